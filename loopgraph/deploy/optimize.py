"""``loopgraph optimize``: save ONNX Runtime's session-optimized graph as a file that reloads.

ORT's session-level optimizer (``SessionOptions.optimized_model_filepath``) fuses inside Loop
bodies as in the main graph (RMSNorm -> SimplifiedLayerNormalization, MatMul+scale -> FusedMatMul,
Gelu, ...). What it writes for a looped graph is not a valid model (measured, onnxruntime 1.32.0,
DESIGN §7), and :func:`repair` fixes each of these:

- **Names repeated across scopes.** A fusion names its Split output ``split_output`` (then
  ``split_output_token_N``) in the main graph *and* in the body; the reload fails with "Graph must
  be in single static assignment (SSA) form". Every name a body defines that the main graph (or an
  enclosing body, or an earlier node of the same body) also defines is renamed inside that body,
  ``loopgraph/body/<name>``, consistently (its producer, its readers in the body and deeper
  subgraphs, the body outputs).
- **Initializers inside the body.** Constant folding in the body stores its results as body
  initializers (16 at BASIC, 26 at EXTENDED on the tiny fixture). loopgraph keeps weights in the
  main graph (ORT's external-data writer duplicates body initializers, DESIGN §5), so they are
  hoisted there, renamed first where the main graph already uses the name.

The saved file then reloads (tested with optimizations disabled, as a pre-optimized file is
meant to be loaded, and at the same level) and gives the same logits as the in-memory session that
wrote it: bit-exact on CPU (the same kernels run the same graph). ``--level all`` adds layout
transforms (NCHWc) tied to the machine's CPU: ORT warns the file may only suit that machine; the
default is ``extended``. The file holds ORT contrib ops, so ``onnx.checker`` does not apply.

Not used: ``onnxruntime.transformers.optimizer.optimize_model`` (the offline transformer
optimizer). On a looped graph ``opt_level=2`` crashes ("Graph is not a DAG": its ONNX-level
pattern matcher walks into the body and sees the outer-scope reads as cycles); ``opt_level=1``
runs but fuses nothing across the Loop boundary (no SkipSimplifiedLayerNormalization between the
Loop output and the next block), so it is no better than ORT's session optimizer, which this uses.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

from loopgraph.errors import LoopgraphError
from loopgraph.metadata import all_graphs, subgraphs
from loopgraph.naming import lg_name

LEVELS = ("basic", "extended", "all")
DEVICES = ("cpu", "cuda")


@dataclasses.dataclass
class OptimizeReport:
    level: str
    device: str
    nodes_before: int  # all graphs
    nodes_after: int
    fused_ops: dict[str, int]  # op types present after but not before, with counts
    renamed: int  # body names renamed (SSA repair)
    hoisted: int  # body initializers moved to the main graph
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format_text(self) -> str:
        fused = ", ".join(f"{v} {k}" for k, v in sorted(self.fused_ops.items())) or "none"
        return (f"optimized at {self.level} for {self.device} in {self.seconds:.1f} s: {self.nodes_before} -> "
                f"{self.nodes_after} nodes; new ops: {fused}\n"
                f"repaired: {self.renamed} body names renamed (repeated across scopes), "
                f"{self.hoisted} body initializers hoisted to the main graph")


def _count_ops(model: onnx.ModelProto) -> dict[str, int]:
    ops: dict[str, int] = {}
    for g in all_graphs(model.graph):
        for n in g.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


# --- repair -------------------------------------------------------------------------------

def _defined(graph: onnx.GraphProto) -> list[str]:
    return [v.name for v in graph.input] + [t.name for t in graph.initializer] + [o for n in graph.node for o in n.output if o]


def _rename_in(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Apply ``mapping`` to every use and definition in ``graph`` and its subgraphs, except in a
    subgraph that defines the name itself (it shadows; it is repaired on its own turn)."""
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        v.name = mapping.get(v.name, v.name)
    for t in graph.initializer:
        t.name = mapping.get(t.name, t.name)
    for n in graph.node:
        n.input[:] = [mapping.get(i, i) for i in n.input]
        n.output[:] = [mapping.get(o, o) for o in n.output]
        for sub in subgraphs(n):
            own = set(_defined(sub))
            _rename_in(sub, {k: v for k, v in mapping.items() if k not in own})


def _repair_body(body: onnx.GraphProto, outer: set[str], taken: set[str]) -> int:
    """Rename names ``body`` defines that are already defined outside (or twice inside)."""
    mapping: dict[str, str] = {}
    seen: set[str] = set()
    for name in _defined(body):
        if name in seen:
            raise RuntimeError(f"ORT wrote {name} twice inside one body")
        if name in outer:
            new = lg_name("body", name)
            k = 1
            while new in taken or new in outer:
                new = lg_name("body", f"{name}_{k}")
                k += 1
            taken.add(new)
            mapping[name] = new
        seen.add(name)
    if mapping:
        _rename_in(body, mapping)
    return len(mapping)


def repair(model: onnx.ModelProto) -> tuple[int, int]:
    """Make ORT's saved graph valid (see the module doc). Returns (renamed, hoisted)."""
    taken = {name for g in all_graphs(model.graph) for name in _defined(g)}
    renamed = 0

    def visit(graph: onnx.GraphProto, outer: set[str]) -> None:
        nonlocal renamed
        scope = outer | set(_defined(graph))
        for n in graph.node:
            for sub in subgraphs(n):
                renamed += _repair_body(sub, scope, taken)
                visit(sub, scope)

    visit(model.graph, set())
    hoisted = 0
    main = {t.name for t in model.graph.initializer}
    for g in list(all_graphs(model.graph))[1:]:
        for t in g.initializer:
            if t.name in main:  # cannot happen after the renaming; guard the invariant
                raise RuntimeError(f"body initializer {t.name} still clashes with the main graph")
            model.graph.initializer.append(t)
            main.add(t.name)
            hoisted += 1
        del g.initializer[:]
    return renamed, hoisted


# --- running ORT -----------------------------------------------------------------------------

def _session_options(level: str):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    return so


def _providers(device: str) -> list[str]:
    import onnxruntime as ort
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise LoopgraphError("--device cuda needs onnxruntime-gpu with its CUDA libraries; this ONNX Runtime offers "
                                 f"{', '.join(ort.get_available_providers())}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def optimize_model(src: str | os.PathLike, level: str = "extended", device: str = "cpu") -> tuple[onnx.ModelProto, OptimizeReport]:
    """ORT-optimize the file at ``src`` and return the repaired graph (weights inline) and a report."""
    import onnxruntime as ort
    if level not in LEVELS:
        raise LoopgraphError(f"unknown --level {level!r}; choose one of {', '.join(LEVELS)}")
    if device not in DEVICES:
        raise LoopgraphError(f"unknown --device {device!r}; choose one of {', '.join(DEVICES)}")
    from loopgraph.onnxio import load_model, resolve_model_path
    src_path = resolve_model_path(src)
    before = _count_ops(load_model(src_path))
    so = _session_options(level)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loopgraph-optimize-") as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(str(src_path), so, providers=_providers(device))
        except Exception as e:  # ORT's own exception types
            raise LoopgraphError(f"ONNX Runtime could not open {src_path}: {str(e).splitlines()[0]}") from None
        model = onnx.load(so.optimized_model_filepath)
    renamed, hoisted = repair(model)
    after = _count_ops(model)
    report = OptimizeReport(level, device, sum(before.values()), sum(after.values()),
                            {k: v for k, v in after.items() if k not in before}, renamed, hoisted, time.perf_counter() - t0)
    return model, report


def optimize_file(src: str | os.PathLike, dest: str | os.PathLike, level: str = "extended", device: str = "cpu",
                  force: bool = False) -> OptimizeReport:
    """Write the repaired optimized graph of ``src`` to ``dest`` atomically (an existing ``dest`` only
    with ``force``; never the input)."""
    from loopgraph.onnxio import check_output, resolve_model_path, save_model
    src_path = resolve_model_path(src)
    dest = Path(dest)
    if dest.exists() and dest.resolve() == src_path.resolve():
        raise LoopgraphError(f"output {dest} is the input file; choose another -o path (the input is never overwritten)")
    check_output(dest, force=force)
    model, report = optimize_model(src_path, level, device)
    if model.ByteSize() >= 2**31:
        raise LoopgraphError("the optimized model is over protobuf's 2 GiB for one file; external-data output is not supported yet")
    save_model(model, dest)
    return report

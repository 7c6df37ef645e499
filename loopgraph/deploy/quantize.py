"""``loopgraph quantize``: int4 / int8 / fp16 copies of an ONNX LM, Loop bodies included.

Built on ONNX Runtime's own tools (loopgraph writes no quantizer):

- ``int4``: ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``, default
  (RTN-style blockwise) algorithm, symmetric (ORT's command-line default), ``MatMulNBits`` nodes
  (QOperator format), accuracy level 4 unless told (int8 activations on CPU: what onnxruntime-genai's
  model builder picks for CPU; level 0 computes in fp32 and decodes SmolLM2 about 1.6x slower).
  Its default algorithm walks subgraphs and looks a weight up along the graph stack, so a MatMul
  in a Loop body that reads a main-graph weight gets its quantized weight added to the **main**
  graph (the body keeps reading it from the outer scope).
- ``int8``: ``onnxruntime.quantization.quantize_dynamic`` with ``EnableSubgraph`` (without it
  the body stays fp32), MatMul only, constant second inputs only (``MatMulConstBOnly``, ORT's
  default for dynamic quantization), signed int8 weights.
- ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)``:
  every graph input and output stays fp32 (the runtime, the KV-cache driver and ``eval`` feed
  and read fp32), the converter puts Casts at the edges; ops in ORT's default block list
  (Max, Min, Range, CumSum, ...) stay fp32 behind Casts.

Measured about these tools (onnxruntime 1.32.0; tests/test_quantize.py holds the evidence):
``MatMulNBitsQuantizer`` quantizes a weight once **per consuming node** (an unrolled file's N
copies, or a main-graph and a body MatMul reading the same weight) and appends one
``W_Q4`` per consumer; its ``clean_initializers`` then drops the later same-name copies as
"unused", so the stored file happens to hold each once. loopgraph does not rely on that:
:func:`_settle_initializers` hoists any body initializer into the main graph, keeps one copy of
same-name identical tensors and treats differing same-name tensors as a bug; the postcondition
checks that no body holds an initializer and no initializer name repeats.

Tied LM heads (SmolLM2, Gemma, ...): Optimum exports ``logits = MatMul(h, Transpose(embed))``, so
the head's weight is *computed* and neither tool converts it; at int4 that fp32 head is most of a
decode step's weight bytes. For int4 / int8, :func:`fold_weight_transposes` first turns each
``Transpose`` of an initializer that feeds a MatMul weight into a transposed initializer (what
ORT's constant folding does at session load anyway, so the fp32 numbers are unchanged, bit-exact);
the tool then quantizes it like any other weight. The embedding Gather keeps reading the fp32
table. fp16 is left as it is: the converter already stores the table in fp16 and ORT folds the
Transpose at load, so folding would only store the table twice.

Handles: original exports, Loop and unrolled rewrites, with or without KV cache (any ``--kv``).
Refuses (:class:`LoopgraphError`, nothing written): an unknown target, a model with no MatMul
reading a constant float weight, an already quantized or fp16 model, bad block size / accuracy
level.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from loopgraph.errors import LoopgraphError
from loopgraph.metadata import all_graphs, props, set_props, subgraphs
from loopgraph.onnxio import is_stub

log = logging.getLogger(__name__)

TARGETS = ("int4", "int8", "fp16")
#: MatMulNBits' compute type when --accuracy-level is not given (the genai model builder's CPU default)
INT4_ACCURACY_LEVEL = 4
#: metadata key recording what ``quantize`` did (target and options)
PRECISION_KEY = "loopgraph.precision"
#: ops that only appear in a model that is already quantized
QUANTIZED_OPS = frozenset({
    "MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul", "GatherBlockQuantized", "MatMulBnb4",
    "QGemm", "QAttention",
})
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


@dataclasses.dataclass
class Candidate:
    """A MatMul (or Gemm: GPT-2's linear layers) whose second input is a constant float weight."""
    level: str  # "main" or "body" (any subgraph)
    node: str
    weight: str
    output: str


@dataclasses.dataclass
class QuantizeReport:
    """What ``quantize`` converted, where, what it left and why, and the sizes."""
    to: str
    options: dict[str, Any]
    converted: dict[str, int]  # {"main": n, "body": n}: MatMul nodes now reading a quantized / fp16 weight
    weights: int  # distinct weights converted (each stored once)
    left: list[dict[str, str]]  # {"level", "node", "reason"}
    size_before: int  # bytes
    size_after: int
    folded: list[str] = dataclasses.field(default_factory=list)  # weights computed by a Transpose, stored transposed first

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format_text(self) -> str:
        c = self.converted
        lines = [f"{self.to}: converted {c['main'] + c['body']} MatMul ({c['main']} in the main graph, "
                 f"{c['body']} in Loop bodies), {self.weights} weights, each stored once",
                 f"size {self.size_before / 1e6:.2f} MB -> {self.size_after / 1e6:.2f} MB "
                 f"({self.size_after / max(self.size_before, 1):.3f}x)"]
        if self.folded:
            lines.append(f"folded {len(self.folded)} transposed weight(s) into initializers first "
                         f"(a tied LM head: {', '.join(self.folded)})")
        reasons: dict[str, int] = {}
        for item in self.left:
            key = f"{item['reason']} ({item['level']})"
            reasons[key] = reasons.get(key, 0) + 1
        lines += [f"left {n} MatMul: {why}" for why, n in reasons.items()]
        return "\n".join(lines)


# --- what the model holds -------------------------------------------------------------------

def _walk(graph: onnx.GraphProto, level: str = "main", outer: dict | None = None) -> Iterator[tuple[str, onnx.GraphProto, dict]]:
    """(level, graph, initializers visible from it) for the graph and every subgraph."""
    visible = {**(outer or {}), **{t.name: t for t in graph.initializer}}
    yield level, graph, visible
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _walk(sub, "body", visible)


def candidates(model: onnx.ModelProto, dtype: int = TensorProto.FLOAT) -> tuple[list[Candidate], list[dict[str, str]]]:
    """MatMuls / Gemms reading a constant weight of ``dtype``; and the other MatMuls with the reason they are not."""
    found, other = [], []
    for level, graph, visible in _walk(model.graph):
        for node in graph.node:
            if node.op_type not in ("MatMul", "Gemm"):
                continue
            w = visible.get(node.input[1])
            if w is None:
                other.append({"level": level, "node": node.name, "reason": "second input is computed, not a weight"})
            elif w.data_type != dtype or len(w.dims) < 2:
                other.append({"level": level, "node": node.name,
                              "reason": f"weight {TensorProto.DataType.Name(w.data_type)} rank {len(w.dims)}"})
            else:
                found.append(Candidate(level, node.name, w.name, node.output[0]))
    return found, other


def quantized_evidence(model: onnx.ModelProto) -> str | None:
    """Why ``model`` counts as already quantized / converted, or None."""
    if PRECISION_KEY in props(model):
        return f"its metadata says {PRECISION_KEY}={props(model)[PRECISION_KEY]}"
    ops: dict[str, int] = {}
    for g in all_graphs(model.graph):
        for n in g.node:
            if n.op_type in QUANTIZED_OPS:
                ops[n.op_type] = ops.get(n.op_type, 0) + 1
    if ops:
        return "it holds " + ", ".join(f"{v} {k}" for k, v in sorted(ops.items()))
    fp16, _ = candidates(model, TensorProto.FLOAT16)
    if fp16:
        return f"{len(fp16)} MatMul already read float16 weights (e.g. {fp16[0].node})"
    return None


def fold_weight_transposes(model: onnx.ModelProto) -> list[str]:
    """In place: every ``Transpose`` of an initializer whose output some MatMul / Gemm reads as its
    weight becomes an initializer of the same name holding the transposed tensor (a tied LM head).
    Returns the folded tensors' names. Other readers of the Transpose's output read the new
    initializer, which holds exactly the values the Transpose computed. A data-less (stub) table
    is left alone, so :func:`quantize_model` refuses it with its own message."""
    from onnx import helper, numpy_helper
    weight_reads = {n.input[1] for g in all_graphs(model.graph) for n in g.node
                    if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1}
    inits = {t.name: t for t in model.graph.initializer}
    folded, keep = [], []
    for n in model.graph.node:
        if n.op_type == "Transpose" and n.input[0] in inits and n.output[0] in weight_reads and not is_stub(inits[n.input[0]]):
            value = numpy_helper.to_array(inits[n.input[0]])
            perm = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "perm"), None)
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value.transpose(perm)), n.output[0]))
            folded.append(n.output[0])
        else:
            keep.append(n)
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return folded


# --- the tools ------------------------------------------------------------------------------

def _int4(model: onnx.ModelProto, block_size: int, accuracy_level: int | None) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    _gemm_as_matmul(model)
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level)
    q.process()
    return q.model.model


def _gemm_as_matmul(model: onnx.ModelProto) -> None:
    """``Gemm(A, W, C)`` (no transposes, alpha = beta = 1) -> ``MatMul(A, W) + C``, in every graph:
    MatMulNBitsQuantizer only rewrites MatMul, and GPT-2's exported linear layers are Gemm. The
    Gemm's output keeps its name (the Add writes it); the MatMul keeps the Gemm's node name. The
    two new names derive from the Gemm's, without the ``loopgraph/`` prefix: that prefix on a node
    marks a file loopgraph has looped (``passes.blocks.is_looped``), and a quantized original is not."""
    from onnx import helper
    for _level, graph, visible in _walk(model.graph):
        nodes = []
        for n in graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            plain = attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 0 and attrs.get("alpha", 1.0) == 1.0 \
                and attrs.get("beta", 1.0) == 1.0
            if n.op_type != "Gemm" or not plain or n.input[1] not in visible:
                nodes.append(n)
                continue
            if len(n.input) < 3 or not n.input[2]:
                nodes.append(helper.make_node("MatMul", n.input[:2], n.output, name=n.name))
                continue
            product = f"{n.output[0]}/matmul"
            nodes += [helper.make_node("MatMul", n.input[:2], [product], name=n.name),
                      helper.make_node("Add", [product, n.input[2]], n.output, name=f"{n.name}/bias_add")]
        del graph.node[:]
        graph.node.extend(nodes)


def _int8(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    with tempfile.TemporaryDirectory(prefix="loopgraph-int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True})
        return onnx.load(str(out))


def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    return convert_float_to_float16(model, keep_io_types=True)


# --- repairs and checks ---------------------------------------------------------------------

def _settle_initializers(model: onnx.ModelProto) -> None:
    """Weights live once, in the main graph: hoist body initializers, drop same-name identical
    copies, refuse same-name different tensors (a tool bug: the file would be ambiguous)."""
    kept: dict[str, TensorProto] = {}
    order: list[TensorProto] = []
    for graph in all_graphs(model.graph):
        for t in graph.initializer:
            seen = kept.get(t.name)
            if seen is None:
                kept[t.name] = t
                order.append(t)
            elif seen.SerializeToString() != t.SerializeToString():
                raise RuntimeError(f"quantizer wrote two different initializers named {t.name}")
    for graph in all_graphs(model.graph):
        del graph.initializer[:]
    model.graph.initializer.extend(order)


def _toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so each runs after its producers (fp16's converter appends its input Casts
    after their readers when the graph has KV-cache inputs; onnx.checker then refuses the file).
    Kahn's algorithm taking the lowest original index first, so a valid order is kept as it is;
    a subgraph's outer-scope reads count as the node's inputs."""
    import heapq
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    users: dict[int, list[int]] = {i: [] for i in range(len(graph.node))}
    indegree = [0] * len(graph.node)
    for i, n in enumerate(graph.node):
        for dep in {producer[t] for t in set(n.input) | _outer_reads(n) if t in producer}:
            users[dep].append(i)
            indegree[i] += 1
    heap = [i for i, d in enumerate(indegree) if d == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        i = heapq.heappop(heap)
        order.append(i)
        for j in users[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                heapq.heappush(heap, j)
    if len(order) != len(graph.node):
        raise RuntimeError(f"graph {graph.name} has a cycle")
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)
    for n in graph.node:
        for sub in subgraphs(n):
            _toposort(sub)


def _produced(graph: onnx.GraphProto) -> set[str]:
    return {o for n in graph.node for o in n.output}


def _outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read but do not define."""
    reads: set[str] = set()
    for sub in subgraphs(node):
        defined = {v.name for v in sub.input} | {t.name for t in sub.initializer} | _produced(sub)
        inner = {i for n in sub.node for i in n.input} | {o.name for o in sub.output}
        inner |= {i for n in sub.node for i in _outer_reads(n)}
        reads |= inner - defined
    return reads


def check_postconditions(model: onnx.ModelProto) -> None:
    """No body initializer, no initializer name twice, no body name shadowing an outer one."""
    names = [t.name for t in model.graph.initializer]
    if len(set(names)) != len(names):
        raise RuntimeError("postcondition: an initializer is stored twice")
    outer = set(names) | {v.name for v in model.graph.input} | {o for n in model.graph.node for o in n.output}
    for graph in list(all_graphs(model.graph))[1:]:
        if graph.initializer:
            raise RuntimeError(f"postcondition: Loop body {graph.name} holds initializers")
        shadow = outer & ({v.name for v in graph.input} | {o for n in graph.node for o in n.output if o})
        if shadow:
            raise RuntimeError(f"postcondition: body names shadow outer names: {sorted(shadow)[:3]}")


def _check_options(to: str, block_size: int, accuracy_level: int | None) -> None:
    if to not in TARGETS:
        raise LoopgraphError(f"unknown --to {to!r}; choose one of {', '.join(TARGETS)}")
    if to == "int4" and (block_size < 16 or block_size & (block_size - 1)):
        raise LoopgraphError(f"--block-size {block_size} must be a power of 2, at least 16 (MatMulNBits' rule)")
    if accuracy_level is not None and (to != "int4" or not 0 <= accuracy_level <= 4):
        raise LoopgraphError(f"--accuracy-level {accuracy_level}: only for --to int4, 0..4 (MatMulNBits' compute types)")


def quantize_model(model: onnx.ModelProto, to: str, block_size: int = 32,
                   accuracy_level: int | None = None) -> tuple[onnx.ModelProto, QuantizeReport]:
    """Return a quantized copy of ``model`` (which must hold its weights) and a report.
    ``model`` is not modified. Validates first, so a refusal changes nothing."""
    _check_options(to, block_size, accuracy_level)
    if to == "int4" and accuracy_level is None:
        accuracy_level = INT4_ACCURACY_LEVEL
    evidence = quantized_evidence(model)
    if evidence:
        raise LoopgraphError(f"the model is already quantized or converted ({evidence}); quantize the fp32 export instead")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    folded = fold_weight_transposes(work) if to in ("int4", "int8") else []
    found, other = candidates(work)
    if not found:
        raise LoopgraphError("the model has no MatMul with a constant float32 weight to quantize "
                             f"({len(other)} MatMul, none reading a weight); give an exported LM")
    weights = {c.weight for c in found}
    if any(is_stub(t) for t in work.graph.initializer if t.name in weights):
        raise ValueError("quantize_model() needs the weights (got onnxio.detach_weights stubs): load the model with its data")
    meta = props(model)
    size_before = model.ByteSize()
    new = {"int4": lambda: _int4(work, block_size, accuracy_level), "int8": lambda: _int8(work),
           "fp16": lambda: _fp16(work)}[to]()
    _settle_initializers(new)
    _toposort(new.graph)
    options = {"block_size": block_size, "accuracy_level": accuracy_level, "symmetric": True} if to == "int4" else {}
    set_props(new, {**meta, PRECISION_KEY: to + "".join(f",{k}={v}" for k, v in options.items() if v is not None)})
    check_postconditions(new)
    left_fp32, _ = candidates(new)
    left_ids = {(c.level, c.output) for c in left_fp32}
    converted = {"main": 0, "body": 0}
    for c in found:
        if (c.level, c.output) not in left_ids:
            converted[c.level] += 1
    left = [{"level": c.level, "node": c.node, "reason": "the tool left its fp32 weight"} for c in left_fp32] + other
    report = QuantizeReport(to, options, converted, len({c.weight for c in found} - {c.weight for c in left_fp32}),
                            left, size_before, new.ByteSize(), folded)
    return new, report


def quantize_file(src: str | os.PathLike, dest: str | os.PathLike, to: str, block_size: int = 32,
                  accuracy_level: int | None = None, force: bool = False) -> QuantizeReport:
    """Quantize the model at ``src`` into ``dest`` (written atomically; an existing ``dest`` only with ``force``;
    never the input). Sizes in the report are the files'."""
    from loopgraph.onnxio import check_output, load_model, resolve_model_path, save_model
    _check_options(to, block_size, accuracy_level)
    src_path = resolve_model_path(src)
    dest = Path(dest)
    if dest.exists() and dest.resolve() == src_path.resolve():
        raise LoopgraphError(f"output {dest} is the input file; choose another -o path (the input is never overwritten)")
    check_output(dest, force=force)
    model = load_model(src_path, load_weights=True)  # the tools need real weights
    new, report = quantize_model(model, to, block_size, accuracy_level)
    del model
    if new.ByteSize() >= 2**31:
        raise LoopgraphError(f"the {to} model is {new.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB for one file; "
                             "external-data output is not supported by quantize yet")
    save_model(new, dest)
    report.size_before, report.size_after = _file_size(src_path), dest.stat().st_size
    return report


def _file_size(path: Path) -> int:
    from loopgraph.onnxio import external_locations
    model = onnx.load(str(path), load_external_data=False)
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in external_locations(model))

"""The range plan: everything the Loop and the unrolled emitters need, worked out before either
changes anything (validate first, then mutate).

A :class:`RangePlan` is built once, by :meth:`RangePass.requires`, from the model, the spec and
the blocks found by the ``find-blocks`` pass. It holds the boundary tensors (``x0`` entering
block ``start``, the range output leaving block ``end - 1``), the body's nodes (chosen by
dataflow, DESIGN §4), the residual stream's dtype and shape, the regularizer and the states it
carries, and the KV slots: which ``past``/``present`` pairs belong to the looped blocks.

Refuses (each a one-line :class:`LoopgraphError` naming the evidence and the fix): a range that
does not resolve against the model's blocks, opset < 13, a residual stream without a known
shape, a range whose intermediate tensors are read after it (the body could not be closed), and
``dynamic`` with the standard KV layout (:func:`loopgraph.passes.kv.check_kv`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper

from loopgraph._version import __version__
from loopgraph.errors import LoopgraphError
from loopgraph.metadata import BLOCKS_KEY, SPEC_KEY, VERSION_KEY, all_graphs, set_props
from loopgraph.naming import PAST_PREFIX, PRESENT_PREFIX, lg_name
from loopgraph.passes.base import Pass, PassResult, Reports
from loopgraph.passes.blocks import BlocksReport
from loopgraph.passes.dataflow import GraphIndex
from loopgraph.passes.kv import check_kv, record_virtual_layers, standard_layout
from loopgraph.passes.regularize import State, carried_states
from loopgraph.regularizers import Regularizer, regularizer
from loopgraph.spec import LoopSpec

MIN_OPSET = 13
ITERS_NAME = lg_name("iters")


def param_name(reg: str) -> str | None:
    """Name of the graph tensor holding the regularizer's parameter (alpha or K)."""
    p = regularizer(reg).param
    return lg_name(p) if p else None


@dataclasses.dataclass(frozen=True)
class KvSlot:
    """One looped block's cache: the past inputs its attention reads and the present outputs it
    writes (key and value each, e.g. ``past_key_values.3.key``/``.value`` -> ``present.3.*``)."""

    layer: str  # "3": the cache index in the names
    past: tuple[str, ...]  # [batch, kv_heads, past, head_dim] each
    present: tuple[str, ...]  # [batch, kv_heads, past + seq, head_dim] each


@dataclasses.dataclass(frozen=True)
class RangePlan:
    spec: LoopSpec  # resolved against the blocks
    blocks: int  # how many blocks the model has
    x0: str  # the residual stream entering block spec.start
    out: str  # ... and leaving block spec.end - 1
    body: tuple[int, ...]  # the body's node indices, in graph order
    at: int  # index of the node producing ``out``: where the Loop (or the copies) go
    dtype: np.dtype  # of the residual stream
    shape: tuple  # [batch, seq, hidden], symbolic dims as strings
    reg: Regularizer
    states: tuple[State, ...]  # carried besides x
    pasts: tuple[str, ...]  # past inputs read in the range, in graph-input order
    presents: tuple[str, ...]  # present outputs written in the range, in graph-output order

    @property
    def kv_slots(self) -> tuple[KvSlot, ...]:
        """The pasts and presents grouped per looped block (by the cache index in their names)."""
        past = {p: _cache_index(p, PAST_PREFIX) for p in self.pasts}
        present = {p: _cache_index(p, PRESENT_PREFIX) for p in self.presents}
        return tuple(KvSlot(n, tuple(p for p in past if past[p] == n), tuple(p for p in present if present[p] == n))
                     for n in dict.fromkeys([*past.values(), *present.values()]))

    @property
    def param_name(self) -> str | None:
        return param_name(self.reg.name)

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Outer-scope scalars: the trip count and the regularizer's parameter (alpha or K)."""
        out = {ITERS_NAME: np.array(self.spec.iters, np.int64)}
        if self.reg.param:
            out[lg_name(self.reg.param)] = np.array(getattr(self.spec, self.reg.param), self.dtype)
        return out

    @property
    def iters_dim(self) -> int | str:
        """The leading dim of per-iteration outputs: N, or a symbol when N is a run-time input."""
        return "loopgraph_iters" if self.spec.dynamic else self.spec.iters

    @property
    def trace_names(self) -> tuple[str, ...]:
        return ("y", "x") if self.spec.trace else ()

    def report_fields(self) -> dict:
        """The fields every range pass reports (see :class:`RangeReport`)."""
        return {"spec": self.spec, "blocks": self.blocks, "kv": self.spec.kv if self.presents else None,
                "range_input": self.x0, "range_output": self.out}


def _cache_index(name: str, prefix: str) -> str:
    """``past_key_values.3.key`` -> ``3``."""
    return name[len(prefix):].rsplit(".", 1)[0]


@dataclasses.dataclass(frozen=True)
class RangeReport:
    spec: LoopSpec  # resolved
    blocks: int
    kv: str | None  # the KV mode, when the range writes caches
    range_input: str
    range_output: str

    @property
    def range(self) -> str:
        return f"{self.spec.start}:{self.spec.end}"


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def hidden_type(model: onnx.ModelProto, name: str) -> tuple[np.dtype, list]:
    """dtype and symbolic shape of the residual stream tensor ``name``."""
    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input)}
    if name not in infos:
        inferred = onnx.shape_inference.infer_shapes(model)
        infos.update({v.name: v for v in inferred.graph.value_info})
    info = infos.get(name)
    if info is None or not info.type.tensor_type.HasField("shape"):
        raise LoopgraphError(f"cannot infer the shape of the range input {name}; "
                             "re-export the model (shape inference found no shape for it)")
    tt = info.type.tensor_type
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tt.shape.dim]
    return helper.tensor_dtype_to_np_dtype(tt.elem_type), shape


def _check_closed(index: GraphIndex, body: set[int], out: str, spec: LoopSpec) -> None:
    """Refuse a range whose intermediate tensors are read after it (or are graph outputs)."""
    for i in sorted(body):
        for t in index.nodes[i].output:
            if t == out or not t:
                continue
            leak = [j for j in index.consumers.get(t, ()) if j not in body]
            if t.startswith(PRESENT_PREFIX) and t in index.graph_outputs and not leak:
                continue  # a looped block's cache output: becomes a Loop scan output
            if leak or t in index.graph_outputs:
                who = index.nodes[leak[0]].name if leak else "a graph output"
                raise LoopgraphError(
                    f"tensor {t} computed inside range {spec.range_str} is also read by {who} "
                    "outside the range, so the range cannot be closed into a Loop body; "
                    "export without extra outputs (e.g. hidden states)")


def build_plan(model: onnx.ModelProto, spec: LoopSpec, blocks: BlocksReport) -> RangePlan:
    """Resolve ``spec`` against the blocks and check everything the emitters rely on."""
    spec = spec.resolve(blocks.count, blocks.strategy)
    if default_opset(model) < MIN_OPSET:
        raise LoopgraphError(f"opset {default_opset(model)} is too old for the rewrite; "
                             f"re-export with --opset {MIN_OPSET} or newer")
    index = GraphIndex(model.graph)
    x0, out = blocks.blocks.blocks[spec.start].input, blocks.blocks.blocks[spec.end - 1].output
    body = index.between(x0, [out])  # a looped block's present feeds its attention, so it is in here
    _check_closed(index, body, out, spec)
    dtype, shape = hidden_type(model, x0)
    reg = regularizer(spec.reg)
    pasts = tuple(v.name for v in model.graph.input if v.name.startswith(PAST_PREFIX)
                  and any(j in body for j in index.consumers.get(v.name, ())))
    presents = tuple(v.name for v in model.graph.output if v.name.startswith(PRESENT_PREFIX)
                     and index.producer.get(v.name) in body)
    check_kv(spec, pasts, presents)  # the standard layout's preconditions (--dynamic needs --kv stacked)
    return RangePlan(spec, blocks.count, x0, out, tuple(sorted(body)), index.producer[out], dtype, tuple(shape), reg,
                     tuple(carried_states(reg, shape, need_r=spec.noise_seed is not None)), pasts, presents)


class RangePass(Pass):
    """What the Loop and the unrolled emitters share: the plan as precondition, and the
    postconditions of the new graph (no body initializer, unique names, no shadowing, declared
    Loop output shapes)."""

    needs: ClassVar[tuple[type, ...]] = (BlocksReport,)

    def __init__(self, spec: LoopSpec) -> None:
        self.spec = spec

    def requires(self, model: onnx.ModelProto, earlier: Reports) -> RangePlan:
        return build_plan(model, self.spec, earlier.get(BlocksReport))

    def ensures(self, result: PassResult) -> None:
        check_postconditions(result.model)


def record_spec(model: onnx.ModelProto, plan: RangePlan) -> None:
    set_props(model, {SPEC_KEY: plan.spec.to_json(), VERSION_KEY: __version__, BLOCKS_KEY: str(plan.blocks)})
    if standard_layout(plan.spec, plan.pasts):
        record_virtual_layers(model, plan.spec, plan.blocks)


def check_postconditions(model: onnx.ModelProto) -> None:
    main = [o for n in model.graph.node for o in n.output if o]
    if len(set(main)) != len(main):
        raise RuntimeError("postcondition: tensor names repeat in the main graph")
    outer = {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input} | set(main)
    for body in list(all_graphs(model.graph))[1:]:
        if body.initializer:
            raise RuntimeError("postcondition: a Loop body holds initializers")
        names = [v.name for v in body.input] + [o for n in body.node for o in n.output if o]
        dup = {n for n in names if names.count(n) > 1} if len(set(names)) != len(names) else set()
        shadow = set(names) & outer
        if dup or shadow:
            raise RuntimeError(f"postcondition: body names repeat ({sorted(dup)[:3]}) or shadow outer names ({sorted(shadow)[:3]})")
    declared = {v.name for v in model.graph.value_info} | {v.name for v in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Loop" and not all(o in declared for o in node.output if o):
            raise RuntimeError("postcondition: a Loop output has no declared shape")

"""Read-only facts about a (looped) ONNX graph, shared by ``check``, ``diff`` and ``view``.

Everything is read from the proto as it is: declared shapes only (no shape inference, which
would copy the weights), constants only when they cannot be overridden at run time.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

from loopgraph.errors import LoopgraphError
from loopgraph.metadata import read_spec, subgraphs
from loopgraph.spec import LoopSpec

#: bits per element of each ONNX data type (strings are counted from their data)
_BITS = {
    onnx.TensorProto.FLOAT: 32, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT16: 16,
    onnx.TensorProto.INT16: 16, onnx.TensorProto.INT32: 32, onnx.TensorProto.INT64: 64, onnx.TensorProto.BOOL: 8,
    onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.DOUBLE: 64, onnx.TensorProto.UINT32: 32, onnx.TensorProto.UINT64: 64,
    onnx.TensorProto.COMPLEX64: 64, onnx.TensorProto.COMPLEX128: 128, onnx.TensorProto.BFLOAT16: 16,
    onnx.TensorProto.FLOAT8E4M3FN: 8, onnx.TensorProto.FLOAT8E4M3FNUZ: 8, onnx.TensorProto.FLOAT8E5M2: 8,
    onnx.TensorProto.FLOAT8E5M2FNUZ: 8, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT4: 4,
    onnx.TensorProto.FLOAT4E2M1: 4,
}

Dim = int | str | None  # a fixed size, a symbolic name, or unknown


def dtype_name(elem_type: int) -> str:
    """``1`` -> ``"float32"`` style names (ONNX enum names, lower case; FLOAT is float32);
    a number ONNX does not define prints as ``unknown(99)`` (a damaged file is still described)."""
    if elem_type not in onnx.TensorProto.DataType.values():
        return f"unknown({elem_type})"
    name = onnx.TensorProto.DataType.Name(elem_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Size of an initializer from its dims and dtype (external data is never opened)."""
    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    return (n * _BITS.get(t.data_type, 0) + 7) // 8


def shape_of(v: onnx.ValueInfoProto) -> list[Dim] | None:
    """Declared shape of ``v`` (None when no shape is declared)."""
    tt = v.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def format_shape(shape: list[Dim] | None) -> str:
    return "?" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def value_infos(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    """Declared types of one graph: value_info, then inputs and outputs (which win)."""
    infos = {v.name: v for v in graph.value_info}
    infos.update({v.name: v for v in graph.input})
    infos.update({v.name: v for v in graph.output})
    return infos


def spec_of(model: onnx.ModelProto) -> LoopSpec | None:
    """The :class:`LoopSpec` recorded by ``loopgraph rewrite``, or None (absent or unreadable:
    the inspection tools report what the graph shows instead of refusing the file)."""
    try:
        return read_spec(model)
    except LoopgraphError:
        return None


def constant_value(name: str, scopes: list[onnx.GraphProto]) -> np.ndarray | None:
    """Value of ``name`` when it is fixed when the model is built: an initializer that no graph
    input overrides, or a ``Constant`` node's output, looked up from the innermost scope out.
    A graph input (even one with a same-named initializer as default) is not constant."""
    for graph in reversed(scopes):
        if any(v.name == name for v in graph.input):
            return None
        for t in graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t) if t.data_location != onnx.TensorProto.EXTERNAL else None
        for node in graph.node:
            if name in node.output:
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                    for a in node.attribute:
                        if a.name == "value":
                            return numpy_helper.to_array(a.t)
                return None
    return None


@dataclasses.dataclass(frozen=True)
class Carried:
    """One loop-carried value: the Loop's initial input, its body input and output, and the
    Loop output that receives the final value."""
    initial: str
    body_in: onnx.ValueInfoProto
    body_out: onnx.ValueInfoProto
    final: str


@dataclasses.dataclass(frozen=True)
class LoopInfo:
    """One ``Loop`` node, in the terms of the ONNX spec: ``Loop(M, cond, v_initial...)`` whose
    body maps ``(iteration_num, cond_in, v...) -> (cond_out, v..., scan...)``."""
    node: onnx.NodeProto
    body: onnx.GraphProto
    scopes: tuple[onnx.GraphProto, ...]  # graphs enclosing the node, outermost first
    trip_count: str  # "" when M is omitted
    cond: str  # "" when cond is omitted
    carried: tuple[Carried, ...]
    scan_outputs: tuple[tuple[onnx.ValueInfoProto, str], ...]  # (body output, Loop output)

    @property
    def name(self) -> str:
        return self.node.name or f"Loop -> {', '.join(self.node.output)}"

    @property
    def trip_value(self) -> int | None:
        """M when it is a build-time constant (None when omitted or a run-time value)."""
        if not self.trip_count:
            return None
        value = constant_value(self.trip_count, list(self.scopes))
        return None if value is None or value.size != 1 else int(value.reshape(()))


def loops(model: onnx.ModelProto) -> list[LoopInfo]:
    """Every ``Loop`` node of the model, including Loops nested in subgraphs."""
    found: list[LoopInfo] = []

    def walk(graph: onnx.GraphProto, scopes: tuple[onnx.GraphProto, ...]) -> None:
        scopes = scopes + (graph,)
        for node in graph.node:
            if node.op_type == "Loop" and node.domain in ("", "ai.onnx"):
                found.append(_loop_info(node, scopes))
            for sub in subgraphs(node):
                walk(sub, scopes)

    walk(model.graph, ())
    return found


def _loop_info(node: onnx.NodeProto, scopes: tuple[onnx.GraphProto, ...]) -> LoopInfo:
    body = next(subgraphs(node))
    inputs = list(node.input) + [""] * max(0, 2 - len(node.input))
    n_carried = len(inputs) - 2
    body_in, body_out = list(body.input), list(body.output)
    if len(body_in) != n_carried + 2 or len(body_out) < n_carried + 1:
        raise LoopgraphError(f"Loop {node.name!r} is malformed: {len(inputs)} inputs but its body has "
                             f"{len(body_in)} inputs and {len(body_out)} outputs; re-create the Loop")
    outputs = list(node.output) + [""] * (len(body_out) - 1 - len(node.output))
    carried = tuple(Carried(inputs[2 + i], body_in[2 + i], body_out[1 + i], outputs[i]) for i in range(n_carried))
    scans = tuple((body_out[1 + n_carried + j], outputs[n_carried + j]) for j in range(len(body_out) - 1 - n_carried))
    return LoopInfo(node, body, scopes, inputs[0], inputs[1], carried, scans)

"""The dtype and shape of the residual stream, also in quantized and contrib-op graphs.

The Loop's carried state needs a declared ``[batch, seq, hidden]`` type. Three sources, in order:

1. what the model declares (``value_info``, graph inputs);
2. ONNX shape inference. It stops at ops it does not know: after ``MatMulNBits`` (int4) or
   other ``com.microsoft`` ops every later tensor has no type;
3. **the hidden size read from the weights** (our choice over ORT's symbolic shape inference,
   because the rewrite runs on weight-less stubs, where symbolic inference cannot fold the
   small constant initializers it needs, and it keeps the rewrite free of an ORT import): walk
   back from the tensor through shape-preserving ops (elementwise, Cast, normalizations) to a
   node that fixes the last axis and the float type from a weight: ``MatMul(x, W)`` (``W``'s
   last dim and dtype), ``MatMulNBits`` (its ``N`` attribute, the scales' dtype), ``Gather(W, ids)``
   (an embedding), ``Gemm``. ``Cast`` sets the dtype on the way. The leading axes are those
   of ``input_ids`` (``[batch, seq]``) — a decoder's residual stream keeps them.

Stubs from :func:`loopgraph.onnxio.detach_weights` keep name, dtype and dims, which is all
step 3 reads. When every source fails, the error names the tensor and what each source found.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from loopgraph.errors import LoopgraphError

#: ops whose output has the shape and dtype of their first float input (broadcast partners aside)
SAME_SHAPE = frozenset({
    "Add", "Sub", "Mul", "Div", "Identity", "Relu", "Sigmoid", "Tanh", "Erf", "Neg", "Sqrt", "Pow", "Softmax",
    "Where", "Gelu", "FastGelu", "QuickGelu", "BiasGelu", "SimplifiedLayerNormalization", "LayerNormalization",
    "SkipSimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization", "Dropout",
})
MAX_STEPS = 2000


def residual_type(model: onnx.ModelProto, name: str) -> tuple[np.dtype, list]:
    """dtype and symbolic shape of the residual-stream tensor ``name`` (see the module doc)."""
    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input)}
    info = infos.get(name)
    if info is None or not _has_shape(info):
        info = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}.get(name)
    if info is not None and _has_shape(info):
        tt = info.type.tensor_type
        return helper.tensor_dtype_to_np_dtype(tt.elem_type), [_dim(d) for d in tt.shape.dim]
    contrib = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    tried = ["no value_info declares it", "ONNX shape inference found none" + (f" (it stops at {', '.join(contrib[:3])})" if contrib else "")]
    found, why = _from_weights(model, name)
    if found is None:
        tried.append(why)
        raise LoopgraphError(f"cannot find the dtype and shape of the range input {name}: " + "; ".join(tried)
                             + ". Add a value_info for it to the model (e.g. with onnxruntime.tools.symbolic_shape_infer)")
    dtype, hidden = found
    lead = _token_dims(model)
    if lead is None:
        raise LoopgraphError(f"cannot find the shape of the range input {name}: " + "; ".join(tried)
                             + f"; the weights give hidden size {hidden}, but the model has no rank-2 input_ids input "
                             "for the [batch, seq] axes. Add a value_info for it to the model")
    return dtype, lead + [hidden]


def _has_shape(info: onnx.ValueInfoProto) -> bool:
    tt = info.type.tensor_type
    return tt.elem_type != 0 and tt.HasField("shape")


def _dim(d) -> str | int | None:
    return d.dim_param or (d.dim_value if d.HasField("dim_value") else None)


def _token_dims(model: onnx.ModelProto) -> list | None:
    ids = next((v for v in model.graph.input if v.name == "input_ids"), None)
    if ids is None or len(ids.type.tensor_type.shape.dim) != 2:
        return None
    return [_dim(d) for d in ids.type.tensor_type.shape.dim]


def _from_weights(model: onnx.ModelProto, name: str) -> tuple[tuple[np.dtype, int] | None, str]:
    """(dtype, hidden) from the weights behind ``name``, or (None, what the walk saw)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    # depth first, inputs in order; each entry carries the dtype of the nearest Cast on its path
    stack: list[tuple[str, int | None]] = [(name, None)]
    seen: set[str] = set()
    stopped: list[str] = []
    while stack and len(seen) < MAX_STEPS:
        t, cast_to = stack.pop()
        if t in seen or t in inits or t not in producer:
            continue
        seen.add(t)
        node = producer[t]
        got = _weight_fact(node, inits)
        if got is not None:
            elem, hidden = got
            return (helper.tensor_dtype_to_np_dtype(cast_to or elem), hidden), ""
        if node.op_type == "Cast":
            stack.append((node.input[0], cast_to or next(a.i for a in node.attribute if a.name == "to")))
        elif node.op_type in SAME_SHAPE:
            stack.extend((i, cast_to) for i in reversed(node.input) if i and i not in inits)
        else:
            stopped.append(f"{node.op_type} {node.name}")
    where = f"; it stopped at {', '.join(stopped[:3])}" if stopped else ""
    return None, f"walking back to a weight (MatMul, MatMulNBits, Gather, Gemm) found none{where}"


def _weight_fact(node: onnx.NodeProto, inits: dict) -> tuple[int, int] | None:
    """(float dtype, last dim) fixed by a weight this node reads, or None."""
    def attr(key: str) -> int | None:
        return next((a.i for a in node.attribute if a.name == key), None)
    if node.op_type == "MatMulNBits" and len(node.input) > 2 and node.input[2] in inits:
        return inits[node.input[2]].data_type, attr("N")
    if node.op_type in ("MatMul", "Gather", "Gemm"):
        w = inits.get(node.input[1] if node.op_type != "Gather" else node.input[0])
        if w is None or w.data_type not in _FLOATS or len(w.dims) < 2:
            return None
        last = w.dims[-2] if node.op_type == "Gemm" and attr("transB") else w.dims[-1]
        return w.data_type, int(last)
    return None


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)

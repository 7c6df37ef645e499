"""Work skipping for halting files that may stop early: an iteration computes only what a moving token needs.

A Loop that freezes tokens still computes every token at every iteration it runs, so its cost
follows the iterations the Loop ran (the batch's slowest token). Two cuts make the cost follow the
moving tokens instead, and neither changes a real token's result:

- **rows**: a row with no moving real token is not fed through the range (rows never meet in
  attention, so the other rows' results do not depend on it);
- **the frozen tail**: the range runs on positions ``[0, L)``, L = 1 + the last position of a moving
  real token in the rows still computed. A decoder is causal: a token's result depends only on the
  tokens at or before it, so cutting positions ≥ L changes nothing at positions < L, and every token
  at ≥ L is frozen or padding.

So at iteration t the range is run on ``rows × [0, L)``; tokens outside it are **held** (their x and
carried states keep their values, as a frozen token's do). For a real token "held" is exactly
"frozen": a moving real token is always inside. A padding token outside the window is held too (it
counts as frozen from then on); padding carries no meaning and never holds the loop.

The range reads tensors from the outer scope that have batch or sequence axes (the causal mask,
rotary cos/sin); they are cut the same way. Their axes come from ONNX Runtime's symbolic shape
inference: an axis whose symbol is the residual stream's batch symbol is gathered, one whose symbol is
its sequence symbol is sliced. When that cannot be told for every such tensor (an unknown symbol, a
shape value computed outside the range and read inside), the file is written without skipping and the
reason is reported (:attr:`Skipping.reason`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from loopgraph.onnxio import is_stub
from loopgraph.passes.build import BodyBuilder, replace_tensor

FLOAT_OR_BOOL = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
                 onnx.TensorProto.BOOL}
LARGE = 4096  # initializers with this many elements are weights: shape inference sees only their type


@dataclasses.dataclass(frozen=True)
class Skipping:
    """What is cut per outer tensor: name -> (batch axis or None, sequence axes). ``reason`` is set
    (and ``axes`` empty) when skipping is off."""
    axes: dict[str, tuple[int | None, tuple[int, ...]]]
    reason: str | None = None

    @property
    def on(self) -> bool:
        return self.reason is None


def outer_inputs(nodes: list[gs.Node], x0: gs.Tensor) -> list[gs.Variable]:
    """The computed tensors the range reads from outside itself (not constants, not ``x0``)."""
    inside = {id(n) for n in nodes}
    seen: dict[str, gs.Variable] = {}
    for node in nodes:
        for t in node.inputs:
            if not isinstance(t, gs.Variable) or t is x0 or not t.name or t.name in seen:
                continue
            producer = t.inputs[0] if t.inputs else None
            if producer is not None and (id(producer) in inside or producer.op == "Constant"):
                continue
            seen[t.name] = t
    return list(seen.values())


class Dims:
    """Tensor dims from ONNX Runtime's symbolic shape inference: ``dims(name)`` is a list of symbols and
    ints, or None when unknown."""

    def __init__(self, inferred: onnx.ModelProto) -> None:
        self.types = {v.name: v.type.tensor_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}

    def __call__(self, name: str) -> list | None:
        t = self.types.get(name)
        return None if t is None or not t.HasField("shape") else [d.dim_param or d.dim_value for d in t.shape.dim]

    def is_float_or_bool(self, name: str) -> bool:
        return self.types[name].elem_type in FLOAT_OR_BOOL


def infer_dims(model: onnx.ModelProto) -> tuple[Dims | None, str | None]:
    """:class:`Dims` of ``model`` (its weights' data left out), or None and why inference failed."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        return Dims(SymbolicShapeInference.infer_shapes(_graph_only(model), auto_merge=True)), None
    except Exception as e:  # an op it does not know, or no onnxruntime: the file is still right, only slower
        return None, f"ONNX Runtime's symbolic shape inference failed ({type(e).__name__}: {str(e)[:120]})"


def plan_skipping(model: onnx.ModelProto, x0: str, outer: list[str]) -> Skipping:
    """The axes to cut of each outer tensor (module docstring), or why skipping is off."""
    dims, reason = infer_dims(model)
    if reason:
        return Skipping({}, reason)
    x_dims = dims(x0)
    if not x_dims or len(x_dims) != 3 or not all(isinstance(d, str) and d for d in x_dims[:2]) or x_dims[0] == x_dims[1]:
        return Skipping({}, f"the residual stream {x0} has no symbolic [batch, seq] axes ({x_dims})")
    batch, seq = x_dims[0], x_dims[1]
    axes: dict[str, tuple[int | None, tuple[int, ...]]] = {}
    for name in outer:
        d = dims(name)
        if d is None:
            return Skipping({}, f"the range reads {name}, whose shape is unknown")
        if not dims.is_float_or_bool(name) and (batch in d or seq in d or len(d) <= 1):
            return Skipping({}, f"the range reads {name} ({d}), an integer tensor that may hold the batch or sequence size")
        unknown = [x for x in d if isinstance(x, str) and x not in (batch, seq)]
        if unknown:
            return Skipping({}, f"the range reads {name}, whose axes {d} are not all the batch or sequence axis or fixed")
        b_axes = [i for i, x in enumerate(d) if x == batch]
        s_axes = tuple(i for i, x in enumerate(d) if x == seq)
        if len(b_axes) > 1:
            return Skipping({}, f"the range reads {name} ({d}), with more than one batch axis")
        if b_axes or s_axes:
            axes[name] = (b_axes[0] if b_axes else None, s_axes)
    return Skipping(axes)


def _graph_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference without the weights' data: every initializer that is a data-less
    stub (:func:`loopgraph.onnxio.detach_weights`, which symbolic inference would try to read) or
    large (whose values no shape depends on) becomes a graph input of the same type and dims."""
    src = model.graph
    weight = [t for t in src.initializer if np.prod(t.dims) >= LARGE or is_stub(t)]
    names = {t.name for t in weight}
    graph = onnx.helper.make_graph(list(src.node), src.name, list(src.input) + [
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weight], list(src.output),
        [t for t in src.initializer if t.name not in names], value_info=list(src.value_info))
    return onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


@dataclasses.dataclass
class Window:
    """One iteration's cut: the computed rows, the length L, and which tokens are held."""
    rows: gs.Tensor  # [k] int64
    length: gs.Tensor  # [1] int64: L
    held: gs.Tensor  # [batch, seq, 1] bool: frozen before this iteration, or outside the window
    dims: gs.Tensor  # [3] int64: Shape(x_prev)
    seq: gs.Tensor  # [1] int64: the full sequence length


def window(b: BodyBuilder, x_prev: gs.Tensor, frozen_prev: gs.Tensor, real: gs.Tensor | None, shape: list) -> Window:
    """rows = rows with a moving real token; L = 1 + the last position of one; held = frozen or outside."""
    i64, i32, bl = np.int64, np.int32, np.bool_
    bs = list(shape[:2])
    moving = b.op("Not", frozen_prev, dtype=bl, shape=frozen_prev.shape, name="skip_moving")
    if real is not None:
        moving = b.op("And", moving, real, dtype=bl, shape=frozen_prev.shape, name="skip_real_moving")
    m = b.op("Cast", b.op("Squeeze", moving, b.const(np.array([-1], i64), "skip_last_axis"), dtype=bl, shape=bs, name="skip_moving2d"),
             attrs={"to": onnx.TensorProto.INT32}, dtype=i32, shape=bs, name="skip_moving_i32")
    per_row = b.op("ReduceSum", m, b.const(np.array([1], i64), "skip_seq_axis"), attrs={"keepdims": 0}, dtype=i32, shape=bs[:1], name="skip_per_row")
    zero = b.const(np.array(0, i32), "skip_zero_i32")
    row_on = b.op("Greater", per_row, zero, dtype=bl, shape=bs[:1], name="skip_row_on")
    rows = b.op("Reshape", b.op("NonZero", row_on, dtype=i64, shape=[1, "k"], name="skip_rows_nz"), b.const(np.array([-1], i64), "skip_flat"),
                dtype=i64, shape=["k"], name="skip_rows")
    per_pos = b.op("ReduceSum", m, b.const(np.array([0], i64), "skip_batch_axis"), attrs={"keepdims": 0}, dtype=i32, shape=bs[1:], name="skip_per_pos")
    pos_on = b.op("Cast", b.op("Greater", per_pos, zero, dtype=bl, shape=bs[1:], name="skip_pos_on_b"), attrs={"to": onnx.TensorProto.INT64},
                  dtype=i64, shape=bs[1:], name="skip_pos_on")
    dims = b.op("Shape", x_prev, dtype=i64, shape=[3], name="skip_x_shape")
    seq1 = b.op("Slice", dims, b.const(np.array([1], i64), "skip_s1"), b.const(np.array([2], i64), "skip_s2"), dtype=i64, shape=[1], name="skip_seq1")
    seq = b.op("Squeeze", seq1, b.const(np.array([0], i64), "skip_axis0"), dtype=i64, shape=[], name="skip_seq")
    one = b.const(np.array(1, i64), "skip_one")
    upto = b.op("Range", one, b.op("Add", seq, one, dtype=i64, shape=[], name="skip_seq_plus_one"), one, dtype=i64, shape=bs[1:], name="skip_one_to_s")
    length = b.op("ReduceMax", b.op("Mul", pos_on, upto, dtype=i64, shape=bs[1:], name="skip_ends"), attrs={"keepdims": 1}, dtype=i64, shape=[1],
                  name="skip_length")
    inside = b.op("And", b.op("Unsqueeze", row_on, b.const(np.array([1], i64), "skip_ax1"), dtype=bl, shape=[bs[0], 1], name="skip_row_col"),
                  b.op("Unsqueeze", b.op("LessOrEqual", upto, length, dtype=bl, shape=bs[1:], name="skip_in_len"), b.const(np.array([0], i64), "skip_ax0"),
                       dtype=bl, shape=[1, bs[1]], name="skip_pos_row"), dtype=bl, shape=bs, name="skip_inside2d")
    outside = b.op("Not", b.op("Unsqueeze", inside, b.const(np.array([-1], i64), "skip_ax_last"), dtype=bl, shape=frozen_prev.shape, name="skip_inside"),
                   dtype=bl, shape=frozen_prev.shape, name="skip_outside")
    held = b.op("Or", frozen_prev, outside, dtype=bl, shape=frozen_prev.shape, name="skip_held")
    return Window(rows, length, held, dims, seq1)


def cut(b: BodyBuilder, t: gs.Tensor, batch_axis: int | None, seq_axes: tuple[int, ...], w: Window, name: str) -> gs.Variable:
    """``t`` restricted to the window's rows (Gather on ``batch_axis``) and positions ``[0, L)`` (Slice on ``seq_axes``)."""
    out = t
    if batch_axis is not None:
        out = b.op("Gather", out, w.rows, attrs={"axis": batch_axis}, dtype=t.dtype, name=f"{name}_rows")
    if seq_axes:
        n = len(seq_axes)
        ends = w.length if n == 1 else b.op("Tile", w.length, b.const(np.array([n], np.int64), f"{name}_n"), dtype=np.int64, shape=[n], name=f"{name}_ends")
        out = b.op("Slice", out, b.const(np.zeros(n, np.int64), f"{name}_starts"), ends, b.const(np.array(seq_axes, np.int64), f"{name}_axes"),
                   dtype=t.dtype, name=f"{name}_cut")
    return out


def apply(b: BodyBuilder, nodes: list[gs.Node], x_prev: gs.Tensor, frozen_prev: gs.Tensor, real: gs.Tensor | None, skipping: Skipping,
          outer: dict[str, gs.Variable], shape: list) -> Window:
    """Make the range (``nodes``, which read ``x_prev``) run on the window: x_prev and the outer
    tensors they read are cut. The caller puts the range's output back with :func:`uncut`."""
    w = window(b, x_prev, frozen_prev, real, shape)
    x_cut = cut(b, x_prev, 0, (1,), w, "skip_x")
    x_cut.shape = [None, None, shape[-1]]
    for k, (name, (batch_axis, seq_axes)) in enumerate(skipping.axes.items()):
        short = cut(b, outer[name], batch_axis, seq_axes, w, f"skip_outer{k}")
        for node in nodes:
            replace_tensor(node.inputs, outer[name], short)
    for node in nodes:
        replace_tensor(node.inputs, x_prev, x_cut)
    return w


def uncut(b: BodyBuilder, y_cut: gs.Tensor, w: Window, shape: list) -> gs.Variable:
    """The range's output on the window, put back at full size: NaN outside (rows left out, positions >= L;
    every such token is held, so the value is never used)."""
    i64, dt = np.int64, b.dtype
    tail = b.op("Sub", w.seq, w.length, dtype=i64, shape=[1], name="skip_tail")
    z = b.const(np.array([0], i64), "skip_pad0")
    pads = b.op("Concat", z, z, z, z, tail, z, attrs={"axis": 0}, dtype=i64, shape=[6], name="skip_pads")
    nan = b.const(np.array(np.nan, dt), "skip_nan")
    padded = b.op("Pad", y_cut, pads, nan, attrs={"mode": "constant"}, dtype=dt, shape=["k", shape[1], shape[-1]], name="skip_y_padded")
    filler = b.op("Expand", nan, w.dims, dtype=dt, shape=list(shape), name="skip_y_filler")
    idx = b.op("Unsqueeze", w.rows, b.const(np.array([1], i64), "skip_rows_ax"), dtype=i64, shape=["k", 1], name="skip_rows_idx")
    return b.op("ScatterND", filler, idx, padded, dtype=dt, shape=list(shape), name="skip_y")

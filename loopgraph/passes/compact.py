"""Held K/V (``spec.halt_kv == "held"``): an iteration computes only the moving tokens.

Under the ``live`` rule a frozen token is still fed through the range, because its K/V at every
looped block after the first depend on the other tokens' states of that iteration and a moving token
attends to them. The ``held`` rule gives a frozen token's K/V another meaning: **at every looped
attention, the K/V of a token not computed at iteration t are the ones of the last iteration that
computed it** (as early-exit decoders copy a finished token's states). Nothing of a frozen token is
computed any more, so an iteration costs what its moving tokens cost.

Per iteration (every tensor below is built in the body):

- the computed tokens are ``real and not frozen``; ``rows`` = the rows holding one, ``M`` = the most
  computed tokens of a row, ``idx`` [k, M] = each row's computed positions in order, padded with
  other positions of the row (their results are discarded and their K/V are not written);
- x and the outer tensors the range reads (rotary cos/sin: the sequence axis; the causal mask: the
  query axis, its key axis stays whole) are gathered to ``[k, M]``;
- at each attention, the K and V of the computed tokens ``[k, heads, M, d]`` are scattered into the
  held K/V of the row ``[k, heads, S, d]`` (a Loop-carried value per tensor, zeros before the first
  iteration): queries come from the computed tokens, keys and values from every position;
- the range's output is scattered back to ``[batch, S]`` (NaN where nothing was computed).

A token outside the computed set is *held*: x and the carried states keep their values
(:func:`loopgraph.passes.halt.step`). Padding is never computed (its K/V stay zero; the mask keeps
real tokens from attending to it) and counts as frozen. The attention's K and V are found by
dataflow: from each Softmax up to the MatMul of the scores and down to the MatMul with V, then up
through layout and scaling ops to the first tensor of shape ``[batch, heads, seq, d]``: the rotary
K and the V that a with-past export would cache, before any repeat of the K/V heads.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from loopgraph.naming import lg_name
from loopgraph.passes.build import BodyBuilder, replace_tensor
from loopgraph.passes.skip import infer_dims

LAYOUT = {"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Identity", "Cast", "Mul", "Div"}  # on the way from K/V to the MatMuls
SCORES = {"Add", "Where", "Mul", "Div", "Sub", "Cast", "Identity", "Tanh"}  # from the scores' MatMul to the Softmax
PROBS = {"Where", "Cast", "Identity", "Dropout"}  # from the Softmax to the MatMul with V


@dataclasses.dataclass(frozen=True)
class Compaction:
    """How the range is compacted: each outer tensor's (batch axis or None for a leading 1, query
    axis, rank), and the K/V tensors to hold, by name, with their sequence axis (1 or 2) and dims
    (``"batch"``, ``"seq"`` and fixed ints). ``reason`` is set (the rest empty) when it cannot be done."""
    outer: dict[str, tuple[int | None, int, int]]
    kv: dict[str, tuple[int, list]]
    reason: str | None = None


def plan_compaction(model: onnx.ModelProto, x0: str, outer: list[str], nodes: list[gs.Node]) -> Compaction:
    """The outer tensors' axes and the attentions' K/V (module docstring), or why not."""
    dims, reason = infer_dims(model)
    if reason:
        return Compaction({}, {}, reason)
    x_dims = dims(x0)
    if not x_dims or len(x_dims) != 3 or not all(isinstance(d, str) and d for d in x_dims[:2]) or x_dims[0] == x_dims[1]:
        return Compaction({}, {}, f"the residual stream {x0} has no symbolic [batch, seq] axes ({x_dims})")
    batch, seq = x_dims[0], x_dims[1]
    axes: dict[str, tuple[int | None, int, int]] = {}
    for name in outer:
        d = dims(name)
        if d is None:
            return Compaction({}, {}, f"the range reads {name}, whose shape is unknown")
        if not dims.is_float_or_bool(name) and (batch in d or seq in d or len(d) <= 1):
            return Compaction({}, {}, f"the range reads {name} ({d}), an integer tensor that may hold the batch or sequence size")
        if [x for x in d if isinstance(x, str) and x not in (batch, seq)]:
            return Compaction({}, {}, f"the range reads {name}, whose axes {d} are not all the batch or sequence axis or fixed")
        b_axes = [i for i, x in enumerate(d) if x == batch]
        s_axes = [i for i, x in enumerate(d) if x == seq]
        if not s_axes:
            if b_axes:
                return Compaction({}, {}, f"the range reads {name} ({d}), with a batch axis but no sequence axis")
            continue
        if b_axes != [0] and not (not b_axes and d[0] == 1 and s_axes[0] > 0):
            return Compaction({}, {}, f"the range reads {name} ({d}): its batch axis is not the first, nor is a leading 1 there")
        axes[name] = (0 if b_axes else None, s_axes[0], len(d))  # the first sequence axis is the query axis (the mask's [b, 1, q, k])
    kv, reason = _attention_kv(nodes, dims, batch, seq)
    if reason:
        return Compaction({}, {}, reason)
    return Compaction(axes, kv)


def _attention_kv(nodes: list[gs.Node], dims, batch: str, seq: str) -> tuple[dict[str, tuple[int, list]], str | None]:
    inside = {id(n) for n in nodes}

    def producer(t: gs.Tensor) -> gs.Node | None:
        p = t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None
        return p if p is not None and id(p) in inside else None

    def up_to(t: gs.Tensor, ops: set[str], target: str, depth: int = 8) -> gs.Node | None:
        p = producer(t)
        if p is None or depth == 0:
            return None
        if p.op == target:
            return p
        if p.op not in ops:
            return None
        return next((n for n in (up_to(i, ops, target, depth - 1) for i in p.inputs) if n is not None), None)

    def head_tensor(t: gs.Tensor) -> gs.Variable | None:
        """The furthest tensor up the layout chain from ``t`` of shape [batch, heads, seq, d] or [batch, seq, heads, d]."""
        found, seen = None, 0
        while isinstance(t, gs.Variable) and seen < 12:
            d = dims(t.name)
            if d and len(d) == 4 and d[0] == batch and seq in d[1:3] and all(isinstance(x, int) for i, x in enumerate(d) if i in (1, 2, 3) and x != seq):
                found = t
            p = producer(t)
            if p is None or p.op not in LAYOUT:
                break
            ins = [i for i in p.inputs if isinstance(i, gs.Variable) and producer(i) is not None and dims(i.name) and len(dims(i.name)) >= 3]
            if len(ins) != 1:
                break
            t, seen = ins[0], seen + 1
        return found

    kv: dict[str, tuple[int, list]] = {}
    softmaxes = [n for n in nodes if n.op == "Softmax"]
    if not softmaxes:
        return {}, "no Softmax (attention) in the range"
    for sm in softmaxes:
        qk = up_to(sm.inputs[0], SCORES, "MatMul")
        pv, t = None, sm.outputs[0]
        for _ in range(4):
            consumers = [c for c in t.outputs if id(c) in inside]
            mm = next((c for c in consumers if c.op == "MatMul" and c.inputs[0] is t), None)
            if mm is not None:
                pv = mm
                break
            nxt = [c for c in consumers if c.op in PROBS]
            if len(nxt) != 1:
                break
            t = nxt[0].outputs[0]
        if qk is None or pv is None:
            return {}, f"the attention around {sm.name} is not MatMul -> Softmax -> MatMul"
        for side, mm in (("K", qk), ("V", pv)):
            h = head_tensor(mm.inputs[1])
            if h is None:
                return {}, f"no [batch, heads, seq, d] {side} tensor found before {mm.name}"
            d = dims(h.name)
            kv[h.name] = (d.index(seq), ["batch", *("seq" if x == seq else x for x in d[1:])])
    return kv, None


@dataclasses.dataclass
class Compacted:
    """One iteration's compaction: the held mask for :func:`loopgraph.passes.halt.step`, the new held K/V."""
    held: gs.Tensor  # [batch, seq, 1] bool: not computed at this iteration
    kv_out: list[gs.Tensor]  # [batch, heads, seq, d] per held K/V, in Compaction.kv order
    rows: gs.Tensor  # [k] int64: the rows with a computed token
    idx: gs.Tensor  # [k, M] int64: their computed positions, then padding slots
    valid: gs.Tensor  # [k, M, 1] bool: the slot holds a computed token (not padding)
    dims: gs.Tensor  # [3] int64: Shape(x_prev)


def kv_inputs(comp: Compaction, dtype) -> list[gs.Variable]:
    """The body inputs of the held K/V, one per tensor of ``comp.kv``."""
    return [gs.Variable(lg_name("body", f"held{k}_prev"), dtype, d) for k, (_, d) in enumerate(comp.kv.values())]


def kv_initial(pre: BodyBuilder, x0: gs.Tensor, comp: Compaction) -> list[gs.Variable]:
    """Zeros of each held K/V's shape ([batch, heads, seq, d] or [batch, seq, heads, d]), before the Loop."""
    i64 = np.int64
    dims = pre.op("Shape", x0, dtype=i64, shape=[3], name="held_x0_shape")
    b = pre.op("Slice", dims, pre.const(np.array([0], i64), "held_b0"), pre.const(np.array([1], i64), "held_b1"), dtype=i64, shape=[1], name="held_batch")
    s = pre.op("Slice", dims, pre.const(np.array([1], i64), "held_s0"), pre.const(np.array([2], i64), "held_s1"), dtype=i64, shape=[1], name="held_seq")
    out = []
    for k, (_, d) in enumerate(comp.kv.values()):
        parts = [b if x == "batch" else s if x == "seq" else pre.const(np.array([x], i64), f"held{k}_dim{i}") for i, x in enumerate(d)]
        shape = pre.op("Concat", *parts, attrs={"axis": 0}, dtype=i64, shape=[len(d)], name=f"held{k}_shape")
        zero = gs.Constant(lg_name("init", f"held{k}_zero"), np.zeros([1], pre.dtype))
        out.append(pre.op("ConstantOfShape", shape, attrs={"value": zero}, dtype=pre.dtype, shape=d, name=f"held{k}_0"))
    return out


def apply(b: BodyBuilder, nodes: list[gs.Node], x_prev: gs.Tensor, frozen_prev: gs.Tensor, real: gs.Tensor | None, comp: Compaction,
          outer: dict[str, gs.Variable], kv_in: list[gs.Variable], shape: list) -> Compacted:
    """Make the range (``nodes``, which read ``x_prev``) run on the computed tokens only, with held K/V.
    The caller puts the range's output back with :func:`scatter_back`."""
    i64, bl = np.int64, np.bool_
    bs = list(shape[:2])
    on = b.op("Not", frozen_prev, dtype=bl, shape=frozen_prev.shape, name="held_not_frozen")
    if real is not None:
        on = b.op("And", on, real, dtype=bl, shape=frozen_prev.shape, name="held_computed")
    on2d = b.op("Squeeze", on, b.const(np.array([-1], i64), "held_last"), dtype=bl, shape=bs, name="held_computed2d")
    on_i = b.op("Cast", on2d, attrs={"to": onnx.TensorProto.INT64}, dtype=i64, shape=bs, name="held_computed_i64")
    per_row = b.op("ReduceSum", on_i, b.const(np.array([1], i64), "held_seq_axis"), attrs={"keepdims": 0}, dtype=i64, shape=bs[:1], name="held_per_row")
    row_on = b.op("Greater", per_row, b.const(np.array(0, i64), "held_zero"), dtype=bl, shape=bs[:1], name="held_row_on")
    rows = b.op("Reshape", b.op("NonZero", row_on, dtype=i64, shape=[1, "k"], name="held_rows_nz"), b.const(np.array([-1], i64), "held_flat"),
                dtype=i64, shape=["k"], name="held_rows")
    m = b.op("ReduceMax", per_row, attrs={"keepdims": 1}, dtype=i64, shape=[1], name="held_m")
    dims = b.op("Shape", x_prev, dtype=i64, shape=[3], name="held_x_shape")
    seq = b.op("Squeeze", b.op("Slice", dims, b.const(np.array([1], i64), "held_s1"), b.const(np.array([2], i64), "held_s2"), dtype=i64, shape=[1],
                               name="held_seq1"), b.const(np.array([0], i64), "held_ax0"), dtype=i64, shape=[], name="held_seq")
    one = b.const(np.array(1, i64), "held_one")
    pos = b.op("Range", b.const(np.array(0, i64), "held_zero_pos"), seq, one, dtype=i64, shape=bs[1:], name="held_pos")
    rev = b.op("Sub", b.op("Sub", seq, one, dtype=i64, shape=[], name="held_last_pos"), pos, dtype=i64, shape=bs[1:], name="held_rev_pos")
    on_rows = b.op("Gather", on_i, rows, attrs={"axis": 0}, dtype=i64, shape=["k", bs[1]], name="held_on_rows")
    key = b.op("Add", b.op("Mul", on_rows, seq, dtype=i64, shape=["k", bs[1]], name="held_key_hi"), rev, dtype=i64, shape=["k", bs[1]], name="held_key")
    top, idx = (gs.Variable(lg_name("body", f"held_topk_{n}"), i64, ["k", "m"]) for n in ("values", "indices"))  # computed first, in order
    b.nodes.append(gs.Node("TopK", name=lg_name("body", "held_topk", "node"), inputs=[key, m], outputs=[top, idx],
                           attrs={"axis": 1, "largest": 1, "sorted": 1}))
    idx3 = b.op("Unsqueeze", idx, b.const(np.array([-1], i64), "held_idx_ax"), dtype=i64, shape=["k", "m", 1], name="held_idx3")

    x_rows = b.op("Gather", x_prev, rows, attrs={"axis": 0}, dtype=x_prev.dtype, shape=["k", bs[1], shape[-1]], name="held_x_rows")
    x_c = b.op("GatherND", x_rows, idx3, attrs={"batch_dims": 1}, dtype=x_prev.dtype, shape=["k", "m", shape[-1]], name="held_x")
    for k, (name, (batch_axis, q, rank)) in enumerate(comp.outer.items()):
        short = _gather_queries(b, outer[name], batch_axis, q, rank, rows, idx, m, f"held_outer{k}")
        for node in nodes:
            replace_tensor(node.inputs, outer[name], short)
    for node in nodes:
        replace_tensor(node.inputs, x_prev, x_c)

    by_name = {t.name: t for n in nodes for t in n.outputs}
    on_b = b.op("Cast", on_rows, attrs={"to": onnx.TensorProto.BOOL}, dtype=bl, shape=["k", bs[1]], name="held_on_rows_b")
    rows2 = b.op("Unsqueeze", rows, b.const(np.array([1], i64), "held_rows_ax"), dtype=i64, shape=["k", 1], name="held_rows2")
    kv_out = []
    for k, ((name, (axis, _)), held) in enumerate(zip(comp.kv.items(), kv_in)):
        new = by_name[name]
        readers = list(new.outputs)
        others = b.const(np.array([1, 2, 3][:axis - 1] + [1, 2, 3][axis:], i64), f"held{k}_other_axes")  # the axes besides batch and seq
        h_rows = b.op("Gather", held, rows, attrs={"axis": 0}, dtype=held.dtype, shape=["k", *held.shape[1:]], name=f"held{k}_rows")
        where = b.op("Expand", b.op("Unsqueeze", idx, others, dtype=i64, name=f"held{k}_idx_u"),
                     b.op("Shape", new, dtype=i64, shape=[4], name=f"held{k}_new_shape"), dtype=i64, name=f"held{k}_idx")
        put = b.op("ScatterElements", h_rows, where, new, attrs={"axis": axis}, dtype=held.dtype, shape=h_rows.shape, name=f"held{k}_put")
        on_mask = b.op("Unsqueeze", on_b, others, dtype=bl, name=f"held{k}_on_mask")
        full = b.op("Where", on_mask, put, h_rows, dtype=held.dtype, shape=h_rows.shape, name=f"held{k}_full")
        for c in readers:
            replace_tensor(c.inputs, new, full)
        kv_out.append(b.op("ScatterND", held, rows2, full, dtype=held.dtype, shape=held.shape, name=f"held{k}_next"))
    held_mask = b.op("Not", on, dtype=bl, shape=frozen_prev.shape, name="held_mask")
    count = b.op("Unsqueeze", b.op("Gather", per_row, rows, attrs={"axis": 0}, dtype=i64, shape=["k"], name="held_count"),
                 b.const(np.array([1], i64), "held_count_ax"), dtype=i64, shape=["k", 1], name="held_count2")
    slots = b.op("Range", b.const(np.array(0, i64), "held_slot0"), b.op("Squeeze", m, b.const(np.array([0], i64), "held_m_ax"), dtype=i64, shape=[],
                 name="held_m0"), one, dtype=i64, shape=["m"], name="held_slots")
    valid = b.op("Unsqueeze", b.op("Less", slots, count, dtype=bl, shape=["k", "m"], name="held_valid2d"), b.const(np.array([-1], i64), "held_valid_ax"),
                 dtype=bl, shape=["k", "m", 1], name="held_valid")
    return Compacted(held_mask, kv_out, rows, idx, valid, dims)


def _gather_queries(b: BodyBuilder, t: gs.Tensor, batch_axis: int | None, q: int, rank: int, rows: gs.Tensor, idx: gs.Tensor, m: gs.Tensor,
                    name: str) -> gs.Variable:
    """``t`` at the computed rows (``batch_axis`` 0; None: a leading 1, expanded to k rows) and, per row, at
    the computed positions ``idx`` on axis ``q``."""
    i64 = np.int64
    if batch_axis is not None:
        t_r = b.op("Gather", t, rows, attrs={"axis": 0}, dtype=t.dtype, name=f"{name}_rows")
    else:
        k = b.op("Shape", rows, dtype=i64, shape=[1], name=f"{name}_k")
        rest = b.op("Slice", b.op("Shape", t, dtype=i64, shape=[rank], name=f"{name}_shape"), b.const(np.array([1], i64), f"{name}_1"),
                    b.const(np.array([rank], i64), f"{name}_r"), dtype=i64, shape=[rank - 1], name=f"{name}_rest")
        t_r = b.op("Expand", t, b.op("Concat", k, rest, attrs={"axis": 0}, dtype=i64, shape=[rank], name=f"{name}_kshape"), dtype=t.dtype,
                   name=f"{name}_rows")
    shp = b.op("Shape", t_r, dtype=i64, shape=[rank], name=f"{name}_rshape")
    target = b.op("Concat", b.op("Slice", shp, b.const(np.array([0], i64), f"{name}_s0"), b.const(np.array([q], i64), f"{name}_sq"), dtype=i64,
                                 name=f"{name}_head"),
                  m, b.op("Slice", shp, b.const(np.array([q + 1], i64), f"{name}_sq1"), b.const(np.array([rank], i64), f"{name}_sr"), dtype=i64,
                          name=f"{name}_tail"), attrs={"axis": 0}, dtype=i64, shape=[rank], name=f"{name}_target")
    axes = [i for i in range(1, rank) if i != q]
    where = idx if not axes else b.op("Unsqueeze", idx, b.const(np.array(axes, i64), f"{name}_axes"), dtype=i64, name=f"{name}_idx")
    return b.op("GatherElements", t_r, b.op("Expand", where, target, dtype=i64, name=f"{name}_where"), attrs={"axis": q}, dtype=t.dtype,
                name=f"{name}_cut")


def scatter_back(b: BodyBuilder, y_c: gs.Tensor, c: Compacted, shape: list) -> gs.Variable:
    """The range's output on the computed tokens [k, M, hidden], put back at [batch, seq, hidden]: NaN where
    nothing was computed (a padding slot writes NaN too: its token is held, its value never used)."""
    i64, dt = np.int64, b.dtype
    nan = b.const(np.array(np.nan, dt), "held_nan")
    y_c = b.op("Where", c.valid, y_c, nan, dtype=dt, shape=["k", "m", shape[-1]], name="held_y_valid")
    filler = b.op("Expand", nan, c.dims, dtype=dt, shape=list(shape), name="held_y_filler")
    rows = b.op("Expand", b.op("Unsqueeze", c.rows, b.const(np.array([1, 2], i64), "held_y_ax"), dtype=i64, shape=["k", 1, 1], name="held_y_rows3"),
                b.op("Shape", b.op("Unsqueeze", c.idx, b.const(np.array([-1], i64), "held_y_ax2"), dtype=i64, shape=["k", "m", 1], name="held_y_idx3"),
                     dtype=i64, shape=[3], name="held_y_idx_shape"), dtype=i64, shape=["k", "m", 1], name="held_y_rows")
    ind = b.op("Concat", rows, b.op("Unsqueeze", c.idx, b.const(np.array([-1], i64), "held_y_ax3"), dtype=i64, shape=["k", "m", 1], name="held_y_pos"),
               attrs={"axis": 2}, dtype=i64, shape=["k", "m", 2], name="held_y_ind")
    return b.op("ScatterND", filler, ind, y_c, dtype=dt, shape=list(shape), name="held_y")

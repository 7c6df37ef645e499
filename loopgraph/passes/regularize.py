"""Interpolation nodes of each regularizer, built inside the Loop body (formulas: :mod:`loopgraph.spec`).

Every interpolation is written ``(1 - a) * p + a * q`` with two Mul and one Add (never
``p + a * (q - p)``), and every regularizer uses weight ``a = 1`` at t = 1, so the first
iteration returns ``y_1`` bit-exactly and N = 1 reproduces the original model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

NAME_PREFIX = "loopgraph/"


def lg_name(*parts: str) -> str:
    """The one naming helper: every tensor and node loopgraph adds carries this prefix."""
    return NAME_PREFIX + "/".join(parts)


def replace_tensor(tensors: list, old: gs.Tensor, new: gs.Tensor) -> None:
    """Swap ``old`` for ``new`` in a node's inputs or outputs, by identity (gs compares tensors
    by name; gs keeps producer/consumer links in sync on item assignment)."""
    for i, t in enumerate(tensors):
        if t is old:
            tensors[i] = new


class BodyBuilder:
    """Appends nodes to a list, naming each output ``loopgraph/<scope>/<op>_<k>``."""

    def __init__(self, scope: str, dtype: np.dtype) -> None:
        self.scope = scope
        self.dtype = dtype
        self.nodes: list[gs.Node] = []
        self._count = 0

    def op(self, op: str, *inputs: gs.Tensor, attrs: dict | None = None, dtype=None, shape=None, name: str = "") -> gs.Variable:
        self._count += 1
        base = lg_name(self.scope, name or f"{op}_{self._count}")
        out = gs.Variable(base, dtype=dtype, shape=shape)
        self.nodes.append(gs.Node(op, name=base + "/node", inputs=list(inputs), outputs=[out], attrs=attrs or {}))
        return out

    def const(self, value, name: str) -> gs.Variable:
        """A scalar or small tensor produced by a Constant node inside the body (never an
        initializer: the body must hold no initializers)."""
        arr = np.asarray(value)
        return self.op("Constant", attrs={"value": gs.Constant(lg_name(self.scope, name, "value"), arr)},
                       dtype=arr.dtype, shape=list(arr.shape), name=name)

    def interpolate(self, p: gs.Tensor, q: gs.Tensor, a: gs.Tensor, one: gs.Tensor, shape, name: str) -> gs.Variable:
        """``(1 - a) * p + a * q``: exact ``q`` when ``a == 1``."""
        keep = self.op("Sub", one, a, dtype=self.dtype, shape=[], name=f"{name}_one_minus_a")
        return self.op("Add", self.op("Mul", keep, p, dtype=self.dtype, shape=shape, name=f"{name}_keep"),
                       self.op("Mul", a, q, dtype=self.dtype, shape=shape, name=f"{name}_take"),
                       dtype=self.dtype, shape=shape, name=name)


@dataclasses.dataclass
class State:
    """A loop-carried tensor besides x: its body input, how to initialise it, its shape."""
    name: str
    shape: list
    init: str  # "x0" or "x0_sum" (a [batch, seq, 1] tensor from x0; value unused at t = 1)


def extra_states(reg: str, hidden_shape: list, need_r: bool = False) -> list[State]:
    """Carried states besides x. ``need_r``: carry r = y_1 even if the regularizer does not."""
    token_shape = list(hidden_shape[:-1]) + [1]
    if reg == "auto-align":
        return [State("r", hidden_shape, "x0"), State("wsum_y", hidden_shape, "x0"),
                State("wsum", token_shape, "x0_sum")]
    if reg == "anchor" or need_r:
        return [State("r", hidden_shape, "x0")]
    return []


def build_update(b: BodyBuilder, reg: str, iteration: gs.Tensor, y: gs.Tensor, x_prev: gs.Tensor,
                 states: dict[str, gs.Tensor], weight: gs.Tensor | None, shape: list) -> tuple[gs.Tensor, dict[str, gs.Tensor]]:
    """Emit ``x_t`` (and the next carried states) from ``y_t``; see :mod:`loopgraph.spec`."""
    dt = b.dtype
    if reg == "naive" and not states:
        return y, {}
    one = b.const(np.array(1, dt), "one")
    first = None  # uniform's weight 1/t needs no "is t = 1" test: emit it only where read
    if reg != "uniform" or states:
        first = b.op("Equal", iteration, b.const(np.array(0, np.int64), "zero_i64"), dtype=np.bool_, shape=[], name="is_first")
    x_next, new_states = _update(b, reg, first, one, iteration, y, x_prev, states, weight, shape)
    if "r" in states and "r" not in new_states:  # carried only for the noise control
        new_states["r"] = b.op("Where", first, y, states["r"], dtype=dt, shape=shape, name="r")
    return x_next, new_states


def _update(b: BodyBuilder, reg: str, first: gs.Tensor, one: gs.Tensor, iteration: gs.Tensor, y: gs.Tensor, x_prev: gs.Tensor,
            states: dict[str, gs.Tensor], weight: gs.Tensor | None, shape: list) -> tuple[gs.Tensor, dict[str, gs.Tensor]]:
    dt = b.dtype
    if reg == "naive":
        return y, {}
    if reg == "uniform":
        t = b.op("Cast", b.op("Add", iteration, b.const(np.array(1, np.int64), "one_i64"), dtype=np.int64, shape=[], name="t"),
                 attrs={"to": onnx_dtype(dt)}, dtype=dt, shape=[], name="t_float")
        a = b.op("Div", one, t, dtype=dt, shape=[], name="a")  # exactly 1 at t = 1
        return b.interpolate(x_prev, y, a, one, shape, "x_next"), {}
    if reg in ("ema", "damped", "anchor"):
        w = weight
        if reg == "damped":  # weight is K
            w = b.op("Div", one, weight, dtype=dt, shape=[], name="inv_k")
        a = b.op("Where", first, one, w, dtype=dt, shape=[], name="a")
        if reg == "anchor":
            r = b.op("Where", first, y, states["r"], dtype=dt, shape=shape, name="r")
            return b.interpolate(r, y, a, one, shape, "x_next"), {"r": r}
        return b.interpolate(x_prev, y, a, one, shape, "x_next"), {}
    if reg == "auto-align":
        token = list(shape[:-1]) + [1]
        r = b.op("Where", first, y, states["r"], dtype=dt, shape=shape, name="r")
        axes = b.const(np.array([-1], np.int64), "hidden_axis")
        def rsum(v, name):
            return b.op("ReduceSum", v, axes, attrs={"keepdims": 1}, dtype=dt, shape=token, name=name)
        dot = rsum(b.op("Mul", y, r, dtype=dt, shape=shape, name="y_r"), "dot")
        norms = b.op("Mul", b.op("Sqrt", rsum(b.op("Mul", y, y, dtype=dt, shape=shape, name="y_y"), "yy"), dtype=dt, shape=token, name="norm_y"),
                     b.op("Sqrt", rsum(b.op("Mul", r, r, dtype=dt, shape=shape, name="r_r"), "rr"), dtype=dt, shape=token, name="norm_r"),
                     dtype=dt, shape=token, name="norms")
        cos = b.op("Div", dot, b.op("Max", norms, b.const(np.array(COS_EPS, dt), "eps"), dtype=dt, shape=token, name="denom"),
                   dtype=dt, shape=token, name="cos")
        w = b.op("Where", first, one, b.op("Relu", cos, dtype=dt, shape=token, name="relu_cos"), dtype=dt, shape=token, name="w")
        wsum_y = b.op("Where", first, y, b.op("Add", states["wsum_y"], b.op("Mul", w, y, dtype=dt, shape=shape, name="w_y"),
                                             dtype=dt, shape=shape, name="acc_wy"), dtype=dt, shape=shape, name="wsum_y")
        wsum = b.op("Where", first, one, b.op("Add", states["wsum"], w, dtype=dt, shape=token, name="acc_w"), dtype=dt, shape=token, name="wsum")
        x_next = b.op("Div", wsum_y, wsum, dtype=dt, shape=shape, name="x_next")  # y / 1 at t = 1
        return x_next, {"r": r, "wsum_y": wsum_y, "wsum": wsum}
    raise ValueError(f"unhandled regularizer {reg}")  # LoopSpec validates names first


#: floor of |y|·|r| in the cosine of auto-align (also used by the PyTorch reference)
COS_EPS = 1e-8


def onnx_dtype(dt: np.dtype) -> int:
    from onnx import helper
    return helper.np_dtype_to_tensor_dtype(np.dtype(dt))

"""Interpolation nodes of each regularizer, built inside the Loop body (formulas: :mod:`loopgraph.regularizers`).

Every interpolation is written ``(1 - a) * p + a * q`` with two Mul and one Add (never
``p + a * (q - p)``), and every regularizer uses weight ``a = 1`` at t = 1, so the first
iteration returns ``y_1`` bit-exactly and N = 1 reproduces the original model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from loopgraph.passes.build import BodyBuilder
from loopgraph.regularizers import COS_EPS, Regularizer


@dataclasses.dataclass(frozen=True)
class State:
    """A loop-carried tensor besides x: its body input, how to initialise it, its shape."""
    name: str
    shape: list
    init: str  # "x0" or "x0_sum" (a [batch, seq, 1] tensor from x0; value unused at t = 1)


def carried_states(reg: Regularizer, hidden_shape: list, need_r: bool = False) -> list[State]:
    """Carried states besides x (``reg.carries``). ``need_r``: carry r = y_1 even if the
    regularizer does not (the noise control reads it)."""
    names = list(reg.carries) or (["r"] if need_r else [])
    token_shape = list(hidden_shape[:-1]) + [1]
    # the running weight sum of auto-align is per token; every other state is a hidden state
    return [State(n, token_shape, "x0_sum") if n == "wsum" else State(n, list(hidden_shape), "x0") for n in names]


Update = Callable[..., tuple[gs.Tensor, dict[str, gs.Tensor]]]


def build_update(b: BodyBuilder, reg: Regularizer, iteration: gs.Tensor, y: gs.Tensor, x_prev: gs.Tensor,
                 states: dict[str, gs.Tensor], weight: gs.Tensor | None, shape: list) -> tuple[gs.Tensor, dict[str, gs.Tensor]]:
    """Emit ``x_t`` (and the next carried states) from ``y_t``; see :mod:`loopgraph.regularizers`."""
    dt = b.dtype
    if reg.name == "naive" and not states:
        return y, {}
    one = b.const(np.array(1, dt), "one")
    first = None  # uniform's weight 1/t needs no "is t = 1" test: emit it only where read
    if reg.name != "uniform" or states:
        first = b.op("Equal", iteration, b.const(np.array(0, np.int64), "zero_i64"), dtype=np.bool_, shape=[], name="is_first")
    x_next, new_states = _UPDATES[reg.name](b, first, one, iteration, y, x_prev, states, weight, shape)
    if "r" in states and "r" not in new_states:  # carried only for the noise control
        new_states["r"] = b.op("Where", first, y, states["r"], dtype=dt, shape=shape, name="r")
    return x_next, new_states


def _naive(b, first, one, iteration, y, x_prev, states, weight, shape):
    return y, {}


def _uniform(b, first, one, iteration, y, x_prev, states, weight, shape):
    dt = b.dtype
    t = b.op("Cast", b.op("Add", iteration, b.const(np.array(1, np.int64), "one_i64"), dtype=np.int64, shape=[], name="t"),
             attrs={"to": onnx_dtype(dt)}, dtype=dt, shape=[], name="t_float")
    a = b.op("Div", one, t, dtype=dt, shape=[], name="a")  # exactly 1 at t = 1
    return b.interpolate(x_prev, y, a, one, shape, "x_next"), {}


def _ema(b, first, one, iteration, y, x_prev, states, weight, shape):
    a = b.op("Where", first, one, weight, dtype=b.dtype, shape=[], name="a")
    return b.interpolate(x_prev, y, a, one, shape, "x_next"), {}


def _damped(b, first, one, iteration, y, x_prev, states, weight, shape):
    inv_k = b.op("Div", one, weight, dtype=b.dtype, shape=[], name="inv_k")  # weight is K
    return _ema(b, first, one, iteration, y, x_prev, states, inv_k, shape)


def _anchor(b, first, one, iteration, y, x_prev, states, weight, shape):
    a = b.op("Where", first, one, weight, dtype=b.dtype, shape=[], name="a")
    r = b.op("Where", first, y, states["r"], dtype=b.dtype, shape=shape, name="r")
    return b.interpolate(r, y, a, one, shape, "x_next"), {"r": r}


def _auto_align(b, first, one, iteration, y, x_prev, states, weight, shape):
    dt, token = b.dtype, list(shape[:-1]) + [1]
    r = b.op("Where", first, y, states["r"], dtype=dt, shape=shape, name="r")
    axes = b.const(np.array([-1], np.int64), "hidden_axis")

    def rsum(v, name):
        return b.op("ReduceSum", v, axes, attrs={"keepdims": 1}, dtype=dt, shape=token, name=name)

    def norm(v, name):
        return b.op("Sqrt", rsum(b.op("Mul", v, v, dtype=dt, shape=shape, name=f"{name}_{name}"), name * 2),
                    dtype=dt, shape=token, name=f"norm_{name}")

    dot = rsum(b.op("Mul", y, r, dtype=dt, shape=shape, name="y_r"), "dot")
    norms = b.op("Mul", norm(y, "y"), norm(r, "r"), dtype=dt, shape=token, name="norms")
    cos = b.op("Div", dot, b.op("Max", norms, b.const(np.array(COS_EPS, dt), "eps"), dtype=dt, shape=token, name="denom"),
               dtype=dt, shape=token, name="cos")
    w = b.op("Where", first, one, b.op("Relu", cos, dtype=dt, shape=token, name="relu_cos"), dtype=dt, shape=token, name="w")
    wsum_y = b.op("Where", first, y, b.op("Add", states["wsum_y"], b.op("Mul", w, y, dtype=dt, shape=shape, name="w_y"),
                                         dtype=dt, shape=shape, name="acc_wy"), dtype=dt, shape=shape, name="wsum_y")
    wsum = b.op("Where", first, one, b.op("Add", states["wsum"], w, dtype=dt, shape=token, name="acc_w"), dtype=dt, shape=token, name="wsum")
    x_next = b.op("Div", wsum_y, wsum, dtype=dt, shape=shape, name="x_next")  # y / 1 at t = 1
    return x_next, {"r": r, "wsum_y": wsum_y, "wsum": wsum}


#: the graph form of each regularizer in :data:`loopgraph.regularizers.ALL` (a test checks it is complete)
_UPDATES: dict[str, Update] = {"naive": _naive, "uniform": _uniform, "ema": _ema, "anchor": _anchor,
                               "auto-align": _auto_align, "damped": _damped}


def onnx_dtype(dt: np.dtype) -> int:
    from onnx import helper
    return helper.np_dtype_to_tensor_dtype(np.dtype(dt))

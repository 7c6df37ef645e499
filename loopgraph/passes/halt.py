"""Per-token halting by convergence (``spec.halt``; the rule is written out in docs/halting.md).

At iteration t (1-based) every token is fed through the range (``y_t = B(x_{t-1})``) and the
regularizer proposes ``x'_t``. Then, per token:

- ``x_t = Where(frozen_{t-1}, x_{t-1}, x'_t)``: a frozen token keeps its state bit for bit
  (Where, never an arithmetic blend, so an unfrozen token's ``x_t`` is exactly the fixed-N file's);
- the carried states (anchor's r, auto-align's sums) are selected the same way, so a frozen token's
  whole loop state stops at the iteration it froze;
- ``change_t`` = ``|x_t - x_{t-1}| / |x_{t-1}|`` (``rel``) or ``1 - cos(x_t, x_{t-1})`` (``cos``)
  over the hidden axis, and ``frozen_t = frozen_{t-1} or (t >= 2 and change_t <= TOL)``;
- ``used_t = Where(frozen_{t-1}, used_{t-1}, t)``: the last iteration whose update the token took.

The Loop's condition is "some real token is still moving": ``any(real and not frozen_t)``, where
``real`` is the current tokens' slice of ``attention_mask`` read from the outer scope (all tokens
when the model has no ``attention_mask``); padding follows the same rule but never holds the loop.
Files with KV caches never stop early (their later iterations' caches are needed; see
docs/halting.md), so the early stop is a saving of cache-less files only; the unrolled form
freezes with the same masks and computes every copy.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from loopgraph.naming import lg_name
from loopgraph.passes.build import BodyBuilder
from loopgraph.regularizers import COS_EPS

HALT_NAME = lg_name("halt")  # the tolerance (an initializer, or a graph input with --dynamic)
ITERATIONS_OUTPUT = lg_name("halt", "iterations")  # [batch, seq] int64: iterations each token took
MASK_INPUT = "attention_mask"


@dataclasses.dataclass
class HaltState:
    """The per-token halting tensors of one iteration: frozen [batch, seq, 1] bool, used [batch, seq, 1] int64."""
    frozen: gs.Tensor
    used: gs.Tensor


def token_shape(shape: list) -> list:
    return list(shape[:-1]) + [1]


def initial(pre: BodyBuilder, x0: gs.Tensor, shape: list) -> HaltState:
    """frozen_0 = false and used_0 = 0 per token, shaped [batch, seq, 1] from ``Shape(x0)``."""
    dims = pre.op("Shape", x0, dtype=np.int64, shape=[len(shape)], name="halt_x0_shape")
    lead = pre.op("Slice", dims, pre.const(np.array([0], np.int64), "halt_zero"), pre.const(np.array([-1], np.int64), "halt_minus_one"),
                  dtype=np.int64, shape=[len(shape) - 1], name="halt_lead")
    tshape = pre.op("Concat", lead, pre.const(np.array([1], np.int64), "halt_one"), attrs={"axis": 0},
                    dtype=np.int64, shape=[len(shape)], name="halt_token_shape")
    tok = token_shape(shape)
    frozen = pre.op("ConstantOfShape", tshape, attrs={"value": gs.Constant(lg_name("init", "halt_false"), np.array([False]))},
                    dtype=np.bool_, shape=tok, name="halt_frozen0")
    used = pre.op("ConstantOfShape", tshape, attrs={"value": gs.Constant(lg_name("init", "halt_zero_i64"), np.array([0], np.int64))},
                  dtype=np.int64, shape=tok, name="halt_used0")
    return HaltState(frozen, used)


def real_tokens(pre: BodyBuilder, graph: gs.Graph, x0: gs.Tensor, shape: list) -> gs.Tensor | None:
    """[batch, seq, 1] bool: which current tokens are real (the last ``seq`` columns of
    ``attention_mask``, which also covers the past with a cache); None without an attention_mask."""
    mask = next((t for t in graph.inputs if t.name == MASK_INPUT), None)
    if mask is None:
        return None
    dims = pre.op("Shape", x0, dtype=np.int64, shape=[len(shape)], name="halt_seq_shape")
    seq = pre.op("Slice", dims, pre.const(np.array([1], np.int64), "halt_axis1"), pre.const(np.array([2], np.int64), "halt_axis2"),
                 dtype=np.int64, shape=[1], name="halt_seq")
    start = pre.op("Neg", seq, dtype=np.int64, shape=[1], name="halt_minus_seq")
    cur = pre.op("Slice", mask, start, pre.const(np.array([np.iinfo(np.int64).max], np.int64), "halt_end"),
                 pre.const(np.array([1], np.int64), "halt_mask_axis"), dtype=mask.dtype, shape=list(shape[:-1]), name="halt_mask_now")
    real = pre.op("Cast", cur, attrs={"to": 9}, dtype=np.bool_, shape=list(shape[:-1]), name="halt_real2d")  # 9 = BOOL
    return pre.op("Unsqueeze", real, pre.const(np.array([-1], np.int64), "halt_last_axis"), dtype=np.bool_, shape=token_shape(shape),
                  name="halt_real")


def _change(b: BodyBuilder, x_new: gs.Tensor, x_prev: gs.Tensor, metric: str, shape: list) -> gs.Tensor:
    """Per-token change [batch, seq, 1] of ``x_new`` against ``x_prev``."""
    dt, tok = b.dtype, token_shape(shape)
    axes = b.const(np.array([-1], np.int64), "halt_hidden_axis")

    def rsum(v: gs.Tensor, name: str) -> gs.Tensor:
        return b.op("ReduceSum", v, axes, attrs={"keepdims": 1}, dtype=dt, shape=tok, name=name)

    def norm(v: gs.Tensor, name: str) -> gs.Tensor:
        return b.op("Sqrt", rsum(b.op("Mul", v, v, dtype=dt, shape=shape, name=f"{name}_sq"), f"{name}_sum"), dtype=dt, shape=tok, name=name)

    if metric == "rel":
        d = b.op("Sub", x_new, x_prev, dtype=dt, shape=shape, name="halt_delta")
        return b.op("Div", norm(d, "halt_delta_norm"), norm(x_prev, "halt_prev_norm"), dtype=dt, shape=tok, name="halt_change")
    dot = rsum(b.op("Mul", x_new, x_prev, dtype=dt, shape=shape, name="halt_new_prev"), "halt_dot")
    norms = b.op("Mul", norm(x_new, "halt_new_norm"), norm(x_prev, "halt_prev_norm"), dtype=dt, shape=tok, name="halt_norms")
    cos = b.op("Div", dot, b.op("Max", norms, b.const(np.array(COS_EPS, dt), "halt_eps"), dtype=dt, shape=tok, name="halt_denom"),
               dtype=dt, shape=tok, name="halt_cos")
    return b.op("Sub", b.const(np.array(1, dt), "halt_one_f"), cos, dtype=dt, shape=tok, name="halt_change")


def step(b: BodyBuilder, iteration: gs.Tensor, x_prev: gs.Tensor, x_cand: gs.Tensor, states_prev: dict[str, gs.Tensor],
         states_cand: dict[str, gs.Tensor], prev: HaltState, tol: gs.Tensor, metric: str, shape: list
         ) -> tuple[gs.Tensor, dict[str, gs.Tensor], HaltState]:
    """One iteration's halting (module docstring): the selected x_t and states, and the new HaltState.
    ``iteration`` is the Loop's 0-based counter (t - 1)."""
    dt, tok = b.dtype, token_shape(shape)
    x_next = b.op("Where", prev.frozen, x_prev, x_cand, dtype=dt, shape=shape, name="halt_x")
    states = {n: b.op("Where", prev.frozen, states_prev[n], v, dtype=dt, shape=v.shape, name=f"halt_{n}") for n, v in states_cand.items()}
    change = _change(b, x_next, x_prev, metric, shape)
    settled = b.op("LessOrEqual", change, tol, dtype=np.bool_, shape=tok, name="halt_settled")
    late = b.op("GreaterOrEqual", iteration, b.const(np.array(1, np.int64), "halt_one_i64"), dtype=np.bool_, shape=[], name="halt_t_ge_2")
    frozen = b.op("Or", prev.frozen, b.op("And", settled, late, dtype=np.bool_, shape=tok, name="halt_newly"), dtype=np.bool_, shape=tok,
                  name="halt_frozen")
    t = b.op("Add", iteration, b.const(np.array(1, np.int64), "halt_t_one"), dtype=np.int64, shape=[], name="halt_t")
    used = b.op("Where", prev.frozen, prev.used, t, dtype=np.int64, shape=tok, name="halt_used")
    return x_next, states, HaltState(frozen, used)


def still_moving(b: BodyBuilder, frozen: gs.Tensor, real: gs.Tensor | None) -> gs.Tensor:
    """cond_out: some real token is not frozen (a scalar bool)."""
    moving = b.op("Not", frozen, dtype=np.bool_, shape=frozen.shape, name="halt_moving")
    if real is not None:
        moving = b.op("And", moving, real, dtype=np.bool_, shape=frozen.shape, name="halt_real_moving")
    as_int = b.op("Cast", moving, attrs={"to": 6}, dtype=np.int32, shape=frozen.shape, name="halt_moving_i32")  # 6 = INT32
    count = b.op("ReduceMax", as_int, attrs={"keepdims": 0}, dtype=np.int32, shape=[], name="halt_any")
    return b.op("Greater", count, b.const(np.array(0, np.int32), "halt_zero_i32"), dtype=np.bool_, shape=[], name="cond_out")


def iterations_output(post: BodyBuilder, used: gs.Tensor, shape: list) -> gs.Variable:
    """The graph output ``loopgraph/halt/iterations`` [batch, seq] int64 from the final ``used``."""
    out = gs.Variable(ITERATIONS_OUTPUT, np.int64, list(shape[:-1]))
    post.nodes.append(gs.Node("Squeeze", name=lg_name("post", "halt_iterations"),
                              inputs=[used, post.const(np.array([-1], np.int64), "halt_squeeze_axis")], outputs=[out]))
    return out

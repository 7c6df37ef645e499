"""Wrap a block range in an ONNX ``Loop`` that re-applies it N times with a regularizer.

Handles: any range of blocks found by :mod:`loopgraph.passes.blocks` (including S = 0 and the
full depth), every regularizer, baked or ``dynamic`` trip count and weight.
With-past exports: the looped blocks' caches are wired by :mod:`loopgraph.passes.kv`
(``spec.kv``: exact caches in the standard layout, one rotating pair per virtual layer, or
stacked per iteration; or first/last-iteration approximations).
Refuses (checked by the plan, :mod:`loopgraph.passes.plan`, before anything changes): opset < 13,
a range whose intermediate tensors are read after the range (the body could not be closed);
a model that is already looped is refused by the ``find-blocks`` pass that runs before this one.

How the graph is built (DESIGN §5):
- The body is chosen by dataflow: nodes whose values depend on the range input and that feed
  the range output. Nodes in the range that do not (constants, rotary cos/sin, the causal mask
  built from ``Shape(h)``) stay in the main graph and the body reads them from the outer scope.
- Weights stay main-graph initializers read by the body (outer-scope capture); the body holds
  no initializers at all (:func:`~loopgraph.passes.build.fix_subgraph_scope` repairs onnx-graphsurgeon's export).
- ``Loop(M, cond="", x0, states...)``: M is always given (TensorRT defines the iteration
  counter only then), cond is empty, the body returns ``Identity(cond_in)``.
- The Loop output takes the range output's name, so nothing downstream is rewired; the body's
  copy of it is renamed ``loopgraph/body/y``. Every added name carries ``loopgraph/``.
- Loop outputs and body inputs have declared shapes, because ONNX shape inference drops the
  shape of Loop outputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from loopgraph.errors import LoopgraphError
from loopgraph.naming import lg_name
from loopgraph.passes import compact, halt, skip
from loopgraph.passes.base import PassResult, Reports
from loopgraph.passes.blocks import is_looped
from loopgraph.passes.build import BodyBuilder, RangeGraph, export, initial_states, noise_control, open_range, replace_tensor, scalar_param, splice
from loopgraph.passes.kv import KvCarry, carry_kv, standard_layout, wire_loop_kv
from loopgraph.passes.plan import ITERS_NAME, RangePass, RangePlan, RangeReport, param_name, record_spec
from loopgraph.passes.regularize import build_update

__all__ = ["ITERS_NAME", "LoopReport", "WrapInLoop", "is_looped", "param_name"]


@dataclasses.dataclass(frozen=True)
class LoopReport(RangeReport):
    body_nodes: int  # the range's nodes moved into the body
    regularizer_nodes: int  # nodes loopgraph added to the body (interpolation, KV slices, cond)
    skipping: str | None = None  # halting files that may stop early: how frozen work is skipped, or why it is not

    @property
    def dynamic(self) -> bool:
        return self.spec.dynamic


class WrapInLoop(RangePass):
    """Blocks ``[start, end)`` inside a Loop that applies them N times (see the module docstring)."""

    name = "wrap-in-loop"
    gives = LoopReport

    def requires(self, model: onnx.ModelProto, earlier: Reports) -> RangePlan:
        if self.spec.unroll:
            raise ValueError("WrapInLoop got a spec with unroll=True; use passes.unroll.Unroll")
        return super().requires(model, earlier)

    def apply(self, model: onnx.ModelProto, plan: RangePlan) -> PassResult[LoopReport]:
        rng = open_range(model, plan)
        outer = {name: scalar_param(rng.graph, name, value, plan.spec.dynamic) for name, value in plan.params.items()}
        kv_start, pre, post = BodyBuilder("kv", plan.dtype), BodyBuilder("init", plan.dtype), BodyBuilder("post", plan.dtype)
        carry = carry_kv(rng, plan.spec) if standard_layout(plan.spec, plan.pasts) else KvCarry()
        halting = _Halting.make(model, rng, plan, pre, outer.get(halt.HALT_NAME))
        body, added, kv_loop = _body(rng, plan, outer.get(plan.param_name), kv_start, post, carry, halting)
        _outer_graph(rng, plan, body, outer[ITERS_NAME], kv_loop, (kv_start, pre, post), carry, halting)
        new = export(rng, model, has_body=True)
        if plan.spec.dynamic:  # a graph input with a same-named initializer is an overridable default
            new.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in plan.params.items())
        record_spec(new, plan)
        skipping = None if halting is None or not plan.early_stop else (
            "every frozen token (its K/V are held)" if halting.compaction is not None else
            "rows and tail positions without a moving token" if halting.skipping.on else f"none ({halting.skipping.reason})")
        return PassResult(new, True, LoopReport(**plan.report_fields(), body_nodes=len(rng.nodes), regularizer_nodes=added, skipping=skipping))


@dataclasses.dataclass
class _Halting:
    """The outer tensors of per-token halting (:mod:`loopgraph.passes.halt`): the tolerance, the
    initial frozen/used states, the real-token mask (None: every token is real), and how frozen
    work is skipped when the Loop may stop early (:mod:`loopgraph.passes.skip`)."""
    tol: gs.Tensor
    init: halt.HaltState
    real: gs.Tensor | None
    skipping: skip.Skipping
    outer: dict[str, gs.Variable]  # the computed tensors the range reads from outside, by name
    compaction: compact.Compaction | None = None  # --halt-kv held: only the moving tokens are computed
    held_init: list[gs.Tensor] = dataclasses.field(default_factory=list)  # the held K/V before the first iteration

    @staticmethod
    def make(model: onnx.ModelProto, rng: RangeGraph, plan: RangePlan, pre: BodyBuilder, tol: gs.Tensor | None) -> _Halting | None:
        if plan.spec.halt is None:
            return None
        shape = list(plan.shape)
        real = halt.real_tokens(pre, rng.graph, rng.x0, shape) if plan.early_stop else None
        outer, skipping = {}, skip.Skipping({}, "the Loop never stops early")
        if plan.spec.halt_kv == "held" and not plan.early_stop:
            raise LoopgraphError("--halt-kv held needs a file without KV cache (export without --with-past): a decode step "
                                 "would need every iteration's cache; use --halt-kv live")
        if plan.early_stop:
            outer = {t.name: t for t in skip.outer_inputs(rng.nodes, rng.x0)}
        if plan.spec.halt_kv == "held":
            comp = compact.plan_compaction(model, plan.x0, list(outer), rng.nodes)
            if comp.reason:
                raise LoopgraphError(f"--halt-kv held: cannot compute only the moving tokens of this range ({comp.reason}); use --halt-kv live")
            return _Halting(tol, halt.initial(pre, rng.x0, shape), real, skip.Skipping({}, "held K/V computes the moving tokens only"),
                            outer, comp, compact.kv_initial(pre, rng.x0, comp))
        if plan.early_stop:
            skipping = skip.plan_skipping(model, plan.x0, list(outer))
        return _Halting(tol, halt.initial(pre, rng.x0, shape), real, skipping, outer)


def _body(rng: RangeGraph, plan: RangePlan, weight: gs.Tensor | None, kv_start: BodyBuilder,
          post: BodyBuilder, carry: KvCarry, halting: _Halting | None = None) -> tuple[gs.Graph, int, list[gs.Variable]]:
    """The Loop body: (iteration, cond_in, x_{t-1}, states..., [frozen, used], kv slots...) -> (cond_out, x_t,
    states..., [frozen, used], kv slots..., traces..., presents...). Returns the body, how many nodes loopgraph
    added to it, and the Loop's KV scan outputs (``carry``: the standard layout's loop-carried caches)."""
    dtype, shape = plan.dtype, list(plan.shape)
    b = BodyBuilder("body", dtype)
    iteration = gs.Variable(lg_name("body", "iteration"), np.int64, [])
    cond_in = gs.Variable(lg_name("body", "cond_in"), np.bool_, [])
    x_prev = gs.Variable(lg_name("body", "x_prev"), dtype, shape)  # [batch, seq, hidden]
    state_in = {s.name: gs.Variable(lg_name("body", f"{s.name}_prev"), dtype, s.shape) for s in plan.states}

    # y_t = B(x_{t-1}): the range's own nodes, reading x_prev instead of x0.
    for node in rng.nodes:
        replace_tensor(node.inputs, rng.x0, x_prev)
    tok = halt.token_shape(shape)
    prev = halt.HaltState(gs.Variable(lg_name("body", "frozen_prev"), np.bool_, tok), gs.Variable(lg_name("body", "used_prev"), np.int64, tok))
    held, kv_in, kv_out = prev.frozen, [], []
    if halting is not None and halting.compaction is not None:  # held K/V: the range runs on the moving tokens only
        kv_in = compact.kv_inputs(halting.compaction, dtype)
        c = compact.apply(b, rng.nodes, x_prev, prev.frozen, halting.real, halting.compaction, halting.outer, kv_in, shape)
        y_c = gs.Variable(lg_name("body", "y_computed"), dtype, [None, None, shape[-1]])
        replace_tensor(rng.out.inputs[0].outputs, rng.out, y_c)
        y, held, kv_out = compact.scatter_back(b, y_c, c, shape), c.held, c.kv_out
    elif halting is not None and halting.skipping.on:  # the range runs on the window of moving tokens only
        w = skip.apply(b, rng.nodes, x_prev, prev.frozen, halting.real, halting.skipping, halting.outer, shape)
        y_window = gs.Variable(lg_name("body", "y_window"), dtype, [None, None, shape[-1]])
        replace_tensor(rng.out.inputs[0].outputs, rng.out, y_window)
        y, held = skip.uncut(b, y_window, w, shape), w.held
    else:
        y = gs.Variable(lg_name("body", "y"), dtype, shape)
        replace_tensor(rng.out.inputs[0].outputs, rng.out, y)

    x_next, state_out = build_update(b, plan.reg, iteration, y, x_prev, state_in, weight, shape)
    halt_in: list[gs.Variable] = []
    halt_out: list[gs.Tensor] = []
    if halting is not None:
        x_next, state_out, now = halt.step(b, iteration, x_prev, x_next, state_in, state_out, halt.HaltState(held, prev.used),
                                           halting.tol, plan.spec.halt_metric, shape)
        halt_in, halt_out = [prev.frozen, prev.used, *kv_in], [now.frozen, now.used, *kv_out]
    if plan.early_stop:
        cond_out = halt.still_moving(b, halt_out[0], halting.real)
    else:
        cond_out = b.op("Identity", cond_in, dtype=np.bool_, shape=[], name="cond_out")
    outputs = [cond_out, x_next] + [state_out[s.name] for s in plan.states] + halt_out + carry.body_outputs  # carried before scan outputs
    outputs += [b.op("Identity", t, dtype=dtype, shape=shape, name=f"trace_{n}") for n, t in zip(plan.trace_names, (y, x_next))]
    kv_body, kv_loop = ([], []) if carry.loop_outputs else wire_loop_kv(rng, plan.spec.kv, iteration, plan.iters_dim, b, kv_start, post)
    body = gs.Graph(nodes=rng.nodes + b.nodes, inputs=[iteration, cond_in, x_prev, *state_in.values(), *halt_in, *carry.body_inputs],
                    outputs=outputs + kv_body, name=lg_name("body"), opset=rng.graph.opset)
    body.toposort()  # the regularizer and KV-slice nodes were appended after the range's nodes
    return body, len(b.nodes), kv_loop


def _outer_graph(rng: RangeGraph, plan: RangePlan, body: gs.Graph, iters: gs.Tensor, kv_loop: list[gs.Variable],
                 builders: tuple[BodyBuilder, BodyBuilder, BodyBuilder], carry: KvCarry, halting: _Halting | None = None) -> None:
    """Initial states, the Loop (taking the range output's name: nothing downstream is rewired),
    the noise control and the trace outputs, in place of the range's nodes. With halting the
    Loop also carries frozen/used (and is given cond = true when it may stop early)."""
    kv_start, pre, post = builders
    spec, dtype, shape = plan.spec, plan.dtype, list(plan.shape)
    inits = initial_states(pre, plan.states, rng.x0, shape)
    rng.out.dtype, rng.out.shape = dtype, shape
    finals = {s.name: gs.Variable(lg_name("loop", f"{s.name}_final"), dtype, s.shape) for s in plan.states}
    x_final = rng.out if spec.noise_seed is None else gs.Variable(lg_name("loop", "x_final"), dtype, shape)
    # with an early stop the trace's length is the number of iterations run, not N
    trace_dim = lg_name("iterations_run") if plan.early_stop else plan.iters_dim
    traces = [gs.Variable(lg_name("trace", n), dtype, [trace_dim, *shape]) for n in plan.trace_names]
    cond, halt_init, halt_final = gs.Variable.empty(), [], []
    if halting is not None:
        tok = halt.token_shape(shape)
        halt_init = [halting.init.frozen, halting.init.used, *halting.held_init]
        halt_final = [gs.Variable(lg_name("loop", "frozen_final"), np.bool_, tok), gs.Variable(lg_name("loop", "used_final"), np.int64, tok)]
        halt_final += [gs.Variable(lg_name("loop", f"held{k}_final"), dtype, t.shape) for k, t in enumerate(halting.held_init)]
        if plan.early_stop:  # a given cond makes the body's cond_out count (M still bounds the loop)
            cond = gs.Constant(lg_name("halt", "cond_init"), np.array(True))
    loop = gs.Node("Loop", name=lg_name("loop"), inputs=[iters, cond, rng.x0, *inits.values(), *halt_init, *carry.loop_inputs],
                   outputs=[x_final, *finals.values(), *halt_final, *carry.loop_outputs, *traces, *kv_loop], attrs={"body": body})
    if spec.noise_seed is not None:
        noise_control(post, x_final, finals["r"], rng.out, spec.noise_seed, shape)
    rng.graph.outputs.extend(traces)
    if halting is not None:
        rng.graph.outputs.append(halt.iterations_output(post, halt_final[1], shape))
    splice(rng, plan.at, kv_start.nodes, pre.nodes + [loop] + post.nodes)

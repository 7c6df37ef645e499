"""Unroll a block range: N copies of the range's nodes in straight-line form, no ``Loop``.

The same numbers as the Loop form (the same nodes and the same interpolation nodes, with the
iteration number a constant per copy), for runtimes that prefer straight-line graphs: ORT
refuses CUDA graphs for models with control flow, and TensorRT builds them more simply.

Handles: every regularizer, noise control, trace outputs, with-past exports (``exact``: copy t
reads and writes its own cache pair ``past_key_values.{v}``/``present.{v}`` of the standard layout
directly, no copy; ``stacked``: copy t reads slice t of the stacked past and the presents are
stacked; ``first``/``last``: every copy
reads the one past, the present comes from the first or the last copy).
Halting (``spec.halt``): every copy freezes tokens with the same masks as the Loop body
(:mod:`loopgraph.passes.halt`), so the numbers equal the Loop form's; all N copies always run
(the early stop is a Loop-only saving).
Refuses: ``dynamic`` (N copies are fixed at rewrite time) and everything the Loop form refuses.
All copies read the *same* weight initializers: no weight is stored twice.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from loopgraph.errors import LoopgraphError
from loopgraph.naming import lg_name
from loopgraph.passes import halt
from loopgraph.passes.base import PassResult, Reports
from loopgraph.passes.build import BodyBuilder, RangeGraph, export, initial_states, noise_control, open_range, scalar_param, splice
from loopgraph.passes.kv import name_unrolled_presents, past_slice, stack_pasts, standard_layout, unroll_kv
from loopgraph.passes.plan import RangePass, RangePlan, RangeReport, record_spec
from loopgraph.passes.regularize import build_update


@dataclasses.dataclass(frozen=True)
class UnrollReport(RangeReport):
    copied_nodes: int  # the range's nodes times N


@dataclasses.dataclass
class _Copies:
    """What the N copies produced: their nodes, y_t and x_t per copy, each copy's presents, and
    the carried states after the last copy."""
    state: dict[str, gs.Tensor]
    nodes: list[gs.Node] = dataclasses.field(default_factory=list)
    ys: list[gs.Tensor] = dataclasses.field(default_factory=list)
    xs: list[gs.Tensor] = dataclasses.field(default_factory=list)
    presents: list[list[gs.Tensor]] = dataclasses.field(default_factory=list)
    halted: halt.HaltState | None = None  # after the last copy, with halting


class Unroll(RangePass):
    """Blocks ``[start, end)`` applied N times in straight-line form (see the module docstring)."""

    name = "unroll"
    gives = UnrollReport

    def requires(self, model: onnx.ModelProto, earlier: Reports) -> RangePlan:
        if not self.spec.unroll:
            raise ValueError("Unroll needs a spec with unroll=True (it is recorded in the file)")
        if self.spec.dynamic:
            raise LoopgraphError("--unroll writes N copies of the range, so N cannot be a run-time input; drop --dynamic or --unroll")
        return super().requires(model, earlier)

    def apply(self, model: onnx.ModelProto, plan: RangePlan) -> PassResult[UnrollReport]:
        rng = open_range(model, plan)
        name = plan.param_name
        weight = None if name is None else scalar_param(rng.graph, name, plan.params[name], False)
        kv_start, pre, post = BodyBuilder("kv", plan.dtype), BodyBuilder("init", plan.dtype), BodyBuilder("post", plan.dtype)
        if plan.spec.kv == "stacked":
            stack_pasts(rng, plan.iters_dim, kv_start)
        kv_inputs = unroll_kv(rng, plan.spec) if standard_layout(plan.spec, plan.pasts) else [{} for _ in range(plan.spec.iters)]
        tol = None if plan.spec.halt is None else scalar_param(rng.graph, halt.HALT_NAME, plan.params[halt.HALT_NAME], False)
        halted = None if tol is None else halt.initial(pre, rng.x0, list(plan.shape))
        copies = _copy_range(rng, plan, weight, initial_states(pre, plan.states, rng.x0, list(plan.shape)), kv_inputs, tol, halted)
        _wire_outputs(rng, plan, copies, post)
        splice(rng, plan.at, kv_start.nodes, pre.nodes + copies.nodes + post.nodes)
        new = export(rng, model, has_body=False)
        record_spec(new, plan)
        return PassResult(new, True, UnrollReport(**plan.report_fields(), copied_nodes=len(rng.nodes) * plan.spec.iters))


def _clone(nodes: list[gs.Node], mapping: dict[int, gs.Tensor], prefix: str) -> list[gs.Node]:
    """Copies of ``nodes`` reading ``mapping[id(tensor)]`` where given (else the same outer tensor,
    e.g. a weight), writing fresh tensors named ``prefix + original name``."""
    copies = []
    for node in nodes:
        outputs = []
        for o in node.outputs:
            if not o.name:  # an omitted optional output (a skip-norm's mean/inv-std): stays omitted
                outputs.append(gs.Variable.empty())
                continue
            mapping[id(o)] = gs.Variable(prefix + o.name if o.name.startswith("/") else f"{prefix}/{o.name}", o.dtype, o.shape)
            outputs.append(mapping[id(o)])
        copies.append(gs.Node(node.op, name=f"{prefix}{node.name}" if node.name.startswith("/") else f"{prefix}/{node.name}",
                              attrs=dict(node.attrs), inputs=[mapping.get(id(t), t) for t in node.inputs], outputs=outputs,
                              domain=node.domain))
    return copies


def _copy_range(rng: RangeGraph, plan: RangePlan, weight: gs.Tensor | None, state: dict[str, gs.Tensor],
                kv_inputs: list[dict[int, gs.Tensor]], tol: gs.Tensor | None = None, halted: halt.HaltState | None = None) -> _Copies:
    """Copy t (t = 1..N): y_t = B(x_{t-1}) with the range's nodes cloned, then the regularizer's
    update with the iteration number a constant (and the halting masks when ``tol`` is given).
    ``state``: the states' initial values; ``kv_inputs[t - 1]``: the cache inputs copy t reads
    instead of the exported ones (standard layout)."""
    done, x_prev = _Copies(state, halted=halted), rng.x0
    for t in range(1, plan.spec.iters + 1):
        b = BodyBuilder(f"iter{t}", plan.dtype)
        iteration = b.const(np.array(t - 1, np.int64), "iteration")
        mapping: dict[int, gs.Tensor] = {id(rng.x0): x_prev, **kv_inputs[t - 1]}
        if plan.spec.kv == "stacked":
            mapping.update({id(past): past_slice(b, past, iteration) for past in rng.pasts})
        head = list(b.nodes)
        del b.nodes[:]
        nodes_t = _clone(rng.nodes, mapping, lg_name(f"iter{t}"))
        y = mapping[id(rng.out)]
        x_cand, state_cand = build_update(b, plan.reg, iteration, y, x_prev, done.state, weight, list(plan.shape))
        if done.halted is not None:
            x_cand, state_cand, done.halted = halt.step(b, iteration, x_prev, x_cand, done.state, state_cand, done.halted,
                                                        tol, plan.spec.halt_metric, list(plan.shape))
        x_prev, done.state = x_cand, state_cand
        done.nodes += head + nodes_t + b.nodes
        done.ys.append(y)
        done.xs.append(x_prev)
        done.presents.append([mapping[id(p)] for p in rng.presents])
    return done


def _stack(b: BodyBuilder, tensors: list[gs.Tensor], out: gs.Variable, name: str) -> None:
    """``out = [N, ...]`` from N tensors: Unsqueeze each on axis 0 and Concat."""
    axes = b.const(np.array([0], np.int64), f"{name}_axis")
    parts = [b.op("Unsqueeze", t, axes, dtype=t.dtype, name=f"{name}_{i}") for i, t in enumerate(tensors)]
    b.nodes.append(gs.Node("Concat", name=lg_name(b.scope, name, "concat"), inputs=parts, outputs=[out], attrs={"axis": 0}))


def _wire_outputs(rng: RangeGraph, plan: RangePlan, copies: _Copies, post: BodyBuilder) -> None:
    """Outer wiring: presents (stacked, or the first or last copy's), trace outputs, and the range
    output (same name as before, so nothing downstream is rewired)."""
    spec, shape = plan.spec, list(plan.shape)
    if standard_layout(spec, plan.pasts):  # each copy writes its own present.{v}: no node, no copy
        name_unrolled_presents(rng, copies.presents, spec)
    for i, present in enumerate([] if standard_layout(spec, plan.pasts) else rng.presents):
        present.inputs.clear()
        if spec.kv == "stacked":
            present.shape = [spec.iters, *(present.shape or [])]
            _stack(post, [c[i] for c in copies.presents], present, f"{present.name}/stack")
        else:
            chosen = copies.presents[0 if spec.kv == "first" else -1][i]
            post.nodes.append(gs.Node("Identity", name=lg_name("post", present.name, spec.kv), inputs=[chosen], outputs=[present]))
    if spec.trace:
        for name, states_t in (("y", copies.ys), ("x", copies.xs)):
            traced = gs.Variable(lg_name("trace", name), plan.dtype, [spec.iters, *shape])
            _stack(post, states_t, traced, f"trace_{name}")
            rng.graph.outputs.append(traced)
    if copies.halted is not None:
        rng.graph.outputs.append(halt.iterations_output(post, copies.halted.used, shape))
    rng.out.inputs.clear()
    x_last = copies.xs[-1]
    if spec.noise_seed is not None:
        noise_control(post, x_last, copies.state["r"], rng.out, spec.noise_seed, shape)
    else:
        post.nodes.append(gs.Node("Identity", name=lg_name("post", "x_final"), inputs=[x_last], outputs=[rng.out]))

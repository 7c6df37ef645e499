"""KV-cache wiring of a looped range in a with-past export (DESIGN §5).

Every iteration of a looped block sees a different input, so it needs its own cache. The
plan's KV slots (:class:`loopgraph.passes.plan.KvSlot`) say which caches are the looped blocks'.

- ``exact`` (the standard layout, the default): a model of L blocks looped over [S, E) N times
  executes V = L + (N - 1)(E - S) block applications, the *virtual layers*. Each gets an
  ordinary rank-4 pair ``past_key_values.{v}.key/.value`` [batch, kv_heads, past, head_dim] and
  ``present.{v}.*``, numbered 0..V-1 in execution order (:func:`virtual_layers`): the file looks
  like a deeper model, so Optimum's ``ORTModelForCausalLM`` and onnxruntime-genai drive it as is.
  In the Loop form each looped cache tensor is N loop-carried values that rotate by one slot per
  iteration (:func:`carry_kv`): iteration t reads slot 0 (its own past), the body returns
  ``(slot 1, ..., slot N-1, present_t)``, so after N iterations slot j holds present_j. ORT hands
  carried values from one iteration to the next without a copy and copies each final carried
  value into the Loop's output once (``loop.cc``: "no way to avoid a copy as we need the final
  shape"): one copy of the looped presents per step, no copy of the pasts. (``stacked`` copies
  twice: the ``Gather`` of the past slice and the scan-output concatenation.) With ``unroll``
  copy t reads and writes its own pair directly (:func:`unroll_kv`): no copy at all.
- ``stacked``: for each looped block, ``past_key_values.L.*`` gains a leading axis of size N
  ([N, batch, kv_heads, past, head_dim]); iteration t reads its slice with
  ``Gather(past, t, axis=0)``; ``present.L.*`` becomes a Loop scan output (stacked per
  iteration: [N, batch, kv_heads, past + seq, head_dim]). Equivalent to recomputing without a
  cache; the one layout that allows ``dynamic`` (N at run time: the number of pairs would follow N).
- ``first`` / ``last``: the original inputs and outputs are kept (one cache slot per block) so
  stock drivers (Optimum's ORTModelForCausalLM) can run the file. Every iteration attends to
  that one past; the present is the first or the last iteration's. An approximation.

Two traps handled here: body tensors that read ``present.L.*`` are renamed with their
producer (else the graph gets a cycle through the outer name), and outer reads of a past
input whose rank changed (``Shape(past_key_values.0.key)`` gives the past length for masks and
positions) are pointed at iteration 0's slice.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from loopgraph.errors import LoopgraphError
from loopgraph.metadata import VIRTUAL_LAYERS_KEY, set_props
from loopgraph.naming import PAST_PREFIX, PRESENT_PREFIX, lg_name
from loopgraph.passes.build import BodyBuilder, RangeGraph, replace_tensor
from loopgraph.spec import LoopSpec


def stack_pasts(rng: RangeGraph, iters_dim: int | str, outer_pre: BodyBuilder) -> None:
    """``stacked``: give each looped past its leading axis of N; outer readers (``Shape(past)``
    for the past length) read iteration 0's slice instead."""
    in_body = rng.node_ids
    for past in rng.pasts:
        outer_readers = [c for c in past.outputs if id(c) not in in_body]
        past.shape = [iters_dim, *past.shape]
        if outer_readers:  # e.g. Shape(past) for the past length: iteration 0 has it
            first = outer_pre.op("Gather", past, outer_pre.const(np.array(0, np.int64), f"{past.name}/zero"),
                                 attrs={"axis": 0}, dtype=past.dtype, shape=past.shape[1:], name=f"{past.name}/iteration0")
            for node in outer_readers:
                replace_tensor(node.inputs, past, first)


def past_slice(b: BodyBuilder, past: gs.Variable, iteration: gs.Tensor) -> gs.Variable:
    """``stacked``: iteration t's cache, ``past[t]`` (after :func:`stack_pasts`)."""
    return b.op("Gather", past, iteration, attrs={"axis": 0}, dtype=past.dtype, shape=past.shape[1:], name=f"{past.name}/iteration")


def wire_loop_kv(rng: RangeGraph, mode: str, iteration: gs.Variable, iters_dim: int | str,
                 body: BodyBuilder, outer_pre: BodyBuilder, outer_post: BodyBuilder) -> tuple[list[gs.Tensor], list[gs.Variable]]:
    """Rewire the looped blocks' caches for the Loop form (``stacked``, ``first``, ``last``; the
    standard layout is :func:`carry_kv`). Returns (body scan outputs, Loop scan outputs)."""
    in_body = rng.node_ids
    if mode == "stacked":
        inner_readers = {id(p): [c for c in p.outputs if id(c) in in_body] for p in rng.pasts}
        stack_pasts(rng, iters_dim, outer_pre)
        for past in rng.pasts:
            sliced = past_slice(body, past, iteration)
            for node in inner_readers[id(past)]:
                replace_tensor(node.inputs, past, sliced)

    body_scan, loop_scan = [], []
    for present in rng.presents:
        inner = gs.Variable(lg_name("body", present.name), present.dtype, present.shape)
        producer = present.inputs[0]
        for node in [c for c in present.outputs if id(c) in in_body]:
            replace_tensor(node.inputs, present, inner)
        replace_tensor(producer.outputs, present, inner)
        body_scan.append(inner)
        stacked_shape = [iters_dim, *(present.shape or [])]
        if mode == "stacked":
            present.shape = stacked_shape
            loop_scan.append(present)
        else:
            stacked = gs.Variable(lg_name("kv", present.name, "all_iterations"), present.dtype, stacked_shape)
            loop_scan.append(stacked)
            index = outer_post.const(np.array(0 if mode == "first" else -1, np.int64), f"{present.name}/{mode}")
            outer_post.nodes.append(gs.Node("Gather", name=lg_name("kv", present.name, mode), inputs=[stacked, index],
                                            outputs=[present], attrs={"axis": 0}))
    return body_scan, loop_scan


def virtual_layers(num_blocks: int, start: int, end: int, iters: int) -> list[tuple[int, int]]:
    """``(block, iteration)`` of each virtual layer v = 0..V-1, in execution order (iteration is
    0-based; blocks outside the range run once, iteration 0)."""
    looped = [(b, t) for t in range(iters) for b in range(start, end)]
    return [(b, 0) for b in range(start)] + looped + [(b, 0) for b in range(end, num_blocks)]


def virtual_index(block: int, iteration: int, spec: LoopSpec) -> int:
    """The cache pair v of ``block`` at ``iteration`` (0-based) for a resolved ``spec``."""
    if block < spec.start:
        return block
    if block < spec.end:
        return spec.start + iteration * (spec.end - spec.start) + block - spec.start
    return block + (spec.iters - 1) * (spec.end - spec.start)


def standard_layout(spec: LoopSpec, pasts) -> bool:
    """True when the rewrite writes the standard layout: ``kv="exact"`` and the range reads caches."""
    return spec.kv == "exact" and bool(pasts)


def check_kv(spec: LoopSpec, pasts: tuple[str, ...], presents: tuple[str, ...]) -> None:
    """Preconditions of the standard layout (the range plan calls this before anything changes):
    ``dynamic`` needs the stacked layout (the number of pairs follows N), and the looped caches
    must be named ``past_key_values.{block}.{kind}`` with their presents inside the range."""
    if not standard_layout(spec, pasts):
        return
    if spec.dynamic:
        raise LoopgraphError("--dynamic makes N a run-time input, but --kv exact writes one cache pair per virtual layer "
                             "(their number depends on N); use --kv stacked (rank-5 caches) with --dynamic, or drop --dynamic")
    for past in pasts:
        block, kind = _layer(past, PAST_PREFIX)
        if not spec.start <= block < spec.end or f"{PRESENT_PREFIX}{block}.{kind}" not in presents:
            raise LoopgraphError(f"cache input {past} is read inside range {spec.range_str}, but its layer or its present "
                                 "does not belong to the range; the cache names do not follow the block numbering")


def _layer(name: str, prefix: str) -> tuple[int, str]:
    """``past_key_values.3.key`` -> (3, "key")."""
    index, _, kind = name[len(prefix):].partition(".")
    if not index.isdigit() or not kind:
        raise LoopgraphError(f"cache tensor {name} is not named {prefix}<layer>.<key|value>; "
                             "re-export with Optimum (loopgraph export --with-past)")
    return int(index), kind


def _looped_caches(rng: RangeGraph) -> list[tuple[gs.Variable, gs.Variable, int, str]]:
    """``(past, present, block, kind)`` of every cache tensor the range reads (checked by :func:`check_kv`)."""
    presents = {t.name: t for t in rng.presents}
    out = []
    for past in rng.pasts:
        block, kind = _layer(past.name, PAST_PREFIX)
        out.append((past, presents[f"{PRESENT_PREFIX}{block}.{kind}"], block, kind))
    return out


@dataclasses.dataclass
class KvCarry:
    """The standard layout's loop-carried caches: what the Loop and its body gain, in order."""
    loop_inputs: list[gs.Tensor] = dataclasses.field(default_factory=list)
    body_inputs: list[gs.Variable] = dataclasses.field(default_factory=list)
    body_outputs: list[gs.Tensor] = dataclasses.field(default_factory=list)
    loop_outputs: list[gs.Variable] = dataclasses.field(default_factory=list)


def carry_kv(rng: RangeGraph, spec: LoopSpec) -> KvCarry:
    """Standard layout in the Loop form: N rotating loop-carried slots per looped cache tensor
    (module docstring). Adds inputs ``past_key_values.{v}.*`` for iterations 1..N-1 (iteration 0
    keeps the exported name: v(b, 0) = b inside the range) and makes the Loop write every
    ``present.{v}.*``; the caches of the blocks after the range are renumbered (:func:`number_virtual_layers`)."""
    graph, in_body = rng.graph, rng.node_ids
    caches = _looped_caches(rng)
    number_virtual_layers(graph, spec)
    carry = KvCarry()
    for past, present, block, kind in caches:
        # [batch, kv_heads, past, head_dim]; the past axis changes length (past -> past + seq) as slots rotate
        slot_shape = None if past.shape is None else [*past.shape[:-2], None, past.shape[-1]]
        # named under loopgraph/body/kv/: deploy.tensorrt recognises the slots by this scope
        slots = [gs.Variable(lg_name("body", "kv", f"{block}.{kind}", f"slot{j}"), past.dtype, slot_shape) for j in range(spec.iters)]
        for node in [c for c in past.outputs if id(c) in in_body]:  # this iteration's past is slot 0
            replace_tensor(node.inputs, past, slots[0])
        inner = gs.Variable(lg_name("body", present.name), present.dtype, present.shape)
        for node in [c for c in present.outputs if id(c) in in_body]:  # body readers of the present follow it (no cycle)
            replace_tensor(node.inputs, present, inner)
        replace_tensor(present.inputs[0].outputs, present, inner)
        extra_pasts = [gs.Variable(f"{PAST_PREFIX}{virtual_index(block, t, spec)}.{kind}", past.dtype, past.shape) for t in range(1, spec.iters)]
        extra_presents = [gs.Variable(f"{PRESENT_PREFIX}{virtual_index(block, t, spec)}.{kind}", present.dtype, present.shape)
                          for t in range(1, spec.iters)]
        graph.inputs.extend(extra_pasts)
        graph.outputs.extend(extra_presents)
        carry.loop_inputs += [past, *extra_pasts]
        carry.body_inputs += slots
        carry.body_outputs += [*slots[1:], inner]  # rotate: slot j+1 -> slot j, this iteration's present -> slot N-1
        carry.loop_outputs += [present, *extra_presents]
    order_caches(graph)
    return carry


def unroll_kv(rng: RangeGraph, spec: LoopSpec) -> list[dict[int, gs.Tensor]]:
    """Standard layout in the unrolled form: per copy t, the input mapping ``{id(past):
    past_key_values.{v(b,t)}.*}`` for the clone of the range (copy 0 reads the exported input).
    The caches of the blocks after the range are renumbered first."""
    caches = _looped_caches(rng)
    number_virtual_layers(rng.graph, spec)
    mappings: list[dict[int, gs.Tensor]] = [{} for _ in range(spec.iters)]
    for past, _, block, kind in caches:
        for t in range(1, spec.iters):
            extra = gs.Variable(f"{PAST_PREFIX}{virtual_index(block, t, spec)}.{kind}", past.dtype, past.shape)
            rng.graph.inputs.append(extra)
            mappings[t][id(past)] = extra
    return mappings


def name_unrolled_presents(rng: RangeGraph, copies: list[list[gs.Tensor]], spec: LoopSpec) -> None:
    """Copy t's present tensors (``copies[t][i]`` for ``rng.presents[i]``) become the graph outputs
    ``present.{v(b,t)}.*`` themselves (no Identity, no copy); the exported presents are dropped."""
    for i, present in enumerate(rng.presents):
        block, kind = _layer(present.name, PRESENT_PREFIX)
        rng.graph.outputs.remove(present)
        for t, produced_t in enumerate(copies):
            produced = produced_t[i]
            produced.name = f"{PRESENT_PREFIX}{virtual_index(block, t, spec)}.{kind}"
            produced.dtype, produced.shape = present.dtype, present.shape
            rng.graph.outputs.append(produced)
    order_caches(rng.graph)


def number_virtual_layers(graph: gs.Graph, spec: LoopSpec) -> None:
    """Renumber the exported caches of the blocks after the range: b -> b + (N-1)(E-S). Called
    before any cache of iterations 1..N-1 is added (their numbers lie in between)."""
    for tensors, prefix in ((graph.inputs, PAST_PREFIX), (graph.outputs, PRESENT_PREFIX)):
        for t in [t for t in tensors if t.name.startswith(prefix)]:
            block, kind = _layer(t.name, prefix)
            if block >= spec.end:
                t.name = f"{prefix}{block + (spec.iters - 1) * (spec.end - spec.start)}.{kind}"


def order_caches(graph: gs.Graph) -> None:
    """Order the cache inputs and outputs by v (Optimum pairs pasts and presents by position),
    key before value as exported, where the first cache input/output stood."""
    for tensors, prefix in ((graph.inputs, PAST_PREFIX), (graph.outputs, PRESENT_PREFIX)):
        caches = [t for t in tensors if t.name.startswith(prefix)]
        if not caches:
            continue
        kinds = list(dict.fromkeys(_layer(t.name, prefix)[1] for t in caches))
        caches.sort(key=lambda t: (_layer(t.name, prefix)[0], kinds.index(_layer(t.name, prefix)[1])))
        at = next(i for i, t in enumerate(tensors) if t.name.startswith(prefix))
        rest = [t for t in tensors if not t.name.startswith(prefix)]
        tensors[:] = rest[:at] + caches + rest[at:]


def record_virtual_layers(model: onnx.ModelProto, spec: LoopSpec, num_blocks: int) -> None:
    """Write the virtual-layer map (v -> [block, iteration]) into the file's metadata."""
    set_props(model, {VIRTUAL_LAYERS_KEY: json.dumps(virtual_layers(num_blocks, spec.start, spec.end, spec.iters))})

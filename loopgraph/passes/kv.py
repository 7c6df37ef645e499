"""KV-cache wiring of a looped range in a with-past export (DESIGN §5).

Every iteration of a looped block sees a different input, so it needs its own cache.

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
  copy t reads and writes its own pair directly: no copy at all.
- ``stacked``: for each looped block, ``past_key_values.L.*`` gains a leading axis of size N
  ([N, batch, kv_heads, past, head_dim]); the body reads its slice with
  ``Gather(past, iteration, axis=0)``; ``present.L.*`` becomes a Loop scan output
  ([N, batch, kv_heads, past + seq, head_dim]). Equivalent to recomputing without a cache.
  The one layout that allows ``dynamic`` (N at run time: the number of pairs would depend on N).
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
from loopgraph.passes.regularize import BodyBuilder, lg_name, replace_tensor
from loopgraph.spec import LoopSpec

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def wire_kv(graph: gs.Graph, body_nodes: list[gs.Node], mode: str, iteration: gs.Variable, iters_dim,
            body: BodyBuilder, outer_pre: BodyBuilder, outer_post: BodyBuilder) -> tuple[list[gs.Tensor], list[gs.Variable]]:
    """Rewire the caches of the looped blocks. Returns (body scan outputs, Loop scan outputs)."""
    in_body = {id(n) for n in body_nodes}
    past_inputs = [t for t in graph.inputs if t.name.startswith(PAST_PREFIX)
                   and any(id(c) in in_body for c in t.outputs)]
    present_outputs = [t for t in graph.outputs if t.name.startswith(PRESENT_PREFIX)
                       and t.inputs and id(t.inputs[0]) in in_body]
    if mode == "stacked":
        for past in past_inputs:
            inner_readers = [c for c in past.outputs if id(c) in in_body]
            outer_readers = [c for c in past.outputs if id(c) not in in_body]
            past.shape = [iters_dim, *past.shape]
            sliced = body.op("Gather", past, iteration, attrs={"axis": 0}, dtype=past.dtype, shape=past.shape[1:],
                             name=f"{past.name}/iteration")
            for node in inner_readers:
                replace_tensor(node.inputs, past, sliced)
            if outer_readers:  # e.g. Shape(past) for the past length: iteration 0 has it
                first = outer_pre.op("Gather", past, outer_pre.const(np.array(0, np.int64), f"{past.name}/zero"),
                                     attrs={"axis": 0}, dtype=past.dtype, shape=past.shape[1:], name=f"{past.name}/iteration0")
                for node in outer_readers:
                    replace_tensor(node.inputs, past, first)

    body_scan, loop_scan = [], []
    for present in present_outputs:
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


def standard_layout(spec: LoopSpec, graph_inputs) -> bool:
    """True when the rewrite writes the standard layout: ``kv="exact"`` on a with-past export."""
    return spec.kv == "exact" and any(t.name.startswith(PAST_PREFIX) for t in graph_inputs)


def check_kv(model: onnx.ModelProto, spec: LoopSpec) -> None:
    """Precondition: ``dynamic`` needs the stacked layout (the number of pairs follows N)."""
    if spec.dynamic and standard_layout(spec, model.graph.input):
        raise LoopgraphError("--dynamic makes N a run-time input, but --kv exact writes one cache pair per virtual layer "
                             "(their number depends on N); use --kv stacked (rank-5 caches) with --dynamic, or drop --dynamic")


def _layer(name: str, prefix: str) -> tuple[int, str]:
    """``past_key_values.3.key`` -> (3, "key")."""
    index, _, kind = name[len(prefix):].partition(".")
    if not index.isdigit() or not kind:
        raise LoopgraphError(f"cache tensor {name} is not named {prefix}<layer>.<key|value>; "
                             "re-export with Optimum (loopgraph export --with-past)")
    return int(index), kind


def _looped_caches(graph: gs.Graph, in_body: set[int], spec: LoopSpec) -> list[tuple[gs.Variable, gs.Variable, int, str]]:
    """``(past, present, block, kind)`` of every cache tensor the range reads, checked against the range."""
    presents = {t.name: t for t in graph.outputs if t.name.startswith(PRESENT_PREFIX)}
    out = []
    for past in [t for t in graph.inputs if t.name.startswith(PAST_PREFIX) and any(id(c) in in_body for c in t.outputs)]:
        block, kind = _layer(past.name, PAST_PREFIX)
        present = presents.get(f"{PRESENT_PREFIX}{block}.{kind}")
        if not spec.start <= block < spec.end or present is None or not present.inputs or id(present.inputs[0]) not in in_body:
            raise LoopgraphError(f"cache input {past.name} is read inside range {spec.range_str}, but its layer or its present "
                                 "does not belong to the range; the cache names do not follow the block numbering")
        out.append((past, present, block, kind))
    return out


@dataclasses.dataclass
class KvCarry:
    """The standard layout's loop-carried caches: what the Loop and its body gain, in order."""
    loop_inputs: list[gs.Tensor] = dataclasses.field(default_factory=list)
    body_inputs: list[gs.Variable] = dataclasses.field(default_factory=list)
    body_outputs: list[gs.Tensor] = dataclasses.field(default_factory=list)
    loop_outputs: list[gs.Variable] = dataclasses.field(default_factory=list)


def carry_kv(graph: gs.Graph, body_nodes: list[gs.Node], spec: LoopSpec) -> KvCarry:
    """Standard layout in the Loop form: N rotating loop-carried slots per looped cache tensor
    (module docstring). Adds inputs ``past_key_values.{v}.*`` for iterations 1..N-1 (iteration 0
    keeps the exported name: v(b, 0) = b inside the range) and makes the Loop write every
    ``present.{v}.*``; the caches of the blocks after the range are renumbered (:func:`number_virtual_layers`)."""
    in_body = {id(n) for n in body_nodes}
    caches = _looped_caches(graph, in_body, spec)
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


def unroll_kv(graph: gs.Graph, body_nodes: list[gs.Node], spec: LoopSpec) -> tuple[list[dict[int, gs.Tensor]], list[tuple[gs.Variable, int, str]]]:
    """Standard layout in the unrolled form. Returns, per copy t, the input mapping
    ``{id(past): past_key_values.{v(b,t)}.*}`` for :func:`passes.unroll._clone` (copy 0 reads the
    exported input), and ``(present, block, kind)`` of each looped present for
    :func:`name_unrolled_presents`."""
    in_body = {id(n) for n in body_nodes}
    caches = _looped_caches(graph, in_body, spec)
    number_virtual_layers(graph, spec)
    mappings: list[dict[int, gs.Tensor]] = [{} for _ in range(spec.iters)]
    for past, _, block, kind in caches:
        for t in range(1, spec.iters):
            extra = gs.Variable(f"{PAST_PREFIX}{virtual_index(block, t, spec)}.{kind}", past.dtype, past.shape)
            graph.inputs.append(extra)
            mappings[t][id(past)] = extra
    return mappings, [(present, block, kind) for _, present, block, kind in caches]


def name_unrolled_presents(graph: gs.Graph, presents: list[tuple[gs.Variable, int, str]], copies: list[dict[int, gs.Tensor]],
                           spec: LoopSpec) -> None:
    """Copy t's present tensors become the graph outputs ``present.{v(b,t)}.*`` themselves (no
    Identity, no copy); the exported present outputs of the range are dropped."""
    for present, block, kind in presents:
        graph.outputs.remove(present)
        for t, mapping in enumerate(copies):
            produced = mapping[id(present)]
            produced.name = f"{PRESENT_PREFIX}{virtual_index(block, t, spec)}.{kind}"
            produced.dtype, produced.shape = present.dtype, present.shape
            graph.outputs.append(produced)
    order_caches(graph)


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

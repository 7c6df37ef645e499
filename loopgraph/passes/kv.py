"""KV-cache wiring of a looped range in a with-past export (DESIGN §5).

Every iteration of a looped block sees a different input, so it needs its own cache. The
plan's KV slots (:class:`loopgraph.passes.plan.KvSlot`) say which caches are the looped blocks'.

- ``exact``: for each looped block, ``past_key_values.L.*`` gains a leading axis of size N
  ([N, batch, kv_heads, past, head_dim]); iteration t reads its slice with
  ``Gather(past, t, axis=0)``; ``present.L.*`` becomes a Loop scan output (stacked per
  iteration: [N, batch, kv_heads, past + seq, head_dim]). Equivalent to recomputing without a cache.
- ``first`` / ``last``: the original inputs and outputs are kept (one cache slot per block) so
  stock drivers (Optimum's ORTModelForCausalLM) can run the file. Every iteration attends to
  that one past; the present is the first or the last iteration's. An approximation.

Two traps handled here: body tensors that read ``present.L.*`` are renamed with their
producer (else the graph gets a cycle through the outer name), and outer reads of a past
input whose rank changed (``Shape(past_key_values.0.key)`` gives the past length for masks and
positions) are pointed at iteration 0's slice.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from loopgraph.naming import lg_name
from loopgraph.passes.build import BodyBuilder, RangeGraph, replace_tensor


def stack_pasts(rng: RangeGraph, iters_dim: int | str, outer_pre: BodyBuilder) -> None:
    """``exact``: give each looped past its leading axis of N; outer readers (``Shape(past)``
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
    """``exact``: iteration t's cache, ``past[t]`` (after :func:`stack_pasts`)."""
    return b.op("Gather", past, iteration, attrs={"axis": 0}, dtype=past.dtype, shape=past.shape[1:], name=f"{past.name}/iteration")


def wire_loop_kv(rng: RangeGraph, mode: str, iteration: gs.Variable, iters_dim: int | str,
                 body: BodyBuilder, outer_pre: BodyBuilder, outer_post: BodyBuilder) -> tuple[list[gs.Tensor], list[gs.Variable]]:
    """Rewire the looped blocks' caches for the Loop form. Returns (body scan outputs, Loop scan outputs)."""
    in_body = rng.node_ids
    if mode == "exact":
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
        if mode == "exact":
            present.shape = stacked_shape
            loop_scan.append(present)
        else:
            stacked = gs.Variable(lg_name("kv", present.name, "all_iterations"), present.dtype, stacked_shape)
            loop_scan.append(stacked)
            index = outer_post.const(np.array(0 if mode == "first" else -1, np.int64), f"{present.name}/{mode}")
            outer_post.nodes.append(gs.Node("Gather", name=lg_name("kv", present.name, mode), inputs=[stacked, index],
                                            outputs=[present], attrs={"axis": 0}))
    return body_scan, loop_scan

"""KV-cache wiring of a looped range in a with-past export (DESIGN §5).

Every iteration of a looped block sees a different input, so it needs its own cache.

- ``exact``: for each looped block, ``past_key_values.L.*`` gains a leading axis of size N
  ([N, batch, kv_heads, past, head_dim]); the body reads its slice with
  ``Gather(past, iteration, axis=0)``; ``present.L.*`` becomes a Loop scan output
  ([N, batch, kv_heads, past + seq, head_dim]). Equivalent to recomputing without a cache.
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

from loopgraph.passes.regularize import BodyBuilder, lg_name, replace_tensor

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
    if mode == "exact":
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

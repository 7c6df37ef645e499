"""Unroll a block range: N copies of the range's nodes in straight-line form, no ``Loop``.

The same numbers as the Loop form (the same nodes and the same interpolation nodes, with the
iteration number a constant per copy), for runtimes that prefer straight-line graphs: ORT
refuses CUDA graphs for models with control flow, and TensorRT builds them more simply.

Handles: every regularizer, noise control, trace outputs, with-past exports (``exact``: copy t
reads and writes its own cache pair ``past_key_values.{v}``/``present.{v}`` of the standard layout
directly, no copy; ``stacked``: copy t reads slice t of the stacked past and the presents are
stacked; ``first``/``last``: every copy
reads the one past, the present comes from the first or the last copy).
Refuses: ``dynamic`` (N copies are fixed at rewrite time) and everything the Loop form refuses.
All copies read the *same* weight initializers: no weight is stored twice.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from loopgraph.errors import LoopgraphError
from loopgraph.passes.base import PassResult
from loopgraph.passes.blocks import BlockMap
from loopgraph.passes.kv import PAST_PREFIX, PRESENT_PREFIX, name_unrolled_presents, standard_layout, unroll_kv
from loopgraph.passes.loop import (
    check_loopable,
    check_postconditions,
    hidden_type,
    noise_control,
    param_name,
    record_spec,
    restore_model_fields,
    scalar_param,
    select_body,
)
from loopgraph.passes.regularize import BodyBuilder, build_update, extra_states, lg_name, replace_tensor
from loopgraph.spec import REGULARIZERS, LoopSpec


def _clone(nodes: list[gs.Node], mapping: dict[int, gs.Tensor], prefix: str) -> list[gs.Node]:
    """Copies of ``nodes`` reading ``mapping[id(tensor)]`` where given (else the same outer tensor,
    e.g. a weight), writing fresh tensors named ``prefix + original name``."""
    copies = []
    for node in nodes:
        outputs = []
        for o in node.outputs:
            mapping[id(o)] = gs.Variable(prefix + o.name if o.name.startswith("/") else f"{prefix}/{o.name}", o.dtype, o.shape)
            outputs.append(mapping[id(o)])
        copies.append(gs.Node(node.op, name=f"{prefix}{node.name}" if node.name.startswith("/") else f"{prefix}/{node.name}",
                              attrs=dict(node.attrs), inputs=[mapping.get(id(t), t) for t in node.inputs], outputs=outputs,
                              domain=node.domain))
    return copies


def _stack(b: BodyBuilder, tensors: list[gs.Tensor], out: gs.Variable, name: str) -> None:
    """``out = [N, ...]`` from N tensors: Unsqueeze each on axis 0 and Concat."""
    axes = b.const(np.array([0], np.int64), f"{name}_axis")
    parts = [b.op("Unsqueeze", t, axes, dtype=t.dtype, name=f"{name}_{i}") for i, t in enumerate(tensors)]
    b.nodes.append(gs.Node("Concat", name=lg_name(b.scope, name, "concat"), inputs=parts, outputs=[out], attrs={"axis": 0}))


def unroll(model: onnx.ModelProto, spec: LoopSpec, blocks: BlockMap) -> PassResult:
    """Return a new model with blocks ``[spec.start, spec.end)`` applied N times in straight-line form."""
    check_loopable(model, spec, blocks)
    if not spec.unroll:
        raise ValueError("unroll() needs a spec with unroll=True (it is recorded in the file)")
    if spec.dynamic:
        raise LoopgraphError("--unroll writes N copies of the range, so N cannot be a run-time input; drop --dynamic or --unroll")
    x0_name, out_name, body_ids = select_body(model, blocks, spec)
    dtype, shape = hidden_type(model, x0_name)
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    x0, out = tensors[x0_name], tensors[out_name]
    body_nodes = [graph.nodes[i] for i in body_ids]
    in_body = {id(n) for n in body_nodes}
    weight_value = {"alpha": spec.alpha, "k": spec.k}.get(REGULARIZERS[spec.reg] or "")
    weight = None if weight_value is None else scalar_param(graph, param_name(spec.reg), np.array(weight_value, dtype), False)

    pasts = [t for t in graph.inputs if t.name.startswith(PAST_PREFIX) and any(id(c) in in_body for c in t.outputs)]
    presents = [t for t in graph.outputs if t.name.startswith(PRESENT_PREFIX) and t.inputs and id(t.inputs[0]) in in_body]
    kv_start, pre, post = BodyBuilder("kv", dtype), BodyBuilder("init", dtype), BodyBuilder("post", dtype)
    standard = standard_layout(spec, graph.inputs)
    kv_inputs, standard_presents = unroll_kv(graph, body_nodes, spec) if standard else ([{} for _ in range(spec.iters)], [])
    if standard:
        presents = []  # wired by name_unrolled_presents: each copy writes its own present.{v}
    if spec.kv == "stacked":
        for past in pasts:
            outer_readers = [c for c in past.outputs if id(c) not in in_body]
            past.shape = [spec.iters, *past.shape]
            if outer_readers:  # Shape(past) for the past length: iteration 0 has it
                first = kv_start.op("Gather", past, kv_start.const(np.array(0, np.int64), f"{past.name}/zero"), attrs={"axis": 0},
                                    dtype=past.dtype, shape=past.shape[1:], name=f"{past.name}/iteration0")
                for node in outer_readers:
                    replace_tensor(node.inputs, past, first)

    states = extra_states(spec.reg, shape, need_r=spec.noise_seed is not None)
    init = {"x0": x0}
    if any(s.init == "x0_sum" for s in states):
        init["x0_sum"] = pre.op("ReduceSum", x0, pre.const(np.array([-1], np.int64), "hidden_axis"), attrs={"keepdims": 1},
                                dtype=dtype, shape=list(shape[:-1]) + [1], name="x0_sum")
    state = {s.name: init[s.init] for s in states}

    copies: list[gs.Node] = []
    x_prev, ys, xs, per_copy_presents, copy_maps = x0, [], [], [], []
    for t in range(1, spec.iters + 1):
        b = BodyBuilder(f"iter{t}", dtype)
        iteration = b.const(np.array(t - 1, np.int64), "iteration")
        mapping: dict[int, gs.Tensor] = {id(x0): x_prev, **kv_inputs[t - 1]}
        if spec.kv == "stacked":
            for past in pasts:
                mapping[id(past)] = b.op("Gather", past, iteration, attrs={"axis": 0}, dtype=past.dtype, shape=past.shape[1:],
                                         name=f"{past.name}/iteration")
        head = list(b.nodes)
        del b.nodes[:]
        nodes_t = _clone(body_nodes, mapping, lg_name(f"iter{t}"))
        y = mapping[id(out)]
        x_prev, state = build_update(b, spec.reg, iteration, y, x_prev, state, weight, shape)
        copies += head + nodes_t + b.nodes
        ys.append(y)
        xs.append(x_prev)
        per_copy_presents.append([mapping[id(p)] for p in presents])
        copy_maps.append(mapping)

    # Outer wiring: presents, trace outputs, the range output (same name as before).
    for i, present in enumerate(presents):
        present.inputs.clear()
        if spec.kv == "stacked":
            present.shape = [spec.iters, *(present.shape or [])]
            _stack(post, [c[i] for c in per_copy_presents], present, f"{present.name}/stack")
        else:
            chosen = per_copy_presents[0 if spec.kv == "first" else -1][i]
            post.nodes.append(gs.Node("Identity", name=lg_name("post", present.name, spec.kv), inputs=[chosen], outputs=[present]))
    if spec.trace:
        for name, states_t in (("y", ys), ("x", xs)):
            traced = gs.Variable(lg_name("trace", name), dtype, [spec.iters, *shape])
            _stack(post, states_t, traced, f"trace_{name}")
            graph.outputs.append(traced)
    out.inputs.clear()
    if spec.noise_seed is not None:
        noise_control(post, x_prev, state["r"], out, spec.noise_seed, shape)
    else:
        post.nodes.append(gs.Node("Identity", name=lg_name("post", "x_final"), inputs=[x_prev], outputs=[out]))

    if standard:
        name_unrolled_presents(graph, standard_presents, copy_maps, spec)
    producer_index = max(body_ids)
    moved = in_body
    graph.nodes = kv_start.nodes + [n for n in graph.nodes[:producer_index] if id(n) not in moved] + pre.nodes + copies + post.nodes + \
        [n for n in graph.nodes[producer_index:] if id(n) not in moved]
    new = gs.export_onnx(graph, do_type_check=False)
    restore_model_fields(new, model)
    record_spec(new, spec, blocks)
    check_postconditions(new)
    report = {"range": f"{spec.start}:{spec.end}", "blocks": len(blocks), "iters": spec.iters, "reg": spec.reg,
              "copied_nodes": len(body_nodes) * spec.iters, "kv": spec.kv if presents or standard_presents else None,
              "range_input": x0_name, "range_output": out_name}
    return PassResult(new, True, report)

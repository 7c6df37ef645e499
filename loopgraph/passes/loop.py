"""Wrap a block range in an ONNX ``Loop`` that re-applies it N times with a regularizer.

Handles: any range of blocks found by :mod:`loopgraph.passes.blocks` (including S = 0 and the
full depth), every regularizer, baked or ``dynamic`` trip count and weight.
With-past exports: the looped blocks' caches are wired by :mod:`loopgraph.passes.kv`
(``spec.kv``: exact caches in the standard layout, one pair per virtual layer, or stacked
per iteration; or first/last-iteration approximations).
Refuses: a model that is already looped, opset < 13, a range whose intermediate tensors are
read after the range (the body could not be closed).

How the graph is built (DESIGN §5):
- The body is chosen by dataflow: nodes whose values depend on the range input and that feed
  the range output. Nodes in the range that do not (constants, rotary cos/sin, the causal mask
  built from ``Shape(h)``) stay in the main graph and the body reads them from the outer scope.
- Weights stay main-graph initializers read by the body (outer-scope capture); the body holds
  no initializers at all (:func:`fix_subgraph_scope` repairs onnx-graphsurgeon's export).
- ``Loop(M, cond="", x0, states...)``: M is always given (TensorRT defines the iteration
  counter only then), cond is empty, the body returns ``Identity(cond_in)``.
- The Loop output takes the range output's name, so nothing downstream is rewired; the body's
  copy of it is renamed ``loopgraph/body/y``. Every added name carries ``loopgraph/``.
- Loop outputs and body inputs have declared shapes, because ONNX shape inference drops the
  shape of Loop outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from loopgraph._version import __version__
from loopgraph.errors import LoopgraphError
from loopgraph.passes.base import PassResult
from loopgraph.passes.blocks import BlockMap
from loopgraph.passes.dataflow import GraphIndex
from loopgraph.passes.kv import PRESENT_PREFIX, KvCarry, carry_kv, check_kv, record_virtual_layers, standard_layout, wire_kv
from loopgraph.passes.regularize import BodyBuilder, build_update, extra_states, lg_name, replace_tensor
from loopgraph.spec import METADATA_KEY, REGULARIZERS, LoopSpec

MIN_OPSET = 13
ITERS_NAME = lg_name("iters")


def param_name(reg: str) -> str | None:
    """Name of the graph tensor holding the regularizer's parameter (alpha or K)."""
    p = REGULARIZERS[reg]
    return lg_name(p) if p else None


def is_looped(model: onnx.ModelProto) -> bool:
    return any(p.key == METADATA_KEY for p in model.metadata_props) or any(
        n.name.startswith(lg_name("")) for n in model.graph.node
    )


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def hidden_type(model: onnx.ModelProto, name: str) -> tuple[np.dtype, list]:
    """dtype and symbolic shape of the residual stream tensor ``name``."""
    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input)}
    if name not in infos:
        inferred = onnx.shape_inference.infer_shapes(model)
        infos.update({v.name: v for v in inferred.graph.value_info})
    info = infos.get(name)
    if info is None or not info.type.tensor_type.HasField("shape"):
        raise LoopgraphError(f"cannot infer the shape of the range input {name}; "
                             "re-export the model (shape inference found no shape for it)")
    tt = info.type.tensor_type
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tt.shape.dim]
    return helper.tensor_dtype_to_np_dtype(tt.elem_type), shape


def check_loopable(model: onnx.ModelProto, spec: LoopSpec, blocks: BlockMap) -> None:
    """Preconditions shared by the Loop and the unroll forms."""
    if is_looped(model):
        raise LoopgraphError("the model is already looped by loopgraph; rewrite the original export instead")
    if default_opset(model) < MIN_OPSET:
        raise LoopgraphError(f"opset {default_opset(model)} is too old for the rewrite; "
                             f"re-export with --opset {MIN_OPSET} or newer")
    if spec.start is None or spec.end is None or not 0 <= spec.start < spec.end <= len(blocks):
        raise LoopgraphError(f"range {spec.range_str} is not resolved against the model's "
                             f"{len(blocks)} blocks; call spec.resolve(len(blocks)) first")
    check_kv(model, spec)


def select_body(model: onnx.ModelProto, blocks: BlockMap, spec: LoopSpec) -> tuple[str, str, list[int]]:
    """(range input, range output, body node indices in graph order) or a clear refusal."""
    index = GraphIndex(model.graph)
    x0 = blocks.blocks[spec.start].input
    out = blocks.blocks[spec.end - 1].output
    body = index.between(x0, [out])  # a looped block's present feeds its attention, so it is in here
    for i in sorted(body):
        for t in index.nodes[i].output:
            if t == out or not t:
                continue
            leak = [j for j in index.consumers.get(t, ()) if j not in body]
            if t.startswith(PRESENT_PREFIX) and t in index.graph_outputs and not leak:
                continue  # a looped block's cache output: becomes a Loop scan output
            if leak or t in index.graph_outputs:
                who = index.nodes[leak[0]].name if leak else "a graph output"
                raise LoopgraphError(
                    f"tensor {t} computed inside range {spec.range_str} is also read by {who} "
                    "outside the range, so the range cannot be closed into a Loop body; "
                    "export without extra outputs (e.g. hidden states)")
    return x0, out, sorted(body)


def wrap_in_loop(model: onnx.ModelProto, spec: LoopSpec, blocks: BlockMap) -> PassResult:
    """Return a new model with blocks ``[spec.start, spec.end)`` inside a Loop. ``model`` is
    not modified. The model may be weight-less (stubs from :func:`onnxio.detach_weights`)."""
    check_loopable(model, spec, blocks)
    if spec.unroll:
        raise ValueError("wrap_in_loop() got a spec with unroll=True; use passes.unroll.unroll()")
    x0_name, out_name, body_ids = select_body(model, blocks, spec)
    dtype, shape = hidden_type(model, x0_name)

    graph = gs.import_onnx(model)
    if len(graph.nodes) != len(model.graph.node):
        raise RuntimeError("onnx-graphsurgeon changed the node count on import")
    tensors = graph.tensors()
    x0, out = tensors[x0_name], tensors[out_name]
    body_nodes = [graph.nodes[i] for i in body_ids]

    # Outer-scope parameters: trip count and regularizer weight (initializers, or inputs if dynamic).
    weight_value = {"alpha": spec.alpha, "k": spec.k}.get(REGULARIZERS[spec.reg] or "")
    params = {ITERS_NAME: np.array(spec.iters, np.int64)}
    if weight_value is not None:
        params[param_name(spec.reg)] = np.array(weight_value, dtype)
    outer = {name: scalar_param(graph, name, value, spec.dynamic) for name, value in params.items()}
    iters, weight = outer[ITERS_NAME], outer.get(param_name(spec.reg))

    # Body inputs: iteration number, condition, x_{t-1} and the regularizer's carried states.
    b = BodyBuilder("body", dtype)
    iteration = gs.Variable(lg_name("body", "iteration"), np.int64, [])
    cond_in = gs.Variable(lg_name("body", "cond_in"), np.bool_, [])
    x_prev = gs.Variable(lg_name("body", "x_prev"), dtype, shape)  # [batch, seq, hidden]
    states = extra_states(spec.reg, shape, need_r=spec.noise_seed is not None)
    state_in = {s.name: gs.Variable(lg_name("body", f"{s.name}_prev"), dtype, s.shape) for s in states}

    # y_t = B(x_{t-1}): the range's own nodes, reading x_prev instead of x0.
    for node in body_nodes:
        replace_tensor(node.inputs, x0, x_prev)
    y = gs.Variable(lg_name("body", "y"), dtype, shape)
    producer = out.inputs[0]
    replace_tensor(producer.outputs, out, y)

    x_next, state_out = build_update(b, spec.reg, iteration, y, x_prev, state_in, weight, shape)
    cond_out = b.op("Identity", cond_in, dtype=np.bool_, shape=[], name="cond_out")
    standard = standard_layout(spec, graph.inputs)
    carry = carry_kv(graph, body_nodes, spec) if standard else KvCarry()  # loop-carried: before the scan outputs
    body_outputs = [cond_out, x_next] + [state_out[s.name] for s in states] + carry.body_outputs
    trace_names = ("y", "x") if spec.trace else ()
    body_outputs += [b.op("Identity", t, dtype=dtype, shape=shape, name=f"trace_{n}") for n, t in zip(trace_names, (y, x_next))]
    iters_dim = "loopgraph_iters" if spec.dynamic else spec.iters
    pre, post, kv_start = BodyBuilder("init", dtype), BodyBuilder("post", dtype), BodyBuilder("kv", dtype)
    kv_body, kv_loop = ([], []) if standard else wire_kv(graph, body_nodes, spec.kv, iteration, iters_dim, b, kv_start, post)
    body_outputs += kv_body
    body = gs.Graph(nodes=body_nodes + b.nodes, inputs=[iteration, cond_in, x_prev, *state_in.values(), *carry.body_inputs],
                    outputs=body_outputs, name=lg_name("body"), opset=graph.opset)
    body.toposort()  # the regularizer and KV-slice nodes were appended after the range's nodes

    # Outer graph: initial states, the Loop (taking the range output's name), nothing else rewired.
    inits = {"x0": x0}
    if any(s.init == "x0_sum" for s in states):
        inits["x0_sum"] = pre.op("ReduceSum", x0, pre.const(np.array([-1], np.int64), "hidden_axis"),
                                 attrs={"keepdims": 1}, dtype=dtype, shape=list(shape[:-1]) + [1], name="x0_sum")
    out.dtype, out.shape = dtype, shape
    finals = {s.name: gs.Variable(lg_name("loop", f"{s.name}_final"), dtype, s.shape) for s in states}
    x_final = out if spec.noise_seed is None else gs.Variable(lg_name("loop", "x_final"), dtype, shape)
    traces = [gs.Variable(lg_name("trace", n), dtype, [iters_dim, *shape]) for n in trace_names]
    loop = gs.Node("Loop", name=lg_name("loop"), inputs=[iters, gs.Variable.empty(), x0] + [inits[s.init] for s in states] + carry.loop_inputs,
                   outputs=[x_final, *finals.values(), *carry.loop_outputs, *traces, *kv_loop], attrs={"body": body})
    if spec.noise_seed is not None:
        noise_control(post, x_final, finals["r"], out, spec.noise_seed, shape)
    graph.outputs.extend(traces)
    at = graph.nodes.index(producer)
    moved = {id(n) for n in body_nodes}
    graph.nodes = kv_start.nodes + [n for n in graph.nodes[:at] if id(n) not in moved] + pre.nodes + [loop] + post.nodes + \
                  [n for n in graph.nodes[at:] if id(n) not in moved]

    new = gs.export_onnx(graph, do_type_check=False)
    fix_subgraph_scope(new)
    restore_model_fields(new, model)
    if spec.dynamic:  # a graph input with a same-named initializer is an overridable default
        new.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in params.items())
    record_spec(new, spec, blocks)
    check_postconditions(new)
    report = {"range": f"{spec.start}:{spec.end}", "blocks": len(blocks), "iters": spec.iters, "reg": spec.reg,
              "body_nodes": len(body_nodes), "regularizer_nodes": len(b.nodes), "dynamic": spec.dynamic,
              "kv": spec.kv if kv_loop or carry.loop_outputs else None,
              "range_input": x0_name, "range_output": out_name}
    return PassResult(new, True, report)


def noise_control(b: BodyBuilder, x_final: gs.Tensor, r: gs.Tensor, out: gs.Variable, seed: int, shape: list) -> None:
    """``out = r + e * |x_N - r| / |e|`` per token, ``e = sin(r W)`` (see :mod:`loopgraph.spec`)."""
    dt, hidden, token = b.dtype, shape[-1], list(shape[:-1]) + [1]
    w = gs.Constant(lg_name("noise", "W"), np.random.default_rng(seed).standard_normal((hidden, hidden)).astype(dt))
    axes = b.const(np.array([-1], np.int64), "hidden_axis")

    def norm(v: gs.Tensor, name: str) -> gs.Variable:
        sq = b.op("Mul", v, v, dtype=dt, shape=shape, name=f"{name}_sq")
        return b.op("Sqrt", b.op("ReduceSum", sq, axes, attrs={"keepdims": 1}, dtype=dt, shape=token, name=f"{name}_sum"),
                    dtype=dt, shape=token, name=name)

    shift = norm(b.op("Sub", x_final, r, dtype=dt, shape=shape, name="shift"), "shift_norm")
    e = b.op("Sin", b.op("MatMul", r, w, dtype=dt, shape=shape, name="r_w"), dtype=dt, shape=shape, name="e")
    scale = b.op("Div", shift, b.op("Max", norm(e, "e_norm"), b.const(np.array(1e-12, dt), "tiny"), dtype=dt, shape=token, name="e_norm_floor"),
                 dtype=dt, shape=token, name="scale")
    b.nodes.append(gs.Node("Add", name=lg_name("noise", "out/node"),
                           inputs=[r, b.op("Mul", e, scale, dtype=dt, shape=shape, name="noise")], outputs=[out]))


def scalar_param(graph: gs.Graph, name: str, value: np.ndarray, dynamic: bool) -> gs.Tensor:
    if dynamic:
        var = gs.Variable(name, value.dtype, [])
        graph.inputs.append(var)
        return var
    return gs.Constant(name, value)


def fix_subgraph_scope(model: onnx.ModelProto) -> None:
    """The one place that repairs onnx-graphsurgeon's export of subgraphs.

    gs writes every constant a body reads into that body as a body initializer, and value_info
    for outer tensors the body reads. Weights must stay main-graph initializers read through
    the outer scope (stored once; ORT's external-data writer duplicates body initializers), so
    body initializers move to the main graph (dropped where the main graph already has them),
    and body value_info is kept only for names the body defines."""
    main_inits = {t.name for t in model.graph.initializer}
    for body in _bodies(model.graph):
        for t in list(body.initializer):
            if t.name not in main_inits:
                model.graph.initializer.append(t)
                main_inits.add(t.name)
        del body.initializer[:]
        defined = {v.name for v in body.input} | {o for n in body.node for o in n.output}
        keep = [v for v in body.value_info if v.name in defined]
        del body.value_info[:]
        body.value_info.extend(keep)


def _bodies(graph: onnx.GraphProto):
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
                yield from _bodies(attr.g)


def restore_model_fields(new: onnx.ModelProto, old: onnx.ModelProto) -> None:
    new.ir_version = old.ir_version
    del new.opset_import[:]
    new.opset_import.extend(old.opset_import)
    new.producer_name, new.producer_version = old.producer_name, old.producer_version
    new.doc_string, new.domain, new.model_version = old.doc_string, old.domain, old.model_version
    del new.metadata_props[:]
    new.metadata_props.extend(old.metadata_props)
    if not new.functions:
        new.functions.extend(old.functions)


def record_spec(model: onnx.ModelProto, spec: LoopSpec, blocks: BlockMap) -> None:
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                   METADATA_KEY: spec.to_json(),
                                   "loopgraph.version": __version__,
                                   "loopgraph.blocks": str(len(blocks))})
    if standard_layout(spec, model.graph.input):
        record_virtual_layers(model, spec, len(blocks))


def check_postconditions(model: onnx.ModelProto) -> None:
    outer = {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
    outer |= {o for n in model.graph.node for o in n.output}
    for body in _bodies(model.graph):
        if body.initializer:
            raise RuntimeError("postcondition: a Loop body holds initializers")
        names = [v.name for v in body.input] + [o for n in body.node for o in n.output if o]
        dup = {n for n in names if names.count(n) > 1} if len(set(names)) != len(names) else set()
        shadow = set(names) & outer
        if dup or shadow:
            raise RuntimeError(f"postcondition: body names repeat ({sorted(dup)[:3]}) or shadow outer names ({sorted(shadow)[:3]})")
    declared = {v.name for v in model.graph.value_info} | {v.name for v in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Loop" and not all(o in declared for o in node.output if o):
            raise RuntimeError("postcondition: a Loop output has no declared shape")

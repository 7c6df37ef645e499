"""Two small graph edits for the experiments (read-only on their input; each returns a new model).

- :func:`expose_outputs`: add existing tensors (block boundaries) as graph outputs, so one run
  returns the residual stream at every boundary without runtime hooks.
- :func:`logit_lens`: the subgraph computing ``logits`` from one residual-stream tensor (the last
  block's output): the final norm and the unembedding, so any hidden state can be decoded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from loopgraph.errors import LoopgraphError
from loopgraph.onnxio import attach_weights, detach_weights
from loopgraph.passes.dataflow import SHAPE_ONLY_OPS as _SHAPE_OPS


def _infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    return {v.name: v for v in [*g.value_info, *g.input, *g.output]}


def _inferred_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Value infos after one shape inference on a weight-less copy (inference on the full model
    would serialize every weight: minutes for SmolLM2 instead of a second)."""
    stash = detach_weights(model)  # stubs keep dims and dtypes, which is all inference needs
    try:
        stub = onnx.ModelProto()
        stub.CopyFrom(model)
    finally:
        attach_weights(model, stash)
    return {**_infos(onnx.shape_inference.infer_shapes(stub)), **_infos(model)}


def _tensor_info(infos: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto:
    info = infos.get(name)
    if info is None or not info.type.tensor_type.elem_type:
        raise LoopgraphError(f"shape inference found no type for tensor {name}; re-export the model")
    tt = info.type.tensor_type
    dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tt.shape.dim] if tt.HasField("shape") else None
    return helper.make_tensor_value_info(name, tt.elem_type, dims)


def expose_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (tensors of the main graph, in
    the order given, after the existing outputs; names already outputs are kept once).

    Handled: tensors produced by a main-graph node or graph inputs; types and shapes come from
    the model's value_info, else from one shape inference of the weight-less graph.
    Refused: a name no main-graph node produces (e.g. a tensor inside a Loop body)."""
    produced = {t for n in model.graph.node for t in n.output} | {v.name for v in model.graph.input}
    unknown = [n for n in names if n not in produced]
    if unknown:
        raise LoopgraphError(f"tensor {unknown[0]} is not produced in the main graph, so it cannot be exposed as an output "
                             "(tensors inside a Loop body are reached through trace outputs)")
    have = {o.name for o in model.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n not in have]
    infos = _infos(model)
    if any(n not in infos or not infos[n].type.tensor_type.elem_type for n in wanted):
        infos = _inferred_infos(model)
    new = onnx.ModelProto()
    new.CopyFrom(model)
    new.graph.output.extend(_tensor_info(infos, n) for n in wanted)
    return new


def logit_lens(model: onnx.ModelProto, source: str, output: str = "logits") -> onnx.ModelProto:
    """The subgraph of ``model`` from tensor ``source`` ([batch, seq, hidden]) to ``output``:
    every node ``output`` depends on, walking back until ``source``, with the initializers they
    read. In practice the final RMSNorm/LayerNorm and the unembedding, which act per position.

    Graph inputs read only through ``Shape``/``Size`` (GPT-2 reshapes with the shape of its ids)
    become inputs of the lens too; :func:`lens_feeds` fills them with zeros of the states' shape.
    Refused: a path that needs the *value* of a graph input (e.g. the ids or the mask), or a
    node with a subgraph (a Loop/If between the last block and the logits)."""
    g = model.graph
    producer = {t: i for i, n in enumerate(g.node) for t in n.output}
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {v.name: v for v in g.input}
    if output not in producer:
        raise LoopgraphError(f"the model has no tensor {output!r} to decode into; the logit lens needs the export's logits output")
    nodes: set[int] = set()
    used_inits: dict[str, onnx.TensorProto] = {}
    shape_inputs: dict[str, onnx.ValueInfoProto] = {}
    stack, seen, reached = [(output, False)], set(), False
    while stack:
        t, via_shape = stack.pop()  # via_shape: only the shape of t matters on this path
        reached = reached or t == source
        if (t, via_shape) in seen or t == source or not t:
            continue
        seen.add((t, via_shape))
        if t in producer:
            node = g.node[producer[t]]
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise LoopgraphError(f"node {node.name} ({node.op_type}) between {source} and {output} has a subgraph; "
                                     "the logit lens supports plain final-norm + unembedding graphs only")
            nodes.add(producer[t])
            stack.extend((x, via_shape or node.op_type in _SHAPE_OPS) for x in node.input)
        elif t in inits:
            used_inits[t] = inits[t]
        elif via_shape and t in graph_inputs:
            shape_inputs[t] = graph_inputs[t]
        else:
            raise LoopgraphError(f"{output} depends on the value of graph input {t} besides {source}, so it is not a function of "
                                 "the hidden state alone; the logit lens cannot be extracted from this model")
    if not reached:
        raise LoopgraphError(f"{output} does not depend on {source}; pass the last block's output as the lens input")
    infos = _infos(model)
    if source not in infos:
        infos = _inferred_infos(model)
    inputs = [_tensor_info(infos, source), *shape_inputs.values()]
    out_info = _tensor_info(infos, output)
    graph = helper.make_graph([g.node[i] for i in sorted(nodes)], "loopgraph_logit_lens", inputs, [out_info],
                              list(used_inits.values()))
    lens = helper.make_model(graph, ir_version=model.ir_version)
    del lens.opset_import[:]
    lens.opset_import.extend(model.opset_import)
    return lens


def lens_feeds(lens: onnx.ModelProto, states: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for a :func:`logit_lens` model: ``states`` [batch, seq, hidden] as its first input,
    zeros of shape [batch, seq] for the inputs it reads only the shape of."""
    first, *others = lens.graph.input
    feeds = {first.name: states}
    for v in others:
        feeds[v.name] = np.zeros(states.shape[:2], helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
    return feeds

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
from loopgraph.passes.dataflow import SHAPE_ONLY_OPS as _SHAPE_OPS
from loopgraph.passes.loop import hidden_type


def _infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    return {v.name: v for v in [*g.value_info, *g.input, *g.output]}


def expose_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (tensors of the main graph, in
    the order given, after the existing outputs; names already outputs are kept once).

    Handled: tensors produced by a main-graph node or graph inputs; the element type comes from
    the model's value_info, else from the range tensors' shape inference (:func:`hidden_type`).
    Refused: a name no main-graph node produces (e.g. a tensor inside a Loop body)."""
    produced = {t for n in model.graph.node for t in n.output} | {v.name for v in model.graph.input}
    unknown = [n for n in names if n not in produced]
    if unknown:
        raise LoopgraphError(f"tensor {unknown[0]} is not produced in the main graph, so it cannot be exposed as an output "
                             "(tensors inside a Loop body are reached through trace outputs)")
    new = onnx.ModelProto()
    new.CopyFrom(model)
    infos = _infos(new)
    have = {o.name for o in new.graph.output}
    for name in dict.fromkeys(names):
        if name in have:
            continue
        info = infos.get(name)
        if info is not None and info.type.tensor_type.elem_type:
            new.graph.output.append(helper.make_tensor_value_info(name, info.type.tensor_type.elem_type, None))
        else:
            dtype, shape = hidden_type(model, name)
            new.graph.output.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), shape))
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
    dtype, shape = hidden_type(model, source)
    out_info = _infos(model).get(output) or helper.make_tensor_value_info(output, helper.np_dtype_to_tensor_dtype(dtype), None)
    inputs = [helper.make_tensor_value_info(source, helper.np_dtype_to_tensor_dtype(dtype), shape), *shape_inputs.values()]
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

"""Logits only where they are read: gather the chosen positions before the LM head.

Scoring a continuation reads the logits of a few positions per row, yet an export computes the
LM head (hidden x vocab: 576 x 49,152 for SmolLM2, a fifth of the model's matmul work per token)
and writes ``[batch, seq, vocab]`` floats at every position. This pass adds one input,
``loopgraph/logits_at`` (int64 ``[P]``, flat indices ``row * seq_len + position``), and turns

    hidden [B, T, H] -> MatMul(W) -> ... -> logits [B, T, V]
into
    hidden [B, T, H] -> Flatten(axis=2) -> Gather(logits_at) -> MatMul(W) -> ... -> logits [P, V]

Only per-position ops may lie between the LM head's MatMul and the ``logits`` output (Cast,
Identity, Tanh, and Mul/Div/Add/Sub with a constant: Gemma-2's soft-capping), so the gather
commutes with them and the logits at the chosen positions are unchanged (each row of a MatMul is
its own dot products; tests check the values bit for bit against the full logits). The Loop, if
any, is upstream and untouched. Refused, leaving the model as it was: no ``logits`` output, a
model that already has the input, an LM head that is not a MatMul of a rank-3 hidden state, or
any other op on the way. The edit is two new nodes at the graph's tail, so it is done on the proto
itself: importing a Loop graph into graphsurgeon and back would be a round trip for nothing.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from loopgraph.errors import LoopgraphError
from loopgraph.naming import lg_name
from loopgraph.passes.base import PassResult

POSITIONS_NAME = lg_name("logits_at")
LOGITS = "logits"
_PER_POSITION = {"Cast", "Identity", "Tanh"}
_WITH_CONSTANT = {"Mul", "Div", "Add", "Sub"}


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    names.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    return names


def find_lm_head(model: onnx.ModelProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]]:
    """The LM head's MatMul and the nodes between it and ``logits`` (nearest first)."""
    graph = model.graph
    out = next((o for o in graph.output if o.name == LOGITS), None)
    if out is None:
        raise LoopgraphError(f"the model has no {LOGITS!r} output (outputs: {', '.join(o.name for o in graph.output)}); "
                             "gathering logits needs a causal-LM export")
    if len(out.type.tensor_type.shape.dim) != 3:
        raise LoopgraphError(f"{LOGITS!r} has rank {len(out.type.tensor_type.shape.dim)}, not [batch, sequence, vocab]")
    producer = {o: n for n in graph.node for o in n.output}
    constants = _constant_names(graph)
    name, path = LOGITS, []
    while True:
        node = producer.get(name)
        if node is None:
            raise LoopgraphError(f"no LM head MatMul found before {LOGITS!r} (reached graph input {name!r})")
        if node.op_type == "MatMulNBits":  # an int4 head (quantize --to int4, the genai builder): rows independent
            return node, path
        if node.op_type == "MatMul":
            weight = next((t for t in graph.initializer if t.name == node.input[1]), None)
            if weight is not None and len(weight.dims) != 2:
                raise LoopgraphError(f"the LM head {node.name!r} has a rank-{len(weight.dims)} weight, not [hidden, vocab]")
            return node, path
        if node.op_type in _PER_POSITION:
            name = node.input[0]
        elif node.op_type in _WITH_CONSTANT and sum(i in constants for i in node.input) == 1:
            name = next(i for i in node.input if i not in constants)
        else:
            raise LoopgraphError(f"{node.op_type} node {node.name!r} lies between the LM head and {LOGITS!r}; "
                                 "only per-position ops can be moved past a gather")
        path.append(node)


def gather_logits(model: onnx.ModelProto) -> PassResult:
    """A new model computing logits only at ``loopgraph/logits_at``; ``model`` is not modified."""
    if POSITIONS_NAME in {i.name for i in model.graph.input}:
        raise LoopgraphError(f"the model already has the {POSITIONS_NAME!r} input (logits are gathered already)")
    head, path = find_lm_head(model)  # before any change: a refusal leaves nothing half done
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    at = next(i for i, n in enumerate(graph.node) if n.output == head.output)  # output names are unique
    node = graph.node[at]
    hidden = node.input[0]
    flat, picked = f"{POSITIONS_NAME}/flat", f"{POSITIONS_NAME}/hidden"
    graph.node.insert(at, helper.make_node("Gather", [flat, POSITIONS_NAME], [picked], name=f"{POSITIONS_NAME}/gather", axis=0))
    graph.node.insert(at, helper.make_node("Flatten", [hidden], [flat], name=f"{POSITIONS_NAME}/flatten", axis=2))
    node.input[0] = picked
    graph.input.append(helper.make_tensor_value_info(POSITIONS_NAME, TensorProto.INT64, ["num_positions"]))
    out = next(o for o in graph.output if o.name == LOGITS)
    dims = out.type.tensor_type.shape.dim
    vocab = onnx.TensorShapeProto.Dimension()
    vocab.CopyFrom(dims[2])
    del dims[:]
    dims.add().dim_param = "num_positions"
    dims.append(vocab)
    # value_info of the tensors after the head described [B, T, V]; let ORT infer them again
    after = set(node.output) | {o for n in path for o in n.output}
    keep = [v for v in graph.value_info if v.name not in after]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    return PassResult(new, True, {"lm_head": head.name, "after_head": [n.op_type for n in path]})

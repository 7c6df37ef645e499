"""onnxruntime-genai model-builder graphs: their blocks, and splitting the fused skip-norms at a range's
boundaries (:class:`SplitSkipNorms`).

In a builder graph the residual Add between two blocks is fused with the next norm into one
``com.microsoft.SkipSimplifiedLayerNormalization(input, skip, gamma) -> (normed, '', '', sum)``:
the residual stream is that node's fourth output (``sum = input + skip``). Measured on tiny Llama
and Qwen2 builds (onnxruntime-genai 0.11.4, fp32 and int4): block 0 starts at the embedding
``Gather``'s output, read by a plain ``SimplifiedLayerNormalization`` and, as the residual, by
block 0's ``post_attention_layernorm`` skip-norm; block L >= 1 starts at output 3 of
``/model/layers.L/input_layernorm/SkipLayerNorm``; the last block ends inside
``/model/layers.{L}/final_norm_layernorm/SkipLayerNorm``, which writes no sum output at all.

Block discovery (:func:`builder_blocks`) follows the residual chain by structure: from the block's
input, the block's own skip-norm (reading it as a residual), then the next skip-norm (reading
that one's sum); node names only say which block a node belongs to, and must agree. It refuses,
naming what it found, a boundary that is not a skip-norm.

:class:`SplitSkipNorms` rewrites only the (at most two) skip-norms at the range's boundaries into
``Add(input, skip) -> sum`` and the same fused op on ``sum`` with a zero skip,
``SkipSimplifiedLayerNormalization(sum, zeros, gamma) -> normed``, so the range input and output are
ordinary tensors; every other fused node stays. Why not the plain ``SimplifiedLayerNormalization``:
ONNX Runtime's kernel for it accumulates the mean of squares differently from the fused kernel, so
the split model's logits moved by up to 2.1e-7 (measured, tiny Llama fp32, CPU); ``sum + 0 = sum``
exactly, so with the fused kernel on a zero skip they are bit-identical (max |Δ| = 0.0, for every
range, tests/test_builder.py). The zeros (``ConstantOfShape(Shape(sum))``) depend only on the
shape, so they stay outside a Loop body.
"""

from __future__ import annotations

import dataclasses

import onnx
from onnx import helper

from loopgraph.errors import LoopgraphError
from loopgraph.passes.base import Pass, PassResult, Reports
from loopgraph.passes.blockmap import Block, BlockMap, BlocksReport
from loopgraph.passes.dataflow import GraphIndex
from loopgraph.spec import LoopSpec

SKIP_NORM = "SkipSimplifiedLayerNormalization"
NORM = "SimplifiedLayerNormalization"
MS_DOMAIN = "com.microsoft"
STRATEGY = "builder skip-norms"


def _is_skip_norm(node: onnx.NodeProto) -> bool:
    return node.op_type == SKIP_NORM and node.domain == MS_DOMAIN


def sum_name(node: onnx.NodeProto) -> str:
    """The residual stream a skip-norm computes: its output 3, or the name the split gives it when
    the builder wrote none (the final norm)."""
    return node.output[3] if len(node.output) > 3 and node.output[3] else f"{node.name}/output_3"


def _describe(index: GraphIndex, tensor: str) -> str:
    readers = [index.nodes[j] for j in index.consumers.get(tensor, ())]
    return ", ".join(f"{n.op_type} {n.name}" for n in readers) or "nothing"


def builder_blocks(model: onnx.ModelProto, index: GraphIndex, groups: dict[int, set[int]], container: str) -> BlockMap | str:
    """The blocks of a model-builder graph, or why it is not one. ``groups``: node indices per
    block number, from the node names (``/model/layers.{i}/...``)."""
    skips = [i for i, n in enumerate(index.nodes) if _is_skip_norm(n)]
    if not skips:
        return f"no {SKIP_NORM} node (not an onnxruntime-genai model-builder graph)"
    block_of = {i: L for L, members in groups.items() for i in members}
    first = index.nodes[skips[0]]
    # block 0's input: the first skip-norm's residual operand that block 0 does not compute (the embedding)
    dynamic = index.dynamic_tensors()
    outside = [t for t in first.input[:2] if block_of.get(index.producer.get(t, -1)) != 0 and t in dynamic]
    if block_of.get(skips[0]) != 0 or len(outside) != 1:
        return f"the first {SKIP_NORM} {first.name} is not block 0's residual Add (reads {list(first.input[:2])})"
    x, blocks, fused = outside[0], [], []
    for L in range(len(groups)):
        inner = _skip_reader(index, x, block_of, {L})
        if isinstance(inner, str):
            return f"block {container}.{L}: {inner}"
        s = sum_name(index.nodes[inner])
        if s not in index.consumers:
            return f"block {container}.{L}: the residual stream after its attention ({s}) is read by nothing"
        exit_ = _skip_reader(index, s, block_of, {L + 1, None})
        if isinstance(exit_, str):
            return f"block {container}.{L}: the boundary after it is not a skip-norm: {exit_}"
        node = index.nodes[exit_]
        out = sum_name(node)
        normed = node.output[0]
        blocks.append(Block(L, x, out, len(index.between(x, [normed]))))
        fused.append((out, node.name))
        x = out
        if out not in index.consumers:  # the final norm: nothing reads the stream after it
            break
    if len(blocks) < 1 or (len(blocks) != len(groups) and len(blocks) != len(groups) - 1):
        return f"the residual chain passes {len(blocks)} blocks, but the node names number {len(groups)}"
    return BlockMap(tuple(blocks), container, STRATEGY, fused=tuple(fused))


def _skip_reader(index: GraphIndex, tensor: str, block_of: dict[int, int], allowed: set) -> int | str:
    """The skip-norm that reads ``tensor`` as one of its two summands, in one of the ``allowed`` blocks."""
    found = [j for j in index.consumers.get(tensor, ()) if _is_skip_norm(index.nodes[j])
             and tensor in index.nodes[j].input[:2] and block_of.get(j) in allowed]
    if len(found) != 1:
        return f"the residual stream {tensor} is read by {_describe(index, tensor)}, not by one {SKIP_NORM}"
    return found[0]


@dataclasses.dataclass(frozen=True)
class SplitReport(BlocksReport):
    """The blocks after the split (later passes read these), and which fused nodes were split."""

    split: tuple[str, ...] = ()  # names of the skip-norm nodes that were split


class SplitSkipNorms(Pass):
    """Splits the fused skip-norms at the two boundaries of ``spec``'s range (see the module
    docstring). Handles: a builder block map (``fused`` boundaries); a range starting at block 0
    (whose input, the embedding, needs no split); a range ending at the last block (the final norm,
    whose sum gets its first name here). A block map without fused boundaries (Optimum exports)
    passes through unchanged. Refuses a skip-norm with a bias input or with its mean/inv-std
    outputs in use (the split would drop them)."""

    name = "split-skip-norms"
    needs = (BlocksReport,)
    gives = SplitReport

    def __init__(self, spec: LoopSpec) -> None:
        self.spec = spec

    def requires(self, model: onnx.ModelProto, earlier: Reports) -> tuple[BlockMap, list[int]]:
        blocks = earlier.get(BlocksReport).blocks
        if not blocks.fused:
            return blocks, []
        spec = self.spec.resolve(len(blocks), blocks.strategy)
        fused = dict(blocks.fused)
        wanted = {blocks.blocks[spec.start].input, blocks.blocks[spec.end - 1].output} & set(fused)
        by_name = {n.name: i for i, n in enumerate(model.graph.node)}
        todo = sorted(by_name[fused[t]] for t in wanted)
        for i in todo:
            node = model.graph.node[i]
            if len(node.input) > 3 and node.input[3]:
                raise LoopgraphError(f"{node.name} adds a bias ({node.input[3]}); loopgraph splits only bias-free skip-norms")
            if any(o for o in node.output[1:3]):
                raise LoopgraphError(f"{node.name} writes its mean/inv-std outputs, which the split would drop")
        return blocks, todo

    def apply(self, model: onnx.ModelProto, checked: tuple[BlockMap, list[int]]) -> PassResult[SplitReport]:
        blocks, todo = checked
        if not todo:
            return PassResult(model, False, SplitReport(blocks))
        new = onnx.ModelProto()
        new.CopyFrom(model)
        names, hidden = [], _hidden_value_info(new, blocks.blocks[0].input)
        for i in reversed(todo):  # back to front: the indices before stay valid
            node = new.graph.node[i]
            parts = _split(node, hidden.type.tensor_type.elem_type if hidden is not None else onnx.TensorProto.FLOAT)
            new.graph.node.remove(node)
            for part in reversed(parts):
                new.graph.node.insert(i, part)
            names.append(node.name)
            if hidden is not None:  # the range input/output's type, for the Loop's shape
                info = onnx.ValueInfoProto()
                info.CopyFrom(hidden)
                info.name = parts[0].output[0]
                new.graph.value_info.append(info)
        done = set(names)
        remaining = tuple((t, n) for t, n in blocks.fused if n not in done)
        return PassResult(new, True, SplitReport(dataclasses.replace(blocks, fused=remaining), tuple(sorted(names))))

    def ensures(self, result: PassResult) -> None:
        outs = [o for n in result.model.graph.node for o in n.output if o]
        if len(outs) != len(set(outs)):
            raise RuntimeError("postcondition: the split repeated a tensor name")


def _split(node: onnx.NodeProto, elem_type: int) -> list[onnx.NodeProto]:
    """``Add(input, skip) -> sum``, then the norm of ``sum`` by the same fused kernel with a zero skip:
    ``SkipSimplifiedLayerNormalization(sum, zeros, gamma) -> normed`` (``zeros`` of ``sum``'s shape,
    from ``Shape``, so it stays outside a Loop body). ``sum + 0 = sum`` exactly, so ``normed`` is
    bit-identical to the fused node's; ONNX Runtime's ``SimplifiedLayerNormalization`` kernel is not
    (it accumulates the mean of squares differently: max |Δlogits| 2.1e-7, measured)."""
    s = sum_name(node)
    base = f"{node.name}/loopgraph_split"
    zero = helper.make_tensor(f"{base}/zero", elem_type, [1], [0.0])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return [
        helper.make_node("Add", list(node.input[:2]), [s], name=f"{base}/Add"),
        helper.make_node("Shape", [s], [f"{base}/shape"], name=f"{base}/Shape"),
        helper.make_node("ConstantOfShape", [f"{base}/shape"], [f"{base}/zeros"], name=f"{base}/ConstantOfShape", value=zero),
        helper.make_node(SKIP_NORM, [s, f"{base}/zeros", node.input[2]], [node.output[0]], name=f"{base}/{SKIP_NORM}",
                         domain=MS_DOMAIN, **attrs),
    ]


def _hidden_value_info(model: onnx.ModelProto, block0_input: str) -> onnx.ValueInfoProto | None:
    """The type of the residual stream, [batch, seq, hidden]: shape inference gives it for block 0's
    input (the embedding Gather's output); contrib ops stop it before the later boundaries."""
    infos = {v.name: v for v in model.graph.value_info}
    if block0_input not in infos:
        infos.update({v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info})
    return infos.get(block0_input)

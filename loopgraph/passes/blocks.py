"""Find the decoder blocks of an exported causal LM: a read-only pass (:class:`FindBlocks`)
whose report holds the :class:`BlockMap`.

Strategies, tried in order; each returns a map or the reason it failed:

1. ``module-path names``: TorchScript/Optimum node names carry the module path
   (``/model/layers.6/self_attn/q_proj/MatMul``, ``/transformer/h.6/...``, ``/m/model/layers.6/...``).
2. ``dynamo name scopes``: the dynamo exporter names nodes generically and keeps the module path
   in ``metadata_props["pkg.torch.onnx.name_scopes"]``.
3. ``builder skip-norms``: onnxruntime-genai's model builder fuses the residual Add into the next
   norm; the chain of fused skip-norms gives the boundaries (:mod:`loopgraph.passes.skipnorm`).

Names only assign nodes to blocks; boundaries are then found and checked by structure: block L's
output is the residual ``Add`` in block L whose output feeds block L+1 (the last block's feeds
the final norm), and walking back through the block's residual Adds from it must reach block
L-1's output. Names do not partition the graph (shared rotary/cos-sin nodes sit in layer 0's
namespace, some constants carry no prefix), so node counts come from dataflow, not names.
"""

from __future__ import annotations

import ast
import re
from collections import Counter, defaultdict
from collections.abc import Callable

import onnx

from loopgraph.errors import LoopgraphError
from loopgraph.metadata import SPEC_KEY, props
from loopgraph.naming import is_lg_name
from loopgraph.passes.base import Pass, PassResult, Reports
from loopgraph.passes.blockmap import Block, BlockMap, BlocksReport
from loopgraph.passes.dataflow import GraphIndex
from loopgraph.passes.skipnorm import STRATEGY as BUILDER_STRATEGY
from loopgraph.passes.skipnorm import builder_blocks

_BLOCK_PATH_RE = re.compile(r"^(?P<container>.*?)\.(?P<index>\d+)(?:\.|$)")
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_RESIDUAL_PATH_OPS = frozenset({"Add", "Cast", "Identity"})


def has_kv_cache(model: onnx.ModelProto) -> bool:
    names = [v.name for v in model.graph.input] + [v.name for v in model.graph.output]
    return any(n.startswith(("past_key_values", "present")) for n in names)


def _paths_from_names(model: onnx.ModelProto) -> dict[int, str] | str:
    paths = {}
    for i, node in enumerate(model.graph.node):
        if node.name.startswith("/") and "/" in node.name[1:]:
            paths[i] = ".".join(node.name.strip("/").split("/")[:-1])
    return paths or "no node name carries a module path like /model/layers.0/..."


def _paths_from_scopes(model: onnx.ModelProto) -> dict[int, str] | str:
    paths = {}
    for i, node in enumerate(model.graph.node):
        for prop in node.metadata_props:
            if prop.key == _SCOPES_KEY:
                try:
                    scopes = ast.literal_eval(prop.value)
                except (ValueError, SyntaxError):
                    continue
                if len(scopes) >= 2:
                    paths[i] = scopes[-2]
    return paths or f"no node has {_SCOPES_KEY!r} metadata (not a dynamo export)"


STRATEGIES: tuple[tuple[str, Callable[[onnx.ModelProto], dict[int, str] | str]], ...] = (
    ("module-path names", _paths_from_names),
    ("dynamo name scopes", _paths_from_scopes),
)


def _group_paths(paths: dict[int, str]) -> tuple[str, dict[int, set[int]]] | str:
    """The block list's module path and the node indices per block number."""
    per_container: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for i, path in paths.items():
        m = _BLOCK_PATH_RE.match(path)
        if m:
            per_container[m["container"]][int(m["index"])].add(i)
    if not per_container:
        return "no module path has a numbered block segment such as layers.0 or h.0"
    container = max(per_container, key=lambda c: (len(per_container[c]), Counter(map(len, per_container[c].values()))))
    return container, per_container[container]


def _builder_strategy(model: onnx.ModelProto, index: GraphIndex) -> BlockMap | str:
    """onnxruntime-genai model-builder graphs: the residual stream lives inside fused skip-norms."""
    paths = _paths_from_names(model)
    grouped = _group_paths(paths) if not isinstance(paths, str) else paths
    if isinstance(grouped, str):
        return grouped
    return builder_blocks(model, index, *reversed(grouped))


def _blocks_from_paths(index: GraphIndex, paths: dict[int, str], strategy: str) -> BlockMap | str:
    grouped = _group_paths(paths)
    if isinstance(grouped, str):
        return grouped
    container, groups = grouped
    indices = sorted(groups)
    if indices != list(range(len(indices))):
        return f"blocks under {container} are numbered {indices[:8]}..., not 0..{len(indices) - 1}"
    in_any_block = set().union(*groups.values())
    dynamic = index.dynamic_tensors()

    blocks: list[Block] = []
    prev_out: str | None = None
    for L in indices:
        members = groups[L]
        nxt = groups.get(L + 1)
        candidates = []
        for i in sorted(members):
            node = index.nodes[i]
            if node.op_type != "Add":
                continue
            out = node.output[0]
            readers = set(index.consumers.get(out, ()))
            if nxt is not None:
                ok = bool(readers & nxt)
            else:
                ok = bool(readers - in_any_block) or out in index.graph_outputs
            if ok:
                candidates.append(i)
        where = f"{container}.{L}"
        if not candidates:
            feeds = f"{container}.{L + 1}" if nxt is not None else "the final norm"
            return f"block {where}: no residual Add in it whose output feeds {feeds}"
        out = index.nodes[candidates[-1]].output[0]
        source = _residual_source(index, out, members, dynamic)
        if source is None:
            return f"block {where}: walking back from {out} through residual Adds reaches no block input"
        if prev_out is not None and source != prev_out:
            return (f"block {where}: its residual input is {source}, "
                    f"but block {L - 1} ends at {prev_out}")
        blocks.append(Block(L, source, out, len(index.between(source, [out]))))
        prev_out = out
    return BlockMap(tuple(blocks), container, strategy)


def _residual_source(index: GraphIndex, tensor: str, members: set[int], dynamic: set[str]) -> str | None:
    """Follow residual Adds inside the block back to the runtime tensor that enters it.
    Cast and Identity are walked through: RMSNorm's ``.to(float32)`` of an fp32 tensor is
    traced as a Cast that the residual Add then reads."""
    producer = index.producer.get(tensor)
    if producer is None or producer not in members:
        return tensor if tensor in dynamic else None
    node = index.nodes[producer]
    if node.op_type not in _RESIDUAL_PATH_OPS:
        return None
    for inp in node.input:
        found = _residual_source(index, inp, members, dynamic)
        if found is not None:
            return found
    return None


def find_blocks(model: onnx.ModelProto) -> BlockMap:
    """Return the block map, or raise a :class:`LoopgraphError` listing what each strategy saw."""
    index = GraphIndex(model.graph)
    reasons = []
    for name, strategy in STRATEGIES:
        paths = strategy(model)
        if isinstance(paths, str):
            reasons.append(f"{name}: {paths}")
            continue
        found = _blocks_from_paths(index, paths, name)
        if isinstance(found, BlockMap):
            return found
        reasons.append(f"{name}: {found}")
    found = _builder_strategy(model, index)
    if isinstance(found, BlockMap):
        return found
    reasons.append(f"{BUILDER_STRATEGY}: {found}")
    raise LoopgraphError(
        "no decoder blocks found (" + "; ".join(reasons) + "); loopgraph needs an Optimum, torch.onnx "
        "or onnxruntime-genai model-builder export of a causal LM whose node names or metadata keep module paths"
    )


def is_looped(model: onnx.ModelProto) -> bool:
    """True for a file loopgraph rewrote: it records a spec, or a main-graph node carries our prefix.
    (Node names that are not valid UTF-8, as in a damaged file, are read leniently.)"""
    return SPEC_KEY in props(model) or any(is_lg_name(n.name) for n in model.graph.node)


class FindBlocks(Pass):
    """Finds the blocks (:func:`find_blocks`); changes nothing. Its report is what later passes
    resolve a range against. Refuses a model loopgraph has already looped: the blocks inside a
    Loop body are out of sight of block discovery, and a rewrite must start from the original."""

    name = "find-blocks"
    gives = BlocksReport

    def requires(self, model: onnx.ModelProto, earlier: Reports) -> None:
        if is_looped(model):
            raise LoopgraphError("the model is already looped by loopgraph; rewrite the original export instead")

    def apply(self, model: onnx.ModelProto, checked: None) -> PassResult[BlocksReport]:
        return PassResult(model, False, BlocksReport(find_blocks(model)))

"""One record of what an ONNX file says about itself: its ``metadata_props`` and its subgraphs.

Keys loopgraph writes (all under ``loopgraph.``):

- ``loopgraph.spec``: the :class:`~loopgraph.spec.LoopSpec` of the rewrite, as JSON;
- ``loopgraph.source``: where the original model lives, relative to the rewritten file;
- ``loopgraph.version`` and ``loopgraph.blocks``: the tool's version and the model's block count;
- ``loopgraph.virtual_layers``: for a standard-layout KV cache (``--kv exact``), the map of cache
  pair v -> ``[block, iteration]`` (JSON list, execution order; iteration 0-based).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import onnx

from loopgraph.errors import LoopgraphError
from loopgraph.spec import LoopSpec

SPEC_KEY = "loopgraph.spec"
SOURCE_KEY = "loopgraph.source"
VERSION_KEY = "loopgraph.version"
BLOCKS_KEY = "loopgraph.blocks"
VIRTUAL_LAYERS_KEY = "loopgraph.virtual_layers"


def props(model: onnx.ModelProto) -> dict[str, str]:
    """``metadata_props`` as a dict (a later duplicate key wins, as onnx's own helpers do)."""
    return {p.key: p.value for p in model.metadata_props}


def set_props(model: onnx.ModelProto, updates: dict[str, str]) -> None:
    """Set (or replace) keys; the other keys keep their values and their order."""
    merged = {**props(model), **updates}
    del model.metadata_props[:]
    for k, v in merged.items():
        model.metadata_props.add(key=k, value=v)


def read_spec(model: onnx.ModelProto | Mapping[str, str]) -> LoopSpec | None:
    """The :class:`LoopSpec` recorded by ``loopgraph rewrite``; None when the file has none.
    ``model`` is the proto or its metadata as a mapping (what ORT's ``custom_metadata_map`` gives).
    A record that cannot be parsed is a user error (:class:`LoopgraphError`) naming the file's key."""
    raw = (props(model) if isinstance(model, onnx.ModelProto) else model).get(SPEC_KEY)
    if raw is None:
        return None
    try:
        return LoopSpec.from_json(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise LoopgraphError(f"the model's {SPEC_KEY} metadata is not a valid rewrite record ({e}); "
                             "rewrite the original export again") from None


def read_virtual_layers(model: onnx.ModelProto) -> list[tuple[int, int]] | None:
    """The virtual-layer map (v -> (block, iteration)) of a standard-layout rewrite, or None."""
    raw = props(model).get(VIRTUAL_LAYERS_KEY)
    if raw is None:
        return None
    try:
        return [(int(b), int(t)) for b, t in json.loads(raw)]
    except (ValueError, TypeError) as e:
        raise LoopgraphError(f"the model's {VIRTUAL_LAYERS_KEY} metadata is not a list of [block, iteration] ({e}); "
                             "rewrite the original export again") from None


def num_blocks(model: onnx.ModelProto) -> int | None:
    """The decoder block count ``loopgraph rewrite`` recorded (``loopgraph.blocks``); None when absent or not a count."""
    raw = props(model).get(BLOCKS_KEY, "")
    return int(raw) if raw.isdigit() else None


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held by ``node``'s attributes (a Loop's body, an If's branches)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph inside it, depth first (the one subgraph walker)."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from all_graphs(sub)

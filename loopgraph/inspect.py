"""``loopgraph inspect``: what is in an ONNX file, without loading its weights."""

from __future__ import annotations

import json
import os
from typing import Any

import onnx

from loopgraph.deploy.tensorrt import readiness as tensorrt_readiness
from loopgraph.errors import LoopgraphError
from loopgraph.metadata import read_virtual_layers
from loopgraph.onnxio import external_locations, load_model, resolve_model_path
from loopgraph.passes.blocks import find_blocks, has_kv_cache
from loopgraph.passes.loop import is_looped
from loopgraph.spec import METADATA_KEY


def _shape(v: onnx.ValueInfoProto) -> list:
    tt = v.type.tensor_type
    return [d.dim_param or d.dim_value for d in tt.shape.dim] if tt.HasField("shape") else []


def _dtype(v: onnx.ValueInfoProto) -> str:
    return onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()


def _count_nodes(graph: onnx.GraphProto) -> int:
    n = 0
    for node in graph.node:
        n += 1
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                n += _count_nodes(a.g)
    return n


def describe(path: str | os.PathLike) -> dict[str, Any]:
    p = resolve_model_path(path)
    model = load_model(p)
    meta = {m.key: m.value for m in model.metadata_props}
    info: dict[str, Any] = {
        "path": str(p),
        "file_bytes": p.stat().st_size,
        "ir_version": model.ir_version,
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [{"name": v.name, "dtype": _dtype(v), "shape": _shape(v)} for v in model.graph.input],
        "outputs": [{"name": v.name, "dtype": _dtype(v), "shape": _shape(v)} for v in model.graph.output],
        "external_data": [{"file": loc, "bytes": (p.parent / loc).stat().st_size} for loc in external_locations(model)],
        "nodes": len(model.graph.node),
        "nodes_with_subgraphs": _count_nodes(model.graph),
        "kv_cache": has_kv_cache(model),
        "rewrite": json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None,
        "virtual_layers": read_virtual_layers(model),  # standard-layout KV cache: pair v -> (block, iteration)
        "loopgraph_version": meta.get("loopgraph.version"),
    }
    info["tensorrt"] = tensorrt_readiness(model)  # TensorRT readiness summary (loopgraph check --target tensorrt)
    config = p.parent / "config.json"
    if config.is_file():
        info["model_type"] = json.loads(config.read_text()).get("model_type")
    if is_looped(model):
        info["family"], info["blocks"], info["strategy"] = None, [], None
        info["blocks_note"] = "the looped range lives inside a Loop body; inspect the original export for the block table"
        return info
    try:
        bm = find_blocks(model)
    except LoopgraphError as e:
        info["family"], info["blocks"], info["strategy"] = None, [], None
        info["blocks_note"] = str(e)
        return info
    info["family"], info["strategy"], info["container"] = bm.family, bm.strategy, bm.container
    info["blocks"] = [{"index": b.index, "input": b.input, "output": b.output, "nodes": b.num_nodes} for b in bm.blocks]
    return info


def virtual_layer_lines(vmap: list) -> str:
    """The virtual-layer map as text: one line per run of a block range's iteration."""
    lines = [f"  KV cache pairs (standard layout): {len(vmap)} virtual layers, past_key_values.{{v}} / present.{{v}}"]
    runs: list[list] = []
    for v, (b, t) in enumerate(vmap):  # group consecutive entries of one iteration into "v a..b -> blocks c..d, iteration t"
        if runs and runs[-1][3] == t and runs[-1][1] == v - 1 and runs[-1][2][-1] == b - 1:
            runs[-1][1] = v
            runs[-1][2].append(b)
        else:
            runs.append([v, v, [b], t])
    for first, last, blocks, t in runs:
        vs = f"v {first}" if first == last else f"v {first}..{last}"
        bs = f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}..{blocks[-1]}"
        lines.append(f"    {vs:<10} -> {bs}, iteration {t + 1}")
    return "\n".join(lines)


def format_text(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}  ({info['file_bytes'] / 1e6:.1f} MB)",
             f"  IR version {info['ir_version']}, opset " + ", ".join(f"{k} {v}" for k, v in info["opset"].items()),
             f"  nodes: {info['nodes']} in the main graph, {info['nodes_with_subgraphs']} with subgraphs"]
    if info.get("model_type"):
        lines.append(f"  model_type: {info['model_type']} (config.json)")
    lines.append(f"  family: {info['family'] or '-'}" + (f" (found by {info['strategy']})" if info.get("strategy") else ""))
    lines.append(f"  KV cache: {'yes' if info['kv_cache'] else 'no'}")
    ext = info["external_data"]
    lines.append("  external data: " + (", ".join(f"{e['file']} ({e['bytes'] / 1e6:.1f} MB)" for e in ext) if ext else "none (weights inline)"))
    for kind in ("inputs", "outputs"):
        lines.append(f"  {kind}:")
        for v in info[kind][:8]:
            lines.append(f"    {v['name']}: {v['dtype']} {v['shape']}")
        if len(info[kind]) > 8:
            lines.append(f"    ... {len(info[kind]) - 8} more")
    if info.get("tensorrt"):  # TensorRT readiness summary
        lines.append(f"  TensorRT: {info['tensorrt']['summary']} (details: loopgraph check --target tensorrt)")
    if info["rewrite"]:
        lines.append(f"  loopgraph rewrite (v{info['loopgraph_version']}): " + ", ".join(f"{k}={v}" for k, v in info["rewrite"].items()))
    if info.get("virtual_layers"):
        lines.append(virtual_layer_lines(info["virtual_layers"]))
    if info["blocks"]:
        lines.append(f"  decoder blocks: {len(info['blocks'])}")
        w_in = max(len(b["input"]) for b in info["blocks"])
        lines.append(f"    {'#':>3}  {'input':<{w_in}}  {'output':<{w_in}}  nodes")
        for b in info["blocks"]:
            lines.append(f"    {b['index']:>3}  {b['input']:<{w_in}}  {b['output']:<{w_in}}  {b['nodes']:>5}")
    elif info.get("blocks_note"):
        lines.append(f"  decoder blocks: {info['blocks_note']}")
    return "\n".join(lines)



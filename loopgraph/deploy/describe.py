"""``loopgraph inspect``: what is in an ONNX file, without loading its weights (an inspection
tool beside ``check``, ``diff`` and ``view``, on the same read-only facts of :mod:`loopgraph.deploy.graphs`)."""

from __future__ import annotations

import json
import os
from typing import Any

import onnx

from loopgraph.deploy.graphs import dtype_name, shape_of
from loopgraph.deploy.tensorrt import readiness as tensorrt_readiness
from loopgraph.errors import LoopgraphError
from loopgraph.exportdir import CONFIG, read_config
from loopgraph.metadata import VERSION_KEY, all_graphs, props, read_spec, read_virtual_layers
from loopgraph.onnxio import external_locations, load_model, resolve_model_path
from loopgraph.passes.blocks import find_blocks, has_kv_cache
from loopgraph.passes.loop import is_looped


def _value(v: onnx.ValueInfoProto) -> dict[str, Any]:
    """Name, dtype (``float32``, ``int64``: the spelling of check/diff/view) and declared shape
    (symbolic dims by name, unknown dims as None, no declared shape as [])."""
    return {"name": v.name, "dtype": dtype_name(v.type.tensor_type.elem_type), "shape": shape_of(v) or []}


def describe(path: str | os.PathLike) -> dict[str, Any]:
    p = resolve_model_path(path)
    model = load_model(p)
    spec = read_spec(model)
    info: dict[str, Any] = {
        "path": str(p),
        "file_bytes": p.stat().st_size,
        "ir_version": model.ir_version,
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [_value(v) for v in model.graph.input],
        "outputs": [_value(v) for v in model.graph.output],
        "external_data": [{"file": loc, "bytes": (p.parent / loc).stat().st_size} for loc in external_locations(model)],
        "nodes": len(model.graph.node),
        "nodes_with_subgraphs": sum(len(g.node) for g in all_graphs(model.graph)),
        "kv_cache": has_kv_cache(model),
        "rewrite": json.loads(spec.to_json()) if spec is not None else None,
        "virtual_layers": read_virtual_layers(model),  # standard-layout KV cache: pair v -> (block, iteration)
        "loopgraph_version": props(model).get(VERSION_KEY),
    }
    info["tensorrt"] = tensorrt_readiness(model)  # TensorRT readiness summary (loopgraph check --target tensorrt)
    if (p.parent / CONFIG).is_file():
        info["model_type"] = read_config(p.parent).get("model_type")
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



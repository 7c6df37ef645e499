"""``loopgraph inspect``: what is in an ONNX file, without loading its weights."""

from __future__ import annotations

import json
import os
from typing import Any

import onnx

from loopgraph.deploy.tensorrt import readiness as tensorrt_readiness
from loopgraph.errors import LoopgraphError
from loopgraph.metadata import read_spec
from loopgraph.onnxio import external_locations, load_model, resolve_model_path
from loopgraph.passes.blocks import find_blocks, has_kv_cache
from loopgraph.passes.loop import is_looped


def _shape(v: onnx.ValueInfoProto) -> list:
    tt = v.type.tensor_type
    return [d.dim_param or d.dim_value for d in tt.shape.dim] if tt.HasField("shape") else []


def _dtype(v: onnx.ValueInfoProto) -> str:
    elem = v.type.tensor_type.elem_type
    if elem not in onnx.TensorProto.DataType.values():  # a damaged file is still described
        return f"unknown({elem})"
    return onnx.TensorProto.DataType.Name(elem).lower()


def _count_nodes(graph: onnx.GraphProto) -> int:
    n = 0
    for node in graph.node:
        n += 1
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                n += _count_nodes(a.g)
    return n


def _rewrite_record(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The recorded spec as a dict; an unreadable record is a one-line error (from read_spec)."""
    spec = read_spec(model)
    return None if spec is None else json.loads(spec.to_json())


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
        "rewrite": _rewrite_record(model),
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
    if info["blocks"]:
        lines.append(f"  decoder blocks: {len(info['blocks'])}")
        w_in = max(len(b["input"]) for b in info["blocks"])
        lines.append(f"    {'#':>3}  {'input':<{w_in}}  {'output':<{w_in}}  nodes")
        for b in info["blocks"]:
            lines.append(f"    {b['index']:>3}  {b['input']:<{w_in}}  {b['output']:<{w_in}}  {b['nodes']:>5}")
    elif info.get("blocks_note"):
        lines.append(f"  decoder blocks: {info['blocks_note']}")
    return "\n".join(lines)



"""``loopgraph diff A.onnx B.onnx``: a Loop-aware, readable summary of what changed.

Reported: the Loop(s) of B that A lacks (block range, N, regularizer, from B's ``loopgraph.spec``
metadata when present, and from node names in the Loop body otherwise), nodes moved into a Loop
body, nodes added (by kind: interpolation, loop condition, KV cache, noise control, traces) and
removed, main-graph nodes whose inputs/outputs changed, inputs/outputs added/removed/retyped,
initializers added/removed/resized (with bytes from dims x dtype), weight duplication, metadata.

"No weight duplicated" means: no initializer of B (main graph or subgraph) holds the same
dtype, dims and data (inline bytes, or external location/offset/length) as another one more
often than in A, no subgraph initializer repeats a main-graph name, and B's initializer bytes
are within 1 % of A's. External data is never read: only its references are compared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter, defaultdict
from typing import Any

import onnx

from loopgraph.deploy.graphs import (
    LoopInfo,
    dtype_name,
    format_shape,
    loops,
    shape_of,
    spec_of,
    tensor_bytes,
)
from loopgraph.errors import LoopgraphError
from loopgraph.metadata import SPEC_KEY, all_graphs, num_blocks, props, read_virtual_layers
from loopgraph.naming import NAME_PREFIX
from loopgraph.onnxio import load_model, resolve_model_path
from loopgraph.passes.blocks import find_blocks, has_kv_cache

_KV_NAME = re.compile(r"(past_key_values|present)\.\d+\.")
BYTES_TOLERANCE = 0.01  # "no weight duplicated" also needs B's initializer bytes within 1 % of A's


@dataclasses.dataclass
class ModelDiff:
    """What changed from ``a`` to ``b``; :meth:`to_dict` for ``--json``, :meth:`format_text` for people."""
    a: str
    b: str
    loops: list[dict[str, Any]]
    nodes: dict[str, Any]
    inputs: dict[str, list]
    outputs: dict[str, list]
    initializers: dict[str, Any]
    weights: dict[str, Any]
    metadata: dict[str, dict]
    model: dict[str, list]
    #: B's virtual-layer map (standard-layout KV cache): cache pair v -> [block, iteration]; cache names are v, not blocks
    virtual_layers: list[tuple[int, int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format_text(self) -> str:
        return "\n".join(_format(self))


def diff_models(a: onnx.ModelProto, b: onnx.ModelProto, labels: tuple[str, str] = ("A", "B")) -> ModelDiff:
    """Compare two models loaded without external data (``loopgraph.onnxio.load_model``)."""
    nodes, moved_by_loop = _diff_nodes(a, b)
    return ModelDiff(
        a=labels[0], b=labels[1],
        loops=[_describe_loop(loop, a, b, moved_by_loop.get(loop.name, [])) for loop in _new_loops(a, b)],
        nodes=nodes,
        inputs=_diff_values(a.graph.input, b.graph.input),
        outputs=_diff_values(a.graph.output, b.graph.output),
        initializers=_diff_initializers(a, b),
        weights=_weights(a, b),
        metadata=_diff_metadata(a, b),
        model=_diff_model_fields(a, b),
        virtual_layers=read_virtual_layers(b),
    )


# --- nodes ---------------------------------------------------------------------------------------

def _key(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}:{','.join(node.output)}"


def _new_loops(a: onnx.ModelProto, b: onnx.ModelProto) -> list[LoopInfo]:
    before = {_key(lp.node) for lp in loops(a)}
    return [lp for lp in loops(b) if _key(lp.node) not in before]


def _all_keys(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {_key(n): n for g in all_graphs(model.graph) for n in g.node}


def _diff_nodes(a: onnx.ModelProto, b: onnx.ModelProto) -> tuple[dict[str, Any], dict[str, list[str]]]:
    a_main = {_key(n): n for n in a.graph.node}
    b_main = {_key(n): n for n in b.graph.node}
    a_all, b_all = _all_keys(a), _all_keys(b)
    in_body: dict[str, str] = {}  # node key -> name of the new Loop whose body holds it
    for loop in _new_loops(a, b):
        for g in all_graphs(loop.body):
            for n in g.node:
                in_body[_key(n)] = loop.name
    moved_by_loop: dict[str, list[str]] = defaultdict(list)
    for k in a_main:
        if k not in b_main and k in in_body:
            moved_by_loop[in_body[k]].append(k)
    added = [k for k in b_all if k not in a_all]
    changed = [k for k, n in a_main.items() if k in b_main and _signature(n) != _signature(b_main[k])]
    kinds: dict[str, Counter] = defaultdict(Counter)
    cond_ins, iteration_ins = _loop_inputs(b)
    for k in added:
        n = b_all[k]
        kinds[_kind(n, cond_ins, iteration_ins)][n.op_type] += 1
    return {
        "a_main": len(a.graph.node), "a_total": len(a_all),
        "b_main": len(b.graph.node), "b_total": len(b_all),
        "moved_into_loop": sum(len(v) for v in moved_by_loop.values()),
        "added": {kind: dict(sorted(c.items())) for kind, c in sorted(kinds.items())},
        "added_other": sorted(k for k in added if not b_all[k].name.startswith(NAME_PREFIX))[:20],
        "removed": sorted(k for k in a_all if k not in b_all),
        "changed": sorted(changed),
    }, moved_by_loop


def _signature(node: onnx.NodeProto) -> tuple:
    attrs = tuple((a.name, _attr_bytes(a)) for a in node.attribute if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS))
    return node.op_type, node.domain, tuple(node.input), tuple(node.output), attrs


def _attr_bytes(attr: onnx.AttributeProto) -> bytes:
    """The attribute's value; a tensor value's (empty) name is ignored: exporters differ in
    whether they write it, which changes the bytes but not the graph."""
    a = onnx.AttributeProto()
    a.CopyFrom(attr)
    a.ClearField("doc_string")
    if a.type == onnx.AttributeProto.TENSOR:
        a.t.ClearField("name")
    return a.SerializeToString(deterministic=True)


def _loop_inputs(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """Names of every Loop body's cond_in and iteration_num."""
    cond, iteration = set(), set()
    for loop in loops(model):
        iteration.add(loop.body.input[0].name)
        cond.add(loop.body.input[1].name)
    return cond, iteration


def _kind(node: onnx.NodeProto, cond_ins: set[str], iteration_ins: set[str]) -> str:
    """What an added node is for (structure first, the ``loopgraph/`` naming scheme second)."""
    if node.op_type == "Loop":
        return "Loop"
    if node.op_type == "Identity" and set(node.input) & cond_ins:
        return "loop condition"
    if node.op_type == "Gather" and set(node.input[1:]) & iteration_ins:
        return "KV cache"  # the body's slice of a per-iteration past
    if not node.name.startswith(NAME_PREFIX):
        return "other"
    if _KV_NAME.search(node.name):
        return "KV cache"  # loopgraph names KV nodes after the past/present they serve
    if node.name.startswith(NAME_PREFIX + "noise/"):
        return "noise control"
    if "/trace" in node.name:
        return "trace (scan outputs)"
    return "interpolation"


# --- the Loop: range, N, regularizer -----------------------------------------------------------

def _describe_loop(loop: LoopInfo, a: onnx.ModelProto, b: onnx.ModelProto, moved: list[str]) -> dict[str, Any]:
    spec = spec_of(b) if loop.node.name == NAME_PREFIX + "loop" else None
    named = _blocks_from_names(a, moved)
    info: dict[str, Any] = {
        "node": loop.name, "moved_nodes": len(moved),
        "body_nodes": sum(len(g.node) for g in all_graphs(loop.body)),
        "iters": loop.trip_value, "iters_input": loop.trip_count, "iters_dynamic": loop.trip_value is None,
        "blocks_by_names": named,
        "carried": len(loop.carried), "scan_outputs": len(loop.scan_outputs),
    }
    if spec is not None:
        info.update(source=SPEC_KEY, start=spec.start, end=spec.end, reg=spec.reg, weight=spec.weight,
                    spec_iters=spec.iters, spec=dataclasses.asdict(spec))
    elif named:
        info.update(source="node names", start=named[0], end=named[1], reg=None, weight=None, spec_iters=None, spec=None)
    else:
        info.update(source=None, start=None, end=None, reg=None, weight=None, spec_iters=None, spec=None)
    info["num_blocks"] = num_blocks(b)
    info["kv"] = (spec.kv if spec is not None else "unknown") if has_kv_cache(b) else None
    return info


def _blocks_from_names(a: onnx.ModelProto, moved: list[str]) -> list[int] | None:
    """[start, end) of the blocks whose module path names the moved nodes (None if none does)."""
    if not moved:
        return None
    try:
        container = find_blocks(a).container
    except LoopgraphError:
        return None
    pattern = re.compile("/" + re.escape(container.replace(".", "/")) + r"\.(\d+)/")
    found = sorted({int(m[1]) for k in moved if (m := pattern.search(k))})
    return [found[0], found[-1] + 1] if found else None


# --- inputs / outputs ------------------------------------------------------------------------------

def _type_str(v: onnx.ValueInfoProto) -> str:
    return f"{dtype_name(v.type.tensor_type.elem_type)} {format_shape(shape_of(v))}"


def _diff_values(a_vals, b_vals) -> dict[str, list]:
    a = {v.name: _type_str(v) for v in a_vals}
    b = {v.name: _type_str(v) for v in b_vals}
    return {
        "added": [{"name": k, "type": t} for k, t in b.items() if k not in a],
        "removed": [{"name": k, "type": t} for k, t in a.items() if k not in b],
        "changed": [{"name": k, "a": a[k], "b": t} for k, t in b.items() if k in a and a[k] != t],
    }


# --- initializers and weights ------------------------------------------------------------------------

def _initializers(model: onnx.ModelProto) -> list[tuple[str, onnx.TensorProto]]:
    """(where, tensor) for every initializer: where is ``main`` or the owning subgraph's name."""
    out = [("main", t) for t in model.graph.initializer]
    for g in list(all_graphs(model.graph))[1:]:
        out += [(g.name or "subgraph", t) for t in g.initializer]
    return out


def _init_entry(where: str, t: onnx.TensorProto) -> dict[str, Any]:
    return {"name": t.name, "where": where, "dtype": dtype_name(t.data_type), "shape": list(t.dims), "bytes": tensor_bytes(t)}


def _diff_initializers(a: onnx.ModelProto, b: onnx.ModelProto) -> dict[str, Any]:
    a_inits = {(w, t.name): t for w, t in _initializers(a)}
    b_inits = {(w, t.name): t for w, t in _initializers(b)}
    changed = []
    for key, t in b_inits.items():
        old = a_inits.get(key)
        if old is not None and (old.data_type, list(old.dims)) != (t.data_type, list(t.dims)):
            changed.append({"name": t.name, "where": key[0], "a": f"{dtype_name(old.data_type)} {list(old.dims)}",
                            "b": f"{dtype_name(t.data_type)} {list(t.dims)}", "bytes_delta": tensor_bytes(t) - tensor_bytes(old)})
    return {
        "a_count": len(a_inits), "b_count": len(b_inits),
        "a_bytes": sum(tensor_bytes(t) for t in a_inits.values()), "b_bytes": sum(tensor_bytes(t) for t in b_inits.values()),
        "added": [_init_entry(w, t) for (w, _), t in b_inits.items() if (w, t.name) not in a_inits],
        "removed": [_init_entry(w, t) for (w, _), t in a_inits.items() if (w, t.name) not in b_inits],
        "changed": changed,
    }


def _content_counts(model: onnx.ModelProto) -> tuple[Counter, dict[tuple, list[str]]]:
    """How often each distinct initializer content occurs, keyed by (dtype, dims, data identity).
    Data is hashed only for tensors that share dtype and dims with another one."""
    by_shape: dict[tuple, list[onnx.TensorProto]] = defaultdict(list)
    for _, t in _initializers(model):
        by_shape[(t.data_type, tuple(t.dims))].append(t)
    counts: Counter = Counter()
    names: dict[tuple, list[str]] = defaultdict(list)
    for shape_key, tensors in by_shape.items():
        for t in tensors:
            key = shape_key + (_data_identity(t) if len(tensors) > 1 else t.name,)
            counts[key] += 1
            names[key].append(t.name)
    return counts, names


def _data_identity(t: onnx.TensorProto) -> str:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        ref = {e.key: e.value for e in t.external_data}
        return f"external:{ref.get('location')}:{ref.get('offset', '0')}:{ref.get('length', '')}"
    if t.raw_data:  # the usual case: hash the bytes without copying the tensor
        return "sha1:" + hashlib.sha1(t.raw_data).hexdigest()
    data = onnx.TensorProto()
    data.CopyFrom(t)
    data.name = ""
    data.doc_string = ""
    return "sha1:" + hashlib.sha1(data.SerializeToString()).hexdigest()


def _weights(a: onnx.ModelProto, b: onnx.ModelProto) -> dict[str, Any]:
    a_counts, _ = _content_counts(a)
    b_counts, b_names = _content_counts(b)
    duplicated = [sorted(b_names[k]) for k, n in b_counts.items() if n > max(a_counts.get(k, 0), 1)]
    main = {t.name for t in b.graph.initializer}
    shadowing = sorted({t.name for w, t in _initializers(b) if w != "main" and t.name in main})
    a_bytes = sum(tensor_bytes(t) for _, t in _initializers(a))
    b_bytes = sum(tensor_bytes(t) for _, t in _initializers(b))
    growth = (b_bytes - a_bytes) / a_bytes if a_bytes else 0.0
    return {"duplicated": duplicated, "subgraph_repeats_main": shadowing, "bytes_growth": growth,
            "no_weight_duplicated": not duplicated and not shadowing and abs(growth) <= BYTES_TOLERANCE}


# --- metadata and model fields -----------------------------------------------------------------------

def _diff_metadata(a: onnx.ModelProto, b: onnx.ModelProto) -> dict[str, dict]:
    ma, mb = props(a), props(b)
    return {"added": {k: mb[k] for k in sorted(mb) if k not in ma},
            "removed": {k: ma[k] for k in sorted(ma) if k not in mb},
            "changed": {k: [ma[k], mb[k]] for k in sorted(mb) if k in ma and ma[k] != mb[k]}}


def _diff_model_fields(a: onnx.ModelProto, b: onnx.ModelProto) -> dict[str, list]:
    def fields(m: onnx.ModelProto) -> dict[str, Any]:
        opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in sorted(m.opset_import, key=lambda o: o.domain))
        return {"ir_version": m.ir_version, "opset": opsets, "producer": f"{m.producer_name} {m.producer_version}".strip()}
    fa, fb = fields(a), fields(b)
    return {k: [fa[k], fb[k]] for k in fa if fa[k] != fb[k]}


# --- text ------------------------------------------------------------------------------------------------

def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _loop_line(lp: dict[str, Any]) -> str:
    if lp["start"] is None:
        what = f"{lp['moved_nodes']} nodes moved into Loop {lp['node']}"
    else:
        of = f" of {lp['num_blocks']}" if lp["num_blocks"] else ""
        what = f"blocks {lp['start']}..{lp['end'] - 1} (range {lp['start']}:{lp['end']}{of}) moved into Loop {lp['node']}"
    n = lp["iters"] if lp["iters"] is not None else lp["spec_iters"]
    runs = f"applied {n}x" if n is not None else "applied N times"
    if lp["iters_dynamic"] and lp["iters_input"]:
        runs += f"{' by default' if n is not None else ''} (N is the graph input {lp['iters_input']})"
    reg = f"regularizer {lp['reg']}" + (f" (weight {lp['weight']:g})" if lp["weight"] is not None else "") if lp["reg"] else "regularizer unknown"
    line = f"  {what}, {runs}, {reg}"
    if (lp["spec"] or {}).get("halt") is not None:  # per-token halting (docs/halting.md)
        line += f", halting per token when {lp['spec']['halt_metric']} change <= {lp['spec']['halt']:g} (N is the most)"
        if lp["spec"].get("halt_kv", "live") != "live":
            line += f"; frozen tokens' K/V are {lp['spec']['halt_kv']}, only moving tokens are computed"
    if lp["source"] == SPEC_KEY:
        agree = lp["blocks_by_names"] == [lp["start"], lp["end"]]
        names = "node names agree" if agree else f"node names say {lp['blocks_by_names']}" if lp["blocks_by_names"] else "node names carry no block index"
        line += f" [from loopgraph.spec; {names}]"
    elif lp["source"] == "node names":
        line += " [from node names; no loopgraph.spec metadata]"
    return line


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in c.items())


def _format(d: ModelDiff) -> list[str]:
    lines = [f"loopgraph diff {d.a} -> {d.b}"]
    if d.loops:
        lines.append("Loop:")
        for lp in d.loops:
            lines.append(_loop_line(lp))
            kv = f"; KV cache: {lp['kv']}" if lp["kv"] else ""
            lines.append(f"  body: {lp['body_nodes']} nodes, {lp['carried']} carried value(s), {lp['scan_outputs']} scan output(s){kv}")
    w, init = d.weights, d.initializers
    sign = "+" if init["b_bytes"] >= init["a_bytes"] else "-"
    size = (f"initializer bytes {init['a_bytes']:,} -> {init['b_bytes']:,} ({sign}{_bytes(abs(init['b_bytes'] - init['a_bytes']))}, "
            f"{w['bytes_growth']:+.2%})")
    if w["no_weight_duplicated"]:
        lines.append(f"weights: no weight duplicated; {size}")
    elif not w["duplicated"] and not w["subgraph_repeats_main"]:
        lines.append(f"weights: no initializer stored twice, but {size}: more than {BYTES_TOLERANCE:.0%} changed "
                     "(see the initializers below)")
    else:
        lines.append(f"weights: DUPLICATED; {size}")
        for group in w["duplicated"]:
            lines.append(f"  same data stored {len(group)}x: {', '.join(group[:4])}")
        for name in w["subgraph_repeats_main"]:
            lines.append(f"  a subgraph initializer repeats the main-graph initializer {name}")
    n = d.nodes
    body = n["b_total"] - n["b_main"]
    lines.append(f"nodes: {n['a_main']} -> {n['b_main']} in the main graph" + (f" (+ {body} in subgraphs)" if body else ""))
    if n["moved_into_loop"]:
        lines.append(f"  moved into a Loop body: {n['moved_into_loop']} nodes")
    if n["added"]:
        total = sum(sum(c.values()) for c in n["added"].values())
        lines.append(f"  added: {total} nodes")
        for kind, c in n["added"].items():
            lines.append(f"    {kind}: {sum(c.values())}" + ("" if list(c) == [kind] else f" ({_counts(c)})"))
        for k in n["added_other"][:5]:
            lines.append(f"    + {k}")
    for what in ("removed", "changed"):
        if n[what]:
            lines.append(f"  {what}: {len(n[what])} nodes" + "".join(f"\n    {k}" for k in n[what][:5]) + ("\n    ..." if len(n[what]) > 5 else ""))
    for kind in ("inputs", "outputs"):
        v = getattr(d, kind)
        if not any(v.values()):
            lines.append(f"{kind}: unchanged")
            continue
        lines.append(f"{kind}:")
        lines += [f"  + {x['name']}: {x['type']}" for x in v["added"]]
        lines += [f"  - {x['name']}: {x['type']}" for x in v["removed"]]
        lines += [f"  ~ {x['name']}: {x['a']} -> {x['b']}" for x in v["changed"]]
    if d.virtual_layers:  # B's cache names count virtual layers: past_key_values.3 may be block 1's second iteration
        lines.append(f"KV cache: standard layout, {len(d.virtual_layers)} pairs numbered by virtual layer (v: block.iteration) "
                     + " ".join(f"{v}:{b}.{t}" for v, (b, t) in enumerate(d.virtual_layers)))
    lines.append(f"initializers: {init['a_count']} -> {init['b_count']}")
    lines += [f"  + {x['name']}: {x['dtype']} {x['shape']}, {_bytes(x['bytes'])}" + ("" if x["where"] == "main" else f" (in {x['where']})")
              for x in init["added"]]
    lines += [f"  - {x['name']}: {x['dtype']} {x['shape']}, {_bytes(x['bytes'])}" for x in init["removed"]]
    lines += [f"  ~ {x['name']}: {x['a']} -> {x['b']}" for x in init["changed"]]
    md = d.metadata
    if any(md.values()):
        lines.append("metadata:")
        lines += [f"  + {k} = {v}" for k, v in md["added"].items()]
        lines += [f"  - {k} = {v}" for k, v in md["removed"].items()]
        lines += [f"  ~ {k}: {a} -> {b}" for k, (a, b) in md["changed"].items()]
    else:
        lines.append("metadata: unchanged")
    for k, (a, b) in d.model.items():
        lines.append(f"model {k}: {a} -> {b}")
    return lines


def diff_files(a: str, b: str) -> ModelDiff:
    """Load both files without their external data and compare them (labels: the paths as given)."""
    return diff_models(load_model(resolve_model_path(a)), load_model(resolve_model_path(b)), (str(a), str(b)))


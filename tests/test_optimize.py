"""``loopgraph optimize``: ORT's session-optimized graph saved so that it reloads (tiny fixtures,
CPU provider, one thread). At every level, for the original, a Loop rewrite (with and without KV
cache), an unrolled rewrite and an int4 looped file: the saved file loads with optimizations
disabled and at its own level, and its logits equal the in-memory optimized session's bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from loopgraph.deploy.optimize import optimize_file, repair
from loopgraph.deploy.quantize import quantize_model
from loopgraph.metadata import all_graphs
from loopgraph.onnxio import load_model
from loopgraph.rewrite import rewrite
from loopgraph.runtime.generate import CausalLM
from loopgraph.runtime.inputs import position_ids as positions
from loopgraph.runtime.session import open_session
from loopgraph.spec import LoopSpec
from tests.conftest import batch_feeds, run_cli

IDS, MASK = batch_feeds()


def _feeds(path, folder) -> dict:
    lm = CausalLM.from_session(open_session(path, threads=1), json.loads((folder / "config.json").read_text()))
    return {"input_ids": IDS, "attention_mask": MASK, "position_ids": positions(MASK), **lm.initial_past(len(IDS))}


def _logits(path, feeds, level: str) -> np.ndarray:
    return open_session(path, device="cpu", threads=1, opt_level=level).run(feeds, ["logits"])["logits"]


def _make(tiny, tmp_path, arch: str, form: str):
    folder = tiny(arch, with_past=form == "loop-exact")
    src = folder / "model.onnx"
    if form == "original":
        return src, folder
    model = load_model(src, load_weights=True)
    spec = LoopSpec(1, 3, iters=3, reg="uniform", kv="exact", unroll=form == "unroll")
    model = rewrite(model, spec).model
    if form == "loop-int4":
        model = quantize_model(model, "int4")[0]
    path = tmp_path / f"{form}.onnx"
    onnx.save(model, path)
    return path, folder


def _names_unique_across_scopes(model: onnx.ModelProto) -> None:
    defined = []
    for g in all_graphs(model.graph):
        defined += [v.name for v in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output if o]
    dup = {n for n in defined if defined.count(n) > 1}
    assert not dup, sorted(dup)[:5]


@pytest.mark.parametrize("level", ["basic", "extended", "all"])
@pytest.mark.parametrize("arch, form", [("llama", "original"), ("llama", "loop"), ("llama", "loop-exact"), ("llama", "unroll"),
                                        ("llama", "loop-int4"), ("gpt2", "loop")])
def test_optimized_file_reloads_and_matches_in_memory(tiny, tmp_path, arch, form, level):
    src, folder = _make(tiny, tmp_path, arch, form)
    out = tmp_path / f"opt-{level}.onnx"
    report = optimize_file(src, out, level=level)
    saved = onnx.load(out)
    _names_unique_across_scopes(saved)
    assert all(not g.initializer for g in list(all_graphs(saved.graph))[1:]), "a Loop body holds initializers"
    assert report.nodes_after < report.nodes_before
    if form.startswith("loop") and level != "basic":
        assert report.renamed > 0, "ORT's fusions repeat split_output across scopes; expected a repair"
    feeds = _feeds(src, folder)
    in_memory = _logits(src, feeds, level)
    for reload_level in ("disable", level):
        got = _logits(out, feeds, reload_level)
        assert np.array_equal(got, in_memory), (f"{arch} {form} {level}, reloaded at {reload_level}: max|Δlogits| "
                                                f"{np.abs(got - in_memory).max():.3g}, want 0 (CPU, 1 thread)")


def test_raw_ort_output_is_what_repair_fixes(tiny, tmp_path):
    """The bug the repair exists for: ORT's own file of a looped graph at EXTENDED does not reload."""
    import onnxruntime as ort
    src, _ = _make(tiny, tmp_path, "llama", "loop")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "raw.onnx")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="split_output|SSA|single static assignment"):
        ort.InferenceSession(so.optimized_model_filepath, providers=["CPUExecutionProvider"])
    raw = onnx.load(so.optimized_model_filepath)
    renamed, hoisted = repair(raw)
    assert renamed > 0 and hoisted > 0
    _names_unique_across_scopes(raw)
    ort.InferenceSession(raw.SerializeToString(), providers=["CPUExecutionProvider"])


def test_cli_refuses_existing_output_and_bad_level(tiny, tmp_path):
    src = tiny("llama") / "model.onnx"
    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep")
    r = run_cli("optimize", src, "-o", out)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("loopgraph: error:") and "--force" in r.stderr
    assert out.read_bytes() == b"keep"
    r = run_cli("optimize", src, "-o", out, "--level", "max")
    assert r.returncode == 2 and "invalid choice" in r.stderr and out.read_bytes() == b"keep"
    r = run_cli("optimize", src, "-o", out, "--force", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["level"] == "extended" and onnx.load(out).graph.node

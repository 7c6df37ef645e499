"""``loopgraph diff``: golden output on an original tiny export and its rewrite, duplication and fallbacks."""

from __future__ import annotations

import json

import onnx
import pytest

from loopgraph import LoopSpec, __version__, rewrite
from loopgraph.deploy.diff import diff_models
from loopgraph.onnxio import load_model
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def pair(tiny):
    original = load_model(tiny("llama") / "model.onnx")
    result = rewrite(original, LoopSpec(1, 3, iters=3, reg="uniform"))
    return original, result.model, result.spec


def golden(spec: LoopSpec) -> str:
    # Reviewed by hand against the fixture (tiny Llama: 4 blocks, hidden 64, vocab 384, untied head):
    # - weights: 384*64*2 + 4*(64*64*2 + 64*32*2 + 64*128*3 + 64*2) + 64 = 197,184 floats = 788,736 B;
    #   the rewrite adds only the trip count loopgraph/iters (int64 scalar, 8 B).
    # - 1094 = 791 - 1 (the Loop) + 304 (moved); body 314 = 304 moved + 9 uniform-update + 1 cond node;
    #   uniform's update is a = 1/(iteration+1) (Constant one, Constant 1, Add, Cast, Div) and the
    #   interpolation (Sub, Mul, Mul, Add); uniform needs no is_first test.
    return f"""\
loopgraph diff model.onnx -> looped.onnx
Loop:
  blocks 1..2 (range 1:3 of 4) moved into Loop loopgraph/loop, applied 3x, regularizer uniform [from loopgraph.spec; node names agree]
  body: 314 nodes, 1 carried value(s), 0 scan output(s)
weights: no weight duplicated; initializer bytes 788,736 -> 788,744 (+8 B, +0.00%)
nodes: 1094 -> 791 in the main graph (+ 314 in subgraphs)
  moved into a Loop body: 304 nodes
  added: 11 nodes
    Loop: 1
    interpolation: 9 (Add 2, Cast 1, Constant 2, Div 1, Mul 2, Sub 1)
    loop condition: 1 (Identity 1)
inputs: unchanged
outputs: unchanged
initializers: 39 -> 40
  + loopgraph/iters: int64 [], 8 B
metadata:
  + loopgraph.blocks = 4
  + loopgraph.spec = {spec.to_json()}
  + loopgraph.version = {__version__}"""


def test_golden_original_vs_rewrite(pair):
    original, looped, spec = pair
    assert diff_models(original, looped, ("model.onnx", "looped.onnx")).format_text() == golden(spec)


def test_identical_models_have_no_changes(pair):
    original = pair[0]
    d = diff_models(original, original)
    assert d.loops == [] and d.weights["no_weight_duplicated"]
    assert d.nodes["added"] == {} and d.nodes["removed"] == [] and d.nodes["changed"] == []
    assert "inputs: unchanged" in d.format_text() and "metadata: unchanged" in d.format_text()


def test_duplicated_weight_is_reported(pair):
    original, looped, _ = pair
    bad = onnx.ModelProto()
    bad.CopyFrom(looped)
    body = next(n for n in bad.graph.node if n.op_type == "Loop").attribute[0].g
    weight = max(bad.graph.initializer, key=lambda t: len(t.raw_data))
    copy = onnx.TensorProto()
    copy.CopyFrom(weight)
    copy.name = "loopgraph/copy"
    body.initializer.extend([copy, weight])  # a renamed copy and a same-named one
    d = diff_models(original, bad)
    assert not d.weights["no_weight_duplicated"]
    assert d.weights["duplicated"] == [sorted([weight.name, weight.name, "loopgraph/copy"])]
    assert d.weights["subgraph_repeats_main"] == [weight.name]
    assert "weights: DUPLICATED" in d.format_text()


def test_without_metadata_the_range_comes_from_node_names(pair):
    original, looped, _ = pair
    bare = onnx.ModelProto()
    bare.CopyFrom(looped)
    del bare.metadata_props[:]
    text = diff_models(original, bare, ("a", "b")).format_text()
    assert ("  blocks 1..2 (range 1:3) moved into Loop loopgraph/loop, applied 3x, regularizer unknown "
            "[from node names; no loopgraph.spec metadata]") in text.splitlines()


def test_dynamic_rewrite_json(tiny):
    original = load_model(tiny("gpt2") / "model.onnx")
    looped = rewrite(original, LoopSpec(0, 2, iters=4, reg="ema", alpha=0.25, dynamic=True)).model
    d = json.loads(json.dumps(diff_models(original, looped).to_dict()))
    loop = d["loops"][0]
    assert (loop["start"], loop["end"], loop["spec_iters"], loop["reg"], loop["weight"]) == (0, 2, 4, "ema", 0.25)
    assert loop["iters_dynamic"] and loop["iters_input"] == "loopgraph/iters" and loop["blocks_by_names"] == [0, 2]
    assert [x["name"] for x in d["inputs"]["added"]] == ["loopgraph/iters", "loopgraph/alpha"]
    assert d["weights"]["no_weight_duplicated"]
    assert "applied 4x by default (N is the graph input loopgraph/iters), regularizer ema (weight 0.25)" in \
        diff_models(original, looped).format_text()


def test_diff_cli(tiny, tmp_path):
    src = tiny("llama") / "model.onnx"
    out = tmp_path / "looped.onnx"
    rewrite(src, LoopSpec(1, 3, iters=3), out)
    text = run_cli("diff", src, out)
    assert text.returncode == 0, text.stderr
    assert "weights: no weight duplicated" in text.stdout and "regularizer uniform" in text.stdout
    js = run_cli("diff", src, out, "--json")
    assert js.returncode == 0, js.stderr
    report = json.loads(js.stdout)
    assert report["loops"][0]["reg"] == "uniform" and "loopgraph.source" in report["metadata"]["added"]
    missing = run_cli("diff", src, tmp_path / "nope.onnx")
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_kv_cache_rewrite(tiny):
    original = load_model(tiny("llama", with_past=True) / "model.onnx")
    looped = rewrite(original, LoopSpec(1, 3, iters=3, kv="stacked")).model
    d = diff_models(original, looped)
    loop = d.to_dict()["loops"][0]
    assert (loop["start"], loop["end"], loop["iters"], loop["kv"], loop["source"]) == (1, 3, 3, "stacked", "loopgraph.spec"), loop
    lines = d.format_text().splitlines()
    assert any(x.startswith("  body: ") and x.endswith(", 1 carried value(s), 4 scan output(s); KV cache: stacked") for x in lines), lines
    assert "    KV cache: 4 (Gather 4)" in lines  # Gather(past, iteration) for blocks 1 and 2, key and value
    assert ("  ~ past_key_values.1.key: float32 [batch_size, 2, past_sequence_length, 16] -> "
            "float32 [3, batch_size, 2, past_sequence_length, 16]") in lines

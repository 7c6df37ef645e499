"""TensorRT readiness: small Loops built in code (conforming and not), and the graphs loopgraph writes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from loopgraph import LoopSpec, rewrite
from loopgraph.deploy.tensorrt import ERROR, WARNING, check_tensorrt, is_ready
from loopgraph.onnxio import load_model, save_model
from tests.conftest import run_cli


def small_loop(*, trip: str = "initializer", scan: bool = True, cond: str = "", body_cond: str = "identity",
               out_shape: list | None = None) -> onnx.ModelProto:
    """``x_t = x_{t-1} + 1`` for M iterations; optionally also a scan output of every x_t.

    trip: "initializer" (M baked), "input" (M a graph input: dynamic) or "none" (M omitted).
    cond: "" (omitted), "const" (a constant True) or "input" (a graph input).
    body_cond: "identity" (cond_out = Identity(cond_in)) or "computed" (cond_out = x_t < 10, data dependent).
    out_shape: the declared shape of the body's carried output (default: same as its input, [3])."""
    body_nodes = [helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.ones(3, np.float32))),
                  helper.make_node("Add", ["x_prev", "one"], ["x_next"])]
    if body_cond == "identity":
        body_nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    else:
        body_nodes += [helper.make_node("ReduceSum", ["x_next"], ["total"], keepdims=0),
                       helper.make_node("Constant", [], ["ten"], value=numpy_helper.from_array(np.array(10, np.float32))),
                       helper.make_node("Less", ["total", "ten"], ["cond_out"])]
    outputs = [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
               helper.make_tensor_value_info("x_next", TensorProto.FLOAT, out_shape or [3])]
    if scan:
        body_nodes.append(helper.make_node("Identity", ["x_next"], ["x_scan"]))
        outputs.append(helper.make_tensor_value_info("x_scan", TensorProto.FLOAT, [3]))
    body = helper.make_graph(body_nodes, "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("x_prev", TensorProto.FLOAT, [3])], outputs)
    inputs = [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [3])]
    inits = []
    if trip == "input":
        inputs.append(helper.make_tensor_value_info("n", TensorProto.INT64, []))
    elif trip == "initializer":
        inits.append(numpy_helper.from_array(np.array(4, np.int64), "n"))
    if cond == "input":
        inputs.append(helper.make_tensor_value_info("go", TensorProto.BOOL, []))
    elif cond == "const":
        inits.append(numpy_helper.from_array(np.array(True), "go"))
    loop_out = ["x_final"] + (["xs"] if scan else [])
    loop = helper.make_node("Loop", ["n" if trip != "none" else "", "go" if cond else "", "x0"], loop_out, name="loop", body=body)
    graph_outputs = [helper.make_tensor_value_info("x_final", TensorProto.FLOAT, [3])]
    if scan:
        graph_outputs.append(helper.make_tensor_value_info("xs", TensorProto.FLOAT, ["iters", 3]))
    model = helper.make_model(helper.make_graph([loop], "small", inputs, graph_outputs, inits), opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def errors(findings) -> list[str]:
    return [f"{f.where}: {f.problem}" for f in findings if f.severity == ERROR]


def test_small_loop_runs_in_ort():
    """The hand-built graph is a real, valid Loop (so the checks below judge a meaningful graph)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(small_loop(trip="input").SerializeToString(), providers=["CPUExecutionProvider"])
    final, xs = sess.run(None, {"x0": np.zeros(3, np.float32), "n": np.array(5, np.int64)})
    assert final.tolist() == [5.0] * 3 and xs.shape == (5, 3)


def test_dynamic_scan_output_is_flagged():
    findings = check_tensorrt(small_loop(trip="input", scan=True))
    assert not is_ready(findings)
    assert errors(findings) == ["loop: scan output(s) xs have a dynamic length because M (n) is not a build-time constant; "
                                "TensorRT needs a static scan-output length"]
    assert "rewrite without --dynamic" in findings[0].fix


def test_static_scan_output_and_dynamic_carried_only_pass():
    assert errors(check_tensorrt(small_loop(trip="initializer", scan=True))) == []
    assert errors(check_tensorrt(small_loop(trip="input", scan=False))) == []


def test_missing_trip_count_and_data_dependent_cond_are_flagged():
    no_m = errors(check_tensorrt(small_loop(trip="none", scan=False, cond="const")))
    assert any("no trip count M" in e for e in no_m)
    computed = errors(check_tensorrt(small_loop(scan=False, cond="const", body_cond="computed")))
    assert any("data-dependent while loop" in e for e in computed)
    runtime_cond = errors(check_tensorrt(small_loop(scan=False, cond="input")))
    assert any("cond (go) is a run-time value" in e for e in runtime_cond)
    const = check_tensorrt(small_loop(scan=False, cond="const"))
    assert is_ready(const) and [f.severity for f in const if f.severity != "info"] == [WARNING]


def test_carried_shape_change_is_flagged():
    findings = check_tensorrt(small_loop(scan=False, out_shape=[1, 3]))
    assert errors(findings) == ["x_next: carried value changes shape across iterations: body input x_prev [3], body output [1, 3]"]
    symbolic = check_tensorrt(small_loop(scan=False, out_shape=["n"]))
    assert is_ready(symbolic) and any(f.severity == WARNING and "may change shape" in f.problem for f in symbolic)


def test_dtypes_and_contrib_ops_are_flagged():
    model = small_loop(scan=False)
    model.graph.node.append(helper.make_node("FusedMatMul", ["x_final", "x_final"], ["y"], domain="com.microsoft", name="fused"))
    model.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.DOUBLE, [3]))
    model.graph.value_info.append(helper.make_tensor_value_info("s", TensorProto.STRING, [1]))
    findings = check_tensorrt(model)
    assert any(f.where == "fused" and "contrib op FusedMatMul" in f.problem for f in findings if f.severity == ERROR)
    assert any(f.where == "s" and "string" in f.problem for f in findings if f.severity == ERROR)
    assert any(f.where == "y" and "float64" in f.problem for f in findings if f.severity == WARNING)


@pytest.mark.parametrize("arch,spec", [
    ("llama", LoopSpec(1, 3, iters=3, reg="uniform")),
    ("llama", LoopSpec(0, 4, iters=2, reg="auto-align")),
    ("gpt2", LoopSpec(1, 3, iters=3, reg="anchor", dynamic=True)),
    ("qwen2", LoopSpec(2, 4, iters=4, reg="damped", trace=True)),
])
def test_graphs_loopgraph_writes_pass(tiny, arch, spec):
    looped = rewrite(load_model(tiny(arch) / "model.onnx"), spec).model
    findings = check_tensorrt(looped)
    assert is_ready(findings), errors(findings)
    assert not [f for f in findings if f.severity == WARNING], [str(f) for f in findings]


def test_dynamic_trace_rewrite_is_flagged(tiny):
    looped = rewrite(load_model(tiny("llama") / "model.onnx"), LoopSpec(1, 3, dynamic=True, trace=True)).model
    assert errors(check_tensorrt(looped)) == [
        "loopgraph/loop: scan output(s) loopgraph/trace/y, loopgraph/trace/x have a dynamic length because M (loopgraph/iters) "
        "is not a build-time constant; TensorRT needs a static scan-output length"]


def test_check_cli_exit_codes_and_inspect_line(tiny, tmp_path):
    good = tmp_path / "looped.onnx"
    rewrite(tiny("llama") / "model.onnx", LoopSpec(1, 3, iters=3), good)
    bad = tmp_path / "bad.onnx"
    save_model(small_loop(trip="input", scan=True), bad)

    ok = run_cli("check", good, "--target", "tensorrt")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"TensorRT readiness of {good}: ready")
    refused = run_cli("check", bad, "--target", "tensorrt", "--json")
    assert refused.returncode == 1, refused.stderr
    report = json.loads(refused.stdout)
    assert report["ready"] is False and report["findings"][0]["severity"] == "error"

    inspected = run_cli("inspect", good)
    assert inspected.returncode == 0, inspected.stderr
    assert "  TensorRT: ready (details: loopgraph check --target tensorrt)" in inspected.stdout.splitlines()


@pytest.mark.parametrize("kv", ["stacked", "first"])
def test_kv_cache_rewrites(tiny, kv):
    """Per-iteration KV caches are Loop scan outputs: fine with a baked N, flagged with --dynamic."""
    original = load_model(tiny("llama", with_past=True) / "model.onnx")
    baked = rewrite(original, LoopSpec(1, 3, iters=3, kv=kv)).model
    assert is_ready(check_tensorrt(baked)), errors(check_tensorrt(baked))
    dynamic = rewrite(original, LoopSpec(1, 3, iters=3, kv=kv, dynamic=True)).model
    assert any("have a dynamic length because M (loopgraph/iters)" in e for e in errors(check_tensorrt(dynamic)))

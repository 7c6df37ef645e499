"""The Loop rewrite, numerically: N = 1 is bit-exact, N >= 2 matches the PyTorch reference."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.onnxio import load_model
from loopgraph.passes.loop import ITERS_NAME, LoopReport, param_name
from loopgraph.reference.looped import reference_logits
from loopgraph.rewrite import rewrite
from loopgraph.runtime.session import open_session
from loopgraph.spec import REGULARIZERS, LoopSpec
from loopgraph.verify import feeds_for
from tests.conftest import batch_feeds

REF_ATOL = 1e-5  # absolute logit tolerance against the PyTorch reference on tiny fixtures (CPU EP)
THREADS = 1  # every session here: CPUExecutionProvider, one intra-op thread
RANGES = [(0, 4), (1, 3), (0, 1), (3, 4)]  # S = 0, the full depth, middle, last block
IDS, MASK = batch_feeds()
FEEDS = feeds_for(IDS, MASK)
VALID = MASK.astype(bool)


@functools.cache
def _model(path) -> onnx.ModelProto:
    return load_model(path, load_weights=True)


def _logits(model, feeds=FEEDS, opt="all"):
    session = open_session(model, device="cpu", threads=THREADS, opt_level=opt)
    assert session.providers[0] == "CPUExecutionProvider", session.providers
    return session.run(feeds, ["logits"])["logits"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def original(tiny, arch):
    return _model(tiny(arch) / "model.onnx")


@pytest.fixture(scope="module")
def base_logits(original):
    return _logits(original)


@pytest.mark.parametrize("reg", list(REGULARIZERS))
@pytest.mark.parametrize("rng", RANGES)
def test_n1_is_bit_exact(original, base_logits, reg, rng):
    looped = rewrite(original, LoopSpec(*rng, iters=1, reg=reg)).model
    for opt in ("all", "disable"):
        got = _logits(looped, opt=opt)
        assert np.array_equal(got, _logits(original, opt=opt)), \
            f"{reg} {rng} opt={opt}: max|Δ| {np.abs(got - base_logits).max()} (CPU EP, {THREADS} thread)"


@pytest.mark.parametrize("reg", list(REGULARIZERS))
@pytest.mark.parametrize("rng", RANGES)
def test_matches_pytorch_reference(original, base_logits, hf_model, arch, reg, rng):
    hf = hf_model(arch)
    for n in (2, 3, 4):
        res = rewrite(original, LoopSpec(*rng, iters=n, reg=reg))
        got = _logits(res.model)
        ref = reference_logits(hf, res.spec, IDS, MASK).numpy()
        err = np.abs(got - ref)[VALID].max()
        assert err <= REF_ATOL, f"{arch} {reg} {rng} N={n}: max|Δ| vs reference {err:.3g} > {REF_ATOL} (CPU EP, {THREADS} thread)"
        # looping must really change the model, or the comparison above proves nothing
        assert np.abs(got - base_logits)[VALID].max() > 1e-3, f"{reg} {rng} N={n} did not change the logits"


@pytest.mark.parametrize("reg", ["uniform", "anchor", "damped"])
def test_dynamic_equals_baked(original, reg):
    dyn = rewrite(original, LoopSpec(1, 3, iters=3, reg=reg, dynamic=True)).model
    session = open_session(dyn, device="cpu", threads=THREADS)
    assert ITERS_NAME in {v.name for v in dyn.graph.input} and ITERS_NAME in {t.name for t in dyn.graph.initializer}
    assert np.array_equal(session.run(FEEDS, ["logits"])["logits"], _logits(rewrite(original, LoopSpec(1, 3, iters=3, reg=reg)).model))
    weight_name = param_name(reg)
    for n in (1, 2, 4):
        for w in ((0.25, 0.75) if reg == "anchor" else (4.0,) if reg == "damped" else (None,)):
            feeds = {**FEEDS, ITERS_NAME: np.array(n, np.int64)}
            spec = LoopSpec(1, 3, iters=n, reg=reg)
            if w is not None:
                feeds[weight_name] = np.array(w, np.float32)
                spec = dataclasses.replace(spec, **({"alpha": w} if reg == "anchor" else {"k": w}))
            got = session.run(feeds, ["logits"])["logits"]
            assert np.array_equal(got, _logits(rewrite(original, spec).model)), f"{reg} N={n} w={w} (CPU EP, {THREADS} thread)"


def _body(model):
    loops = [n for n in model.graph.node if n.op_type == "Loop"]
    assert len(loops) == 1
    return loops[0], loops[0].attribute[0].g


def test_graph_structure(original):
    res = rewrite(original, LoopSpec(1, 3, iters=3, reg="auto-align"))
    model = res.model
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    loop, body = _body(model)
    assert loop.input[1] == ""  # counted loop: M given, cond empty
    assert loop.input[0] == ITERS_NAME and any(t.name == ITERS_NAME for t in model.graph.initializer)
    assert len(body.initializer) == 0  # weights are read from the outer scope
    # every body input has a declared shape; the carried state is [batch, seq, hidden]
    assert all(v.type.tensor_type.HasField("shape") for v in body.input)
    assert len(body.input[2].type.tensor_type.shape.dim) == 3
    # the Loop output keeps the boundary name and has a declared shape
    assert loop.output[0] == res.report.range_output == res.reports.get(LoopReport).range_output
    assert loop.output[0] in {v.name for v in model.graph.value_info}
    # no shadowing, all new names prefixed
    outer = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    inner = {o for n in body.node for o in n.output} | {v.name for v in body.input}
    assert not inner & outer
    new_nodes = [n for n in body.node if not n.name.startswith("/")]
    assert new_nodes and all(n.name.startswith("loopgraph/") for n in new_nodes)
    # weights are stored once: the same initializer set as the original, plus the trip count
    assert {t.name for t in model.graph.initializer} == {t.name for t in original.graph.initializer} | {ITERS_NAME}
    assert abs(model.ByteSize() - original.ByteSize()) < 0.01 * original.ByteSize()
    meta = {p.key: p.value for p in model.metadata_props}
    assert LoopSpec.from_json(meta["loopgraph.spec"]) == res.spec


def test_ort_all_levels_and_graphsurgeon_round_trip(original):
    model = rewrite(original, LoopSpec(0, 2, iters=3, reg="ema", alpha=0.3)).model
    want = _logits(model, opt="disable")
    for opt in ("basic", "extended", "all"):
        assert np.abs(_logits(model, opt=opt) - want).max() <= 1e-5
    again = gs.export_onnx(gs.import_onnx(model))
    assert np.array_equal(_logits(again, opt="disable"), want)


def test_other_architectures(tiny, hf_model):
    for arch in ("qwen2", "mistral", "gemma2", "phi3"):
        original = _model(tiny(arch) / "model.onnx")
        assert np.array_equal(_logits(rewrite(original, LoopSpec(1, 3, iters=1)).model), _logits(original)), arch
        res = rewrite(original, LoopSpec(1, 3, iters=3, reg="uniform"))
        err = np.abs(_logits(res.model) - reference_logits(hf_model(arch), res.spec, IDS, MASK).numpy())[VALID].max()
        assert err <= REF_ATOL, f"{arch}: max|Δ| {err:.3g}"


def test_noise_control_and_trace(original, base_logits):
    spec = LoopSpec(1, 3, iters=3, reg="uniform")
    looped = _logits(rewrite(original, spec).model)
    noise = rewrite(original, dataclasses.replace(spec, noise_seed=7)).model
    onnx.checker.check_model(noise, full_check=True)
    got = _logits(noise)
    assert np.array_equal(_logits(rewrite(original, dataclasses.replace(spec, iters=1, noise_seed=7)).model), base_logits)
    assert np.abs(got - base_logits).max() > 1e-3 and np.abs(got - looped).max() > 1e-3
    # same per-token shift norm as looping: check on the hidden state via the trace outputs
    traced = open_session(rewrite(original, dataclasses.replace(spec, trace=True)).model, device="cpu", threads=THREADS).run(FEEDS)
    assert np.array_equal(traced["logits"], looped)
    ys, xs = traced["loopgraph/trace/y"], traced["loopgraph/trace/x"]
    assert ys.shape[0] == 3 and np.array_equal(xs[0], ys[0])  # x_1 = y_1 = r
    np.testing.assert_allclose(xs[2], (ys[0] + ys[1] + ys[2]) / 3, atol=1e-5)  # uniform = running mean


def test_refusals(tiny, original):
    looped = rewrite(original, LoopSpec(1, 3)).model
    with pytest.raises(LoopgraphError, match="already looped"):
        rewrite(looped, LoopSpec(0, 1))
    with pytest.raises(LoopgraphError, match="blocks 0..3"):
        rewrite(original, LoopSpec(2, 9))
    original_bytes = original.SerializeToString()
    with pytest.raises(LoopgraphError, match=r"--range 3:1 is empty for a model with blocks 0\.\.3 \(found by module-path names\)"):
        rewrite(original, LoopSpec(3, 1))
    assert original.SerializeToString() == original_bytes  # a refused rewrite leaves the model untouched


def test_fix_subgraph_scope_moves_captured_weights_to_the_main_graph():
    """onnx-graphsurgeon writes a constant that a Loop body reads into the body; the fix moves it
    back to the main graph (one copy, read through the outer scope) and ORT runs the result."""
    import onnx_graphsurgeon as gs

    from loopgraph.passes.build import fix_subgraph_scope

    w = gs.Constant("w", np.arange(4, dtype=np.float32).reshape(2, 2))
    x = gs.Variable("x", np.float32, [2, 2])
    it, cond = gs.Variable("it", np.int64, []), gs.Variable("cond", np.bool_, [])
    h, h2, c2 = gs.Variable("h", np.float32, [2, 2]), gs.Variable("h2", np.float32, [2, 2]), gs.Variable("c2", np.bool_, [])
    body = gs.Graph(nodes=[gs.Node("MatMul", inputs=[h, w], outputs=[h2]), gs.Node("Identity", inputs=[cond], outputs=[c2])],
                    inputs=[it, cond, h], outputs=[c2, h2], name="body")
    y = gs.Variable("y", np.float32, [2, 2])
    graph = gs.Graph(nodes=[gs.Node("Loop", inputs=[gs.Constant("M", np.array(3, np.int64)), gs.Variable.empty(), x], outputs=[y],
                                    attrs={"body": body})], inputs=[x], outputs=[y], opset=18)
    model = gs.export_onnx(graph)
    loop_body = model.graph.node[0].attribute[0].g
    assert [t.name for t in loop_body.initializer] == ["w"]  # what gs does
    assert "w" not in {t.name for t in model.graph.initializer}
    fix_subgraph_scope(model)
    assert not loop_body.initializer and [t.name for t in model.graph.initializer].count("w") == 1
    onnx.checker.check_model(model, full_check=True)
    got = open_session(model).run({"x": np.eye(2, dtype=np.float32)})["y"]
    wv = np.arange(4, dtype=np.float32).reshape(2, 2)
    assert np.array_equal(got, wv @ wv @ wv)

"""--unroll: N straight-line copies give the Loop form's numbers and store no weight twice."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx
import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.onnxio import load_model
from loopgraph.rewrite import rewrite
from loopgraph.runtime.session import open_session
from loopgraph.spec import REGULARIZERS, LoopSpec
from loopgraph.verify import feeds_for
from tests.conftest import batch_feeds

FEEDS = feeds_for(*batch_feeds())
THREADS = 1  # every session here: CPUExecutionProvider, one intra-op thread


@functools.cache
def _load(path):
    return load_model(path, load_weights=True)


def _run(model, opt, feeds=FEEDS):
    s = open_session(model, device="cpu", threads=THREADS, opt_level=opt)
    assert s.providers[0] == "CPUExecutionProvider", s.providers
    return dict(zip([o.name for o in s.ort_session.get_outputs()], s.ort_session.run(None, feeds)))


def _weights(model):
    return {t.name: t.raw_data for t in model.graph.initializer if t.raw_data}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("reg", list(REGULARIZERS))
def test_unrolled_equals_loop(tiny, arch, reg):
    original = _load(tiny(arch) / "model.onnx")
    for rng, n in (((0, 4), 3), ((1, 3), 2), ((3, 4), 1)):
        spec = LoopSpec(*rng, iters=n, reg=reg)
        loop = rewrite(original, spec).model
        flat = rewrite(original, dataclasses.replace(spec, unroll=True)).model
        assert not any(node.op_type == "Loop" for node in flat.graph.node)
        # the same graph semantics: bit-exact without ORT's fusions, and with the basic ones ...
        for opt in ("disable", "basic"):
            a, b = _run(loop, opt)["logits"], _run(flat, opt)["logits"]
            assert np.array_equal(a, b), f"{reg} {rng} N={n} opt={opt}: max|Δ| {np.abs(a - b).max():.3g} (CPU EP, {THREADS} thread)"
        # ... while extended fusions (SkipLayerNorm of an interpolation Add and the next copy's norm)
        # may cross copy boundaries, which a Loop body boundary prevents
        for opt in ("extended", "all"):
            err = np.abs(_run(loop, opt)["logits"] - _run(flat, opt)["logits"]).max()
            assert err <= 1e-6, f"{reg} {rng} N={n} opt={opt}: max|Δ| {err:.3g} > 1e-6 (CPU EP, {THREADS} thread)"


def test_unrolled_structure_and_weights(tiny):
    original = _load(tiny("llama") / "model.onnx")
    flat = rewrite(original, LoopSpec(1, 3, iters=3, reg="anchor", unroll=True)).model
    onnx.checker.check_model(flat, full_check=True)
    onnx.shape_inference.infer_shapes(flat, strict_mode=True)
    want = _weights(original)
    got = _weights(flat)
    assert set(got) == set(want) | {"loopgraph/alpha"}  # every copy reads the same initializers
    assert sum(map(len, got.values())) - 4 == sum(map(len, want.values()))
    names = [o for n in flat.graph.node for o in n.output]
    assert len(names) == len(set(names))
    # the range's computing nodes live only in the copies; its Constant nodes stay shared
    in_range = [n for n in flat.graph.node if n.name.startswith(("/model/layers.1/", "/model/layers.2/"))]
    assert in_range and all(n.op_type == "Constant" for n in in_range)
    assert sum(n.name.startswith("loopgraph/iter3/model/layers.2/") for n in flat.graph.node) > 50


def test_unroll_trace_noise_and_kv(tiny):
    plain = _load(tiny("llama") / "model.onnx")
    spec = LoopSpec(0, 2, iters=3, reg="uniform", trace=True, noise_seed=3)
    loop, flat = _run(rewrite(plain, spec).model, "disable"), _run(rewrite(plain, dataclasses.replace(spec, unroll=True)).model, "disable")
    assert set(loop) == set(flat) == {"logits", "loopgraph/trace/y", "loopgraph/trace/x"}
    for k in loop:
        assert np.array_equal(loop[k], flat[k]), k
    past = _load(tiny("llama", with_past=True) / "model.onnx")
    ids = np.array([[5, 17, 42, 9]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None]}
    for kv in ("exact", "stacked", "first", "last"):
        kv_spec = LoopSpec(1, 3, iters=3, reg="ema", kv=kv)
        loop_m, flat_m = rewrite(past, kv_spec).model, rewrite(past, dataclasses.replace(kv_spec, unroll=True)).model
        f = dict(feeds)
        for i in open_session(loop_m).ort_session.get_inputs():
            if i.name.startswith("past_key_values"):
                dims = [d if isinstance(d, int) else 0 for d in i.shape]
                dims[-4] = 1
                if len(dims) == 5:
                    dims[0] = 3
                f[i.name] = np.zeros(dims, np.float32)
        a, b = _run(loop_m, "disable", f), _run(flat_m, "disable", f)
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), f"{kv} {k}"


def test_unroll_refuses_dynamic(tiny):
    with pytest.raises(LoopgraphError, match="drop --dynamic or --unroll"):
        rewrite(_load(tiny("llama") / "model.onnx"), LoopSpec(1, 3, unroll=True, dynamic=True))

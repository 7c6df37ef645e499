"""KV-cache rewrites at the graph level, driven by a minimal decode loop written here (independent
of loopgraph's generator): exact caches equal a no-cache recompute of the same looped model."""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest

from loopgraph.onnxio import load_model
from loopgraph.passes.loop import ITERS_NAME
from loopgraph.rewrite import rewrite
from loopgraph.runtime.session import open_session
from loopgraph.spec import REGULARIZERS, LoopSpec

PROMPT = [5, 17, 42, 99, 7, 3]
STEPS = 16
ATOL = 1e-5  # logits of cached vs recomputed decoding, CPU EP
THREADS = 1  # every session here: CPUExecutionProvider, one intra-op thread


@functools.cache
def _load(path):
    return load_model(path, load_weights=True)


def _decode_cached(model, n_iters: int, steps: int = STEPS, extra=None):
    """Greedy decoding feeding presents back as pasts; rank-5 pasts get a leading axis of N."""
    session = open_session(model, device="cpu", threads=THREADS)
    feeds = dict(extra or {})
    for i in session.ort_session.get_inputs():
        if i.name.startswith("past_key_values"):
            dims = [d if isinstance(d, int) else 0 for d in i.shape]
            dims[-4] = 1  # batch
            if len(dims) == 5:
                dims[0] = n_iters
            feeds[i.name] = np.zeros(dims, np.float32)
    tokens, logits, past = list(PROMPT), [], 0
    cur = np.array([PROMPT])
    for _ in range(steps):
        total = past + cur.shape[1]
        out = session.ort_session.run(None, {**feeds, "input_ids": cur, "attention_mask": np.ones((1, total), np.int64),
                                             "position_ids": np.arange(past, total)[None]})
        named = dict(zip([o.name for o in session.ort_session.get_outputs()], out))
        logits.append(named["logits"][0, -1])
        tokens.append(int(logits[-1].argmax()))
        for k in [k for k in feeds if k.startswith("past_key_values")]:
            feeds[k] = named[k.replace("past_key_values", "present")]
        past, cur = total, np.array([[tokens[-1]]])
    return tokens, np.stack(logits)


def _decode_recompute(model, steps: int = STEPS):
    session = open_session(model, device="cpu", threads=THREADS)
    tokens, logits = list(PROMPT), []
    for _ in range(steps):
        ids = np.array([tokens])
        out = session.run({"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]})
        logits.append(out["logits"][0, -1])
        tokens.append(int(logits[-1].argmax()))
    return tokens, np.stack(logits)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def models(request, tiny):
    arch = request.param
    return _load(tiny(arch, with_past=True) / "model.onnx"), _load(tiny(arch) / "model.onnx")


@pytest.mark.parametrize("reg", list(REGULARIZERS))
@pytest.mark.parametrize("rng", [(0, 4), (1, 3), (3, 4)])
def test_exact_cache_equals_recompute(models, reg, rng):
    past_model, plain = models
    spec = LoopSpec(*rng, iters=3, reg=reg, kv="exact")
    looped = rewrite(past_model, spec).model
    tokens, logits = _decode_cached(looped, 3)
    want_tokens, want_logits = _decode_recompute(rewrite(plain, spec).model)
    assert tokens == want_tokens
    err = np.abs(logits - want_logits).max()
    assert err <= ATOL, f"{reg} {rng}: max|Δ| {err:.3g} > {ATOL} (CPU EP)"


def _io_shapes(model) -> dict[str, list]:
    return {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in list(model.graph.input) + list(model.graph.output)}


@pytest.mark.parametrize("unroll", [False, True])
def test_standard_cache_structure(models, unroll):
    """V = 4 + 2 * 2 = 8 ordinary pairs numbered in execution order, in order, and the map recorded."""
    past_model, _ = models
    model = rewrite(past_model, LoopSpec(1, 3, iters=3, kv="exact", unroll=unroll)).model
    onnx.checker.check_model(model, full_check=True)
    shapes = _io_shapes(model)
    pasts = [v.name for v in model.graph.input if v.name.startswith("past_key_values.")]
    presents = [v.name for v in model.graph.output if v.name.startswith("present.")]
    assert pasts == [f"past_key_values.{v}.{k}" for v in range(8) for k in ("key", "value")]
    assert presents == [f"present.{v}.{k}" for v in range(8) for k in ("key", "value")]
    assert all(len(shapes[n]) == 4 for n in pasts + presents)
    assert shapes["past_key_values.7.key"] == shapes["past_key_values.0.key"]  # block 3 renumbered 3 -> 7
    vmap = json.loads({p.key: p.value for p in model.metadata_props}["loopgraph.virtual_layers"])
    assert vmap == [[0, 0], [1, 0], [2, 0], [1, 1], [2, 1], [1, 2], [2, 2], [3, 0]]
    if unroll:  # each copy writes its own present: no Identity, Concat or Split for the cache
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        assert {producers[n] for n in presents} == {producers["present.0.key"]}
    else:  # the Loop carries N slots per looped cache tensor and outputs every iteration's present
        loop = next(n for n in model.graph.node if n.op_type == "Loop")
        want = [f"present.{v}.{k}" for b in (1, 2) for k in ("key", "value") for v in (b, b + 2, b + 4)]  # v(b, t) = b + 2t
        assert [o for o in loop.output if o.startswith("present.")] == want


def test_stacked_cache_structure(models):
    past_model, _ = models
    model = rewrite(past_model, LoopSpec(1, 3, iters=3, kv="stacked")).model
    onnx.checker.check_model(model, full_check=True)
    shapes = _io_shapes(model)
    assert len(shapes["past_key_values.1.key"]) == 5 and shapes["past_key_values.1.key"][0] == 3
    assert len(shapes["present.2.value"]) == 5 and shapes["present.2.value"][0] == 3
    assert len(shapes["past_key_values.0.key"]) == 4 and len(shapes["present.3.key"]) == 4  # blocks outside the range


@pytest.mark.parametrize("kv, unroll", [("exact", False), ("exact", True), ("stacked", False), ("first", False), ("last", False)])
def test_n1_with_past_is_bit_exact(models, kv, unroll):
    past_model, _ = models
    want_tokens, want = _decode_cached(past_model, 1)
    tokens, got = _decode_cached(rewrite(past_model, LoopSpec(0, 4, iters=1, kv=kv, unroll=unroll)).model, 1)
    assert tokens == want_tokens and np.array_equal(got, want)


@pytest.mark.parametrize("kv", ["first", "last"])
def test_first_last_keep_the_original_interface_and_drift(models, kv):
    past_model, plain = models
    spec = LoopSpec(1, 3, iters=3, kv=kv)
    looped = rewrite(past_model, spec).model
    io = lambda m: [(v.name, len(v.type.tensor_type.shape.dim)) for v in list(m.graph.input) + list(m.graph.output)]
    assert io(looped) == io(past_model)
    _, logits = _decode_cached(looped, 3)
    _, exact = _decode_recompute(rewrite(plain, spec).model)
    assert np.abs(logits[0] - exact[0]).max() <= ATOL  # the prompt step has no past: still exact
    assert np.abs(logits[1:] - exact[1:]).max() > 1e-3  # later steps approximate the looped model


def test_dynamic_exact_cache(models):
    past_model, plain = models
    dyn = rewrite(past_model, LoopSpec(0, 4, iters=3, reg="uniform", kv="stacked", dynamic=True)).model
    for n in (2, 4):
        tokens, logits = _decode_cached(dyn, n, extra={ITERS_NAME: np.array(n, np.int64)})
        want_tokens, want = _decode_recompute(rewrite(plain, LoopSpec(0, 4, iters=n, reg="uniform")).model)
        err = np.abs(logits - want).max()
        assert tokens == want_tokens and err <= ATOL, f"N={n}: tokens equal {tokens == want_tokens}, max|Δ| {err:.3g} > {ATOL} (CPU EP, {THREADS} thread)"

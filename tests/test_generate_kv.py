"""Generation with looped with-past rewrites (tiny Llama and GPT-2, CPU provider, one thread).

``kv="stacked"`` (rank-5 per-iteration caches; the standard layout: test_pipelines.py) must decode like a no-cache
recompute of the same looped model: greedy, 16 tokens,
a left-padded batch of 2, every regularizer on both architectures, ranges that start at block 0,
cover the full depth, sit in the middle or hold only the last block. Tokens equal, next-token
logits within 1e-5 at every step, against the looped plain export (ONNX) and against the PyTorch
reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from loopgraph.rewrite import rewrite
from loopgraph.spec import LoopSpec, parse_range
from tests.test_generate import _one_torch_thread, assert_same_decoding, greedy, lm_for, reference_greedy  # noqa: F401

CASES = [  # (arch, regularizer, range): every regularizer on both; S = 0, full depth, middle, last block on both
    ("llama", "uniform", "0:4"), ("llama", "naive", "0:2"), ("llama", "ema", "1:3"),
    ("llama", "anchor", "0:4"), ("llama", "auto-align", "2:4"), ("llama", "damped", "3:4"),
    ("gpt2", "uniform", "1:3"), ("gpt2", "naive", "0:4"), ("gpt2", "ema", "0:2"),
    ("gpt2", "anchor", "3:4"), ("gpt2", "auto-align", "0:4"), ("gpt2", "damped", "1:3"),
]


def _looped(folder, spec: LoopSpec) -> onnx.ModelProto:
    return rewrite(onnx.load(str(folder / "model.onnx")), spec).model


@pytest.mark.parametrize("arch, reg, range_", CASES)
def test_stacked_kv_equals_no_cache_recompute(tiny, hf_model, arch, reg, range_):
    spec = LoopSpec(*parse_range(range_), iters=3, reg=reg, kv="stacked").resolve(4)
    past_folder = tiny(arch, with_past=True)
    cached_lm = lm_for(_looped(past_folder, spec), past_folder)
    looped_layers = set(range(spec.start, spec.end))
    for slot in cached_lm.slots:  # looped blocks: one cache per iteration; the others as exported
        layer = int(slot.past.split(".")[1])
        assert len(slot.shape) == (5 if layer in looped_layers else 4), slot
        assert layer not in looped_layers or slot.shape[0] == 3
    cached = greedy(cached_lm)
    recompute = greedy(lm_for(_looped(tiny(arch), spec), tiny(arch)))
    assert_same_decoding(cached, recompute.tokens, recompute.step_logits, f"{spec.slug()} exact KV vs ONNX recompute")
    ref_tokens, ref_logits = reference_greedy(hf_model(arch), spec)
    assert_same_decoding(cached, ref_tokens, ref_logits, f"{spec.slug()} exact KV vs PyTorch recompute")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_kv_n1_is_the_original_bit_for_bit(tiny, arch):
    folder = tiny(arch, with_past=True)
    original = greedy(lm_for(folder / "model.onnx", folder))
    one = greedy(lm_for(_looped(folder, LoopSpec(0, 3, iters=1, reg="uniform", kv="stacked")), folder))
    assert one.tokens == original.tokens
    worst = max(float(np.abs(a - b).max()) for a, b in zip(one.step_logits, original.step_logits))
    assert worst == 0.0, f"N = 1 exact-KV rewrite vs original: max |Δlogits| = {worst:.3g}, expected bit-exact (CPU provider)"


def test_dynamic_iters_feed_sizes_the_cache(tiny):
    """A --dynamic exact file fed N = 2 (loopgraph/iters) decodes like a file baked with N = 2."""
    folder = tiny("llama", with_past=True)
    spec = LoopSpec(1, 3, iters=3, reg="ema", kv="stacked", dynamic=True)
    dynamic = _looped(folder, spec)
    assert {s.shape[0] for s in lm_for(dynamic, folder).slots if len(s.shape) == 5} == {3}  # default N: the spec's
    fed = lm_for(dynamic, folder, iters=2)
    assert {s.shape[0] for s in fed.slots if len(s.shape) == 5} == {2}
    baked = greedy(lm_for(_looped(folder, dataclasses.replace(spec, iters=2, dynamic=False)), folder))
    assert_same_decoding(greedy(fed), baked.tokens, baked.step_logits, "dynamic file fed N = 2 vs baked N = 2")


@pytest.mark.parametrize("kv", ["first", "last"])
def test_approximate_kv_modes_run_with_rank4_caches(tiny, kv):
    """first/last keep the exported cache shapes; at the prefill (empty past) they equal the exact result."""
    folder = tiny("llama", with_past=True)
    spec = LoopSpec(1, 3, iters=3, reg="uniform", kv=kv)
    lm = lm_for(_looped(folder, spec), folder)
    assert all(len(s.shape) == 4 for s in lm.slots)
    got = greedy(lm)
    exact = greedy(lm_for(_looped(folder, dataclasses.replace(spec, kv="exact")), folder))
    assert all(len(t) == 16 for t in got.tokens)
    assert float(np.abs(got.step_logits[0] - exact.step_logits[0]).max()) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_kv_batch_equals_each_prompt_alone(tiny, arch):
    folder = tiny(arch, with_past=True)
    lm = lm_for(_looped(folder, LoopSpec(0, 2, iters=3, reg="auto-align", kv="exact")), folder)
    prompts = [[5, 17, 40, 33, 101, 7, 250, 9, 64], [12, 300, 45], [99, 98, 97, 96, 95]]
    batch = greedy(lm, prompts)
    for i, p in enumerate(prompts):
        alone = greedy(lm, [p])
        assert batch.tokens[i] == alone.tokens[0], f"prompt {i}: batch {batch.tokens[i]} vs alone {alone.tokens[0]}"
        worst = max(float(np.abs(b[i] - a[0]).max()) for b, a in zip(batch.step_logits, alone.step_logits))
        assert worst <= 1e-5, f"prompt {i}: batch vs alone max |Δlogits| = {worst:.3g} > 1e-5 (CPU provider)"

"""Scoring models with KV-cache inputs (issue 15): Optimum with-past exports and their rewrites in
every ``--kv`` layout, and onnxruntime-genai model-builder graphs, fed whole sequences with empty
caches. CPU provider, one thread.

- with-past logits equal the no-past export's (same checkpoint, same spec) within PAST_ATOL on a
  left-padded batch, at every real position;
- a builder graph (no ``position_ids``: GroupQueryAttention numbers tokens from index 0) is fed the
  batch right-aligned: every row equals the same row scored alone, unpadded, within ROW_ATOL, and
  the Optimum export of the same checkpoint within BUILDER_ATOL;
- ``loopgraph eval`` on a builder folder and on its looped rewrite scores every item and agrees
  with the Optimum pair item by item.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from loopgraph.eval.runner import SAMPLES_DIR, evaluate
from loopgraph.eval.tasks import TASKS
from loopgraph.onnxio import load_model
from loopgraph.rewrite import rewrite
from loopgraph.runtime.logits import LogitsSession, right_align
from loopgraph.spec import LoopSpec
from tests.conftest import batch_feeds

PAST_ATOL = 1e-5  # with-past vs no-past export of one checkpoint (different graphs: not bit-exact)
ROW_ATOL = 1e-5  # a row in a right-aligned batch vs the row alone (MatMul row counts differ)
BUILDER_ATOL = 1e-4  # builder fp32 graph (fused ops) vs the Optimum export
SPEC = LoopSpec(1, 3, iters=3, reg="uniform")


def _all_real(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask.reshape(-1))


def _assert_close(got: np.ndarray, want: np.ndarray, atol: float, what: str) -> None:
    err = float(np.abs(got - want).max())
    assert err <= atol, f"{what}: max|Δlogits| {err:.3g} > {atol} (CPU, 1 thread)"


def test_right_align_moves_rows_and_positions():
    ids = np.array([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = (ids > 0).astype(np.int64)
    got_ids, got_mask, at = right_align(ids, mask, np.array([2, 3, 4, 7]))
    assert got_ids.tolist() == [[5, 6, 0, 0], [7, 8, 9, 10]] and got_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert at.tolist() == [0, 1, 4, 7] and got_ids.reshape(-1)[at].tolist() == [5, 6, 7, 10]
    right = np.array([[5, 6, 0, 0]])
    assert [a.tolist() for a in right_align(right, (right > 0).astype(np.int64), np.array([0, 1]))] == [[[5, 6, 0, 0]], [[1, 1, 0, 0]], [0, 1]]
    with pytest.raises(ValueError, match="one run of ones"):
        right_align(ids, np.array([[1, 0, 1, 1], [1, 1, 1, 1]]), at)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kv", [None, "exact", "stacked", "first"])
def test_with_past_scores_equal_the_no_past_export(tiny, arch, kv):
    plain, past = tiny(arch) / "model.onnx", tiny(arch, with_past=True) / "model.onnx"
    if kv is not None:
        spec = LoopSpec(SPEC.start, SPEC.end, iters=SPEC.iters, reg=SPEC.reg, kv=kv)
        plain, past = rewrite(load_model(plain, load_weights=True), SPEC).model, rewrite(load_model(past, load_weights=True), spec).model
    ids, mask = batch_feeds()
    at = _all_real(mask)
    want = LogitsSession(plain, threads=1).logits_at(ids, mask, at)
    lm = LogitsSession(past, threads=1)
    assert lm._empty_past is not None and not lm.right_pad
    _assert_close(lm.logits_at(ids, mask, at), want, PAST_ATOL, f"{arch} with-past kv={kv} vs no-past")


@pytest.fixture(scope="module")
def builder_llama(fixture_root, tmp_path_factory):
    """The tiny Llama checkpoint through the genai model builder at fp32 (needs the [genai] extra)."""
    pytest.importorskip("onnxruntime_genai", reason="the [genai] extra (onnxruntime-genai 0.11.4) is not installed")
    from tests import fixtures
    ckpt = fixtures.ensure(fixture_root, "llama-hf", lambda d: fixtures.build_checkpoint("llama", d))
    folder = tmp_path_factory.mktemp("eval-builder") / "genai"
    from loopgraph.exporters.export import export
    export(str(ckpt), folder, builder="genai", precision="fp32", force=True, say=lambda m: None)
    return folder


def test_builder_graph_is_scored_right_aligned(builder_llama, tiny):
    lm = LogitsSession(builder_llama / "model.onnx", threads=1)
    assert lm.right_pad and lm._empty_past is not None
    ids, mask = batch_feeds()
    at = _all_real(mask)
    got = lm.logits_at(ids, mask, at)
    rows = []
    for r in range(len(ids)):
        real = ids[r:r + 1, mask[r] == 1]
        rows.append(lm.logits_at(real, np.ones_like(real), np.arange(real.shape[1])))
    _assert_close(got, np.concatenate(rows), ROW_ATOL, "builder: left-padded batch vs each row alone")
    want = LogitsSession(tiny("llama") / "model.onnx", threads=1).logits_at(ids, mask, at)
    _assert_close(got, want, BUILDER_ATOL, "builder fp32 vs the Optimum export")


def test_eval_scores_builder_folders_like_the_optimum_pair(builder_llama, tiny, tmp_path):
    optimum = tmp_path / "optimum"
    shutil.copytree(tiny("llama"), optimum)
    looped_builder = rewrite(builder_llama / "model.onnx", SPEC, f"{tmp_path}/looped-genai/", copy_weights=True).path
    looped_optimum = rewrite(optimum / "model.onnx", SPEC, optimum / "looped.onnx").path
    kw = {"data_dir": SAMPLES_DIR, "limit": 6, "cache_dir": None, "threads": 1, "progress": False, "say": lambda m: None}
    tasks = [TASKS["arc_easy"], TASKS["winogrande"]]
    ours = evaluate([builder_llama / "model.onnx", looped_builder], tasks, **kw)
    theirs = evaluate([optimum / "model.onnx", looped_optimum], tasks, **kw)
    for task in ("arc_easy", "winogrande"):
        for a, b in zip(ours.results[task].values(), theirs.results[task].values()):
            got = [s.ll for item in a.scores for s in item]
            want = [s.ll for item in b.scores for s in item]
            assert len(got) == len(want) > 0
            err = max(abs(x - y) for x, y in zip(got, want))
            assert err <= 1e-3, f"{task}: builder vs Optimum log-likelihood max|Δ| {err:.3g} > 1e-3 (CPU, 1 thread)"
            assert a.per_item == b.per_item, f"{task}: per-item metrics differ"

"""Per-token halting on the tiny torch fixtures (tests/fixtures.py), CPU provider, one thread:

- the ONNX Loop (which stops early) against the PyTorch reference (``reference/looped.py``, which
  implements the rule independently and always runs N iterations): logits at the real positions of
  a left-padded batch within 1e-5 and the same per-token iteration counts, for every regularizer and
  TOL in {0, small, large}; the large TOL equals the N = 2 file bit for bit;
- a prompt scored alone equals the same prompt in a batch with a slow prompt;
- exact-KV greedy decoding (standard and stacked layouts) equals the no-cache recompute of the same spec (ONNX and PyTorch).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from loopgraph.passes.halt import ITERATIONS_OUTPUT
from loopgraph.reference.looped import looped
from loopgraph.regularizers import BY_NAME
from loopgraph.rewrite import rewrite
from loopgraph.runtime.inputs import left_pad, right_pad
from loopgraph.runtime.inputs import position_ids as positions
from loopgraph.runtime.session import open_session
from loopgraph.spec import LoopSpec
from tests.test_generate import _one_torch_thread, assert_same_decoding, greedy, lm_for, reference_greedy  # noqa: F401

ATOL = 1e-5  # ONNX (CPU EP, 1 thread) vs PyTorch reference (1 thread), tiny fixtures, logits O(1)
PROMPTS = ([5, 17, 40, 33, 101, 7, 250, 9, 64], [12, 300, 45, 8])
N = 5


def _scores(model: onnx.ModelProto, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    s = open_session(model, device="cpu", threads=1).ort_session
    names = {i.name for i in s.get_inputs()}
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {k: v for k, v in feeds.items() if k in names})))


def _reference(hf, spec: LoopSpec, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, list]:
    """Reference logits, per-token iterations and the recorded x_t (for choosing tolerances)."""
    record: list = []
    t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)
    with torch.no_grad(), looped(hf, spec, record) as m:
        out = m(input_ids=t_ids, attention_mask=t_mask, position_ids=torch.as_tensor(positions(mask)), use_cache=False)
        rng = next(x for x in m.modules() if type(x).__name__ == "LoopedRange")
        used = None if rng.iterations is None else rng.iterations.numpy()
    return out.logits.numpy(), used, [x for _, x in record]


def _small_tol(hf, spec: LoopSpec, ids, mask) -> float:
    """A TOL inside a wide gap of the real tokens' changes at t = 2 (so float rounding cannot flip a decision)."""
    _, _, xs = _reference(hf, spec, ids, mask)
    c = (xs[1] - xs[0]).norm(dim=-1) / xs[0].norm(dim=-1)  # rel
    values = np.sort(c.numpy()[mask.astype(bool)])
    lo, hi = len(values) // 4, 3 * len(values) // 4
    i = lo + int(np.argmax(np.diff(values[lo:hi + 1])))
    return float((values[i] + values[i + 1]) / 2)


@pytest.mark.parametrize("reg", list(BY_NAME))
def test_onnx_matches_the_reference(tiny, hf_model, reg):
    folder = tiny("llama")
    original = onnx.load(str(folder / "model.onnx"))
    ids, mask = left_pad(PROMPTS, 0)
    real = mask.astype(bool)
    hf = hf_model("llama")
    base = LoopSpec(1, 3, iters=N, reg=reg).resolve(4)
    for tol in (0.0, _small_tol(hf, dataclasses.replace(base, halt=0.0), ids, mask), 1e9):
        spec = dataclasses.replace(base, halt=tol)
        got = _scores(rewrite(original, spec).model, ids, mask)
        want, used, _ = _reference(hf, spec, ids, mask)
        worst = float(np.abs(got["logits"] - want)[real].max())
        assert worst <= ATOL, f"{reg} TOL={tol:.4g}: max |Δlogits| at real positions = {worst:.3g} > {ATOL} (CPU EP, 1 thread)"
        np.testing.assert_array_equal(got[ITERATIONS_OUTPUT][real], used[real], err_msg=f"{reg} TOL={tol:.4g}: iterations per token")
        if 0 < tol < 1e9:
            assert used[real].min() < used[real].max(), f"{reg}: TOL {tol:.4g} should freeze some tokens before others"
    two = _scores(rewrite(original, dataclasses.replace(base, iters=2)).model, ids, mask)["logits"]
    np.testing.assert_array_equal(got["logits"], two, err_msg=f"{reg}: TOL 1e9 freezes every token at t = 2, so it is the N = 2 file")


@pytest.mark.parametrize("halt_kv", ["live", "held"])
def test_a_prompt_alone_equals_it_in_a_batch_with_a_slow_prompt(tiny, hf_model, halt_kv):
    folder = tiny("llama")
    original = onnx.load(str(folder / "model.onnx"))
    ids, mask = left_pad(PROMPTS, 0)
    spec = LoopSpec(1, 3, iters=N, reg="uniform", halt=0.0, halt_kv=halt_kv).resolve(4)
    _, _, xs = _reference(hf_model("llama"), spec, ids, mask)
    change = np.where(mask.astype(bool), ((xs[1] - xs[0]).norm(dim=-1) / xs[0].norm(dim=-1)).numpy(), 0)
    spec = dataclasses.replace(spec, halt=float(change.max(1).min()) * 1.001)  # the calmer row freezes at t = 2
    model = rewrite(original, spec).model
    batch = _scores(model, ids, mask)
    used = np.where(mask.astype(bool), batch[ITERATIONS_OUTPUT], 0).max(1)
    fast = int(np.argmin(used))
    assert used[fast] < used.max(), f"need rows that stop at different iterations, got {used.tolist()}"
    alone_ids, alone_mask = left_pad([PROMPTS[fast]], 0)
    alone = _scores(model, alone_ids, alone_mask)
    n = alone_ids.shape[1]
    worst = float(np.abs(alone["logits"][0] - batch["logits"][fast, -n:]).max())
    assert worst <= ATOL, f"{halt_kv}: prompt alone vs in a batch: max |Δlogits| = {worst:.3g} > {ATOL} (CPU EP, 1 thread)"
    np.testing.assert_array_equal(alone[ITERATIONS_OUTPUT][0], batch[ITERATIONS_OUTPUT][fast, -n:])


@pytest.mark.parametrize("arch, reg, range_, kv", [("llama", "uniform", (1, 3), "exact"), ("gpt2", "auto-align", (0, 4), "exact"),
                                                  ("llama", "anchor", (3, 4), "stacked"), ("gpt2", "uniform", (1, 3), "stacked")])
def test_exact_kv_decoding_equals_the_recompute(tiny, hf_model, arch, reg, range_, kv):
    """``exact`` (the standard layout) and ``stacked``: both exact per-iteration caches."""
    spec = LoopSpec(*range_, iters=4, reg=reg, kv=kv, halt=0.0).resolve(4)
    ids, mask = left_pad(PROMPTS, 0)
    spec = dataclasses.replace(spec, halt=_small_tol(hf_model(arch), spec, ids, mask))
    past = tiny(arch, with_past=True)
    cached = greedy(lm_for(rewrite(onnx.load(str(past / "model.onnx")), spec).model, past))
    plain = tiny(arch)
    recompute = greedy(lm_for(rewrite(onnx.load(str(plain / "model.onnx")), spec).model, plain))
    assert_same_decoding(cached, recompute.tokens, recompute.step_logits, f"{spec.slug()} exact KV vs ONNX recompute (early stop)")
    ref_tokens, ref_logits = reference_greedy(hf_model(arch), spec)
    assert_same_decoding(cached, ref_tokens, ref_logits, f"{spec.slug()} exact KV vs PyTorch recompute")


def test_trace_records_where_each_token_froze(tiny, hf_model, tmp_path):
    from loopgraph.experiments.trace import capture, format_table, write_trace
    from loopgraph.runtime.tokenizer import TextTokenizer
    folder = tiny("llama")
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = np.array([TextTokenizer.from_folder(folder).encode(prompt)], np.int64)
    spec = LoopSpec(1, 3, iters=N, reg="uniform", halt=0.0).resolve(4)
    spec = dataclasses.replace(spec, halt=_small_tol(hf_model("llama"), spec, ids, np.ones_like(ids)))
    trace = capture(folder / "model.onnx", spec, prompt)
    _, used, _ = _reference(hf_model("llama"), spec, ids, np.ones_like(ids))
    assert trace.iterations == used[0].tolist() and min(trace.iterations) < max(trace.iterations)
    stopped = max(trace.iterations)
    assert stopped < N and np.isnan(trace.ys[stopped:]).all() and (trace.xs[stopped:] == trace.xs[stopped - 1]).all()
    paths = write_trace(trace, tmp_path / "t")
    assert paths["halting"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "iterations per token" in format_table(trace)


def test_cli_rewrite_and_diff_show_halting(tiny, tmp_path):
    from tests.conftest import run_cli
    folder = tiny("llama")
    out = tmp_path / "h.onnx"
    done = run_cli("rewrite", folder / "model.onnx", "--range", "1:3", "--iters", "4", "--halt", "0.01", "--halt-metric", "cos",
                   "-o", out, "--copy-weights")
    assert done.returncode == 0 and "halt cos <= 0.01" in done.stdout, done.stderr
    assert "skipped per iteration: rows and tail positions without a moving token" in done.stdout, done.stdout
    shown = run_cli("inspect", out)
    assert "halt=0.01" in shown.stdout and "halt_metric=cos" in shown.stdout, shown.stdout
    diff = run_cli("diff", folder / "model.onnx", out)
    assert "halting per token when cos change <= 0.01" in diff.stdout, diff.stdout
    check = run_cli("check", out, "--target", "tensorrt")
    assert "per-token halting (--halt) ends this Loop" in check.stdout + check.stderr, check.stdout
    bad = run_cli("rewrite", folder / "model.onnx", "--range", "1:3", "--halt", "-1", "-o", tmp_path / "bad.onnx", "--copy-weights")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--halt -1.0 must be a finite number >= 0" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad.onnx").exists()


def test_eval_scores_a_halting_file(tiny, tmp_path):
    """loopgraph eval runs a halting file (its extra output and early stop included) beside the fixed-N file;
    with TOL 0 no token freezes, so both score the same."""
    import json
    import shutil

    from loopgraph.eval.runner import SAMPLES_DIR
    from tests.conftest import run_cli
    folder = tmp_path / "llama"
    shutil.copytree(tiny("llama"), folder)
    rewrite(folder / "model.onnx", LoopSpec(1, 3, iters=3, reg="uniform"), folder / "fixed.onnx")
    rewrite(folder / "model.onnx", LoopSpec(1, 3, iters=3, reg="uniform", halt=0.0), folder / "halt0.onnx")
    rewrite(folder / "model.onnx", LoopSpec(1, 3, iters=3, reg="uniform", halt=1e9), folder / "halt-huge.onnx")
    out = tmp_path / "r.json"
    r = run_cli("eval", folder / "fixed.onnx", folder / "halt0.onnx", folder / "halt-huge.onnx", "--tasks", "winogrande", "--limit", "4",
                "--data-dir", SAMPLES_DIR, "--json", out, "--no-cache", "--threads", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(out.read_text())["tasks"]["winogrande"]["metrics"]
    assert len(metrics) == 3 and metrics["loop1-3x3-uniform"] == metrics["loop1-3x3-uniform-halt0"], metrics


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_the_window_of_moving_tokens_is_computed(tiny, hf_model, arch):
    """Work skipping (passes/skip.py) on a right-padded batch whose rows stop at different iterations:
    y_t is computed exactly on rows with a moving real token x positions [0, L), L = 1 + the last moving
    position (NaN elsewhere in the trace: not computed), and the logits at real positions still equal
    the PyTorch reference, which computes every token at every iteration."""
    ids, mask = right_pad(PROMPTS, 0)
    real = mask.astype(bool)
    hf = hf_model(arch)
    spec = LoopSpec(1, 3, iters=N, reg="uniform", halt=0.0).resolve(4)
    _, _, xs = _reference(hf, spec, ids, mask)
    change = np.where(real, ((xs[1] - xs[0]).norm(dim=-1) / xs[0].norm(dim=-1)).numpy(), 0)
    spec = dataclasses.replace(spec, halt=float(change.max(1).min()) * 1.001)  # the calmer row freezes at t = 2
    result = rewrite(onnx.load(str(tiny(arch) / "model.onnx")), dataclasses.replace(spec, trace=True))
    assert result.report.skipping.startswith("rows and tail"), result.report.skipping
    got = _scores(result.model, ids, mask)
    want, used, _ = _reference(hf, spec, ids, mask)
    worst = float(np.abs(got["logits"] - want)[real].max())
    assert worst <= ATOL, f"{arch} right-padded, skipping: max |Δlogits| at real positions = {worst:.3g} > {ATOL} (CPU EP, 1 thread)"
    its = got[ITERATIONS_OUTPUT]
    np.testing.assert_array_equal(its[real], used[real], err_msg=f"{arch}: iterations per token")
    ys = got["loopgraph/trace/y"]
    assert len(ys) == its[real].max() and len(ys) > 2, f"the Loop ran {len(ys)} iterations; the tokens used {sorted(set(its[real]))}"
    skipped_any = False
    for t in range(1, len(ys) + 1):
        moving = real & (its >= t)  # not frozen before iteration t
        rows = moving.any(1)
        length = 1 + int(np.nonzero(moving[rows].any(0))[0].max())
        computed = rows[:, None] & (np.arange(ids.shape[1]) < length)[None, :]
        np.testing.assert_array_equal(~np.isnan(ys[t - 1]).all(-1), computed, err_msg=f"{arch}: the tokens computed at iteration {t}")
        assert not np.isnan(ys[t - 1][computed]).any(), f"{arch}: a computed token of iteration {t} holds NaN"
        skipped_any |= not computed.all()
    assert skipped_any, f"{arch}: every token was computed at every iteration; the test needs rows or a tail that stop early"

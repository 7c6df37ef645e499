"""Held K/V (``--halt-kv held``, passes/compact.py) on the tiny torch fixtures, CPU provider, one thread:

- the ONNX Loop, which computes only the moving tokens, against the PyTorch reference
  (``reference/looped.py``), which computes every token and swaps in the held K/V: logits at real
  positions within 1e-5 and the same per-token iteration counts, for every regularizer and TOL in
  {0, small, large}; TOL 0 is the fixed file and the large TOL the N = 2 file, bit for bit;
- the rule is not the live one (the reference's logits differ), and the tokens computed at each
  iteration are exactly the moving real ones (trace NaN pattern), frozen tokens inside a row included;
- a prompt scored alone equals the same prompt in a batch with a slow prompt (test_halting_torch.py, both rules);
- files it cannot be are refused with one line (a with-past export, --unroll, phi3's range that reads
  a shape computed outside it).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.passes.halt import ITERATIONS_OUTPUT
from loopgraph.regularizers import BY_NAME
from loopgraph.rewrite import rewrite
from loopgraph.runtime.inputs import left_pad, right_pad
from loopgraph.spec import LoopSpec
from tests.test_halting_torch import ATOL, PROMPTS, N, _reference, _scores, _small_tol

CASES = [("llama", reg, (1, 3)) for reg in BY_NAME] + [("gpt2", "auto-align", (0, 4)), ("gemma2", "anchor", (1, 3))]


@pytest.mark.parametrize("arch, reg, range_", CASES)
def test_held_onnx_matches_the_reference(tiny, hf_model, arch, reg, range_):
    original = onnx.load(str(tiny(arch) / "model.onnx"))
    ids, mask = left_pad(PROMPTS, 0)
    real = mask.astype(bool)
    hf = hf_model(arch)
    base = LoopSpec(*range_, iters=N, reg=reg, halt=0.0, halt_kv="held").resolve(4)
    small = _small_tol(hf, base, ids, mask)
    for tol in (0.0, small, 1e9):
        spec = dataclasses.replace(base, halt=tol)
        result = rewrite(original, spec)
        assert result.report.skipping == "every frozen token (its K/V are held)", result.report.skipping
        got = _scores(result.model, ids, mask)
        want, used, _ = _reference(hf, spec, ids, mask)
        worst = float(np.abs(got["logits"] - want)[real].max())
        assert worst <= ATOL, f"{arch} {reg} held TOL={tol:.4g}: max |Δlogits| at real positions = {worst:.3g} > {ATOL} (CPU EP, 1 thread)"
        np.testing.assert_array_equal(got[ITERATIONS_OUTPUT][real], used[real], err_msg=f"{arch} {reg} held TOL={tol:.4g}: iterations per token")
        if tol == 0:
            fixed = _scores(rewrite(original, dataclasses.replace(base, halt=None, halt_kv="live")).model, ids, mask)["logits"]
            np.testing.assert_array_equal(got["logits"][real], fixed[real], err_msg=f"{arch} {reg}: held TOL 0 freezes nothing, so it is the fixed file")
    two = _scores(rewrite(original, dataclasses.replace(base, iters=2, halt=None, halt_kv="live")).model, ids, mask)["logits"]
    np.testing.assert_array_equal(got["logits"][real], two[real], err_msg=f"{arch} {reg}: TOL 1e9 freezes every token at t = 2: the N = 2 file")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_held_computes_exactly_the_moving_tokens(tiny, hf_model, arch):
    """Right-padded (eval's layout): y_t is computed exactly for the real tokens not frozen before t, frozen
    tokens in the middle of a row included (NaN in the trace: not computed); the logits equal the reference,
    and differ from the live rule's (so the held K/V are really used)."""
    ids, mask = right_pad(PROMPTS, 0)
    real = mask.astype(bool)
    hf = hf_model(arch)
    base = LoopSpec(1, 3, iters=N, reg="uniform", halt=0.0, halt_kv="held").resolve(4)
    spec = dataclasses.replace(base, halt=_small_tol(hf, base, ids, mask))
    got = _scores(rewrite(onnx.load(str(tiny(arch) / "model.onnx")), dataclasses.replace(spec, trace=True)).model, ids, mask)
    want, used, _ = _reference(hf, spec, ids, mask)
    live, _, _ = _reference(hf, dataclasses.replace(spec, halt_kv="live"), ids, mask)
    worst = float(np.abs(got["logits"] - want)[real].max())
    assert worst <= ATOL, f"{arch} held, right-padded: max |Δlogits| at real positions = {worst:.3g} > {ATOL} (CPU EP, 1 thread)"
    moved = float(np.abs(live - want)[real].max())
    assert moved > 100 * ATOL, f"{arch}: held and live K/V give the same logits (max |Δ| {moved:.3g}); the test needs a TOL that freezes early"
    its = got[ITERATIONS_OUTPUT]
    np.testing.assert_array_equal(its[real], used[real], err_msg=f"{arch}: iterations per token")
    ys = got["loopgraph/trace/y"]
    inside = False
    for t in range(1, len(ys) + 1):
        computed = real & (its >= t)  # not frozen before iteration t
        np.testing.assert_array_equal(~np.isnan(ys[t - 1]).all(-1), computed, err_msg=f"{arch}: the tokens computed at iteration {t}")
        assert not np.isnan(ys[t - 1][computed]).any(), f"{arch}: a computed token of iteration {t} holds NaN"
        last = np.where(computed, np.arange(ids.shape[1]), -1).max(1, keepdims=True)
        inside |= bool((real & ~computed & (np.arange(ids.shape[1]) < last)).any())
    assert inside, f"{arch}: no frozen token before a moving one in its row; the test needs one to show mid-row skipping"


def test_held_is_refused_where_it_cannot_be(tiny, tmp_path):
    with pytest.raises(LoopgraphError, match="--halt-kv needs --halt TOL"):
        LoopSpec(1, 3, halt_kv="held")
    with pytest.raises(LoopgraphError, match="drop --unroll"):
        LoopSpec(1, 3, halt=0.1, halt_kv="held", unroll=True)
    with pytest.raises(LoopgraphError, match="unknown --halt-kv"):
        LoopSpec(1, 3, halt=0.1, halt_kv="kept")
    past = onnx.load(str(tiny("llama", with_past=True) / "model.onnx"))
    with pytest.raises(LoopgraphError, match="--halt-kv held needs a file without KV cache"):
        rewrite(past, LoopSpec(1, 3, halt=0.1, halt_kv="held"))
    phi3 = onnx.load(str(tiny("phi3") / "model.onnx"))  # its range reads a shape computed outside
    with pytest.raises(LoopgraphError, match=r"cannot compute only the moving tokens of this range \(the range reads .*an integer tensor"):
        rewrite(phi3, LoopSpec(1, 3, halt=0.1, halt_kv="held"))
    spec = LoopSpec(1, 3, halt=0.1, halt_kv="held")
    assert LoopSpec.from_json(spec.to_json()) == spec and "halt_kv" not in LoopSpec(1, 3, halt=0.1).to_json()


def test_cli_rewrite_and_diff_show_held(tiny, tmp_path):
    from tests.conftest import run_cli
    folder = tiny("llama")
    out = tmp_path / "h.onnx"
    done = run_cli("rewrite", folder / "model.onnx", "--range", "1:3", "--iters", "4", "--halt", "0.01", "--halt-kv", "held", "-o", out,
                   "--copy-weights")
    assert done.returncode == 0 and "halt rel <= 0.01, held K/V" in done.stdout, done.stderr
    assert "skipped per iteration: every frozen token (its K/V are held)" in done.stdout, done.stdout
    assert "halt_kv=held" in run_cli("inspect", out).stdout
    assert "frozen tokens' K/V are held" in run_cli("diff", folder / "model.onnx", out).stdout
    bad = run_cli("rewrite", folder / "model.onnx", "--range", "1:3", "--halt-kv", "held", "-o", tmp_path / "bad.onnx", "--copy-weights")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--halt-kv needs --halt TOL" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad.onnx").exists()

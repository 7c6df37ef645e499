"""Per-token halting (``--halt``) on the toy graphs (tests/toy.py): against a numpy recompute of
the rule in docs/halting.md, bit-exact invariants (TOL = 0 is the fixed-N file, N = 1 the original,
a TOL that freezes everything at t = 2 is the N = 2 file), batch independence with the early stop,
unroll = Loop, the spec's validation, and the KV file (no early stop, caches as without halting).

Numbers: ONNX Runtime, CPUExecutionProvider, 1 intra-op thread, graph optimizations disabled
(``tests.test_passes._run``); numpy in float64 (ATOL 1e-6 as in test_passes).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.passes.halt import HALT_NAME, ITERATIONS_OUTPUT
from loopgraph.rewrite import rewrite
from loopgraph.spec import LoopSpec
from tests import toy
from tests.test_passes import ATOL, REGS, X, _past_feeds, _reg_np, _run, _standard

N = 6
HUGE = 1e9  # above any change: every token freezes at t = 2


def _change_np(metric: str, new: np.ndarray, old: np.ndarray) -> np.ndarray:
    norm = lambda v: np.sqrt((v * v).sum(-1))  # noqa: E731
    if metric == "rel":
        return norm(new - old) / norm(old)
    return 1 - (new * old).sum(-1) / np.maximum(norm(new) * norm(old), 1e-8)


def _halting_np(spec: LoopSpec, x: np.ndarray, pasts: dict | None = None) -> tuple[dict, np.ndarray, list]:
    """The toy with halting in numpy: logits (and stacked presents with ``exact``), each token's
    last applied iteration, and each iteration's per-token change (for choosing tolerances)."""
    w, h = {k: v.astype(np.float64) for k, v in toy.weights().items()}, x.astype(np.float64)
    cache = (lambda L, t: None) if pasts is None else (lambda L, t: (pasts[L][0][t], pasts[L][1][t]) if spec.start <= L < spec.end else pasts[L])
    out = {}
    for L in range(spec.start):
        h, out[L] = toy.block_np(L, h, w, cache(L, 0))
    frozen, used, ys, per_iter, changes = np.zeros(h.shape[:-1], bool), np.zeros(h.shape[:-1], np.int64), [], [], []
    for t in range(1, spec.iters + 1):
        y, pres = h, {}
        for L in range(spec.start, spec.end):
            y, pres[L] = toy.block_np(L, y, w, cache(L, t - 1))
        ys.append(y)
        per_iter.append(pres)
        new = np.where(frozen[..., None], h, _reg_np(spec, t, ys, h))
        used = np.where(frozen, used, t)
        change = _change_np(spec.halt_metric, new, h)
        changes.append(change)
        if t >= 2:
            frozen = frozen | (change <= spec.halt)
        h = new
    for L in range(spec.start, spec.end):
        out[L] = tuple(np.stack([p[L][i] for p in per_iter]) for i in (0, 1)) if pasts else None
    for L in range(spec.end, toy.BLOCKS):
        h, out[L] = toy.block_np(L, h, w, cache(L, 0))
    named = {"logits": h @ w["W_head"]}
    for L, pres in out.items():
        if pres is not None:
            named[f"present.{L}.key"], named[f"present.{L}.value"] = pres
    return named, used, changes


def _middle_tol(spec: LoopSpec, x: np.ndarray) -> float:
    """A tolerance that freezes some tokens and not others, far (relative 1e-3) from every change
    of the fixed-N run at t >= 2, so float32 vs float64 cannot flip a decision."""
    _, _, changes = _halting_np(dataclasses.replace(spec, halt=0.0), x)
    values = np.sort(np.concatenate([c.ravel() for c in changes[1:]]))
    gaps = np.diff(values) / np.maximum(values[1:], 1e-30)
    mid = len(values) // 4 + int(np.argmax(gaps[len(values) // 4: 3 * len(values) // 4]))  # a wide gap in the middle half
    return float((values[mid] + values[mid + 1]) / 2)


@pytest.mark.parametrize("metric", ["rel", "cos"])
@pytest.mark.parametrize("reg", REGS)
def test_halting_matches_numpy(reg, metric):
    original = toy.model()
    for rng in ((0, 4), (1, 3)):
        base = rewrite(original, LoopSpec(*rng, iters=N, reg=reg)).spec
        for tol in (0.0, _middle_tol(dataclasses.replace(base, halt=0.0, halt_metric=metric), X), HUGE):
            spec = dataclasses.replace(base, halt=tol, halt_metric=metric)
            got = _run(rewrite(original, spec).model, {"x": X})
            want, used, _ = _halting_np(spec, X)
            what = f"{reg} {metric} {rng} TOL={tol:.4g} (CPU EP, 1 thread, no optimizations)"
            bound = ATOL * max(1.0, float(np.abs(want["logits"]).max()))  # float32 over N = 6 iterations, logits O(10)
            np.testing.assert_allclose(got["logits"], want["logits"], rtol=0, atol=bound, err_msg=f"{what}, bound {bound:.2g}")
            np.testing.assert_array_equal(got[ITERATIONS_OUTPUT], used, err_msg=what)
            if tol not in (0.0, HUGE):
                assert 2 <= used.min() < used.max(), f"{what}: TOL should freeze some tokens early and not others, got {used.tolist()}"
            flat = _run(rewrite(original, dataclasses.replace(spec, unroll=True)).model, {"x": X})
            np.testing.assert_array_equal(flat["logits"], got["logits"], err_msg=f"unrolled vs Loop, {what}")


@pytest.mark.parametrize("reg", REGS)
def test_bit_exact_invariants(reg):
    """TOL = 0 is the fixed-N file; N = 1 is the original; TOL huge is the N = 2 file (CPU EP, 1 thread)."""
    original = toy.model()
    for rng in ((0, 4), (1, 3)):
        fixed = _run(rewrite(original, LoopSpec(*rng, iters=N, reg=reg)).model, {"x": X})["logits"]
        zero = _run(rewrite(original, LoopSpec(*rng, iters=N, reg=reg, halt=0.0)).model, {"x": X})
        np.testing.assert_array_equal(zero["logits"], fixed, err_msg=f"{reg} {rng}: --halt 0 vs fixed N = {N}")
        assert (zero[ITERATIONS_OUTPUT] == N).all()
        one = _run(rewrite(original, LoopSpec(*rng, iters=1, reg=reg, halt=0.5)).model, {"x": X}, "all")["logits"]
        np.testing.assert_array_equal(one, _run(original, {"x": X}, "all")["logits"], err_msg=f"{reg} {rng}: N = 1 with halting vs original")
        for metric in ("rel", "cos"):
            huge = _run(rewrite(original, LoopSpec(*rng, iters=N, reg=reg, halt=HUGE, halt_metric=metric)).model, {"x": X})
            two = _run(rewrite(original, LoopSpec(*rng, iters=2, reg=reg)).model, {"x": X})["logits"]
            np.testing.assert_array_equal(huge["logits"], two, err_msg=f"{reg} {rng} {metric}: TOL huge vs N = 2")
            assert (huge[ITERATIONS_OUTPUT] == 2).all()


@pytest.mark.parametrize("reg", ["uniform", "auto-align", "anchor"])
def test_a_row_alone_equals_the_row_beside_a_slow_row(reg):
    """The batch stops later than the fast row alone (its Loop stops early); the fast row's
    frozen tokens must not change in the extra iterations."""
    spec = LoopSpec(1, 3, iters=N, reg=reg)
    _, _, changes = _halting_np(dataclasses.replace(spec, halt=0.0), X)
    tol = float(changes[1].max(1).min()) * 1.001  # just above the fastest row's largest change at t = 2
    model = rewrite(toy.model(), dataclasses.replace(spec, halt=tol)).model
    batch = _run(model, {"x": X})
    used = batch[ITERATIONS_OUTPUT]
    fast, slow = int(np.argmin(used.max(1))), int(np.argmax(used.max(1)))
    assert used[fast].max() < used[slow].max(), f"need a fast and a slow row, got {used.tolist()}"
    alone = _run(model, {"x": X[fast:fast + 1]})
    np.testing.assert_array_equal(alone["logits"][0], batch["logits"][fast], err_msg=f"{reg}: row alone vs in a batch (CPU EP, 1 thread)")
    np.testing.assert_array_equal(alone[ITERATIONS_OUTPUT][0], used[fast])
    trace = _run(rewrite(toy.model(), dataclasses.replace(spec, halt=tol, trace=True)).model, {"x": X[fast:fast + 1]})
    assert trace["loopgraph/trace/x"].shape[0] == used[fast].max() < N, "the Loop alone must stop when its last token froze"


@pytest.mark.parametrize("kv", ["exact", "stacked"])
def test_kv_file_freezes_without_stopping_and_matches_numpy(kv):
    """With caches the Loop runs N iterations (every iteration's cache is what a recompute holds);
    ``exact`` is the standard layout (one cache pair per virtual layer), ``stacked`` the rank-5 one."""
    original = toy.model(kv=True)
    base = LoopSpec(1, 3, iters=4, reg="ema", kv=kv)
    pasts, feeds = _past_feeds(base)
    _, _, changes = _halting_np(dataclasses.replace(base, halt=0.0), X, pasts)
    tol = float(np.median(changes[1]))
    for unroll in (False, True):
        spec = dataclasses.replace(base, halt=tol, unroll=unroll)
        model = rewrite(original, spec).model
        loop = next((n for n in model.graph.node if n.op_type == "Loop"), None)
        assert unroll or loop.input[1] == "", "a file with caches must not stop early (cond stays empty)"
        want, used, _ = _halting_np(spec, X, pasts)
        fed = feeds
        if kv == "exact":
            fed, want = _standard(spec, feeds, "past_key_values."), _standard(spec, want, "present.")
        got = _run(model, {"x": X, **fed})
        assert 2 <= used.min() < used.max() <= 4, used.tolist()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ATOL, err_msg=f"{kv} unroll={unroll} {name} TOL={tol:.4g} (CPU EP, 1 thread)")
        np.testing.assert_array_equal(got[ITERATIONS_OUTPUT], used)


def test_dynamic_tolerance_is_a_graph_input():
    spec = LoopSpec(1, 3, iters=N, reg="uniform", halt=0.0, dynamic=True)
    model = rewrite(toy.model(), spec).model
    assert HALT_NAME in [i.name for i in model.graph.input]
    default = _run(model, {"x": X})
    np.testing.assert_array_equal(default["logits"], _run(rewrite(toy.model(), dataclasses.replace(spec, dynamic=False)).model, {"x": X})["logits"])
    fed = _run(model, {"x": X, HALT_NAME: np.array(HUGE, np.float32)})
    np.testing.assert_array_equal(fed["logits"], _run(rewrite(toy.model(), LoopSpec(1, 3, iters=2, reg="uniform")).model, {"x": X})["logits"])


def test_spec_records_and_validates_halting():
    res = rewrite(toy.model(), LoopSpec(1, 3, iters=4, halt=0.01, halt_metric="cos"))
    onnx.checker.check_model(res.model, full_check=True)
    assert res.spec.slug() == "loop1-3x4-uniform-halt0.01-cos"
    assert LoopSpec.from_json(res.spec.to_json()) == res.spec
    assert "halt" not in LoopSpec(1, 3).to_json(), "files without halting keep their old spec record"
    for kwargs, match in (({"halt": -0.1}, r"--halt -0.1 must be a finite number >= 0"),
                          ({"halt": float("nan")}, r"--halt nan must be a finite number"),
                          ({"halt": float("inf")}, r"--halt inf must be a finite number"),
                          ({"halt": True}, r"--halt True must be a finite number"),
                          ({"halt_metric": "cos"}, r"--halt-metric needs --halt TOL"),
                          ({"halt": 0.1, "halt_metric": "kl"}, r"unknown --halt-metric 'kl'; choose one of rel, cos")):
        with pytest.raises(LoopgraphError, match=match):
            LoopSpec(1, 3, **kwargs)


def test_skipping_is_off_when_the_range_reads_a_size_computed_outside():
    """A range that reshapes with a shape computed outside it (here ``Shape(x)``) would break if its rows
    or positions were cut: the file is written without skipping, says why, and still halts exactly
    as the numpy rule does."""
    from onnx import helper
    m = toy.model()
    g = m.graph
    add = next(n for n in g.node if n.name == "/model/layers.1/Add_1")
    add.input[1] = "/model/layers.1/reshaped"
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"], name="/shape")] + list(g.node)
    at = next(i for i, n in enumerate(nodes) if n.name == "/model/layers.1/Add_1")
    nodes.insert(at, helper.make_node("Reshape", ["/model/layers.1/Tanh_output_0", "x_shape"], ["/model/layers.1/reshaped"],
                                      name="/model/layers.1/Reshape"))
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    on = rewrite(toy.model(), LoopSpec(1, 3, iters=N, halt=0.01)).report.skipping
    assert on.startswith("rows and tail"), on
    spec = LoopSpec(1, 3, iters=N, reg="uniform", halt=0.0).resolve(toy.BLOCKS)
    spec = dataclasses.replace(spec, halt=_middle_tol(spec, X))
    off = rewrite(m, spec)
    assert off.report.skipping.startswith("none (") and "x_shape" in off.report.skipping and "integer" in off.report.skipping, off.report.skipping
    got, (want, used, _) = _run(off.model, {"x": X}), _halting_np(spec, X)
    np.testing.assert_allclose(got["logits"], want["logits"], atol=ATOL, err_msg="halting without skipping vs numpy (CPU EP, 1 thread)")
    np.testing.assert_array_equal(got[ITERATIONS_OUTPUT], used)

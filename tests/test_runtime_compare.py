"""The comparator: errors, where the worst element is, the bound, masks and refusals (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.runtime.compare import compare


def test_errors_worst_element_and_bound_by_hand():
    ref = np.array([[1.0, -4.0, 2.0], [0.5, 3.0, -1.0]], np.float32)
    got = ref.copy()
    got[1, 2] += 0.25  # the worst element
    got[0, 0] -= 0.125
    c = compare({"logits": got, "extra": np.zeros(2)}, {"logits": ref}, atol=0.1, rtol=0.01, provider="CPUExecutionProvider")
    assert list(c.outputs) == ["logits"]  # only the reference's outputs are compared
    d = c["logits"]
    assert (d.max_abs, d.mean_abs, d.scale, d.count) == (0.25, 0.375 / 6, 4.0, 6)
    assert (d.max_rel, d.mean_rel) == (0.25 / 4.0, 0.375 / 6 / 4.0)
    assert d.worst == (1, 2) and (d.a_worst, d.b_worst) == (-0.75, -1.0)
    assert d.bound == pytest.approx(0.1 + 0.01 * 4.0, rel=1e-15)  # atol + rtol * max|reference|
    assert not d.ok and not c.ok  # 0.25 > 0.14
    assert (c.provider, c.atol, c.rtol) == ("CPUExecutionProvider", 0.1, 0.01)
    assert compare({"logits": got}, {"logits": ref}, atol=0.25, rtol=0.0, provider="x").ok  # the bound is inclusive


def test_identical_outputs_are_exactly_zero():
    a = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
    d = compare({"y": a}, {"y": a.copy()}, atol=0.0, rtol=0.0, provider="p")["y"]
    assert (d.max_abs, d.mean_abs, d.ok) == (0.0, 0.0, True) and d.worst == (0, 0, 0)


def test_valid_mask_limits_the_comparison_and_reports_full_indices():
    ref = np.zeros((2, 4, 3), np.float32)
    got = ref.copy()
    got[0, 0, 1] = 100.0  # a padded position: must not count
    got[1, 2, 0] = 0.5
    valid = np.array([[0, 1, 1, 1], [1, 1, 1, 0]], bool)
    d = compare({"logits": got}, {"logits": ref}, atol=1.0, rtol=0.0, provider="p", valid=valid)["logits"]
    assert d.max_abs == 0.5 and d.worst == (1, 2, 0) and d.count == 6 * 3 and d.ok
    unmasked = compare({"logits": got}, {"logits": ref}, atol=1.0, rtol=0.0, provider="p")["logits"]
    assert unmasked.max_abs == 100.0 and unmasked.worst == (0, 0, 1) and not unmasked.ok


def test_nan_is_never_ok_and_is_found():
    ref = np.ones((3,), np.float32)
    got = np.array([1.0, np.nan, 1.0], np.float32)
    d = compare({"y": got}, {"y": ref}, atol=1e9, rtol=1e9, provider="p")["y"]
    assert not d.ok and d.worst == (1,) and np.isnan(d.max_abs)


def test_integer_outputs_do_not_wrap():
    d = compare({"ids": np.array([0], np.uint8)}, {"ids": np.array([255], np.uint8)}, atol=0, rtol=0, provider="p")["ids"]
    assert d.max_abs == 255.0 and not d.ok


def test_nothing_to_compare():
    d = compare({"y": np.ones((2, 3))}, {"y": np.ones((2, 3))}, atol=0.5, rtol=0.0, provider="p", valid=np.zeros(2, bool))["y"]
    assert (d.count, d.worst, d.max_abs, d.ok) == (0, None, 0.0, True)


def test_refusals():
    with pytest.raises(LoopgraphError, match="the run under test has no output logits"):
        compare({"other": np.ones(2)}, {"logits": np.ones(2)}, atol=0, rtol=0, provider="p")
    with pytest.raises(LoopgraphError, match=r"output y has shape \[2\] in the run under test but \[3\] in the reference"):
        compare({"y": np.ones(2)}, {"y": np.ones(3)}, atol=0, rtol=0, provider="p")
    with pytest.raises(LoopgraphError, match=r"the valid mask \[3\] does not fit the leading axes of output y \[2, 4\]"):
        compare({"y": np.ones((2, 4))}, {"y": np.ones((2, 4))}, atol=0, rtol=0, provider="p", valid=np.ones(3, bool))
    with pytest.raises(LoopgraphError, match="tolerances must be >= 0"):
        compare({"y": np.ones(2)}, {"y": np.ones(2)}, atol=-1.0, rtol=0, provider="p")

"""The real SmolLM2-135M (marked `real`): parity of the looped graph with the PyTorch reference."""

from __future__ import annotations

import numpy as np
import pytest

from loopgraph.rewrite import rewrite
from loopgraph.spec import LoopSpec
from loopgraph.verify import verify

pytestmark = pytest.mark.real


@pytest.mark.parametrize("reg, alpha", [("uniform", None), ("anchor", 0.5)])
def test_smollm2_10_20_x3_matches_reference(real_export, tmp_path, reg, alpha):
    out = real_export / f"looped-{reg}.onnx"
    rewrite(real_export / "model.onnx", LoopSpec(10, 20, iters=3, reg=reg, alpha=alpha), out)
    try:
        report = verify(out, say=lambda m: None)
    finally:
        out.unlink()
    assert report.n1_max_abs == 0.0  # N = 1 is bit-exact to the original export
    for c in report.comparisons:
        bound = 1e-3 * c.max_abs / c.max_rel if c.max_rel else 0.0  # 1e-3 x max|reference logits|
        assert c.max_abs <= bound, f"{reg} {c.label}: max|Δ| {c.max_abs:.3g} > 1e-3 x max|logits| (CPU EP)"
        assert c.argmax_agree == 1.0, f"{reg} {c.label}: argmax differs at {1 - c.argmax_agree:.1%} of positions"
    assert np.isfinite([c.max_abs for c in report.comparisons]).all()

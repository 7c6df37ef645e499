"""The real SmolLM2-135M (marked `real`): parity of the looped graph with the PyTorch reference."""

from __future__ import annotations

import numpy as np
import pytest

from loopgraph.rewrite import rewrite
from loopgraph.runtime.inputs import feeds_for
from loopgraph.runtime.session import open_session
from loopgraph.spec import LoopSpec
from loopgraph.verify import DEFAULT_PROMPTS, encode, verify

pytestmark = pytest.mark.real
THREADS = 2  # ORT intra-op threads, CPUExecutionProvider


@pytest.mark.parametrize("reg, alpha", [("uniform", None), ("anchor", 0.5)])
def test_smollm2_10_20_x3_matches_reference(real_export, tmp_path, reg, alpha):
    out = real_export / f"looped-{reg}.onnx"
    rewrite(real_export / "model.onnx", LoopSpec(10, 20, iters=3, reg=reg, alpha=alpha), out)
    try:
        report = verify(out, threads=THREADS, say=lambda m: None)
        ids, mask = encode(real_export, DEFAULT_PROMPTS[0], vocab_size=49152)
        looped = open_session(out, threads=THREADS).run(feeds_for(ids, mask), ["logits"])["logits"]
    finally:
        out.unlink()
    original = open_session(real_export / "model.onnx", threads=THREADS).run(feeds_for(ids, mask), ["logits"])["logits"]
    assert report.provider == "CPUExecutionProvider" and len(report.comparisons) == len(DEFAULT_PROMPTS)
    assert report.n1_max_abs == 0.0  # N = 1 is bit-exact to the original export
    for c in report.comparisons:
        d = c.logits
        assert d.max_abs <= 1e-3 * d.scale, (f"{reg} {c.label}: max|Δ| {d.max_abs:.3g} at {d.worst} > 1e-3 x max|logits| "
                                             f"{d.scale:.3g} (CPU EP, {THREADS} threads)")
        assert c.argmax_agree == 1.0, f"{reg} {c.label}: argmax differs at {1 - c.argmax_agree:.1%} of positions"
    # the parity above is of a model that really loops: blocks 10..19 three times move the logits far
    # beyond the parity bound (a no-op loop would match a no-op reference just as well)
    moved = float(np.abs(looped - original).max())
    assert moved > 100 * report.comparisons[0].logits.bound, f"{reg}: looping moved the logits by only {moved:.3g}"

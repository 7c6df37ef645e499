"""int4 on the real SmolLM2-135M (marked ``real``; CPU provider, two threads).

- the with-past export looped 10:20 x3 (uniform, ``kv="exact"``) and quantized to int4 with fp32
  compute (``accuracy_level=0``) generates with its cache exactly what the no-cache recompute of the
  same int4 file generates (32 greedy tokens, a left-padded batch of 2). At the default accuracy
  level 4 (int8 activations) that does not hold for the *original* int4 file either: MLAS takes
  another kernel for one row (decode) than for many (recompute) and the logits part by up to 35
  (row 2 of this batch after 8 tokens, measured), so the property is checked where the math allows it;
- its ``verify``-style distance from the fp32 looped model (max |Δlogits| / max |fp32 logits| on
  verify's prompts) stays within FACTOR of the int4 original's distance from the fp32 original;
- the int4 looped file is within 1 % of the int4 original's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loopgraph.deploy.quantize import quantize_file
from loopgraph.rewrite import rewrite
from loopgraph.runtime.generate import generate, open_lm
from loopgraph.runtime.inputs import position_ids as positions
from loopgraph.runtime.session import open_session
from loopgraph.runtime.tokenizer import TextTokenizer
from loopgraph.spec import LoopSpec
from loopgraph.verify import DEFAULT_PROMPTS, encode
from tests.test_quantize import FACTOR, greedy_recompute

pytestmark = pytest.mark.real

SPEC = LoopSpec(10, 20, iters=3, reg="uniform", kv="exact")
ATOL, RTOL = 1e-4, 1e-4  # cached vs recompute of one int4 file: |Δ| <= ATOL + RTOL * max|logits| (fp32 compute)


@pytest.fixture(scope="module")
def files(past_export, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("precision-real")
    out = {"fp32": past_export / "model.onnx", "looped": d / "looped.onnx"}
    rewrite(out["fp32"], SPEC, out["looped"])
    for name in ("fp32", "looped"):
        out[f"{name}-int4"] = d / f"{name}.int4.onnx"
        quantize_file(out[name], out[f"{name}-int4"], "int4")
    out["looped-int4-acc0"] = d / "looped.int4-acc0.onnx"
    quantize_file(out["looped"], out["looped-int4-acc0"], "int4", accuracy_level=0)
    return out


def _lm(path: Path, folder: Path):
    return open_lm(open_session(path, device="cpu", threads=2), folder)


def test_int4_looped_cache_equals_recompute(files, past_export):
    tok = TextTokenizer.from_folder(past_export)
    prompts = [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):\n    ")]
    lm = _lm(files["looped-int4-acc0"], past_export)
    cached = generate(lm, prompts, 32, keep_logits=True)
    again = greedy_recompute(lm, prompts, 32)
    assert cached.tokens == again.tokens, f"cached {tok.decode(cached.tokens[0])!r} vs recompute {tok.decode(again.tokens[0])!r}"
    worst = max(float(np.abs(a - b).max() - RTOL * np.abs(b).max()) for a, b in zip(cached.step_logits, again.step_logits))
    assert worst <= ATOL, f"int4 looped cached vs recompute: max(|Δ| - {RTOL} max|logits|) = {worst:.3g} > {ATOL} (CPU, 2 threads)"
    print(f"\nint4 (accuracy level 0) looped 10:20x3 answers 'The capital of France is' with {tok.decode(cached.tokens[0])!r}")
    default = generate(_lm(files["looped-int4"], past_export), prompts[:1], 32)
    print(f"int4 (default, accuracy level 4) looped 10:20x3 answers it with {tok.decode(default.tokens[0])!r}")


def _distance(path: Path, ref: Path, folder: Path) -> float:
    """verify's measure: max |Δlogits| / max |reference logits| over its prompt sets (empty pasts)."""
    worst = 0.0
    a, b = _lm(path, folder), _lm(ref, folder)
    for texts in DEFAULT_PROMPTS:
        ids, mask = encode(folder, texts, 49152)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
        got = a.session.run({**feeds, **a.initial_past(len(ids))}, ["logits"])["logits"]
        want = b.session.run({**feeds, **b.initial_past(len(ids))}, ["logits"])["logits"]
        valid = mask.astype(bool)
        worst = max(worst, float(np.abs(got[valid] - want[valid]).max() / np.abs(want[valid]).max()))
    return worst


def test_int4_looped_distance_from_fp32_looped(files, past_export):
    looped = _distance(files["looped-int4"], files["looped"], past_export)
    original = _distance(files["fp32-int4"], files["fp32"], past_export)
    print(f"\nverify-style distance (max|Δlogits| / max|fp32 logits|): int4 looped vs fp32 looped {looped:.4f}, "
          f"int4 original vs fp32 original {original:.4f}")
    assert 0.0 < looped <= FACTOR * original, f"int4 looped {looped:.4g} > {FACTOR} x the original's {original:.4g} (CPU, 2 threads)"


def test_int4_looped_size(files):
    a, b = files["fp32-int4"].stat().st_size, files["looped-int4"].stat().st_size
    assert abs(b - a) <= 0.01 * a, f"int4 looped {b} B vs int4 original {a} B"
    assert b <= 0.4 * files["looped"].stat().st_size

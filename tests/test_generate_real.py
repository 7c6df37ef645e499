"""Generation with the real SmolLM2-135M (marked ``real``; CPU provider, two threads).

- range 10:20, N = 3, uniform, ``kv="exact"``: 32 greedy tokens identical to the PyTorch
  reference recomputing the whole sequence each step (a left-padded batch of 2 prompts);
- the with-past rewrite with N = 1 generates exactly what the original with-past export
  generates (bit-identical logits), which generates what the plain export recomputes;
- the CLI answers a chat question.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loopgraph.reference.hf import load_reference
from loopgraph.reference.looped import reference_logits
from loopgraph.rewrite import rewrite
from loopgraph.runtime.generate import CausalLM, Generation, generate, open_lm
from loopgraph.runtime.inputs import left_pad
from loopgraph.runtime.session import open_session
from loopgraph.runtime.tokenizer import TextTokenizer
from loopgraph.spec import LoopSpec
from tests.conftest import run_cli

pytestmark = pytest.mark.real

STEPS = 32
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ")
ATOL, RTOL = 1e-4, 1e-4  # real weights: |Δ| <= ATOL + RTOL * max|reference logits| (logits ~ 20-40)


@pytest.fixture(autouse=True, scope="module")
def _two_torch_threads():
    """The reference on two threads, like the ORT sessions here (the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok(past_export) -> TextTokenizer:
    return TextTokenizer.from_folder(past_export)


def _lm(path: Path, folder: Path) -> CausalLM:
    return open_lm(open_session(path, device="cpu", threads=2), folder)


def _greedy(lm: CausalLM, prompts: list[list[int]], pad_id: int) -> Generation:
    return generate(lm, prompts, STEPS, eos_ids=(), pad_id=pad_id, keep_logits=True)


def test_real_exact_kv_equals_pytorch_recompute(past_export, tok, tmp_path):
    spec = LoopSpec(10, 20, iters=3, reg="uniform", kv="exact")
    looped = rewrite(past_export / "model.onnx", spec, tmp_path / "looped.onnx").path
    prompts = [tok.encode(p) for p in PROMPTS]
    got = _greedy(_lm(looped, past_export), prompts, tok.pad_id)

    torch.set_grad_enabled(False)
    model = load_reference(past_export / "hf")
    ids, mask = (torch.as_tensor(a) for a in left_pad(prompts, tok.pad_id))
    want, worst = [], 0.0
    for step in range(STEPS):
        ref = reference_logits(model, spec.resolve(30), ids, mask)[:, -1].numpy()
        bound = ATOL + RTOL * float(np.abs(ref).max())
        diff = float(np.abs(got.step_logits[step] - ref).max())
        worst = max(worst, diff / bound)
        assert diff <= bound, f"step {step}: max |Δlogits| = {diff:.3g} > {bound:.3g} (CPU provider)"
        want.append(ref.argmax(-1))
        # the reference continues with its own choice: a token flip would surface as a token mismatch below
        ids = torch.cat([ids, torch.as_tensor(want[-1])[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert got.tokens == np.stack(want, 1).tolist(), "looped exact-KV greedy tokens differ from the PyTorch recompute"
    print(f"worst |Δlogits| / bound over {STEPS} steps: {worst:.3f}")


def test_real_n1_with_past_is_the_original(past_export, tok, tmp_path):
    prompts = [tok.encode(p) for p in PROMPTS]
    original = _greedy(_lm(past_export / "model.onnx", past_export), prompts, tok.pad_id)
    n1 = rewrite(past_export / "model.onnx", LoopSpec(10, 20, iters=1, reg="uniform", kv="exact"), tmp_path / "n1.onnx").path
    one = _greedy(_lm(n1, past_export), prompts, tok.pad_id)
    assert one.tokens == original.tokens
    worst = max(float(np.abs(a - b).max()) for a, b in zip(one.step_logits, original.step_logits))
    assert worst == 0.0, f"N = 1 with-past rewrite vs original: max |Δlogits| = {worst:.3g}, expected bit-exact (CPU provider)"


def test_real_with_past_equals_plain_recompute(real_export, past_export, tok):
    prompts = [tok.encode(p) for p in PROMPTS]
    cached = _greedy(_lm(past_export / "model.onnx", past_export), prompts, tok.pad_id)
    recompute = _greedy(_lm(real_export / "model.onnx", real_export), prompts, tok.pad_id)
    assert cached.tokens == recompute.tokens
    for step, (a, b) in enumerate(zip(cached.step_logits, recompute.step_logits)):
        bound = ATOL + RTOL * float(np.abs(b).max())
        assert float(np.abs(a - b).max()) <= bound, f"step {step}: with-past vs recompute beyond {bound:.3g}"


def test_real_chat_through_the_cli(past_export):
    done = run_cli("generate", past_export, "--chat", "-p", "What is the capital of France?", "--max-new-tokens", "24", "--threads", "2")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "tokens/s" in done.stderr

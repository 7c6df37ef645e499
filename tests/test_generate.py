"""The generation loop on tiny fixtures (CPU provider, one thread): KV cache against the no-cache
recompute and the PyTorch reference, batches with left padding, EOS, sampling, bad input; and the
reference's own per-iteration KV cache against its no-cache recompute."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loopgraph.errors import LoopgraphError
from loopgraph.reference.looped import reference_generate, reference_logits
from loopgraph.runtime.generate import CausalLM, Generation, Sampling, choose, generate, open_lm
from loopgraph.runtime.inputs import left_pad
from loopgraph.runtime.session import open_session
from loopgraph.spec import REGULARIZERS, LoopSpec

ATOL = 1e-5  # max |Δ next-token logits| at every step, tiny fixtures (logits are O(1))
PROMPTS = ([5, 17, 40, 33, 101, 7, 250, 9, 64], [12, 300, 45])  # different lengths: the second is left padded


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The reference runs on one thread, like the ORT sessions here (the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lm_for(model, folder: Path, iters: int | None = None) -> CausalLM:
    """A CausalLM on the CPU provider with one thread: a path, or a ModelProto with the export's config."""
    session = open_session(model, device="cpu", threads=1)
    if isinstance(model, (str, Path)):
        return open_lm(session, folder, iters)
    return CausalLM.from_session(session, json.loads((folder / "config.json").read_text()), iters)


def greedy(lm: CausalLM, prompts=PROMPTS, n: int = 16) -> Generation:
    return generate(lm, prompts, n, eos_ids=(), pad_id=0, keep_logits=True)


def reference_greedy(model, spec: LoopSpec | None, prompts=PROMPTS, n: int = 16) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy decoding with the PyTorch reference recomputing the whole sequence every step."""
    ids, mask = (torch.as_tensor(a) for a in left_pad(prompts, 0))
    tokens, logits = [], []
    for _ in range(n):
        step = reference_logits(model, spec, ids, mask)[:, -1].float()
        logits.append(step.numpy())
        tokens.append(step.argmax(-1))
        ids = torch.cat([ids, tokens[-1][:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(tokens, 1).numpy(), logits


def assert_same_decoding(got: Generation, tokens, logits, what: str, atol: float = ATOL) -> None:
    assert np.array_equal(np.array(got.tokens), np.asarray(tokens)), f"{what}: tokens differ\n{got.tokens}\n{np.asarray(tokens).tolist()}"
    worst = max(float(np.abs(a - b).max()) for a, b in zip(got.step_logits, logits))
    assert worst <= atol, f"{what}: max |Δlogits| over {len(logits)} steps = {worst:.3g} > {atol} (CPU provider)"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_equals_recompute_and_reference(tiny, hf_model, arch):
    plain, past = tiny(arch), tiny(arch, with_past=True)
    recompute_lm, cached_lm = lm_for(plain / "model.onnx", plain), lm_for(past / "model.onnx", past)
    assert not recompute_lm.uses_cache and cached_lm.uses_cache
    assert {s.shape for s in cached_lm.slots} == {(0, 2 if arch == "llama" else 4, 0, 16)}
    recompute, cached = greedy(recompute_lm), greedy(cached_lm)
    assert_same_decoding(cached, recompute.tokens, recompute.step_logits, "with-past vs recompute")
    ref_tokens, ref_logits = reference_greedy(hf_model(arch), None)
    assert_same_decoding(cached, ref_tokens, ref_logits, "with-past vs PyTorch recompute")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_equals_each_prompt_alone(tiny, arch):
    lm = lm_for(tiny(arch, with_past=True) / "model.onnx", tiny(arch, with_past=True))
    prompts = (*PROMPTS, [99, 98, 97, 96, 95, 94])
    batch = greedy(lm, prompts)
    for i, p in enumerate(prompts):
        alone = greedy(lm, [p])
        assert batch.tokens[i] == alone.tokens[0], f"prompt {i}: batch {batch.tokens[i]} vs alone {alone.tokens[0]}"
        worst = max(float(np.abs(b[i] - a[0]).max()) for b, a in zip(batch.step_logits, alone.step_logits))
        assert worst <= ATOL, f"prompt {i}: batch vs alone max |Δlogits| = {worst:.3g} > {ATOL}"


def test_stops_at_eos_per_row(tiny):
    lm = lm_for(tiny("llama", with_past=True) / "model.onnx", tiny("llama", with_past=True))
    free = greedy(lm, n=8)
    eos = free.tokens[1][2]  # a token the second row produces by step 3 becomes EOS
    seen: list[tuple[list[int], list[bool]]] = []
    got = generate(lm, PROMPTS, 8, eos_ids=(eos,), pad_id=0, on_step=lambda t, a: seen.append((t.tolist(), a.tolist())))
    for row in range(2):
        stop = free.tokens[row].index(eos) + 1 if eos in free.tokens[row] else 8
        assert got.tokens[row] == free.tokens[row][:stop], f"row {row}"
        assert got.finish[row] == ("eos" if eos in free.tokens[row] else "length")
        assert [a[row] for _, a in seen] == [True] * stop + [False] * (len(seen) - stop)  # the EOS step is active
        assert all(t[row] == 0 for t, a in seen if not a[row])  # a finished row is fed the pad token
    assert got.finish[1] == "eos" and len(got.tokens[1]) <= 3


def test_generation_stops_when_every_row_is_done(tiny):
    lm = lm_for(tiny("gpt2", with_past=True) / "model.onnx", tiny("gpt2", with_past=True))
    first = greedy(lm, [PROMPTS[0]], n=1).tokens[0][0]
    runs = []
    run_bound = lm.session.run_bound
    lm.session.run_bound = lambda *a, **k: runs.append(1) or run_bound(*a, **k)  # count the model runs
    try:
        got = generate(lm, [PROMPTS[0]], 50, eos_ids=(first,), pad_id=0)
    finally:
        del lm.session.run_bound
    assert got.tokens == [[first]] and got.finish == ["eos"]
    assert len(runs) == 1, f"{len(runs)} model runs: generation went on after the only row reached EOS at the prefill"


def test_sampling_is_seeded_and_top_p_small_is_greedy(tiny):
    lm = lm_for(tiny("llama", with_past=True) / "model.onnx", tiny("llama", with_past=True))
    a = generate(lm, PROMPTS, 12, sampling=Sampling(temperature=1.0, seed=7))
    b = generate(lm, PROMPTS, 12, sampling=Sampling(temperature=1.0, seed=7))
    c = generate(lm, PROMPTS, 12, sampling=Sampling(temperature=1.0, seed=8))
    assert a.tokens == b.tokens and a.tokens != c.tokens
    nucleus_of_one = generate(lm, PROMPTS, 12, sampling=Sampling(temperature=0.7, top_p=1e-9, seed=3))
    assert nucleus_of_one.tokens == greedy(lm, n=12).tokens


def test_choose_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = np.log(probs)
    rng = np.random.default_rng(0)
    draws = np.array([choose(logits, Sampling(top_p=0.75), rng)[0] for _ in range(4000)])
    assert set(draws) == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 reaches it: tokens 0 and 1 only
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03  # renormalized: 0.625 (4000 draws: sd 0.008)
    assert choose(np.array([[1.0, 3.0, 3.0, 0.0]]), None, rng).tolist() == [1]  # greedy takes the first maximum


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "--temperature 0.0 must be > 0"),
    ({"top_p": 0.0}, r"--top-p 0.0 is outside \(0, 1\]"),
    ({"top_p": 1.5}, r"--top-p 1.5 is outside \(0, 1\]"),
])
def test_bad_sampling(kwargs, message):
    with pytest.raises(LoopgraphError, match=message):
        Sampling(**kwargs)


def test_bad_generation_input(tiny):
    lm = lm_for(tiny("llama", with_past=True) / "model.onnx", tiny("llama", with_past=True))
    with pytest.raises(LoopgraphError, match="--max-new-tokens 0 must be at least 1"):
        generate(lm, PROMPTS, 0)
    with pytest.raises(LoopgraphError, match="prompt 2 has no tokens"):
        generate(lm, [[5], []], 4)
    with pytest.raises(LoopgraphError, match="no prompt given"):
        generate(lm, [], 4)
    with pytest.raises(LoopgraphError, match="past the model's 256 positions; .* lower --max-new-tokens to 247"):
        generate(lm, [PROMPTS[0]], 250)
    with pytest.raises(LoopgraphError, match="--iters applies to files rewritten with --dynamic"):
        open_lm(lm.session, tiny("llama", with_past=True), iters=2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("reg", list(REGULARIZERS))
def test_reference_kv_cache_equals_its_recompute(hf_model, arch, reg):
    """The PyTorch looped model with per-iteration caches under HF generate (what the CPU
    benchmark runs) decodes exactly like its no-cache recompute."""
    range_ = {"llama": (0, 4), "gpt2": (1, 3)}[arch] if reg in ("uniform", "auto-align") else (1, 3)
    spec = LoopSpec(*range_, iters=3, reg=reg).resolve(4)
    model = hf_model(arch)
    ids, mask = left_pad(PROMPTS, 0)
    tokens, logits = reference_generate(model, spec, ids, mask, 12, pad_token_id=0, eos_token_id=None)
    ref_tokens, ref_logits = reference_greedy(model, spec, n=12)
    assert np.array_equal(tokens.numpy(), ref_tokens), f"{spec.slug()}: {tokens.tolist()} vs {ref_tokens.tolist()}"
    worst = max(float(np.abs(logits[:, i].numpy() - ref_logits[i]).max()) for i in range(12))
    assert worst <= ATOL, f"{spec.slug()}: cached vs recompute max |Δlogits| = {worst:.3g} > {ATOL}"
    again, _ = reference_generate(model, spec, ids, mask, 12, pad_token_id=0, eos_token_id=None)
    assert torch.equal(again, tokens)  # a new generation starts with fresh per-iteration caches


class _FakeSession:
    """Just the metadata CausalLM.from_session reads."""

    def __init__(self, pasts: dict[str, tuple], metadata: dict[str, str] | None = None, presents: bool = True) -> None:
        from loopgraph.runtime.session import TensorInfo
        self.inputs = {n: TensorInfo(n, s, "tensor(int64)") for n, s in (("input_ids", ("b", "s")), ("attention_mask", ("b", "t")))}
        self.inputs.update({n: TensorInfo(n, s, "tensor(float)") for n, s in pasts.items()})
        self.outputs = {"logits": TensorInfo("logits", ("b", "s", 8), "tensor(float)")}
        if presents:
            self.outputs.update({"present." + n[len("past_key_values."):]: TensorInfo(n, s, "tensor(float)") for n, s in pasts.items()})
        self.metadata = metadata or {}


def test_cache_layout_from_metadata_and_config():
    spec = LoopSpec(1, 2, iters=4, kv="exact").to_json()
    fake = _FakeSession({"past_key_values.0.key": ("b", "h", "p", "d"), "past_key_values.1.key": ("n", "b", 3, "p", 16)},
                        {"loopgraph.spec": spec})
    lm = CausalLM.from_session(fake, {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 96, "max_position_embeddings": 64})
    assert [s.shape for s in lm.slots] == [(0, 3, 0, 16), (4, 0, 3, 0, 16)]  # kv_heads and head_dim from config, N from the spec
    assert lm.max_positions == 64 and lm.spec.iters == 4
    assert lm.initial_past(2)["past_key_values.1.key"].shape == (4, 2, 3, 0, 16)


@pytest.mark.parametrize("pasts, kwargs, message", [
    ({"past_key_values.0.key": ("b", "h", "p", "d")}, {}, r"leaves kv_heads symbolic \('h'\) and config.json does not give it"),
    ({"past_key_values.0.key": ("n", "b", 2, "p", 16)}, {}, r"leaves N \(iterations; no loopgraph.spec metadata\) symbolic"),
    ({"past_key_values.0.key": ("b", "p", 16)}, {}, "has rank 3"),
    ({"past_key_values.0.key": ("b", 2, "p", 16)}, {"presents": False}, "but no output present.0.key to feed it"),
])
def test_cache_layouts_refused(pasts, kwargs, message):
    with pytest.raises(LoopgraphError, match=message):
        CausalLM.from_session(_FakeSession(pasts, **kwargs), {})

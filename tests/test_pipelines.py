"""Looped models in the stock pipelines (issue 13): the standard-layout KV cache (one ordinary pair
per virtual layer) written as a runnable folder, driven by Optimum's ``ORTModelForCausalLM.generate()``
and by onnxruntime-genai with no loopgraph code, against the no-cache recompute of the same looped
model (loopgraph's generator on the looped *plain* export). Tiny Llama, Qwen2 and GPT-2 fixtures,
CPU provider, one thread; greedy, 16 tokens, a batch of 2 prompts of different lengths.

Padding: Optimum gets the batch left-padded (its convention); onnxruntime-genai 0.11 pads on the
right (its ``Tokenizer.encode_batch`` does, and a left-padded batch gives the padded row wrong
tokens even with the original export), so it gets the same prompts right-padded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from loopgraph.errors import LoopgraphError
from loopgraph.rewrite import rewrite
from loopgraph.runtime.generate import left_pad
from loopgraph.spec import LoopSpec, parse_range
from tests.conftest import run_cli
from tests.test_generate import PROMPTS, _one_torch_thread, greedy, lm_for  # noqa: F401

STEPS = 16
ATOL = 1e-5  # next-token logits, Optimum vs recompute, CPU provider, tiny fixtures (logits O(1))
EOS = 2  # the fixtures' eos_token_id

CASES = [  # (arch, regularizer, range, unroll): every regularizer; ranges from block 0, in the middle, to the last block
    ("llama", "uniform", "0:4", False), ("llama", "naive", "0:2", True), ("llama", "ema", "1:3", False),
    ("llama", "anchor", "3:4", True), ("qwen2", "auto-align", "0:2", False), ("qwen2", "damped", "1:3", True),
    ("qwen2", "uniform", "3:4", False), ("gpt2", "ema", "0:4", True), ("gpt2", "auto-align", "1:3", False),
    ("gpt2", "damped", "3:4", False), ("gpt2", "anchor", "0:2", False), ("gpt2", "naive", "1:3", True),
]


def optimum_greedy(folder: Path, prompts=PROMPTS, steps: int = STEPS) -> tuple[list[list[int]], list[np.ndarray]]:
    """Optimum ``generate()`` on a left-padded batch: new tokens per row, raw logits per step."""
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import GenerationConfig
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(folder, provider="CPUExecutionProvider", session_options=options)
    assert model.can_use_cache, f"Optimum found no KV cache in {folder}"
    model.generation_config.eos_token_id = None  # run all the steps (the recompute does not stop either)
    ids, mask = left_pad(prompts, 0)
    out = model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), return_dict_in_generate=True,
                         output_logits=True, generation_config=GenerationConfig(max_new_tokens=steps, min_new_tokens=0, do_sample=False,
                                                                                eos_token_id=None, pad_token_id=0))
    return out.sequences[:, ids.shape[1]:].tolist(), [step.numpy() for step in out.logits]


def genai_greedy(folder: Path, prompts=PROMPTS, steps: int = STEPS) -> list[list[int]]:
    """onnxruntime-genai greedy on a right-padded batch (module docstring); a row stops at EOS."""
    import onnxruntime_genai as og
    config = og.Config(str(folder))
    config.clear_providers()  # the CPU provider
    model = og.Model(config)
    pad = json.loads((folder / "genai_config.json").read_text())["model"]["pad_token_id"]
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad, np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + steps, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    # genai keeps each row's padding in its sequence; the new tokens are the last `steps` (fewer after an EOS)
    return [[int(t) for t in generator.get_sequence(i)[width:]] for i in range(len(prompts))]


def until_eos(tokens: list[int]) -> list[int]:
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def recompute(tiny, arch: str, spec: LoopSpec):
    plain = tiny(arch)
    return greedy(lm_for(rewrite(onnx.load(str(plain / "model.onnx")), spec).model, plain), n=STEPS)


@pytest.mark.parametrize("arch, reg, range_, unroll", CASES)
def test_optimum_and_genai_equal_the_recompute(tiny, tmp_path, arch, reg, range_, unroll):
    spec = LoopSpec(*parse_range(range_), iters=3, reg=reg, kv="exact", unroll=unroll).resolve(4)
    folder = rewrite(tiny(arch, with_past=True) / "model.onnx", spec, f"{tmp_path}/looped/").path.parent
    config = json.loads((folder / "config.json").read_text())
    layers = 4 + 2 * (spec.end - spec.start)
    assert config.get("num_hidden_layers", config.get("n_layer")) == layers and config["loopgraph_original_num_hidden_layers"] == 4
    assert json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == layers
    want = recompute(tiny, arch, spec)
    what = f"{arch} {spec.slug()}"
    tokens, logits = optimum_greedy(folder)
    assert tokens == want.tokens, f"{what}: Optimum generate() tokens differ from the no-cache recompute\n{tokens}\n{want.tokens}"
    worst = max(float(np.abs(a - b).max()) for a, b in zip(logits, want.step_logits))
    assert worst <= ATOL, f"{what}: Optimum vs recompute max |Δlogits| over {STEPS} steps = {worst:.3g} > {ATOL} (CPU provider)"
    got = genai_greedy(folder)
    assert got == [until_eos(t) for t in want.tokens], f"{what}: onnxruntime-genai tokens differ from the recompute\n{got}\n{want.tokens}"


@pytest.mark.parametrize("arch, unroll", [("llama", False), ("llama", True), ("qwen2", False), ("gpt2", False), ("gpt2", True)])
def test_standard_equals_stacked_at_every_step(tiny, arch, unroll):
    """The same graph ops, other cache plumbing: identical logits (0.0) at every decode step."""
    folder = tiny(arch, with_past=True)
    original = onnx.load(str(folder / "model.onnx"))
    spec = LoopSpec(1, 3, iters=3, reg="auto-align", unroll=unroll)
    standard = greedy(lm_for(rewrite(original, spec).model, folder))
    stacked = greedy(lm_for(rewrite(original, LoopSpec(1, 3, iters=3, reg="auto-align", unroll=unroll, kv="stacked")).model, folder))
    assert standard.tokens == stacked.tokens
    worst = max(float(np.abs(a - b).max()) for a, b in zip(standard.step_logits, stacked.step_logits))
    assert worst == 0.0, f"{arch} unroll={unroll}: standard vs stacked max |Δlogits| = {worst:.3g}, expected 0.0 (CPU provider)"


@pytest.mark.parametrize("unroll", [False, True])
def test_n1_standard_folder_is_the_original_under_optimum(tiny, tmp_path, unroll):
    folder = tiny("qwen2", with_past=True)
    looped = rewrite(folder / "model.onnx", LoopSpec(0, 4, iters=1, unroll=unroll), f"{tmp_path}/n1/").path.parent
    original = tmp_path / "original"
    shutil.copytree(folder, original)
    want_tokens, want = optimum_greedy(original)
    tokens, got = optimum_greedy(looped)
    assert tokens == want_tokens
    worst = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    assert worst == 0.0, f"N = 1 standard layout vs the original export under Optimum: max |Δlogits| = {worst:.3g}, expected bit-exact"


def test_folder_contents_and_tools(tiny, tmp_path):
    """The folder holds what the drivers need; inspect shows the virtual-layer map; verify passes on it."""
    folder = rewrite(tiny("llama", with_past=True) / "model.onnx", LoopSpec(1, 3, iters=3), f"{tmp_path}/out/").path.parent
    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json",
                                                   "generation_config.json", "loopgraph.json", "genai_config.json"}
    manifest = json.loads((folder / "loopgraph.json").read_text())
    assert manifest["rewrite"]["virtual_layers"] == 8 and manifest["rewrite"]["virtual_layer_map"][3] == [1, 1]
    genai = json.loads((folder / "genai_config.json").read_text())["model"]
    assert genai["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key" and genai["eos_token_id"] == EOS
    assert genai["decoder"]["head_size"] == 16 and genai["decoder"]["num_key_value_heads"] == 2
    shown = run_cli("inspect", folder / "model.onnx")
    assert shown.returncode == 0, shown.stderr
    assert "  KV cache pairs (standard layout): 8 virtual layers, past_key_values.{v} / present.{v}" in shown.stdout
    assert "    v 3..4     -> blocks 1..2, iteration 2" in shown.stdout.splitlines()
    generated = run_cli("generate", folder / "model.onnx", "-p", "The capital of France is", "--max-new-tokens", "4", "--threads", "1")
    assert generated.returncode == 0 and "kv=exact: 8 virtual-layer cache pairs" in generated.stderr, generated.stderr
    checked = run_cli("check", folder / "model.onnx", "--target", "tensorrt")
    assert checked.returncode != 0 and "change length across iterations" in checked.stdout + checked.stderr
    # the folder lives outside the export's tree, so its recorded original is not opened unless named (docs/safety.md)
    verified = run_cli("verify", folder / "model.onnx", "--original", tiny("llama", with_past=True) / "model.onnx")
    assert verified.returncode == 0 and "PASS" in verified.stdout and "(bit-exact)" in verified.stdout, verified.stdout + verified.stderr


def test_diff_shows_the_virtual_layers(tiny):
    from loopgraph.deploy.diff import diff_models
    original = onnx.load(str(tiny("llama", with_past=True) / "model.onnx"))
    lines = diff_models(original, rewrite(original, LoopSpec(1, 3, iters=3)).model).format_text().splitlines()
    assert ("KV cache: standard layout, 8 pairs numbered by virtual layer (v: block.iteration) "
            "0:0.0 1:1.0 2:2.0 3:1.1 4:2.1 5:1.2 6:2.2 7:3.0") in lines, lines
    assert any(x.startswith("  body: ") and x.endswith(", 13 carried value(s), 0 scan output(s); KV cache: exact") for x in lines), lines


def test_unrolled_standard_layout_is_tensorrt_ready(tiny):
    from loopgraph.deploy.tensorrt import check_tensorrt, is_ready
    model = rewrite(onnx.load(str(tiny("llama", with_past=True) / "model.onnx")), LoopSpec(1, 3, iters=3, unroll=True)).model
    assert is_ready(check_tensorrt(model))


def test_dynamic_needs_the_stacked_layout(tiny, tmp_path):
    src = tiny("llama", with_past=True) / "model.onnx"
    with pytest.raises(LoopgraphError, match="use --kv stacked"):
        rewrite(onnx.load(str(src)), LoopSpec(1, 3, dynamic=True))
    out = tmp_path / "dyn.onnx"
    done = run_cli("rewrite", src, "--range", "1:3", "--dynamic", "-o", out)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--kv stacked" in done.stderr, done.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    assert run_cli("rewrite", src, "--range", "1:3", "--dynamic", "--kv", "stacked", "-o", out).returncode == 0
    plain = run_cli("rewrite", tiny("llama") / "model.onnx", "--range", "1:3", "--dynamic", "-o", tmp_path / "plain.onnx")
    assert plain.returncode == 0, plain.stderr  # no cache: the KV layout does not matter


def test_bad_folder_outputs(tiny, tmp_path):
    src = tiny("llama", with_past=True) / "model.onnx"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    done = run_cli("rewrite", src, "--range", "1:3", "-o", busy)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "exists and is not empty" in done.stderr and "--force" in done.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    forced = run_cli("rewrite", src, "--range", "1:3", "-o", busy, "--force")
    assert forced.returncode == 0, forced.stderr
    assert (busy / "genai_config.json").is_file() and not (busy / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no staging or old folder left behind

    bare = tmp_path / "bare"  # an export without its tokenizer
    shutil.copytree(src.parent, bare)
    (bare / "tokenizer.json").unlink()
    missing = run_cli("rewrite", bare / "model.onnx", "--range", "1:3", "-o", f"{tmp_path}/nope/")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no tokenizer (tokenizer.json)" in missing.stderr
    assert not (tmp_path / "nope").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "busy"]


@pytest.mark.real
def test_real_smollm2_optimum_and_genai_equal_the_pytorch_recompute(past_export, tmp_path):
    """SmolLM2-135M looped 10:20 x3 uniform: 32 greedy tokens of Optimum and genai equal the
    PyTorch reference recomputing every step (the reference verify uses)."""
    from loopgraph.reference.hf import load_reference
    from loopgraph.reference.looped import reference_logits
    from loopgraph.runtime.tokenizer import TextTokenizer
    from tests.test_generate_real import PROMPTS as TEXTS
    from tests.test_generate_real import STEPS as REAL_STEPS
    spec = LoopSpec(10, 20, iters=3, reg="uniform")
    folder = rewrite(past_export / "model.onnx", spec, f"{tmp_path}/smol/").path.parent
    tok = TextTokenizer.from_folder(past_export)
    prompts = [tok.encode(p) for p in TEXTS]
    torch.set_grad_enabled(False)
    model = load_reference(past_export / "hf")
    ids, mask = (torch.as_tensor(a) for a in left_pad(prompts, tok.pad_id))
    want = []
    for _ in range(REAL_STEPS):
        want.append(reference_logits(model, spec.resolve(30), ids, mask)[:, -1].argmax(-1))
        ids = torch.cat([ids, want[-1][:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    want_tokens = torch.stack(want, 1).tolist()
    tokens, _ = optimum_greedy(folder, prompts, REAL_STEPS)
    assert tokens == want_tokens, f"Optimum generate() vs the PyTorch recompute:\n{tokens}\n{want_tokens}"
    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    cut = [next((t[:i + 1] for i, x in enumerate(t) if x in eos), t) for t in want_tokens]
    assert genai_greedy(folder, prompts, REAL_STEPS) == cut, "onnxruntime-genai vs the PyTorch recompute"

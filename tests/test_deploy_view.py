"""``loopgraph view``: Netron servers on loopback, and the block-structure PNG."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from loopgraph import LoopSpec, rewrite
from loopgraph.deploy.view import block_graph, netron_servers, render_png, structure_of
from loopgraph.errors import LoopgraphError
from loopgraph.onnxio import load_model
from tests.conftest import run_cli

IN_CI = bool(os.environ.get("CI"))  # CI installs the view extra and graphviz: nothing may be skipped there


def need(module: str) -> None:
    if not IN_CI:
        pytest.importorskip(module)


def need_dot() -> None:
    need("graphviz")
    if not IN_CI and shutil.which("dot") is None:
        pytest.skip("graphviz's dot program is not installed (apt-get install graphviz)")


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("view")
    original = tiny("llama") / "model.onnx"
    looped = folder / "looped.onnx"
    rewrite(original, LoopSpec(1, 3, iters=3, reg="anchor", alpha=0.5), looped)
    return original, looped


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return r.read()


def test_netron_serves_each_model_on_its_own_port_and_stops(files):
    need("netron")
    original, looped = files
    with netron_servers([original, looped]) as urls:
        assert len(set(urls)) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
        page = fetch(urls[1])
        assert b"<html" in page.lower() and b'content="/data/looped.onnx"' in page
        assert fetch(urls[1] + "/data/looped.onnx") == looped.read_bytes()
        assert fetch(urls[0] + "/data/model.onnx") == original.read_bytes()
    with pytest.raises(urllib.error.URLError):
        fetch(urls[0])


def test_netron_port_in_use_is_a_one_line_error(files):
    need("netron")
    with netron_servers([files[0]]) as urls:
        port = int(urls[0].rsplit(":", 1)[1])
        with pytest.raises(LoopgraphError, match=f"cannot serve .* on 127.0.0.1:{port}"):
            with netron_servers([files[1]], port=port):
                pass


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "parent-ignores-sigint"])
def test_view_cli_prints_url_and_stops_on_ctrl_c(files, inherited):
    need("netron")
    # a child inherits an ignored SIGINT (from a script's background job, or a test runner whose libraries set it)
    proc = subprocess.Popen([sys.executable, "-m", "loopgraph.cli", "view", str(files[1]), "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, inherited))
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"{files[1]}: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
        assert b"<html" in fetch(line.split(": ", 1)[1].strip()).lower()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie (exited, not yet reaped by init) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_view_cli_stops_its_servers_on_sigterm_and_sighup(files, sig):
    """Regression: kill PID left the Netron server running (orphaned, still listening)."""
    need("netron")
    proc = subprocess.Popen([sys.executable, "-m", "loopgraph.cli", "view", str(files[1]), "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"{files[1]}: http://127.0.0.1:"), line
        url = line.split(": ", 1)[1].strip()
        servers = _children(proc.pid)
        assert servers, "no netron child process found"
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert all(_gone(pid) for pid in servers), f"netron servers {servers} outlived loopgraph view after {sig.name}"
        with pytest.raises(urllib.error.URLError):
            fetch(url)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_structure_of_original_and_rewrite(files):
    original, looped = (load_model(p) for p in files)
    s = structure_of(original, "model.onnx")
    assert s.num_blocks == 4 and s.loop is None and len(s.block_nodes) == 4
    s = structure_of(looped, "looped.onnx")
    assert (s.num_blocks, s.loop.start, s.loop.end, s.loop.iters, s.loop.reg, s.loop.param) == (4, 1, 3, 3, "anchor", "α = 0.5")
    assert s.loop.iters_input is None and s.loop.kv is None


def test_block_graph_draws_the_loop_frame(files):
    need("graphviz")
    src = block_graph([structure_of(load_model(p), p.name) for p in files]).source
    assert "subgraph cluster_m1_loop" in src and "Loop: N = 3, anchor, α = 0.5" in src
    assert "x_t = α·y_t + (1−α)·r" in src
    assert src.count("label=\"block ") == 8  # one box per block, in each model
    assert "cluster_m0_loop" not in src


def test_png_is_written_and_non_trivial(files, tmp_path):
    need_dot()
    out = tmp_path / "structure.png"
    result = run_cli("view", *files, "--png", out)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert len(data) > 10_000 and width > 300 and height > 300, (len(data), width, height)


def test_missing_dot_is_a_one_line_error(files, tmp_path, monkeypatch):
    need("graphviz")
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot on PATH
    with pytest.raises(LoopgraphError, match="graphviz's dot program is not installed; install it"):
        render_png([("looped", load_model(files[1]))], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_png_refuses_a_loop_without_spec(files):
    model = load_model(files[1])
    del model.metadata_props[:]
    with pytest.raises(LoopgraphError, match="has a Loop but no readable loopgraph.spec metadata"):
        structure_of(model, "bare")

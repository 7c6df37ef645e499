"""``loopgraph view``: Netron for browsing graphs, and a compact PNG of the block structure.

- :func:`netron_servers` serves each model with Netron (the ``netron`` package) on 127.0.0.1,
  one server process and port each, and stops the servers when the ``with`` block ends.
- :func:`render_png` draws what Netron cannot (it has no headless export and no diff): one box
  per decoder block, the Loop as a frame around its range labelled with N and the regularizer,
  and the interpolation node that feeds the next iteration. Handles original exports (blocks
  from :func:`find_blocks`) and loopgraph rewrites (range, N and regularizer from the
  ``loopgraph.spec`` metadata, body size from the Loop); refuses a Loop without that metadata.
  Needs the ``graphviz`` package and graphviz's ``dot`` program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx

from loopgraph.deploy.graphs import loops, spec_of
from loopgraph.errors import LoopgraphError
from loopgraph.metadata import all_graphs, num_blocks
from loopgraph.naming import NAME_PREFIX
from loopgraph.onnxio import atomic_path, resolve_model_path
from loopgraph.passes.blocks import find_blocks, has_kv_cache
from loopgraph.regularizers import ALL

HOST = "127.0.0.1"  # loopback only: a model is not published on the network

#: x_t for t >= 2, from the regularizers' definitions (graphviz writes a line break as \\n)
REG_FORMULAS = {r.name: r.formula.replace("\n", "\\n") for r in ALL}


# --- Netron ----------------------------------------------------------------------------------------

# One process per model: netron keeps the served file in a class attribute of its request
# handler, so two servers in one process would both serve the last model.
_NETRON = "import sys, netron; sys.argv[0] = 'netron'; netron.main()"


@contextlib.contextmanager
def netron_servers(paths: Sequence[str | os.PathLike], *, port: int = 0, browse: bool = False,
                   timeout: float = 30.0) -> Iterator[list[str]]:
    """Serve each model with Netron on 127.0.0.1 (a server process and a port each) and yield
    their URLs once every page answers. ``port`` 0 picks a free port per model; otherwise the
    models get ``port``, ``port + 1``... The servers stop when the block ends (also on error or
    Ctrl-C)."""
    if importlib.util.find_spec("netron") is None:
        raise LoopgraphError("the netron package is not installed; pip install 'loopgraph[view]'")
    files = [resolve_model_path(p) for p in paths]
    procs: list[subprocess.Popen] = []
    urls: list[str] = []
    try:
        for i, f in enumerate(files):
            want = port + i if port else _free_port()
            _check_port(want, f)
            proc = subprocess.Popen([sys.executable, "-c", _NETRON, "--host", HOST, "--port", str(want), "--verbosity", "quiet", str(f)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(proc)
            urls.append(f"http://{HOST}:{want}")
            _wait_until_serving(proc, urls[-1], f, timeout)
        if browse:
            for url in urls:
                webbrowser.open(url)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _check_port(port: int, model: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise LoopgraphError(f"cannot serve {model} on {HOST}:{port} ({e.strerror or e}); "
                                 "choose another --port, or omit it to get a free one") from None


def _wait_until_serving(proc: subprocess.Popen, url: str, model: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
            raise LoopgraphError(f"netron stopped while starting to serve {model} on {url} "
                                 f"({said[-1] if said else f'exit code {proc.returncode}'}); try another --port")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    raise LoopgraphError(f"netron did not answer on {url} within {timeout:.0f} s; retry, or run netron {model} yourself")


# --- the block-structure picture -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoopPart:
    start: int
    end: int
    iters: int
    iters_input: str | None  # the graph input that overrides N (--dynamic), if any
    reg: str
    param: str | None  # "α = 0.5", "K = 2" or None
    body_nodes: int
    kv: str | None  # the KV-cache mode of a with-past export
    noise: bool
    trace: bool


@dataclasses.dataclass(frozen=True)
class Structure:
    """What the picture shows of one model."""
    label: str
    num_blocks: int
    family: str
    block_nodes: tuple[int, ...] | None  # nodes per block (original exports only)
    loop: LoopPart | None


def structure_of(model: onnx.ModelProto, label: str) -> Structure:
    """The block structure of an original export or of a loopgraph rewrite (see module doc)."""
    spec = spec_of(model)
    ours = [lp for lp in loops(model) if lp.node.name == NAME_PREFIX + "loop"]
    if spec is None and not loops(model):
        try:
            bm = find_blocks(model)
        except LoopgraphError as e:
            raise LoopgraphError(f"{label}: {e}") from None
        return Structure(label, len(bm), bm.family, tuple(b.num_nodes for b in bm.blocks), None)
    if spec is None or not ours or spec.start is None or spec.end is None:
        raise LoopgraphError(f"{label} has a Loop but no readable loopgraph.spec metadata, so its block range is unknown; "
                             "--png draws loopgraph exports and rewrites (use Netron for other graphs)")
    lp = ours[0]
    recorded = num_blocks(model)
    blocks = recorded if recorded is not None else spec.end
    kv = spec.kv if has_kv_cache(model) else None
    param = f"α = {spec.alpha:g}" if spec.alpha is not None else f"K = {spec.k:g}" if spec.k is not None else None
    part = LoopPart(spec.start, spec.end, spec.iters, None if lp.trip_value is not None else lp.trip_count, spec.reg,
                    param, sum(len(g.node) for g in all_graphs(lp.body)), kv, spec.noise_seed is not None, spec.trace)
    return Structure(label, blocks, "looped by loopgraph", None, part)


def block_graph(structures: Sequence[Structure]):
    """A ``graphviz.Digraph`` of the models side by side (one cluster each)."""
    graphviz = _graphviz()
    g = graphviz.Digraph("loopgraph", graph_attr={"rankdir": "TB", "nodesep": "0.25", "ranksep": "0.22", "fontname": "DejaVu Sans",
                                                  "fontsize": "11"},
                         node_attr={"shape": "box", "style": "rounded,filled", "fillcolor": "#eef3fb", "fontname": "DejaVu Sans",
                                    "fontsize": "10", "height": "0.3", "width": "1.4"},
                         edge_attr={"arrowsize": "0.6", "fontname": "DejaVu Sans", "fontsize": "9"})
    for i, s in enumerate(structures):
        with g.subgraph(name=f"cluster_model{i}") as m:
            m.attr(label=f"{s.label}\n{s.num_blocks} blocks, {s.family}", style="rounded", color="#999999")
            _draw_model(m, s, f"m{i}")
    return g


def _draw_model(m, s: Structure, p: str) -> None:
    m.node(f"{p}_in", "embeddings", shape="plain", style="")
    m.node(f"{p}_out", "final norm · LM head → logits", shape="plain", style="")
    prev, edge_label = f"{p}_in", ""
    lp = s.loop
    for i in range(s.num_blocks):
        node = f"{p}_b{i}"
        label = f"block {i}" + (f"  ({s.block_nodes[i]} nodes)" if s.block_nodes else "")
        if lp is not None and i == lp.start:
            prev, edge_label = _draw_loop(m, lp, p, prev), " x_N"
            continue
        if lp is not None and lp.start < i < lp.end:
            continue
        m.node(node, label)
        m.edge(prev, node, label=edge_label)
        prev, edge_label = node, ""
    m.edge(prev, f"{p}_out", label=edge_label)


def _draw_loop(m, lp: LoopPart, p: str, prev: str) -> str:
    """The frame around blocks [start, end) and the interpolation; returns the node leaving it."""
    n = f"N = {lp.iters}" + (f" (default; input {lp.iters_input})" if lp.iters_input else "")
    reg = lp.reg + (f", {lp.param}" if lp.param else "")
    extras = [x for x, on in ((f"KV cache {lp.kv}", lp.kv), ("trace outputs", lp.trace)) if on]
    with m.subgraph(name=f"cluster_{p}_loop") as c:
        c.attr(label=f"Loop: {n}, {reg}\n{lp.body_nodes} body nodes" + "".join(f", {x}" for x in extras),
               style="rounded,bold", color="#1f5fbf", fontcolor="#1f5fbf", labeljust="l")
        first = f"{p}_b{lp.start}"
        last = f"{p}_b{lp.end - 1}"
        for i in range(lp.start, lp.end):
            c.node(f"{p}_b{i}", f"block {i}", fillcolor="#d6e4fa")
            if i > lp.start:
                c.edge(f"{p}_b{i - 1}", f"{p}_b{i}")
        interp = f"{p}_interp"
        c.node(interp, "interpolation\n" + REG_FORMULAS.get(lp.reg, lp.reg), shape="box", style="filled", fillcolor="#fff4d6",
               fontsize="9", width="0")
        c.edge(last, interp, label=" y_t")
    m.edge(prev, first, label=" x_0")
    m.edge(interp, first, label=" x_t, t < N", style="dashed", color="#1f5fbf", constraint="false")
    if not lp.noise:
        return interp
    noise = f"{p}_noise"
    m.node(noise, "noise control\nr + e·|x_N − r| / |e|", fillcolor="#f3e8f8", fontsize="9", width="0")
    m.edge(interp, noise)
    return noise


def render_png(models: Sequence[tuple[str, onnx.ModelProto]], out: str | os.PathLike) -> Path:
    """Write the block-structure picture of ``models`` ((label, model) pairs) to ``out`` atomically."""
    graphviz = _graphviz()
    g = block_graph([structure_of(model, label) for label, model in models])
    try:
        png = g.pipe(format="png")
    except graphviz.ExecutableNotFound:
        raise LoopgraphError("graphviz's dot program is not installed; install it (apt-get install graphviz, "
                             "brew install graphviz) and retry") from None
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_bytes(png)
    return out


def _graphviz():
    try:
        import graphviz
    except ImportError:
        raise LoopgraphError("the graphviz Python package is not installed; pip install 'loopgraph[view]'") from None
    return graphviz

"""loopgraph sweep on the tiny Llama fixture: one CSV row per cell, N = 1 equals the baseline exactly,
resume recomputes nothing, a wider sweep scores only the new cells, heatmaps, Ray = local pool, CLI."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.eval.cache import ScoreCache, item_key
from loopgraph.eval.runner import open_model, select
from loopgraph.eval.tasks import load_items
from loopgraph.experiments import sweep as sweep_mod
from loopgraph.experiments.grid import Cell, Reg, group_units, make_cells, parse_iters, parse_ranges, parse_regs
from loopgraph.experiments.plots import HEATMAP_DPI, HEATMAP_SIZE
from loopgraph.experiments.sweep import cell_key, holm, sweep, sweep_task, write_outputs
from tests.conftest import DATA_DIR, run_cli

LIMIT = 12
RANGES = "0:2,1:3,2:4"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def model(tiny) -> Path:
    return tiny("llama") / "model.onnx"


def cached_lls(model, cache, cell) -> list[list[float]]:
    """Per-item option log-likelihoods of ``cell`` (None: the baseline) as stored in the cache, in item order."""
    base = open_model(model)
    items = select(load_items(sweep_task("winogrande", DATA_DIR)[0], DATA_DIR), LIMIT, 1234)
    keys = [item_key(cell_key(base.key, cell), it.requests) for it in items]
    store = ScoreCache(cache)
    try:
        got = store.get(keys)
    finally:
        store.close()
    assert len(got) == len(items), f"cell {cell} is missing items in the cache"
    return [[s.ll for s in got[k]] for k in keys]


def run(model, cache, **kw):
    kw = {"ranges": RANGES, "iters": "1,2", "regs": "uniform,naive", "limit": LIMIT, "data_dir": DATA_DIR, "cache_dir": cache,
          "threads": 1, "progress": False, "say": lambda m: None, **kw}
    return sweep(model, "winogrande", **kw)


# --- the grid ---------------------------------------------------------------------------------

def test_ranges_grammar():
    assert parse_ranges("all", 4) == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    assert len(parse_ranges("all", 30)) == 465
    assert parse_ranges("width=6", 30, stride=6) == [(0, 6), (6, 12), (12, 18), (18, 24), (24, 30)]
    assert parse_ranges("all", 30, stride=10) == [(0, 10), (0, 20), (0, 30), (10, 20), (10, 30), (20, 30)]
    assert parse_ranges("1:3, -2:", 4) == [(1, 3), (2, 4)]
    for bad, match in (("width=9", "width=1..4"), ("1:3,1:3", "twice"), ("5:6", "blocks 0..3"), ("", "empty"), ("x", "S:E")):
        with pytest.raises(LoopgraphError, match=match):
            parse_ranges(bad, 4)
    with pytest.raises(LoopgraphError, match="--stride applies"):
        parse_ranges("1:3", 4, stride=2)
    with pytest.raises(LoopgraphError, match="at least 1"):
        parse_ranges("all", 4, stride=0)


def test_iters_regs_and_units():
    assert parse_iters("3,1,2") == [1, 2, 3]
    for bad, match in (("0", r"--iters 0 is out of range; use 1\.\.64"), ("2,2", "lists a value twice"),
                       ("a", "not a comma-separated list of integers"), ("", "--iters is empty"),
                       ("65", r"--iters 65 is out of range; use 1\.\.64")):
        with pytest.raises(LoopgraphError, match=match):
            parse_iters(bad)
    regs = parse_regs("uniform,anchor:0.3,anchor,damped:4")
    assert regs == [Reg("uniform"), Reg("anchor", 0.3), Reg("anchor", 0.5), Reg("damped", 4.0)]
    assert [r.label for r in regs] == ["uniform", "anchor:0.3", "anchor:0.5", "damped:4"]
    for bad, match in (("naive:0.5", "takes no weight"), ("anchor:2", "outside"), ("foo", "not a regularizer"), ("anchor:x", "not a number"),
                       ("uniform,uniform", "twice")):
        with pytest.raises(LoopgraphError, match=match):
            parse_regs(bad)
    cells = make_cells([(0, 2), (1, 3)], [2, 3], regs)
    units = group_units(cells)
    # one rewrite per (range, regularizer name): both anchor weights share it
    assert len(cells) == 16 and len(units) == 6
    anchor = next(u for u in units if u.reg == "anchor" and u.start == 0)
    assert len(anchor.cells) == 4 and anchor.spec().dynamic and anchor.spec().iters == 3


def test_holm():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]) == []


def test_dev_split_where_the_data_has_one():
    task, split = sweep_task("arc_easy", DATA_DIR)
    assert task.files == ("arc_easy/arc_easy_dev.jsonl",) and split == "dev"
    assert sweep_task("arc_easy", DATA_DIR, "reported")[0].files == ("arc_easy/arc_easy_test.jsonl",)
    assert sweep_task("winogrande", DATA_DIR)[0].files == ("winogrande/winogrande_xl_dev.jsonl",)  # no separate tuning file
    with pytest.raises(LoopgraphError, match="no per-item accuracy"):
        sweep_task("wikitext", DATA_DIR)


# --- the sweep on a tiny model ----------------------------------------------------------------

def test_sweep_csv_n1_exact_resume_and_heatmaps(model, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = run(model, cache)
    cells = make_cells(parse_ranges(RANGES, 4), [1, 2], parse_regs("uniform,naive"))
    assert [r.cell for r in first.rows] == cells
    assert (first.cells, first.units, first.cells_computed, first.cells_cached, first.rewrites) == (12, 6, 12, 0, 6)
    paths = write_outputs(first, tmp_path / "out", say=lambda m: None)
    rows = read_csv(paths["csv"])
    assert len(rows) == len(cells) and len({(r["start"], r["end"], r["iters"], r["reg"]) for r in rows}) == len(cells)
    assert {r["n"] for r in rows} == {str(LIMIT)}

    # N = 1 cells equal the baseline exactly: every item's log-likelihoods, not just the accuracy
    baseline_lls = cached_lls(model, cache, None)
    for c in cells:
        if c.iters == 1:
            assert cached_lls(model, cache, c) == baseline_lls, f"N = 1 cell {c} differs from the baseline"
        else:
            assert cached_lls(model, cache, c) != baseline_lls, f"cell {c} did not change any log-likelihood: looping had no effect"
    for r in rows:
        if r["iters"] == "1":
            assert (r["value"], r["delta"], r["gained"], r["lost"]) == (r["baseline"], "0.0", "0", "0"), r

    # heatmaps: one per (N, regularizer), of the fixed size
    maps = sorted(p for k, p in paths.items() if k.startswith("heatmap"))
    assert [p.name for p in maps] == ["heatmap_N1_naive.png", "heatmap_N1_uniform.png", "heatmap_N2_naive.png", "heatmap_N2_uniform.png"]
    expected = (round(HEATMAP_SIZE[0] * HEATMAP_DPI), round(HEATMAP_SIZE[1] * HEATMAP_DPI))
    for p in maps:
        assert png_size(p) == expected, f"{p.name}: {png_size(p)} != {expected}"
        assert p.stat().st_size > 10_000, f"{p.name} looks empty"

    # resumed: nothing is recomputed (no job runs at all), and the CSV is the same
    def no_job(job):
        raise AssertionError(f"a resumed sweep ran a job: {job.unit}")
    monkeypatch.setattr(sweep_mod, "run_job", no_job)
    again = run(model, cache)
    assert (again.cells_computed, again.cells_cached, again.rewrites, again.tokens) == (0, 12, 0, 0)
    paths2 = write_outputs(again, tmp_path / "out2", say=lambda m: None)
    assert paths2["csv"].read_text() == paths["csv"].read_text()
    monkeypatch.undo()

    # wider (one more N, one more range): only the new cells are scored, old units are not rewritten for old cells
    wider = run(model, cache, iters="1,2,3", ranges=RANGES + ",0:4")
    assert wider.cells == 24 and wider.cells_cached == 12 and wider.cells_computed == 12
    assert wider.rewrites == 8  # 6 old units (for N = 3 only) + 2 new ones
    assert {(r.cell, r.value) for r in wider.rows} >= {(r.cell, r.value) for r in first.rows}


def test_an_interrupted_cell_scores_only_its_missing_items(model, tmp_path):
    cache = tmp_path / "cache"
    full = run(model, cache, ranges="1:3", iters="2", regs="uniform")
    # forget 5 items of the looped cell, as if the sweep had stopped in the middle of it
    base = open_model(model)
    items = select(load_items(sweep_task("winogrande", DATA_DIR)[0], DATA_DIR), LIMIT, 1234)
    cell = full.rows[0].cell
    lost = [item_key(cell_key(base.key, cell), it.requests) for it in items[:5]]
    with sqlite3.connect(cache / "scores.sqlite") as db:
        db.executemany("DELETE FROM scores WHERE key = ?", [(k,) for k in lost])
    resumed = run(model, cache, ranges="1:3", iters="2", regs="uniform")
    assert resumed.cells_computed == 1 and resumed.rewrites == 1
    assert 0 < resumed.tokens < full.tokens / 2, (resumed.tokens, full.tokens)
    assert [(r.value, r.p_mcnemar) for r in resumed.rows] == [(r.value, r.p_mcnemar) for r in full.rows]


def test_weights_share_one_rewrite_and_are_fed(model, tmp_path):
    """anchor:0.3 and anchor:0.9 run on one rewrite whose default alpha is 0.3; the 0.9 cell, fed
    through loopgraph/alpha, equals a sweep whose rewrite has 0.9 as its default."""
    both = run(model, tmp_path / "a", ranges="1:3", iters="2", regs="anchor:0.9,anchor:0.3")
    assert both.rewrites == 1 and both.cells_computed == 2
    alone = run(model, tmp_path / "b", ranges="1:3", iters="2", regs="anchor:0.9")
    high = alone.rows[0].cell
    low = next(r.cell for r in both.rows if r.cell.reg.weight == 0.3)
    assert cached_lls(model, tmp_path / "a", high) == cached_lls(model, tmp_path / "b", high)
    assert cached_lls(model, tmp_path / "a", low) != cached_lls(model, tmp_path / "a", high), "alpha was not fed"


def test_local_pool_and_ray_give_the_same_csv(model, tmp_path):
    ray = pytest.importorskip("ray")
    pooled = run(model, None, executor="local", workers=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run(model, None, executor="ray")
    finally:
        ray.shutdown()
    assert pooled.cells_computed == on_ray.cells_computed == 12
    a = write_outputs(pooled, tmp_path / "pool", say=lambda m: None)["csv"].read_text()
    b = write_outputs(on_ray, tmp_path / "ray", say=lambda m: None)["csv"].read_text()
    assert a == b


def test_refusals(model, tmp_path):
    for kw, match in (({"metric": "acc_norm"}, "not a per-item accuracy"), ({"executor": "dask"}, "choose local or ray"),
                      ({"workers": 0}, "at least 1"), ({"significance": 1.5}, "between 0 and 1")):
        with pytest.raises(LoopgraphError, match=match):
            run(model, tmp_path / "c", **kw)
    from loopgraph.rewrite import rewrite
    from loopgraph.spec import LoopSpec
    looped = tmp_path / "m" / "looped.onnx"
    looped.parent.mkdir()
    for f in model.parent.iterdir():
        if f.is_file():
            (looped.parent / f.name).write_bytes(f.read_bytes())
    rewrite(looped.parent / "model.onnx", LoopSpec(1, 3, iters=2), looped)
    with pytest.raises(LoopgraphError, match="already looped"):
        run(looped, tmp_path / "c")


# --- the command line -------------------------------------------------------------------------

def test_cli_sweep_dry_run_and_errors(model, tmp_path):
    out = tmp_path / "out"
    common = [model, "--task", "winogrande", "--data-dir", DATA_DIR, "--limit", "6", "--ranges", "width=2", "--stride", "2",
              "--iters", "2", "--reg", "uniform", "--threads", "1", "--cache-dir", tmp_path / "cache", "--no-progress"]
    dry = run_cli("sweep", *common, "--dry-run", "-o", out)
    assert dry.returncode == 0, dry.stderr
    assert "2 cells (2 rewrites" in dry.stdout and "estimated time:" in dry.stdout, dry.stdout
    assert not out.exists()

    done = run_cli("sweep", *common, "-o", out)
    assert done.returncode == 0, done.stderr
    assert len(read_csv(out / "sweep.csv")) == 2 and (out / "heatmap_N2_uniform.png").is_file()
    assert "baseline" in done.stdout

    again = run_cli("sweep", *common, "-o", out)  # the results are there: replaced only with --force
    assert again.returncode == 2 and "already holds" in again.stderr and "--force" in again.stderr, again.stderr

    bad = run_cli("sweep", *common[:-1], "--ranges", "width=9", "-o", tmp_path / "out2")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "width=1..4" in bad.stderr


def test_cells_are_sortable_values():
    a, b = Cell(0, 2, 2, Reg("uniform")), Cell(0, 2, 2, Reg("uniform"))
    assert a == b and hash(a) == hash(b) and sorted([Cell(1, 2, 1, Reg("naive")), a])[0] == a


def test_one_worker_reads_the_model_file_once(model, tmp_path, monkeypatch):
    """The driver and the in-process jobs share one load of the model (graph, metadata and weights):
    no second onnx.load for the block count, the baseline session or the rewrites."""
    import onnx

    from loopgraph.experiments import sweep as sweep_mod
    sweep_mod._original.cache_clear()
    loads = []
    real_load = onnx.load_model

    def counting_load(f, *args, **kwargs):
        loads.append(str(f))
        return real_load(f, *args, **kwargs)
    monkeypatch.setattr(onnx, "load_model", counting_load)
    monkeypatch.setattr(onnx, "load", counting_load)
    result = run(model, tmp_path / "cache", ranges="1:3", iters="2", regs="uniform", limit=4)
    assert result.rewrites == 1 and result.cells_computed == 1 and len(result.rows) == 1
    assert [Path(f).resolve() for f in loads] == [model.resolve()], loads


def _pids(folder: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in folder.glob("pid-*")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_failed_job_stops_the_pool_at_once(tmp_path):
    """The other worker's job in hand (30 s) is terminated, not waited for: no worker outlives execute()."""
    from tests.pool_jobs import sleep_job
    with pytest.raises(ValueError, match="this job fails"):
        sweep_mod.execute([(str(tmp_path), "sleep"), (str(tmp_path), "fail")], lambda job, result: None,
                          workers=2, fn=sleep_job)
    pids = _pids(tmp_path)
    assert pids, "the sleeping job never started"
    assert not list(tmp_path.glob("finished-*")), "execute() waited for a job in hand after another job failed"
    assert not [p for p in pids if _alive(p)], f"workers {pids} outlived execute()"


def test_sigterm_to_the_driver_stops_its_workers(tmp_path):
    """kill PID of a running sweep/tune: the spawn workers die with the driver instead of running on, orphaned."""
    script = ("import sys; from loopgraph.cli import sigterm_interrupts; from loopgraph.experiments.sweep import execute; "
              "from tests.pool_jobs import sleep_job\nwith sigterm_interrupts(): "
              "execute([(sys.argv[1], 'sleep'), (sys.argv[1], 'sleep')], lambda job, result: None, workers=2, fn=sleep_job)")
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        driver = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=Path(__file__).parents[1], stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while len(_pids(tmp_path)) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = _pids(tmp_path)
        assert len(pids) == 2, f"the two jobs did not start (driver exit code {driver.poll()}): {log.read_text()[-2000:]}"
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=25)
    finally:
        driver.kill()
    alive = [p for p in pids if _alive(p)]
    assert not alive, f"workers {alive} outlived the driver stopped by SIGTERM"
    assert not list(tmp_path.glob("finished-*"))
    assert "KeyboardInterrupt" in log.read_text(), "SIGTERM did not unwind the driver like Ctrl-C"

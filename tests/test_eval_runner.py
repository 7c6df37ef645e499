"""The ONNX evaluation path on the tiny Llama fixture: end to end, cache and resume, noise control,
and agreement with the independent PyTorch scorer."""

import json
import math
import shutil

import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.eval.report import comparisons, format_text, to_json, write_items
from loopgraph.eval.runner import SAMPLES_DIR, OnnxScorer, evaluate, open_model, select
from loopgraph.eval.tasks import TASKS, load_items
from loopgraph.exportdir import reference_dir
from loopgraph.rewrite import rewrite
from loopgraph.runtime.logits import LogitsSession
from loopgraph.spec import LoopSpec
from tests.conftest import run_cli

TASK_LIST = [TASKS["arc_easy"], TASKS["winogrande"]]


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """A copy of the tiny Llama export (with its tokenizer) plus a looped rewrite beside it."""
    folder = tmp_path_factory.mktemp("eval-models") / "llama"
    shutil.copytree(tiny("llama"), folder)
    rewrite(folder / "model.onnx", LoopSpec(1, 3, iters=3, reg="uniform"), folder / "looped.onnx")
    return folder / "model.onnx", folder / "looped.onnx"


def run(models, tmp_path, tasks=TASK_LIST, **kw):
    kw = {"data_dir": SAMPLES_DIR, "limit": 5, "cache_dir": tmp_path / "cache", "threads": 1, "progress": False,
          "say": lambda m: None, **kw}
    return evaluate(models, tasks, **kw)


def test_end_to_end_then_everything_from_the_cache(models, tmp_path):
    first = run(models, tmp_path)
    assert [m.label for m in first.models] == ["model", "loop1-3x3-uniform"]
    assert first.models[1].spec.iters == 3 and first.models[1].source == models[0].resolve()
    for task in TASK_LIST:
        for r in first.results[task.name].values():
            assert len(r.per_item) == 5 and r.from_cache == 0 and r.tokens > 0
            acc, se = r.metrics["acc"], r.metrics["acc_stderr"]
            assert acc == sum(it["acc"] for it in r.per_item) / 5  # the mean of the per-item 0/1 scores
            # the binomial stderr with the n - 1 sample std: sqrt(acc (1 - acc) / (n - 1)), zero only when all items agree
            assert se == pytest.approx(math.sqrt(acc * (1 - acc) / 4), rel=1e-12, abs=1e-15), (task.name, acc, se)
    again = run(models, tmp_path)
    for task in TASK_LIST:
        for label, r in again.results[task.name].items():
            assert r.from_cache == 5 and r.tokens == 0
            assert r.scores == first.results[task.name][label].scores  # bit-identical floats from the cache
    # the looped model really differs from the base on these items
    base, looped = (first.results["arc_easy"][m.label].scores for m in first.models)
    assert base != looped


def test_an_interrupted_run_resumes_from_the_finished_items(models, tmp_path, monkeypatch):
    real = LogitsSession.logits_at
    calls = {"n": 0}

    def dies_after_ten_batches(self, ids, mask, at):
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt
        return real(self, ids, mask, at)

    monkeypatch.setattr(LogitsSession, "logits_at", dies_after_ten_batches)
    kw = {"limit": 40, "max_batch_tokens": 64}
    with pytest.raises(KeyboardInterrupt):
        run(models[:1], tmp_path, **kw)
    monkeypatch.setattr(LogitsSession, "logits_at", real)
    resumed = run(models[:1], tmp_path, **kw).results["arc_easy"]["model"]
    assert 0 < resumed.from_cache < 40
    fresh = run(models[:1], tmp_path, cache_dir=None, **kw).results["arc_easy"]["model"]
    assert fresh.from_cache == 0
    assert [[round(s.ll, 4) for s in x] for x in resumed.scores] == [[round(s.ll, 4) for s in x] for x in fresh.scores]


def test_cache_key_follows_the_model_and_the_text(models, tmp_path):
    run(models[:1], tmp_path, limit=3)
    other_items = run(models[:1], tmp_path, limit=3, seed=99).results["arc_easy"]["model"]
    assert other_items.from_cache < 3  # different items are scored, not looked up
    looped = run(models[1:], tmp_path, limit=3).results["arc_easy"]["loop1-3x3-uniform"]
    assert looped.from_cache == 0  # another model file never hits the base's entries


def test_noise_control_builds_and_compares_a_variant(models, tmp_path):
    report = run(models, tmp_path, noise_control=True, limit=4, seed=7)
    noise = report.models[2]
    assert noise.label == "loop1-3x3-uniform-noise7" and noise.noise_of == "loop1-3x3-uniform"
    assert noise.path == models[1].with_name("looped.noise7.onnx") and noise.spec.noise_seed == 7
    assert noise.spec.start == 1 and noise.spec.end == 3 and noise.spec.iters == 3
    comps = comparisons(report, seed=7)
    assert {(c.base, c.other) for c in comps} == {("model", "loop1-3x3-uniform"), ("model", "loop1-3x3-uniform-noise7"),
                                                   ("loop1-3x3-uniform-noise7", "loop1-3x3-uniform")}
    scores = [report.results["arc_easy"][m.label].scores for m in report.models]
    assert scores[2] != scores[1] and scores[2] != scores[0]
    mtime = noise.path.stat().st_mtime_ns
    run(models, tmp_path, noise_control=True, limit=4, seed=7)
    assert noise.path.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_noise_control_needs_a_looped_model(models, tmp_path):
    with pytest.raises(LoopgraphError, match="needs at least one looped model"):
        run(models[:1], tmp_path, noise_control=True)


def test_reports(models, tmp_path):
    report = run(models, tmp_path, limit=4)
    comps = comparisons(report)
    text = format_text(report, comps)
    assert "== arc_easy (test; 4 of 200 items (random subset, seed 1234))" in text
    assert "loop1-3x3-uniform vs model acc_norm:" in text and "the shipped samples" in text
    data = json.loads(json.dumps(to_json(report, comps)))  # JSON-serialisable, no NaN
    arc = data["tasks"]["arc_easy"]
    assert set(arc["metrics"]["model"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert {c["metric"] for c in arc["comparisons"]} == {"acc", "acc_norm"}
    assert data["models"][1]["spec"]["iters"] == 3 and data["config"]["baseline"] == "model"
    assert "onnxruntime" in data["versions"] and data["timing"]["total_seconds"] > 0
    n = write_items(report, tmp_path / "items.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert n == len(lines) == 2 * 2 * 4
    assert {"task", "model", "index", "gold", "ll", "greedy", "acc"} <= set(lines[0])


def test_reports_of_loglikelihood_and_perplexity_tasks(models, tmp_path):
    report = run(models, tmp_path, tasks=[TASKS["lambada_openai"], TASKS["wikitext"]], limit=2, max_length=64)
    comps = comparisons(report)
    assert {(c.task, c.metric) for c in comps} == {("lambada_openai", "acc")}  # perplexities get no paired test
    data = to_json(report, comps)
    assert set(data["tasks"]["lambada_openai"]["metrics"]["model"]) == {"acc", "acc_stderr", "perplexity"}
    wiki = data["tasks"]["wikitext"]["metrics"]["model"]
    assert set(wiki) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert wiki["byte_perplexity"] == pytest.approx(2 ** wiki["bits_per_byte"], rel=1e-12)
    assert data["models"][0]["max_length"] == 64 and data["models"][0]["max_length_from"] == "--max-length"
    text = format_text(report, comps)
    assert "== wikitext (test; 2 of 5 items" in text and "bits_per_byte" in text


def test_onnx_and_pytorch_scorers_agree_on_the_tiny_model(models, tiny):
    """Every task type, including left truncation (BoolQ passages exceed the fixture's 256 positions)
    and rolling windows (WikiText)."""
    from loopgraph.reference.hf_scorer import HFScorer
    onnx_scorer = OnnxScorer(open_model(models[0]), threads=1, max_batch_tokens=512)
    hf = HFScorer(reference_dir(tiny("llama")), threads=1, batch_items=2)
    assert hf.max_length == onnx_scorer.model.max_length == 256 and hf.prefix_id == onnx_scorer.tokenizer.prefix_id
    for name, n in [("arc_easy", 4), ("winogrande", 4), ("boolq", 3), ("lambada_openai", 3), ("wikitext", 1)]:
        task = TASKS[name]
        items = select(load_items(task, SAMPLES_DIR), n, 0)
        assert [onnx_scorer.token_requests(task, it) for it in items] == [hf.token_requests(task, it) for it in items]
        a, b = onnx_scorer.score(task, items), hf.score(task, items)
        for x, y in zip(a, b):
            assert [s.ll for s in x] == pytest.approx([s.ll for s in y], abs=1e-4), name
            assert [s.greedy for s in x] == [s.greedy for s in y], name
    hf.full_logits = True  # lm-eval's way (LM head and log-softmax everywhere): the same numbers
    items = select(load_items(TASKS["arc_easy"], SAMPLES_DIR), 3, 0)
    kept, full = hf.score(TASKS["arc_easy"], items), onnx_scorer.score(TASKS["arc_easy"], items)
    assert [s.ll for x in kept for s in x] == pytest.approx([s.ll for x in full for s in x], abs=1e-4)


# --- the command line -------------------------------------------------------------------------

def test_cli_default_batch_cap_is_the_scorer_default():
    from loopgraph.eval import cli, scoring
    assert cli.DEFAULT_BATCH_TOKENS == scoring.DEFAULT_BATCH_TOKENS


def test_cli_end_to_end(models, tmp_path):
    out, items = tmp_path / "r.json", tmp_path / "items.jsonl"
    r = run_cli("eval", *models, "--tasks", "winogrande", "--limit", "4", "--data-dir", SAMPLES_DIR, "--json", out,
                "--items", items, "--cache-dir", tmp_path / "c", "--threads", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "== winogrande (validation; 4 of 200 items" in r.stdout and "loop1-3x3-uniform vs model acc:" in r.stdout
    data = json.loads(out.read_text())
    assert data["tasks"]["winogrande"]["items"] == 4 and "acc" in data["tasks"]["winogrande"]["metrics"]["model"]
    assert len(items.read_text().splitlines()) == 8


@pytest.mark.parametrize("args, message", [
    (["--tasks", "arc_medium"], "unknown task 'arc_medium'; choose from"),
    (["--tasks", "arc_easy", "--limit", "0"], "--limit 0 evaluates nothing"),
    (["--tasks", "arc_easy", "--data-dir", "/nonexistent/benchmarks"], "data folder /nonexistent/benchmarks does not exist"),
])
def test_cli_bad_input_is_one_line_and_exit_2(models, tmp_path, args, message):
    r = run_cli("eval", models[0], *args, "--no-cache", "--no-progress")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"loopgraph: error: {message}") and r.stderr.count("\n") == 1, r.stderr


def test_cli_malformed_jsonl_names_the_file_and_line(models, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLES_DIR / "winogrande", data / "winogrande")
    path = data / "winogrande/winogrande_xl_dev.jsonl"
    lines = path.read_text().splitlines()
    lines[6] = lines[6][:-5]
    path.write_text("\n".join(lines) + "\n")
    r = run_cli("eval", models[0], "--tasks", "winogrande", "--data-dir", data, "--no-cache")
    assert r.returncode == 2 and r.stderr.startswith(f"loopgraph: error: {path} line 7: not valid JSON"), r.stderr

"""Fuzzing the CLI with damaged models: no traceback, no hang, no changed input, no bad output.

Every run of ``inspect``, ``check``, ``diff`` and ``rewrite`` on a mutant of the tiny Llama export
(:mod:`tests.fuzzing`, fixed seed) must either succeed (a written file then passes
``onnx.checker`` with ``full_check`` and loads in ONNX Runtime, CPU provider, 1 thread) or exit 2
with exactly one ``loopgraph: error:`` line on stderr. The default corpus is
``DEFAULT_MUTANTS`` mutants (all mutator kinds, every command); ``LOOPGRAPH_FUZZ=N`` runs a
corpus of N mutants with another seed in ``test_fuzz_large`` (marked ``fuzz``; skipped without it).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tests import fuzzing

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MUTANTS = 64  # 4 per mutator kind
SEED = 20261202
CASE_TIMEOUT = 60  # seconds per run (the tiny model rewrites in well under a second)


def _cases(folder: Path, original: Path, count: int, seed: int) -> list[dict]:
    model = onnx.load(str(original))
    cases = []
    for name, data in fuzzing.mutants(model, count, seed):
        sub = folder / name
        sub.mkdir()
        path = sub / "model.onnx"
        path.write_bytes(data)
        for src in original.parent.iterdir():  # the tokenizer and config, as in a real export folder
            if src.suffix == ".json":
                shutil.copy(src, sub / src.name)
        inputs = [str(path), str(original)]
        out = sub / "out.onnx"
        for cmd, argv in (("inspect", ["inspect", str(path)]), ("inspect-json", ["inspect", str(path), "--json"]),
                          ("check", ["check", str(path)]), ("diff", ["diff", str(original), str(path)]),
                          ("rewrite", ["rewrite", str(path), "--range", "1:3", "--iters", "2", "-o", str(out)])):
            cases.append({"id": f"{name}/{cmd}", "argv": argv, "inputs": inputs, "timeout": CASE_TIMEOUT,
                          "output": str(out) if cmd == "rewrite" else None})
    return cases


def _run(tmp_path: Path, original: Path, count: int, seed: int) -> list[dict]:
    cases = _cases(tmp_path, original, count, seed)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    results = tmp_path / "results.jsonl"
    try:
        subprocess.run([sys.executable, "-m", "tests.fuzzing", str(tmp_path / "cases.json"), str(results)], cwd=ROOT,
                       timeout=CASE_TIMEOUT * 3 + 2 * len(cases), check=False, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pass  # reported below: the cases without a result
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    assert len(done) == len(cases), f"the driver stopped (hang or crash) at case {cases[len(done)]['id']}"
    return done


def _problems(results: list[dict]) -> list[str]:
    bad = []
    for r in results:
        lines = r["stderr"].strip().splitlines()
        ok_rc = (0, 1) if r["argv"][0] == "check" else (0,)  # check: 1 means "not ready", a finding, not an error
        if r["escaped"]:
            bad.append(f"{r['id']}: escaped: {r['escaped'][-600:]}")
        elif r["changed_inputs"]:
            bad.append(f"{r['id']}: changed its input {r['changed_inputs']}")
        elif r["rc"] == 2:
            if len(lines) != 1 or not lines[0].startswith("loopgraph: error: "):
                bad.append(f"{r['id']}: exit 2 without exactly one error line: {r['stderr'][-600:]!r}")
        elif r["rc"] not in ok_rc:
            bad.append(f"{r['id']}: exit code {r['rc']}: {r['stderr'][-600:]!r}")
        elif r["output_problem"]:
            bad.append(f"{r['id']}: exit 0 but the output is broken: {r['output_problem']}")
    return bad


def _summary(results: list[dict]) -> str:
    counts = collections.Counter(f"{r['argv'][0]}:{'ok' if r['rc'] in (0, 1) else 'error' if r['rc'] == 2 else 'other'}"
                                 for r in results)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _original(tiny, tmp_path: Path) -> Path:
    src = tmp_path / "original"
    shutil.copytree(tiny("llama"), src)
    return src / "model.onnx"


def test_fuzz_default_corpus(tiny, tmp_path):
    results = _run(tmp_path, _original(tiny, tmp_path), DEFAULT_MUTANTS, SEED)
    print(f"fuzz: {len(results)} runs on {DEFAULT_MUTANTS} mutants: {_summary(results)}")
    bad = _problems(results)
    assert not bad, f"{len(bad)} of {len(results)} runs misbehaved:\n" + "\n".join(bad[:20])
    # the corpus is not vacuous: some runs succeed, some are refused, every command is exercised
    assert {r["argv"][0] for r in results} == {"inspect", "check", "diff", "rewrite"}
    assert any(r["rc"] == 0 for r in results if r["argv"][0] == "rewrite"), _summary(results)
    assert any(r["rc"] == 2 for r in results if r["argv"][0] == "rewrite"), _summary(results)


@pytest.mark.fuzz
@pytest.mark.skipif(not os.environ.get("LOOPGRAPH_FUZZ"), reason="set LOOPGRAPH_FUZZ=N to fuzz with N mutants")
def test_fuzz_large(tiny, tmp_path):
    count = int(os.environ["LOOPGRAPH_FUZZ"])
    results = _run(tmp_path, _original(tiny, tmp_path), count, SEED + 1)
    print(f"fuzz: {len(results)} runs on {count} mutants: {_summary(results)}")
    bad = _problems(results)
    assert not bad, f"{len(bad)} of {len(results)} runs misbehaved:\n" + "\n".join(bad[:40])


def test_fuzz_subprocess_entry_point(tiny, tmp_path):
    """A few mutants through the installed console entry point (a real process, real stderr)."""
    original = _original(tiny, tmp_path)
    model = onnx.load(str(original))
    for name, data in list(fuzzing.mutants(model, 16, SEED + 2))[::4]:
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(data)
        before = fuzzing.sha256(path)
        r = subprocess.run([sys.executable, "-m", "loopgraph.cli", "rewrite", str(path), "--range", "1:3", "-o",
                            str(tmp_path / f"{name}.out.onnx")], capture_output=True, text=True, timeout=CASE_TIMEOUT)
        assert fuzzing.sha256(path) == before, name
        assert "Traceback" not in r.stderr, (name, r.stderr)
        if r.returncode == 0:
            assert fuzzing.check_output(tmp_path / f"{name}.out.onnx") is None, name
        else:
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("loopgraph: error: "), (name, r.stderr)

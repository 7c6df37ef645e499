"""loopgraph trace on tiny fixtures: the exposed per-iteration states match the PyTorch reference,
the last one is the Loop output exactly, block boundaries match Hugging Face's hidden states, the
logit lens reproduces the logits; files, figure size, CLI and refusals."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from loopgraph.errors import LoopgraphError
from loopgraph.experiments.graphs import expose_outputs, lens_feeds, logit_lens
from loopgraph.experiments.plots import TRAJECTORY_DPI, TRAJECTORY_SIZE
from loopgraph.experiments.trace import capture, format_table, write_trace
from loopgraph.onnxio import load_model
from loopgraph.passes.blocks import find_blocks
from loopgraph.reference.looped import looped
from loopgraph.rewrite import rewrite
from loopgraph.runtime.session import open_session
from loopgraph.spec import LoopSpec
from tests.conftest import run_cli

ATOL = 1e-5  # absolute, states of the tiny fixtures (|h| ~ 1), ORT CPU EP vs eager PyTorch fp32
PROMPT = "The quick brown fox jumps over the lazy dog"
SPECS = [LoopSpec(1, 3, iters=3, reg="uniform"), LoopSpec(1, 3, iters=3, reg="naive"), LoopSpec(0, 2, iters=4, reg="anchor", alpha=0.3),
         LoopSpec(2, 4, iters=3, reg="auto-align"), LoopSpec(1, 4, iters=2, reg="damped", k=3), LoopSpec(3, 4, iters=3, reg="ema")]


def _reference(hf, spec: LoopSpec, ids: list[int]):
    """PyTorch: (y_t, x_t) per iteration and the hidden states at every boundary (no loop)."""
    t = torch.tensor([ids])
    feeds = {"input_ids": t, "attention_mask": torch.ones_like(t), "position_ids": torch.arange(len(ids))[None], "use_cache": False}
    record: list = []
    with torch.no_grad():
        with looped(hf, spec, record=record):
            hf(**feeds)
        hidden = hf(**feeds, output_hidden_states=True).hidden_states
    return record, hidden


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.slug())
def test_states_match_pytorch_and_loop_output(tiny, hf_model, arch, spec):
    trace = capture(tiny(arch) / "model.onnx", spec, PROMPT)
    n, L = spec.iters, len(trace.boundaries) - 1
    record, hidden = _reference(hf_model(arch), trace.spec, trace.ids)
    assert trace.ys.shape[0] == trace.xs.shape[0] == len(record) == n
    for t, (y_ref, x_ref) in enumerate(record, 1):
        for name, got, ref in (("y", trace.ys[t - 1], y_ref), ("x", trace.xs[t - 1], x_ref)):
            err = float(np.abs(got - ref[0].numpy()).max())
            assert err <= ATOL, f"{arch} {spec.slug()}: {name}_{t} differs from the PyTorch reference by {err:.3g} > {ATOL}"
    # x_1 = y_1 = r, the baseline's output of the range
    assert np.array_equal(trace.xs[0], trace.ys[0])
    assert np.abs(trace.ys[0] - trace.baseline[spec.end]).max() <= ATOL
    # the last exposed state is the Loop's output itself (boundary E of the looped model), bit for bit
    assert np.array_equal(trace.xs[-1], trace.after[0]), f"{arch} {spec.slug()}: x_N != the Loop output"
    # boundaries 0..L-1 are Hugging Face's hidden_states (its last entry is after the final norm)
    for i in range(L):
        err = float(np.abs(trace.baseline[i] - hidden[i][0].numpy()).max())
        assert err <= ATOL, f"{arch}: boundary {i} differs from hidden_states[{i}] by {err:.3g}"
    assert np.abs(trace.before - trace.baseline[:spec.start + 1]).max() <= ATOL
    # the table: r first, then y_t/x_t per iteration, then the two outputs
    labels = [r.label for r in trace.rows]
    assert labels == ["r"] + [f"{v}{t}" for t in range(2, n + 1) for v in "yx"] + ["final (baseline)", "final (looped)"]
    r_row = trace.rows[0]
    assert r_row.cos == pytest.approx(1.0, abs=1e-6) and r_row.norm_ratio == pytest.approx(1.0, abs=1e-6)
    assert all(len(r.top) == 5 for r in trace.rows)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logit_lens_reproduces_the_logits(tiny, arch):
    model = load_model(tiny(arch) / "model.onnx", load_weights=True)
    blocks = find_blocks(model)
    last = blocks.blocks[-1].output
    ids = np.array([[5, 9, 14, 3, 27, 8]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(6)[None]}
    out = open_session(expose_outputs(model, [last])).run(feeds, ["logits", last])
    lens = logit_lens(model, last)
    assert lens.graph.input[0].name == last and len(lens.graph.node) < 40
    got = open_session(lens).run(lens_feeds(lens, out[last]), ["logits"])["logits"]
    assert np.abs(got - out["logits"]).max() <= ATOL
    # rows of any batch shape decode independently: the lens is per position
    rows = open_session(lens).run(lens_feeds(lens, out[last][0][:, None, :]), ["logits"])["logits"][:, 0]
    assert np.abs(rows - out["logits"][0]).max() <= ATOL
    with pytest.raises(LoopgraphError, match="depends on the value of graph input"):
        logit_lens(model, blocks.blocks[-2].output)  # the last block reads the attention mask


def test_expose_outputs_refuses_tensors_it_cannot_reach(tiny):
    model = load_model(tiny("llama") / "model.onnx")
    looped_model = rewrite(model, LoopSpec(1, 3, iters=2)).model
    inside = find_blocks(model).blocks[1].output  # inside the Loop body after the rewrite
    with pytest.raises(LoopgraphError, match="not produced in the main graph"):
        expose_outputs(looped_model, [inside])
    assert len(expose_outputs(model, [inside, inside, "logits"]).graph.output) == len(model.graph.output) + 1


def test_naive_drifts_further_than_uniform(tiny):
    """What the trace is for: with naive re-application the state moves further from r than with uniform."""
    naive = capture(tiny("llama") / "model.onnx", LoopSpec(1, 3, iters=4, reg="naive"), PROMPT)
    uniform = capture(tiny("llama") / "model.onnx", LoopSpec(1, 3, iters=4, reg="uniform"), PROMPT)
    x_naive, x_uniform = naive.rows[-3], uniform.rows[-3]  # x_4
    assert x_naive.label == x_uniform.label == "x4"
    assert x_naive.cos < x_uniform.cos, (x_naive.cos, x_uniform.cos)


def test_write_trace_files_and_figure(tiny, tmp_path):
    trace = capture(tiny("qwen2") / "model.onnx", LoopSpec(1, 3, iters=3, reg="uniform"), PROMPT, token=2)
    assert trace.token == 2
    paths = write_trace(trace, tmp_path / "t")
    data = paths["png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (round(TRAJECTORY_SIZE[0] * TRAJECTORY_DPI), round(TRAJECTORY_SIZE[1] * TRAJECTORY_DPI))
    summary = json.loads(paths["json"].read_text())
    assert summary["spec"]["trace"] is True and len(summary["baseline_norms"]) == len(trace.boundaries)
    assert len(summary["looped_norms"]) == len(trace.boundaries) + trace.spec.iters - (trace.spec.end - trace.spec.start)
    assert 0 < sum(summary["pca_explained"]) <= 1 + 1e-9
    lines = paths["csv"].read_text().splitlines()
    assert lines[0].startswith("state,t,reference,cos,norm_ratio,top1") and len(lines) == 1 + len(trace.rows)
    assert "logit-lens top-5" in format_table(trace)


def test_refusals(tiny, tmp_path):
    model = tiny("llama") / "model.onnx"
    with pytest.raises(LoopgraphError, match="outside the prompt"):
        capture(model, LoopSpec(1, 3), "two words", token=40)
    with pytest.raises(LoopgraphError, match="empty"):
        capture(model, LoopSpec(1, 3), "  ")
    with pytest.raises(LoopgraphError, match="noise"):
        capture(model, LoopSpec(1, 3, noise_seed=1), PROMPT)
    with pytest.raises(LoopgraphError, match="blocks 0..3"):
        capture(model, LoopSpec(2, 9), PROMPT)
    with pytest.raises(LoopgraphError, match="with-past"):
        capture(tiny("llama", with_past=True) / "model.onnx", LoopSpec(1, 3), PROMPT)


def test_cli_trace(tiny, tmp_path):
    folder = tiny("llama")
    out = tmp_path / "trace"
    done = run_cli("trace", folder / "model.onnx", "--range", "1:3", "--iters", "3", "--reg", "naive", "--prompt", PROMPT, "-o", out)
    assert done.returncode == 0, done.stderr
    assert "final (looped)" in done.stdout and (out / "trajectory.png").is_file() and (out / "trace.csv").is_file()
    looped_file = tmp_path / "looped.onnx"
    rewrite(folder / "model.onnx", LoopSpec(1, 3, iters=2), looped_file, copy_weights=True)
    again = run_cli("trace", folder / "model.onnx", "--range", "1:3", "--prompt", PROMPT, "-o", out)
    assert again.returncode == 2 and "already holds" in again.stderr and "--force" in again.stderr, again.stderr
    bad = run_cli("trace", looped_file, "--range", "1:3", "--prompt", PROMPT, "-o", tmp_path / "trace2")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "already looped" in bad.stderr, bad.stderr

"""What looping does to the hidden state: the residual stream at every block boundary and at every
loop iteration, for one prompt.

:func:`capture` runs two graphs with ONNX Runtime, both made in memory from the original export:

- the **baseline**: the original with every block boundary exposed as an output (boundary 0 =
  the embedding output entering block 0, boundary i = the output of block i-1, boundary L = the
  last block's output);
- the **looped** model: the rewrite with ``trace=True`` (the Loop's scan outputs
  ``loopgraph/trace/y`` and ``loopgraph/trace/x`` hold y_t and x_t of every iteration), with the
  boundaries outside the range exposed too: 0..S before the loop and E..L after it (boundary E
  is the Loop's output, x_N, which keeps the range output's name).

States are decoded with the *logit lens* (:func:`loopgraph.experiments.graphs.logit_lens`: final
norm + unembedding applied to any state) and compared with the non-looped state ``r = y_1``
(the baseline's boundary E): cosine similarity and norm ratio.

Handled: every regularizer (with alpha/K), any range, exports without KV cache.
Refused: a looped model (trace the original), with-past exports, an empty prompt, a token
position outside the prompt, noise control (it replaces x_N after the loop; trace the plain spec).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from loopgraph.errors import LoopgraphError
from loopgraph.experiments.plots import Trajectory, trajectory_figure
from loopgraph.exportdir import model_title
from loopgraph.naming import lg_name
from loopgraph.spec import LoopSpec

TRACE_Y, TRACE_X = lg_name("trace", "y"), lg_name("trace", "x")
TOP_K = 5


@dataclasses.dataclass
class StateRow:
    """One row of the per-iteration table, for the followed token."""
    label: str  # "r", "y2", "x2", ..., "final (baseline)", "final (looped)"
    t: int | None  # iteration, None for the final rows
    ref: str  # what cos and norm_ratio compare with: "r" for loop states, "final (baseline)" for the final ones
    cos: float  # cosine similarity with ref over the hidden axis
    norm_ratio: float  # |state| / |ref|
    top: list[tuple[str, float]]  # logit-lens top-k tokens and probabilities


@dataclasses.dataclass
class Trace:
    """Everything :func:`capture` measured, for one prompt. State arrays are [count, seq, hidden]."""
    model: str
    spec: LoopSpec  # resolved, trace=True
    prompt: str
    ids: list[int]
    token: int  # the followed position, 0 <= token < len(ids)
    tokens: list[str]  # the prompt's tokens as text
    boundaries: list[str]  # tensor names of boundaries 0..L
    baseline: np.ndarray  # boundaries 0..L of the original
    before: np.ndarray  # boundaries 0..S of the looped model
    ys: np.ndarray  # y_1..y_N
    xs: np.ndarray  # x_1..x_N
    after: np.ndarray  # boundaries E..L of the looped model (after[0] is the Loop output x_N)
    rows: list[StateRow]

    def token_states(self, states: np.ndarray) -> np.ndarray:
        return states[:, self.token, :].astype(np.float64)

    def token_text(self, position: int) -> str:
        return repr(self.tokens[position])

    def baseline_states(self) -> np.ndarray:
        """The followed token at boundaries 0..L of the original, [L+1, hidden]."""
        return self.token_states(self.baseline)

    def looped_states(self) -> np.ndarray:
        """The followed token along the looped path: boundaries 0..S, x_1..x_N, boundaries E+1..L."""
        return self.token_states(np.concatenate([self.before, self.xs, self.after[1:]]))

    def pca(self) -> tuple[Callable[[np.ndarray], np.ndarray], tuple[float, float]]:
        """Projection on the first two principal components of the baseline trajectory (its
        L+1 states of the followed token, centred on their mean), and the share of that
        trajectory's variance each component explains."""
        base = self.baseline_states()
        mean = base.mean(0)
        _, s, vt = np.linalg.svd(base - mean, full_matrices=False)
        var = s**2
        explained = (float(var[0] / var.sum()), float(var[1] / var.sum())) if var.sum() > 0 else (0.0, 0.0)
        return (lambda states: (np.asarray(states, np.float64) - mean) @ vt[:2].T), explained

    def trajectory(self) -> Trajectory:
        """The followed token's paths on the baseline's first two principal components, for the figure."""
        proj, explained = self.pca()
        return Trajectory(proj(self.baseline_states()), proj(self.looped_states()), proj(self.token_states(self.ys)), explained,
                          self.spec, self.token, self.token_text(self.token), model_title(self.model), self.prompt)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float("nan")


def _softmax_top(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    x = logits.astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    top = np.argsort(-x, kind="stable")[:k]
    return [(int(i), float(p[i])) for i in top]


def capture(model: str | os.PathLike, spec: LoopSpec, prompt: str, *, token: int = -1, threads: int | None = None) -> Trace:
    """Run the baseline and the looped model (``spec``) on ``prompt`` and collect the states."""
    from loopgraph.experiments.graphs import expose_outputs, lens_feeds, logit_lens
    from loopgraph.onnxio import load_model, resolve_model_path
    from loopgraph.passes.blocks import find_blocks, has_kv_cache
    from loopgraph.passes.loop import is_looped
    from loopgraph.rewrite import rewrite
    from loopgraph.runtime.session import open_session
    from loopgraph.runtime.tokenizer import TextTokenizer

    if not prompt.strip():
        raise LoopgraphError("--prompt is empty; give some text to trace")
    if spec.noise_seed is not None:
        raise LoopgraphError("trace does not take a noise-control spec (its x_N is replaced after the loop); drop the noise seed")
    path = resolve_model_path(model)
    original = load_model(path, load_weights=True)
    if is_looped(original):
        raise LoopgraphError(f"{path} is already looped; trace the original export (model.onnx), the command rewrites it itself")
    if has_kv_cache(original):
        raise LoopgraphError(f"{path} is a with-past export; trace an export made without --with-past")
    blocks = find_blocks(original)
    spec = dataclasses.replace(spec.resolve(len(blocks), blocks.strategy), trace=True, dynamic=False, unroll=False)
    names = [blocks.blocks[0].input] + [b.output for b in blocks.blocks]
    s, e, L = spec.start, spec.end, len(blocks)

    tokenizer = TextTokenizer.from_folder(path.parent)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise LoopgraphError(f"--prompt {prompt!r} tokenizes to nothing; give some text")
    if not -len(ids) <= token < len(ids):
        raise LoopgraphError(f"--token {token} is outside the prompt's {len(ids)} tokens; use 0..{len(ids) - 1} or -1 for the last")
    position = token % len(ids)
    arr = np.array([ids], np.int64)
    feeds = {"input_ids": arr, "attention_mask": np.ones_like(arr), "position_ids": np.arange(len(ids), dtype=np.int64)[None]}

    base_out = open_session(expose_outputs(original, names), threads=threads).run(feeds, names)
    baseline = np.concatenate([base_out[n] for n in names])  # [L+1, seq, hidden]
    del base_out
    outside = names[:s + 1] + names[e:]
    looped = expose_outputs(rewrite(original, spec).model, outside)
    out = open_session(looped, threads=threads).run(feeds, [*outside, TRACE_Y, TRACE_X])
    del looped
    before = np.concatenate([out[n] for n in names[:s + 1]])
    after = np.concatenate([out[n] for n in names[e:]])
    ys, xs = out[TRACE_Y][:, 0], out[TRACE_X][:, 0]  # [N, batch = 1, seq, hidden] -> [N, seq, hidden]

    # logit lens: the followed token of every state in one run, as a batch of one-position rows
    lens = logit_lens(original, names[L])
    r, final = baseline[e, position], baseline[L, position]
    # (label, t, reference, state): r = y1 = x1, then y_t and x_t of each later iteration, then the outputs
    states = [("r", 1, "r", r)]
    for t in range(2, spec.iters + 1):
        states += [(f"y{t}", t, "r", ys[t - 1, position]), (f"x{t}", t, "r", xs[t - 1, position])]
    states += [("final (baseline)", None, "final (baseline)", final), ("final (looped)", None, "final (baseline)", after[-1, position])]
    stacked = np.stack([st for *_, st in states])[:, None, :]  # [k, 1, hidden]: one-position rows
    logits = open_session(lens, threads=threads).run(lens_feeds(lens, stacked), ["logits"])["logits"][:, 0]

    def text(i: int) -> str:
        return tokenizer.decode([i], skip_special_tokens=False)

    rows = []
    for (label, t, ref, state), lg in zip(states, logits):
        ref_state = r if ref == "r" else final
        ratio = float(np.linalg.norm(state.astype(np.float64)) / np.linalg.norm(ref_state.astype(np.float64)))
        rows.append(StateRow(label, t, ref, _cos(state, ref_state), ratio, [(text(i), p) for i, p in _softmax_top(lg, TOP_K)]))
    return Trace(str(path), spec, prompt, ids, position, [text(i) for i in ids], names, baseline, before, ys, xs, after, rows)


def format_table(trace: Trace) -> str:
    """The per-iteration table as text (r = y1 = x1 is the non-looped state)."""
    s = trace.spec
    lines = [f"{model_title(trace.model)} · looped {s.start}:{s.end} ×{s.iters} ({s.reg}"
             f"{'' if s.weight is None else f', weight {s.weight:g}'}) · token {trace.token} {trace.token_text(trace.token)}",
             f"{'state':<17} {'vs':<6} {'cos':>7} {'norm':>7}  logit-lens top-{TOP_K}"]
    for row in trace.rows:
        top = "  ".join(f"{t!r} {p:.2f}" for t, p in row.top)
        ref = "r" if row.ref == "r" else "base"
        lines.append(f"{row.label:<17} {ref:<6} {row.cos:7.4f} {row.norm_ratio:7.4f}  {top}")
    lines.append("cos and norm (|state| / |reference|) compare loop states with r = y1 = x1, the non-looped output of the range, "
                 "and the looped model's final state with the baseline's")
    return "\n".join(lines)


def write_trace(trace: Trace, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``trajectory.png``, ``trace.csv`` (the table) and ``trace.json`` (table, spec,
    prompt tokens, PCA variance) into ``out_dir`` (created if needed)."""
    from loopgraph.onnxio import atomic_path
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoopgraphError(f"cannot create the output folder {out} ({e.strerror}); choose another -o") from None
    paths = {"png": trajectory_figure(trace.trajectory(), out / "trajectory.png"), "csv": out / "trace.csv", "json": out / "trace.json"}
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["state", "t", "reference", "cos", "norm_ratio", *[f"top{i + 1}" for i in range(TOP_K)],
                    *[f"p{i + 1}" for i in range(TOP_K)]])
        for row in trace.rows:
            w.writerow([row.label, "" if row.t is None else row.t, row.ref, row.cos, row.norm_ratio, *[t for t, _ in row.top],
                        *[p for _, p in row.top]])
    summary = {"model": trace.model, "spec": json.loads(trace.spec.to_json()), "prompt": trace.prompt, "tokens": trace.tokens,
               "token": trace.token, "pca_explained": list(trace.pca()[1]),
               "rows": [dataclasses.asdict(r) for r in trace.rows],
               "baseline_norms": np.linalg.norm(trace.baseline_states(), axis=-1).tolist(),
               "looped_norms": np.linalg.norm(trace.looped_states(), axis=-1).tolist()}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths

"""What ``loopgraph tune`` writes: ``tune.md`` (the report a person reads), ``tune.json`` (every
number, the item lists of both splits), one start x end heatmap per (task, N, regularizer) with
the finalists marked, and (``--write-model``) the looped model of each confirmed winner.

Every file goes through a temporary file (:func:`loopgraph.onnxio.atomic_path`); a refused or
failed run leaves no half-written report.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

from loopgraph.errors import LoopgraphError
from loopgraph.experiments.grid import Cell, format_duration
from loopgraph.experiments.search import pairs
from loopgraph.experiments.tune import Confirmation, TaskTune, TuneResult, _cell_label
from loopgraph.onnxio import atomic_path

_BESIDE = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "chat_template.jinja", "loopgraph.json")


def _scoring_line(w: dict) -> str:
    """How the chain fed the items (packed or a row per option) and how many cached scores came from the other way."""
    how = "packed (an item's options share their context in one row)" if w.get("packed") else "a row per option"
    other = w.get("scores_of_other_scoring", 0)
    return f"Items fed {how}" + (f"; {other} cached cell scores were computed the other way (equal to float rounding)." if other else ".")


def _pts(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:+.2f}"


def _p(x: float) -> str:
    return f"{x:.3g}"


def verdict(t: TaskTune, significance: float) -> str:
    """One plain paragraph: the confirmed gain (and whether noise does as well), or that none was found."""
    w = t.winner
    m = t.metric
    if w is not None:
        c = w.cell
        text = (f"**Confirmed:** blocks {c.start}:{c.end} ×{c.iters} ({c.reg.label}) improves {m} on the {w.n} held-out items "
                f"by {_pts(w.delta)} points (95 % CI [{_pts(w.ci95[0])}, {_pts(w.ci95[1])}], McNemar p = {_p(w.p_mcnemar)}, "
                f"Holm p = {_p(w.p_holm)} over {len(t.confirmations)} finalists).")
        if w.vs_noise_p >= significance:
            text += (f" Its noise control moves {m} by {_pts(w.noise_delta)} points, and looped − noise is {_pts(w.vs_noise_delta)} "
                     f"(p = {_p(w.vs_noise_p)}): the gain is not shown to be specific to looping.")
        else:
            text += f" It also beats its noise control by {_pts(w.vs_noise_delta)} points (p = {_p(w.vs_noise_p)})."
        return text
    best = max(t.confirmations, key=lambda c: c.delta, default=None)
    what = "" if best is None else (f" The best finalist on the held-out items, {_cell_label(best.cell)}, moves {m} by "
                                    f"{_pts(best.delta)} points (McNemar p = {_p(best.p_mcnemar)}, Holm p = {_p(best.p_holm)}).")
    return (f"**No confirmed gain:** none of the {len(t.cells)} searched cells improves {m} on the held-out items.{what} "
            f"With {len(t.splits.confirm)} held-out items this confirmation detects a gain of about {_pts(t.detectable)} points "
            f"(80 % power at α = {significance:g}/{len(t.confirmations) or 1}); smaller gains are not excluded.")


def task_json(t: TaskTune, significance: float) -> dict:
    s = t.splits
    return {
        "task": t.task.name, "metric": t.metric, "blocks": t.num_blocks,
        "splits": {"how": s.how, "tune_file": s.tune_file, "confirm_file": s.confirm_file,
                   "tune_items": [it.index for it in s.tune], "confirm_items": [it.index for it in s.confirm],
                   "dropped_overlap": s.dropped_overlap},
        "rounds": [{"items": r.items, "cells": r.cells} for r in t.rounds],
        "pairs_planned": pairs(t.rounds), "pairs_exhaustive": len(t.cells) * len(s.tune),
        "baseline_tune": t.baseline_tune,
        "cells": [{"start": c.start, "end": c.end, "iters": c.iters, "reg": c.reg.label, "items": st.items, "signal": st.signal,
                   "signal_se": st.signal_se, "delta": st.delta, "dropped_after": st.dropped_after}
                  for c, st in sorted(t.table.items())],
        "finalists": [_cell_label(f.key) for f in t.finalists],
        "confirmation": [_confirmation_json(c) for c in t.confirmations],
        "detectable_effect": t.detectable, "oracle": t.oracle, "work": t.work, "estimate": t.estimate,
        "verdict": verdict(t, significance) if t.confirmations or t.finalists else None,
        "winner": None if t.winner is None else _cell_label(t.winner.cell),
        "model_written": None if t.model_written is None else str(t.model_written),
    }


def _confirmation_json(c: Confirmation) -> dict:
    return {"range": f"{c.cell.start}:{c.cell.end}", "iters": c.cell.iters, "reg": c.cell.reg.label, "tune_items": c.tune.items,
            "tune_delta": c.tune.delta, "tune_signal": c.tune.signal, "value": c.value, "baseline": c.baseline, "delta": c.delta,
            "ci95": list(c.ci95), "p_mcnemar": c.p_mcnemar, "p_holm": c.p_holm, "gained": c.gained, "lost": c.lost, "n": c.n,
            "noise_value": c.noise_value, "noise_delta": c.noise_delta, "noise_p": c.noise_p, "vs_noise_delta": c.vs_noise_delta,
            "vs_noise_ci95": list(c.vs_noise_ci95), "vs_noise_p": c.vs_noise_p, "confirmed": c.confirmed}


def task_markdown(t: TaskTune, significance: float, heatmaps: list[Path]) -> list[str]:
    s, w = t.splits, t.work
    regs = sorted({c.reg.label for c in t.cells})
    ns = sorted({c.iters for c in t.cells})
    ranges = len({(c.start, c.end) for c in t.cells})
    planned, exhaustive = pairs(t.rounds), len(t.cells) * len(s.tune)
    out = [f"## {t.task.name}", "",
           f"- **Tuning split**: {len(s.tune)} items of `{s.tune_file}`; **confirmation split**: {len(s.confirm)} items of "
           f"`{s.confirm_file}` ({'the _dev file tunes, the reported split confirms' if s.how == 'dev/reported' else 'two seeded disjoint halves of one file'}"
           f"{f'; {s.dropped_overlap} items whose text is also a tuning item dropped' if s.dropped_overlap else ''}). "
           "The search never saw a confirmation item (disjoint by item key; the line numbers are in tune.json).",
           f"- **Searched**: {ranges} ranges × N ∈ {{{', '.join(map(str, ns))}}} × {', '.join(regs)} = {len(t.cells)} cells, "
           f"metric {t.metric}, baseline {t.baseline_tune:.4f} on the tuning split.",
           f"- **Search**: successive halving on the paired gold-option probability; {planned} (cell, item) pairs of the "
           f"{exhaustive} an exhaustive search needs ({planned / max(1, exhaustive):.1%}); this run scored {w['pairs']} and found "
           f"{w['pairs_cached']} in the cache, {w['block_runs']} block-session runs, {w['search_seconds']:.1f} s. "
           + _scoring_line(w), "",
           "| round | items per cell | cells |", "|---|---|---|"]
    out += [f"| {i} | {r.items} | {r.cells} |" for i, r in enumerate(t.rounds)]
    full = sorted((st for st in t.table.values() if st.dropped_after is None), key=lambda st: (-st.delta, -st.signal))
    out += ["", f"Cells scored on all {len(s.tune)} tuning items (best 10 of {len(full)}):", "",
            "| range | N | reg | Δ acc (points) | Δ p(gold) (points) ± se |", "|---|---|---|---|---|"]
    out += [f"| {st.key.start}:{st.key.end} | {st.key.iters} | {st.key.reg.label} | {_pts(st.delta)} | {_pts(st.signal)} ± "
            f"{abs(st.signal_se) * 100:.2f} |" for st in full[:10]]
    out += ["", f"### Confirmation ({len(s.confirm)} held-out items, the real looped graphs)", "",
            "| finalist | tuning Δ | held-out value | Δ (points) | 95 % CI | McNemar p | Holm p | gained / lost | noise Δ (p) | "
            "looped − noise (p) | confirmed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in t.confirmations:
        out.append(f"| {_cell_label(c.cell)} | {_pts(c.tune.delta)} | {c.value:.4f} (baseline {c.baseline:.4f}) | {_pts(c.delta)} | "
                   f"[{_pts(c.ci95[0])}, {_pts(c.ci95[1])}] | {_p(c.p_mcnemar)} | {_p(c.p_holm)} | +{c.gained} / −{c.lost} | "
                   f"{_pts(c.noise_delta)} ({_p(c.noise_p)}) | {_pts(c.vs_noise_delta)} ({_p(c.vs_noise_p)}) | "
                   f"{'yes' if c.confirmed else 'no'} |")
    out += ["", f"Detectable effect: with {len(s.confirm)} held-out items, McNemar at α = {significance:g}/{len(t.confirmations)} "
            f"detects about {_pts(t.detectable)} points with 80 % power (normal approximation, the finalists' discordance).", ""]
    if t.oracle:
        o = t.oracle
        out += [f"### Oracle headroom ({o['items']} tuning items every cell got, {o['cells']} cells)", "",
                f"- Of the {o['baseline_wrong']} items the baseline gets wrong, some cell gets right {_share(o['fixed_by_some_cell'])}; "
                f"some **noise control** of the same cells gets right {_share(o['fixed_by_some_noise'])}.",
                f"- Of the {o['baseline_right']} items it gets right, some cell breaks {_share(o['broken_by_some_cell'])}; "
                f"some noise control breaks {_share(o['broken_by_some_noise'])}.",
                "- Headroom well above the noise controls' says some path fixes these items; equal headroom says any "
                "perturbation flips them.", ""]
    out += ["### Verdict", "", verdict(t, significance), ""]
    if t.model_written is not None:
        out += [f"Looped model written: `{t.model_written}`.", ""]
    out += [f"![{p.stem}]({p.name})" for p in heatmaps] + [""]
    return out


def _share(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1%}"


def heatmap_path(out: Path, task: str, iters: int, reg_label: str) -> Path:
    return out / f"tune_{task}_N{iters}_{re.sub(r'[^A-Za-z0-9.]+', '-', reg_label)}.png"


def heatmaps(t: TaskTune, result: TuneResult, out: Path) -> list[Path]:
    """Start x end maps of the tuning delta (points, on the items each cell got), one per (N, reg)."""
    from loopgraph.experiments.plots import HEATMAP_DPI, HEATMAP_SIZE, _pyplot, _save
    from loopgraph.exportdir import model_title
    plt = _pyplot()
    L = t.num_blocks
    scale = max([abs(st.delta) * 100 for st in t.table.values()] + [1.0])
    finalists = {f.key for f in t.finalists}
    confirmed = {c.cell for c in t.confirmations if c.confirmed}
    paths = []
    for iters, label in sorted({(c.iters, c.reg.label) for c in t.cells}):
        grid = np.full((L, L), np.nan)
        full = np.zeros((L, L), bool)
        for c, st in t.table.items():
            if c.iters == iters and c.reg.label == label:
                grid[c.start, c.end - 1] = st.delta * 100
                full[c.start, c.end - 1] = st.dropped_after is None
        fig, ax = plt.subplots(figsize=HEATMAP_SIZE)
        cmap = plt.get_cmap("RdBu").with_extremes(bad="#c8c8c8")
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-scale, vmax=scale, origin="upper", aspect="auto")
        fig.colorbar(im, ax=ax, label=f"Δ {t.metric} vs baseline on the tuning items it got (points)")
        ys, xs = np.nonzero(full)
        ax.scatter(xs, ys, s=6, c="black", marker=".", label="scored on every tuning item")
        for c in finalists:
            if c.iters == iters and c.reg.label == label:
                ax.add_patch(plt.Rectangle((c.end - 1.5, c.start - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.2))
                if c in confirmed:
                    ax.text(c.end - 1, c.start, "★", ha="center", va="center", fontsize=11, color="#1a7f37")
        ticks = range(0, L, max(1, L // 15))
        ax.set_xticks(list(ticks), [str(e + 1) for e in ticks], fontsize=7)
        ax.set_yticks(list(ticks), [str(s) for s in ticks], fontsize=7)
        ax.set_xlabel(f"end block E (exclusive; the model has {L} blocks)")
        ax.set_ylabel("start block S")
        ax.legend(loc="lower left", fontsize=7)
        ax.set_title(f"{model_title(result.model)} · tune {t.task.name} ({len(t.splits.tune)} tuning items) · N = {iters}, {label}\n"
                     f"□ finalist, ★ confirmed on {len(t.splits.confirm)} held-out items; grey: not searched", fontsize=9)
        fig.subplots_adjust(left=0.09, right=0.97, top=0.9, bottom=0.09)
        paths.append(_save(fig, heatmap_path(out, t.task.name, iters, label), HEATMAP_DPI))
        plt.close(fig)
    return paths


def write_model(t: TaskTune, model: Path, out: Path) -> Path | None:
    """The confirmed winner as a looped model in ``out`` (baked N and weight), with the tokenizer
    and config files beside it so ``loopgraph eval``/``generate`` run it from there."""
    from loopgraph.rewrite import default_output, rewrite
    w = t.winner
    if w is None:
        return None
    spec = w.cell.reg.spec(w.cell.start, w.cell.end, w.cell.iters, dynamic=False)
    dest = out / default_output(model, spec).name
    rewrite(model, spec, dest, copy_weights=True)
    for name in _BESIDE:
        if (model.parent / name).is_file() and not (out / name).exists():
            shutil.copyfile(model.parent / name, out / name)
    return dest


def write_outputs(result: TuneResult, out_dir: str | os.PathLike, *, write_models: bool = False, say=print) -> dict[str, Path]:
    """Write tune.md, tune.json, the heatmaps and (``write_models``) the confirmed winners into ``out_dir``."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoopgraphError(f"cannot create the output folder {out} ({e.strerror}); choose another -o") from None
    sig = result.config["significance"]
    paths: dict[str, Path] = {}
    md = ["# loopgraph tune", "", f"Model `{result.model}`; {result.seconds:.1f} s in all. Settings: " +
          ", ".join(f"{k} = {v}" for k, v in result.config.items() if k not in ("model", "cache")), ""]
    for t in result.tasks:
        if write_models:
            t.model_written = write_model(t, result.model, out)
            if t.model_written is not None:
                paths[f"model_{t.task.name}"] = t.model_written
        maps = heatmaps(t, result, out)
        paths.update({f"heatmap_{p.stem}": p for p in maps})
        md += task_markdown(t, sig, maps)
    summary = {"config": result.config, "seconds": round(result.seconds, 2), "tasks": [task_json(t, sig) for t in result.tasks]}
    paths["json"], paths["md"] = out / "tune.json", out / "tune.md"
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=_json_default) + "\n", encoding="utf-8")
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text("\n".join(md), encoding="utf-8")
    say(f"wrote {paths['md']}, {paths['json']} and {sum(k.startswith('heatmap') for k in paths)} heatmap(s) in {out}")
    return paths


def _json_default(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, Cell):
        return _cell_label(x)
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON: {type(x).__name__}")


def format_summary(result: TuneResult) -> str:
    lines = []
    for t in result.tasks:
        lines.append(f"{t.task.name}: {verdict(t, result.config['significance'])}".replace("**", ""))
    return "\n".join(lines)


def format_dry_run(result: TuneResult) -> str:
    """The estimate and its arithmetic, per task."""
    lines = []
    for t in result.tasks:
        e = t.estimate or {}
        rate = e["seconds_per_block_token"]
        lines += [f"{t.task.name}: {e['cells']} cells, {len(t.splits.tune)} tuning items ({e['mean_item_tokens']:.1f} ids each), "
                  f"{len(t.splits.confirm)} confirmation items",
                  "  rounds: " + ", ".join(f"{r['cells']} cells x {r['items']} items" for r in e["rounds"]),
                  f"  search: {e['search_pairs']} (cell, item) pairs (exhaustive: {e['exhaustive_pairs']}) + {e['oracle_pairs']} oracle pairs"
                  f" x {e['mean_cell_blocks']:.1f} blocks per cell (mean (N-1)(E-S) + (L-E)) x {e['sharing']:.2f} (y_2 and x_t shared)"
                  f" x {e['mean_item_tokens']:.1f} ids = {e['search_block_tokens']:.3g} block-tokens",
                  f"    + boundary states: {e['num_blocks']} blocks x the tuning ids x {e['groups_of_starts']} job groups of starts"
                  f" = {e['boundary_block_tokens']:.3g} block-tokens",
                  f"    x {rate * 1e3:.4f} ms per block-token (measured wall: the chain's baseline on 8 items; "
                  f"{e['cpu_seconds_per_block_token'] * 1e3:.4f} ms of CPU) / {e['workers']} worker(s) = {format_duration(e['search_seconds'])}",
                  f"  confirmation: (1 + 2 x {e['confirm']}) graphs x {e['finalist_blocks']:.1f} blocks x the held-out ids"
                  f" = {e['confirm_block_tokens']:.3g} block-tokens, + {2 * e['confirm']} rewrites x {e['rewrite_and_session_s']:.1f} s"
                  f" = {format_duration(e['confirm_seconds'])}",
                  f"  estimated total: {format_duration(e['seconds'])} wall at the measured rate (chain setup {e['chain_setup_s']:.1f} s); "
                  f"{format_duration(e['cpu_seconds'])} of single-thread CPU (what one free core per worker gives)"]
    return "\n".join(lines)



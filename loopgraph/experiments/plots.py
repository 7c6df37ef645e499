"""Figures: sweep heatmaps (start block x end block, colour = delta vs baseline) and the latent
trajectory of a trace (PCA of the residual stream across depth). matplotlib, Agg backend, fixed
pixel sizes (no tight bounding box), so the files are the same size on every machine.

The figures take plain rows and arrays (:class:`HeatCell`, :class:`HeatmapTitle`,
:class:`Trajectory`), not the sweep's or the trace's results: those modules build them and call
in here, never the other way round.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loopgraph.errors import LoopgraphError
from loopgraph.onnxio import atomic_path
from loopgraph.spec import LoopSpec

HEATMAP_SIZE = (8.0, 6.8)  # inches at HEATMAP_DPI: 800 x 680 pixels
HEATMAP_DPI = 100
TRAJECTORY_SIZE = (15.0, 6.5)  # inches at TRAJECTORY_DPI: 1500 x 650 pixels
TRAJECTORY_DPI = 100
_MAX_ANNOTATED = 16  # write the delta into cells up to this many columns


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LoopgraphError("the figures need matplotlib; pip install 'loopgraph[experiments]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path, dpi: int) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


@dataclasses.dataclass(frozen=True)
class HeatCell:
    """One swept cell: blocks ``start:end`` looped ``iters`` times with the regularizer ``reg``
    (its label, weight included), and its delta vs the baseline (a fraction, 0.01 = 1 point)."""
    start: int
    end: int
    iters: int
    reg: str
    delta: float
    significant: bool


@dataclasses.dataclass(frozen=True)
class HeatmapTitle:
    """What the heatmaps' titles and axes say about the sweep."""
    model: str  # the model's title (loopgraph.exportdir.model_title)
    task: str
    split: str
    n: int  # items scored
    metric: str
    baseline: float  # the metric of the original model
    num_blocks: int
    significance: float  # the McNemar level of the starred cells


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One token's residual stream across depth, projected on two principal components ([*, 2] each)."""
    baseline: np.ndarray  # block boundaries 0..L of the original
    looped: np.ndarray  # the looped path: boundaries 0..S, x_1..x_N, boundaries E+1..L
    ys: np.ndarray  # y_1..y_N, the raw outputs of the iterations
    explained: tuple[float, float]  # share of the baseline trajectory's variance of PC1 and PC2
    spec: LoopSpec
    token: int  # the followed position
    token_text: str
    model: str  # the model's title
    prompt: str


def heatmap_name(iters: int, reg_label: str) -> str:
    return f"heatmap_N{iters}_{re.sub(r'[^A-Za-z0-9.]+', '-', reg_label)}.png"


def heatmaps(cells: Sequence[HeatCell], title: HeatmapTitle, out_dir: Path) -> list[Path]:
    """One PNG per (N, regularizer): rows = start block S, columns = end block E (exclusive),
    colour = delta of the metric vs the baseline in points, on one symmetric scale for all the
    sweep's maps; the best cell is outlined, cells with McNemar p below the sweep's significance
    level are starred. Cells not in the sweep are left blank."""
    plt = _pyplot()
    groups: dict[tuple[int, str], list[HeatCell]] = {}
    for c in cells:
        groups.setdefault((c.iters, c.reg), []).append(c)
    scale = max([abs(c.delta) * 100 for c in cells] + [1.0])
    paths = []
    for (iters, label), group in sorted(groups.items()):
        fig = _heatmap(plt, title, group, iters, label, scale)
        paths.append(_save(fig, out_dir / heatmap_name(iters, label), HEATMAP_DPI))
        plt.close(fig)
    return paths


def _heatmap(plt, title: HeatmapTitle, cells: Sequence[HeatCell], iters: int, label: str, scale: float):
    starts = sorted({c.start for c in cells})
    ends = sorted({c.end for c in cells})
    grid = np.full((len(starts), len(ends)), np.nan)
    where = {}
    for c in cells:
        i, j = starts.index(c.start), ends.index(c.end)
        grid[i, j] = c.delta * 100
        where[(i, j)] = c
    fig, ax = plt.subplots(figsize=HEATMAP_SIZE)
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#c8c8c8")  # not swept: grey, distinct from the white of a zero delta
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-scale, vmax=scale, origin="upper", aspect="auto")
    fig.colorbar(im, ax=ax, label=f"Δ {title.metric} vs baseline (points)")
    ax.set_xticks(range(len(ends)), [str(e) for e in ends], fontsize=8 if len(ends) <= 20 else 6, rotation=0 if len(ends) <= 20 else 90)
    ax.set_yticks(range(len(starts)), [str(s) for s in starts], fontsize=8 if len(starts) <= 20 else 6)
    ax.set_xlabel(f"end block E (exclusive; the model has {title.num_blocks} blocks)")
    ax.set_ylabel("start block S")
    best = max(cells, key=lambda c: c.delta)
    for (i, j), c in where.items():
        text = f"{c.delta * 100:+.1f}" if len(ends) <= _MAX_ANNOTATED else ""
        if c.significant:
            text += "*"
        if text:
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if abs(c.delta * 100) > 0.6 * scale else "black")
    bi, bj = starts.index(best.start), ends.index(best.end)
    ax.add_patch(plt.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5))
    ax.set_title(f"{title.model} · {title.task} ({title.split}, n = {title.n}) · N = {iters}, {label}\n"
                 f"baseline {title.metric} = {title.baseline:.1%}; best {best.start}:{best.end} "
                 f"{best.delta * 100:+.1f} pts (□); * McNemar p < {title.significance:g} (uncorrected); grey: not swept", fontsize=9)
    fig.subplots_adjust(left=0.09, right=0.97, top=0.9, bottom=0.09)
    return fig


def trajectory_figure(traj: Trajectory, path: Path) -> Path:
    """The residual stream of one token across depth, projected on the first two principal
    components of the baseline trajectory: the baseline path (every block boundary), the looped
    path (boundaries before the range, the carried state x_t of every iteration, the boundaries
    after it) and the raw outputs y_t of the loop iterations. Left: the whole depth; right: a
    zoom on the looped range (state norms grow with depth, so the loop is small on the left)."""
    plt = _pyplot()
    base, looped, ys, explained = traj.baseline, traj.looped, traj.ys, traj.explained
    s, e, n = traj.spec.start, traj.spec.end, traj.spec.iters
    loop_pts = looped[s + 1:s + 1 + n]  # x_1 .. x_N
    fig, axes = plt.subplots(1, 2, figsize=TRAJECTORY_SIZE)
    for ax, zoom in zip(axes, (False, True)):
        ax.plot(base[:, 0], base[:, 1], "-o", color="#4c72b0", ms=4, lw=1.5, label="baseline (block boundaries)", zorder=2)
        ax.plot(looped[:, 0], looped[:, 1], "-s", color="#dd8452", ms=3.5, lw=1.2, alpha=0.9,
                label=f"looped {s}:{e} ×{n} ({traj.spec.reg}): boundaries and $x_t$", zorder=3)
        ax.scatter(loop_pts[:, 0], loop_pts[:, 1], s=70, facecolors="none", edgecolors="#c44e52", linewidths=1.8, zorder=4,
                   label="loop iterations $x_t$")
        ax.scatter(ys[:, 0], ys[:, 1], marker="x", s=40, color="#8172b3", zorder=4, label="$y_t = B(x_{t-1})$ (raw output of iteration t)")
        for t in range(n):
            ax.annotate(f"x{t + 1}", loop_pts[t], textcoords="offset points", xytext=(5, -10), fontsize=8, color="#c44e52")
        ax.set_xlabel(f"PC1 ({explained[0]:.0%} of the baseline trajectory's variance)")
        ax.set_ylabel(f"PC2 ({explained[1]:.0%})")
        ax.grid(alpha=0.3)
        if zoom:
            box = np.concatenate([base[max(0, s - 1):min(len(base), e + 2)], loop_pts, ys, looped[s + n:s + n + 2]])
            lo, hi = box.min(0), box.max(0)
            pad = np.maximum((hi - lo) * 0.15, 1e-6)
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            labelled = range(max(0, s - 1), min(len(base), e + 2))
            ax.set_title(f"zoom on blocks {s}:{e} (boundaries {labelled.start}..{labelled.stop - 1})", fontsize=9)
        else:
            labelled = range(0, len(base), max(1, len(base) // 10))
            ax.annotate("final", looped[-1], textcoords="offset points", xytext=(6, -10), fontsize=8, color="#dd8452")
            ax.set_title("whole depth (blue numbers: block boundaries)", fontsize=9)
            ax.legend(fontsize=7, loc="best")
        for i in labelled:
            ax.annotate(str(i), base[i], textcoords="offset points", xytext=(4, 4), fontsize=7, color="#4c72b0")
    axes[1].annotate(f"r = y1 = x1 (boundary {e})", base[e], textcoords="offset points", xytext=(10, -24), fontsize=8,
                     arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6})
    fig.suptitle(f"Latent trajectory of token {traj.token} ({traj.token_text}) across depth, PCA fit on the baseline · "
                 f"{traj.model} · looped {s}:{e} ×{n}, {traj.spec.reg} · prompt: "
                 f"{_short(traj.prompt)}", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.88, bottom=0.09, wspace=0.2)
    out = _save(fig, path, TRAJECTORY_DPI)
    plt.close(fig)
    return out


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[:n - 1] + "…")

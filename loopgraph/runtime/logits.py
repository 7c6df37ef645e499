"""A session of a causal LM that computes logits only at the positions asked for (what scoring,
the evaluation and the sweep run on).

Whole sequences are fed, so a model with KV-cache inputs (an Optimum ``--with-past`` export, its
rewrites in every ``--kv`` layout, a model-builder graph) gets empty caches: its logits are those
of the first generation step. A graph without a ``position_ids`` input (the genai model builder's:
GroupQueryAttention numbers a row's tokens from index 0, whatever the mask says) needs every row to
start at index 0: the scorer's batches are right-padded already; a left-padded batch is shifted row
by row (the asked positions with it); causal attention never looks right, so trailing pads change
nothing."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx

from loopgraph.errors import LoopgraphError
from loopgraph.exportdir import read_config
from loopgraph.naming import PAST_PREFIX
from loopgraph.onnxio import attach_weights, detach_weights, external_locations, load_model, resolve_model_path
from loopgraph.passes.logits import POSITIONS_NAME, gather_logits
from loopgraph.runtime.generate import CausalLM
from loopgraph.runtime.inputs import feeds_for
from loopgraph.runtime.session import open_session

log = logging.getLogger(__name__)


class LogitsSession:
    """An ORT session of a causal LM that computes logits only at the positions asked for.

    The model is opened with :func:`loopgraph.passes.logits.gather_logits` applied in memory (the
    file is not changed; weights external data stay where they are). A graph the pass refuses is
    opened as it is, with a warning, and the positions are picked from its full logits.
    ``model``: an .onnx path or export folder, or a ModelProto that holds its weights (a proto
    whose weights are external data has no folder to find them in: give its path instead)."""

    def __init__(self, model: onnx.ModelProto | str | os.PathLike, *, device: str = "cpu", threads: int | None = None,
                 gather: bool = True) -> None:
        path = None if isinstance(model, onnx.ModelProto) else resolve_model_path(model)
        self.gathered, source, base = False, model if path is None else path, None
        if gather:
            proto = load_model(path) if path is not None else model  # external weights are never read here
            external = path is not None and bool(external_locations(proto))
            stash = detach_weights(proto)  # the pass copies the graph, not the weights
            try:
                source = gather_logits(proto).model
                self.gathered = True
                attach_weights(source, stash)
                base = path.parent if external else None
            except LoopgraphError as e:
                log.warning("scoring with full logits: %s", e)
            attach_weights(proto, stash)
            del proto
        self.session = open_session(source, device=device, threads=threads, base_dir=base)
        inputs = self.session.inputs
        self.right_pad = "position_ids" not in inputs
        self._inputs = set(inputs)
        self._empty_past = None
        if any(n.startswith(PAST_PREFIX) for n in inputs):
            config = read_config(path.parent) if path is not None else {}
            self._empty_past = CausalLM.from_session(self.session, config).initial_past

    def logits_at(self, ids: np.ndarray, mask: np.ndarray, at: np.ndarray, feeds: dict | None = None) -> np.ndarray:
        """Logits ``[len(at), vocab]`` at the flat positions ``at`` (``row * seq + position``);
        ``feeds``: more inputs (a --dynamic file's N and weight)."""
        if self.right_pad:
            ids, mask, at = right_align(ids, mask, at)
        feeds = {**{n: v for n, v in feeds_for(ids, mask).items() if n in self._inputs},
                 **(self._empty_past(len(ids)) if self._empty_past else {}), **(feeds or {})}
        if self.gathered:
            return self.session.run({**feeds, POSITIONS_NAME: at}, ["logits"])["logits"]
        logits = self.session.run(feeds, ["logits"])["logits"]
        return logits.reshape(-1, logits.shape[-1])[at]


def right_align(ids: np.ndarray, mask: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row moved to start at index 0 (its pads after its tokens), and the flat positions
    ``at`` (``row * seq + position``) moved with their rows. A row's real tokens must be one run
    (left- or right-padded); rows already starting at 0 stay as they are."""
    width = ids.shape[1]
    start, length = np.argmax(mask != 0, 1), mask.sum(1)
    cols = np.arange(width)
    if not np.array_equal(mask != 0, (cols >= start[:, None]) & (cols < (start + length)[:, None])):
        raise ValueError("right_align() needs each row's mask to be one run of ones (left or right padding)")
    cols = (cols + start[:, None]) % width
    return np.take_along_axis(ids, cols, 1), np.take_along_axis(mask, cols, 1), at - start[at // width]

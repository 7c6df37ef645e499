"""A session of a causal LM that computes logits only at the positions asked for (what scoring,
the evaluation and the sweep run on)."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx

from loopgraph.errors import LoopgraphError
from loopgraph.onnxio import attach_weights, detach_weights, external_locations, load_model, resolve_model_path
from loopgraph.passes.logits import POSITIONS_NAME, gather_logits
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

    def logits_at(self, ids: np.ndarray, mask: np.ndarray, at: np.ndarray, feeds: dict | None = None) -> np.ndarray:
        """Logits ``[len(at), vocab]`` at the flat positions ``at`` (``row * seq + position``);
        ``feeds``: more inputs (a --dynamic file's N and weight)."""
        feeds = {**feeds_for(ids, mask), **(feeds or {})}
        if self.gathered:
            return self.session.run({**feeds, POSITIONS_NAME: at}, ["logits"])["logits"]
        logits = self.session.run(feeds, ["logits"])["logits"]
        return logits.reshape(-1, logits.shape[-1])[at]

"""The inputs a causal-LM export is fed, built one way for every caller (verify, scoring, generation,
the PyTorch reference): left- or right-padded ids and mask, and position ids that follow the mask.

numpy only, so the rewrite and the runtime stay importable without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions that count only real tokens, ``cumsum(mask) - 1`` along the last axis, int64.

    Left padding is invisible to the real tokens: the first real token of every row is at
    position 0. Pads before it get 0 (they are masked anyway; Hugging Face's generate() gives
    them 1, which changes nothing that is attended to)."""
    return np.clip(np.cumsum(np.asarray(attention_mask, np.int64), -1) - 1, 0, None)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask`` [batch, width] (int64), prompts right-aligned and the
    space before them filled with ``pad_id``."""
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def right_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask`` [batch, width] (int64), prompts left-aligned and the
    space after them filled with ``pad_id`` (how ``loopgraph eval``'s scorer batches rows)."""
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
        mask[i, :len(p)] = 1
    return ids, mask


def feeds_for(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The feeds of a whole-sequence forward pass (no KV cache): ids, mask and their position ids."""
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)}

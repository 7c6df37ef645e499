"""The inputs every caller feeds: left padding and the position-ids rule (numpy only)."""

from __future__ import annotations

import numpy as np

from loopgraph.runtime.inputs import feeds_for, left_pad, position_ids


def _positions_by_counting(mask: np.ndarray) -> np.ndarray:
    """The rule written out: each real token's position is the number of real tokens before it in its row."""
    out = np.zeros(mask.shape, np.int64)
    for row in range(mask.shape[0]):
        seen = 0
        for col in range(mask.shape[1]):
            if mask[row, col]:
                out[row, col] = seen
                seen += 1
    return out


def test_position_ids_count_real_tokens_only():
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]], np.int64)
    got = position_ids(mask)
    assert got.dtype == np.int64 and got.shape == mask.shape
    np.testing.assert_array_equal(got, _positions_by_counting(mask))
    np.testing.assert_array_equal(got[1], [0, 0, 0, 1])  # left padding is invisible: the first real token is at 0
    # Hugging Face's generate() rule, cumsum(mask) - 1 with pads set to 1, agrees wherever a token is attended to
    hf = np.where(mask == 0, 1, mask.cumsum(-1) - 1)
    np.testing.assert_array_equal(got[mask == 1], hf[mask == 1])


def test_position_ids_of_other_mask_dtypes():
    mask = np.array([[False, True, True]])
    np.testing.assert_array_equal(position_ids(mask), [[0, 0, 1]])
    assert position_ids(mask.astype(np.int32)).dtype == np.int64


def test_left_pad_and_feeds():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=2)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [2, 2, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    assert ids.dtype == mask.dtype == np.int64
    feeds = feeds_for(ids, mask)
    assert list(feeds) == ["input_ids", "attention_mask", "position_ids"]
    np.testing.assert_array_equal(feeds["position_ids"], [[0, 1, 2], [0, 0, 0]])
    assert left_pad([[1, 2]])[0].tolist() == [[1, 2]]  # pad id 0 by default

"""lm-eval's tokenisation rules and the batched scorer, against direct per-request computation."""

import hashlib

import numpy as np
import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.eval.encoding import config_max_length, encode_pair, model_input, rolling_windows
from loopgraph.eval.scoring import plan, score_groups

VOCAB = 50


def char_encode(text: str) -> list[int]:
    """A toy tokenizer: one id per character, except "ab" merges into one id (a BPE-like boundary effect)."""
    ids, i = [], 0
    while i < len(text):
        if text.startswith("ab", i):
            ids.append(99)
            i += 2
        else:
            ids.append(ord(text[i]))
            i += 1
    return ids


def test_encode_pair_moves_trailing_space_and_tokenizes_jointly():
    # trailing whitespace moves to the continuation
    assert encode_pair("x ", "y", char_encode, 0) == ([ord("x")], [ord(" "), ord("y")])
    # joint tokenisation: "a" + "b..." merges at the boundary, so the context is tok("a") and the continuation
    # is whatever follows it in tok("ab...") (lm-eval's rule, even though it changes the boundary token)
    assert encode_pair("xa", "bc", char_encode, 0) == ([ord("x"), ord("a")], [ord("c")])
    # empty context: the prefix token
    assert encode_pair("", " w", char_encode, 7) == ([7], [ord(" "), ord("w")])


def test_rolling_windows_by_hand():
    tokens = list(range(10, 19))  # 9 tokens, max_length 4
    assert rolling_windows(tokens, 1, 4) == [
        ([1], [10, 11, 12, 13]),  # the prefix token as context, the first L tokens predicted
        ([13], [14, 15, 16, 17]),  # a full window: only the last token before it as context
        ([14, 15, 16, 17], [18]),  # the last, partial window is fed the L tokens before its target
    ]
    assert rolling_windows([], 1, 4) == []
    assert rolling_windows([5, 6], 1, 4) == [([1], [5, 6])]


@pytest.mark.parametrize("n, length", [(1, 1), (7, 1), (9, 4), (16, 4), (17, 4), (100, 7)])
def test_rolling_windows_predict_every_token_once_in_windows_of_at_most_max_length(n, length):
    tokens = list(range(100, 100 + n))
    windows = rolling_windows(tokens, 1, length)
    assert [t for _, pred in windows for t in pred] == tokens
    full, end = [1] + tokens, 0  # full[j] is the id fed to predict tokens[j]
    for ctx, pred in windows:
        fed, count = model_input((ctx, pred), length)
        end += len(pred)
        assert len(fed) <= length and count == len(pred)
        assert fed == full[end - len(fed):end]  # contiguous text right before (and under) the targets


def test_model_input_left_truncates():
    assert model_input(([1, 2, 3, 4], [5, 6]), 3) == ([3, 4, 5], 2)
    assert model_input(([1, 2], [3]), 8) == ([1, 2], 1)
    with pytest.raises(LoopgraphError, match="continuation of 4 tokens does not fit"):
        model_input(([1], [2, 3, 4, 5]), 3)


def test_config_max_length_order():
    assert config_max_length({"n_positions": 1024, "max_position_embeddings": 2048}) == (1024, "config.json n_positions")
    assert config_max_length({"max_position_embeddings": 8192}) == (8192, "config.json max_position_embeddings")
    assert config_max_length({}, {"model_max_length": 512})[0] == 512
    assert config_max_length({}, {"model_max_length": 1000000000000000019884624838656})[0] == 2048


def fake_forward(calls: list):
    """A causal toy LM: the logits at position t are a pseudo-random function of ids[:t+1] only;
    returned at the flat positions ``at`` asked for, as the ONNX scorer's gathered graph does."""
    def forward(ids: np.ndarray, mask: np.ndarray, at: np.ndarray) -> np.ndarray:
        return full(ids, mask).reshape(-1, VOCAB)[at]

    def full(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        calls.append(ids.shape)
        out = np.zeros((*ids.shape, VOCAB), np.float32)
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                seed = int.from_bytes(hashlib.sha256(ids[b, :t + 1].tobytes()).digest()[:8], "little")
                out[b, t] = np.random.default_rng(seed).normal(0, 3, VOCAB)
        out[mask == 0] = np.nan  # padding positions must never be read
        return out
    forward.full = full
    return forward


def direct(request, max_length):
    """The same log-likelihood computed one request, one position at a time."""
    fed, count = model_input(request, max_length)
    logits = fake_forward([]).full(np.array([fed]), np.ones((1, len(fed)), np.int64))[0].astype(np.float64)
    ll, greedy = 0.0, True
    for pos, target in zip(range(len(fed) - count, len(fed)), request[1][len(request[1]) - count:]):
        row = logits[pos]
        ll += row[target] - (row.max() + np.log(np.exp(row - row.max()).sum()))
        greedy &= int(row.argmax()) == target
    return ll, greedy


def test_batched_scores_equal_direct_computation_and_groups_complete_once():
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(12):
        ctx = list(rng.integers(1, VOCAB, rng.integers(1, 9)))
        groups.append([(ctx, list(rng.integers(1, VOCAB, rng.integers(1, 4)))) for _ in range(rng.integers(1, 5))])
    groups.append([([3, 4], [5]), ([3, 4], [6])])  # one-token continuations of one context: one row
    groups.append([])  # an item without requests
    calls, done = [], []
    scores = score_groups(groups, fake_forward(calls), max_length=6, max_batch_tokens=20, max_batch_rows=3,
                          on_group=lambda g, s: done.append(g))
    assert sorted(done) == list(range(len(groups)))
    for group, got in zip(groups, scores):
        assert len(got) == len(group)
        for request, s in zip(group, got):
            ll, greedy = direct(request, 6)
            assert s.ll == pytest.approx(ll, abs=1e-12) and s.greedy == greedy
    assert all(b * t <= 20 or b == 1 for b, t in calls) and all(b <= 3 for b, _ in calls)


def test_rows_are_shared_when_one_input_is_a_prefix_of_another():
    groups = [[([3, 4], [5]), ([3, 4], [6]), ([3, 4], [5, 7]), ([3, 4], [8, 9])]]
    p = plan(groups, 16, 100, 8)
    # fed ids: [3,4], [3,4], [3,4,5], [3,4,8]: the first three share the row [3,4,5]
    assert sorted(map(tuple, p.rows)) == [(3, 4, 5), (3, 4, 8)]
    calls = []
    scores = score_groups(groups, fake_forward(calls), max_length=16)
    assert calls == [(2, 3)]
    assert [s.ll for s in scores[0]] == pytest.approx([direct(r, 16)[0] for r in groups[0]], abs=1e-12)


def test_rows_of_different_items_are_not_shared():
    p = plan([[([3, 4], [5])], [([3, 4], [6])]], 16, 100, 8)
    assert len(p.rows) == 2


def test_a_request_with_nothing_to_condition_on_is_refused():
    with pytest.raises(LoopgraphError, match="cannot be scored"):
        plan([[([], [5])]], 16, 100, 8)


def test_forward_returning_the_wrong_shape_is_refused():
    with pytest.raises(LoopgraphError, match=r"expected \[positions, vocab\]"):
        score_groups([[([1, 2], [3])]], lambda ids, mask, at: np.zeros((*ids.shape, VOCAB)), max_length=16)


def test_progress_counts_fed_tokens():
    seen = []
    score_groups([[([1, 2, 3], [4])], [([1], [2])]], fake_forward([]), max_length=16, max_batch_tokens=3,
                 on_batch=lambda done, total: seen.append((done, total)))
    assert seen == [(3, 4), (4, 4)]


def test_log_probs_equal_the_whole_array_float64_formula():
    """_log_probs (float32 argmax / max / target, float64 chunks in place) gives every value of the
    plain whole-array float64 log-softmax bit for bit, over chunk borders and with ties."""
    from loopgraph.eval.scoring import _log_probs
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((45, 49152)) * 4).astype(np.float32)
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1  # a tie: the first index wins both ways
    targets = rng.integers(0, 49152, 45)
    targets[3] = 9
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    want = x[np.arange(45), targets] - (m[:, 0] + np.log(np.exp(x - m).sum(-1)))
    lp, hit = _log_probs(logits, targets)
    assert np.array_equal(lp, want) and np.array_equal(hit, x.argmax(-1) == targets) and not hit[3]

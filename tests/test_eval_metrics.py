"""Metrics and paired statistics on hand-computed cases."""

import math

import numpy as np
import pytest

from loopgraph.eval.metrics import aggregate, item_metrics, multiple_choice
from loopgraph.eval.scoring import Score
from loopgraph.eval.stats import compare_paired, mcnemar_exact, paired_bootstrap, stderr
from loopgraph.eval.tasks import TASKS, Item


def test_acc_ties_go_to_the_first_maximum():
    assert multiple_choice([-1.0, -1.0, -2.0], 0, ["a", "b", "c"]) == {"acc": 1, "acc_norm": 1}
    assert multiple_choice([-1.0, -1.0, -2.0], 1, ["a", "b", "c"]) == {"acc": 0, "acc_norm": 0}


def test_acc_norm_divides_by_characters_not_bytes_or_tokens():
    # "éé" is 2 characters but 4 UTF-8 bytes: by characters -3/2 < -4/3 (option 1 wins); by bytes -3/4 would win
    assert multiple_choice([-3.0, -4.0], 1, ["éé", "abc"]) == {"acc": 0, "acc_norm": 1}
    # a longer option can win acc_norm while losing acc
    assert multiple_choice([-4.0, -6.0], 1, ["ab", "abcd"]) == {"acc": 0, "acc_norm": 1}


def test_item_metrics_keep_only_the_task_metrics():
    item = Item(0, (("c", " no"), ("c", " yes")), 1, ("no", "yes"))
    assert item_metrics(TASKS["boolq"], item, [Score(-2.0, False), Score(-1.0, True)]) == {"acc": 1}
    arc = Item(0, (("q", " a"), ("q", " bb")), 0, ("a", "bb"))
    assert item_metrics(TASKS["arc_easy"], arc, [Score(-1.0, False), Score(-1.5, False)]) == {"acc": 1, "acc_norm": 0}


def test_lambada_acc_is_greedy_and_perplexity_is_exp_of_minus_mean_ll():
    task, item = TASKS["lambada_openai"], Item(0, (("ctx", " w"),))
    per_item = [item_metrics(task, item, [Score(-1.0, True)]), item_metrics(task, item, [Score(-3.0, False)])]
    assert per_item == [{"acc": 1, "perplexity": -1.0}, {"acc": 0, "perplexity": -3.0}]
    agg = aggregate(task, per_item)
    assert agg["acc"] == 0.5 and agg["perplexity"] == pytest.approx(math.exp(2.0), rel=1e-15)
    assert agg["acc_stderr"] == pytest.approx(0.5, rel=1e-15)  # std(ddof=1) of [1, 0] = 0.7071, / sqrt 2
    assert "perplexity_stderr" not in agg


def test_wikitext_metrics_are_ratios_of_sums():
    task = TASKS["wikitext"]
    pages = [(Item(0, (("", "x"),), words=5, bytes=30), [Score(-4.0, False), Score(-6.0, False)]),  # two windows
             (Item(1, (("", "y"),), words=10, bytes=60), [Score(-20.0, False)])]
    agg = aggregate(task, [item_metrics(task, it, s) for it, s in pages])
    assert agg["word_perplexity"] == pytest.approx(math.exp(30 / 15), rel=1e-15)
    assert agg["byte_perplexity"] == pytest.approx(math.exp(30 / 90), rel=1e-15)
    assert agg["bits_per_byte"] == pytest.approx(30 / 90 / math.log(2), rel=1e-15)


def test_stderr_uses_the_sample_std():
    assert stderr(np.array([1, 0, 1, 1])) == pytest.approx(0.25, rel=1e-15)  # sample std 0.5, / sqrt 4
    assert math.isnan(stderr(np.array([1.0])))


@pytest.mark.parametrize("b, c, p", [(0, 0, 1.0), (1, 0, 1.0), (5, 0, 2 / 32), (0, 5, 2 / 32), (10, 2, 2 * 79 / 4096),
                                     (2, 10, 2 * 79 / 4096), (3, 3, 1.0), (6, 1, 2 * 8 / 128)])
def test_mcnemar_exact_by_hand(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-15)


def test_mcnemar_exact_large_counts_stay_exact():
    assert mcnemar_exact(5000, 5000) == 1.0
    p = mcnemar_exact(4800, 5200)  # z = 4 -> about 6.3e-5
    assert 5e-5 < p < 8e-5
    with pytest.raises(ValueError, match="discordant counts must be >= 0"):
        mcnemar_exact(-1, 2)


def test_paired_bootstrap():
    a = np.zeros(1000)
    b = np.zeros(1000)
    b[:100] = 1  # delta 0.1; sd of the differences 0.3 -> 95 % half-width about 1.96 * 0.3 / sqrt(1000) = 0.0186
    lo, hi = paired_bootstrap(a, b, seed=0)
    assert lo == pytest.approx(0.1 - 0.0186, abs=0.004) and hi == pytest.approx(0.1 + 0.0186, abs=0.004)
    assert paired_bootstrap(a, b, seed=0) == (lo, hi)  # fixed seed: the same interval
    assert paired_bootstrap(a, a, seed=0) == (0.0, 0.0)  # identical models: no spread at all
    assert paired_bootstrap(a, np.ones(1000), seed=0) == (1.0, 1.0)


def test_compare_paired_counts_discordant_items():
    base = np.array([1, 1, 0, 0, 1, 0])
    other = np.array([1, 0, 1, 1, 1, 0])
    r = compare_paired(base, other, seed=1)
    assert (r.gained, r.lost, r.n) == (2, 1, 6)
    assert r.delta == pytest.approx(1 / 6, rel=1e-12)
    assert r.p_mcnemar == 1.0  # 2 vs 1 discordant: no evidence
    assert r.ci95[0] <= r.delta <= r.ci95[1]
    with pytest.raises(ValueError, match="same items"):
        compare_paired(base, other[:5])

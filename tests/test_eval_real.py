"""Cross-check on the real SmolLM2-135M: the ONNX scorer against the independent PyTorch scorer."""

import numpy as np
import pytest

from loopgraph.eval.runner import OnnxScorer, open_model, select
from loopgraph.eval.tasks import TASKS, load_items
from loopgraph.exportdir import reference_dir
from tests.conftest import DATA_DIR

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not at {DATA_DIR} (set LOOPGRAPH_DATA)")]

ITEMS = 200
ATOL = 1e-3  # per-request log-likelihood, fp32 ONNX Runtime vs fp32 PyTorch
AGREE = 0.995


@pytest.fixture(scope="module")
def scorers(real_export):
    from loopgraph.reference.hf_scorer import HFScorer
    onnx_scorer = OnnxScorer(open_model(real_export / "model.onnx"), threads=2)
    hf = HFScorer(reference_dir(real_export), threads=1, batch_items=4)  # 1 torch thread: 2 oversubscribe a busy 2-core box
    return onnx_scorer, hf


@pytest.mark.parametrize("name", ["arc_easy", "winogrande"])
def test_onnx_and_pytorch_scores_agree_on_smollm2(scorers, name):
    onnx_scorer, hf = scorers
    task = TASKS[name]
    items = select(load_items(task, DATA_DIR), ITEMS, 1234)
    assert onnx_scorer.model.max_length == hf.max_length == 8192  # SmolLM2's max_position_embeddings
    # the two tokenizer stacks (tokenizers on tokenizer.json / transformers' AutoTokenizer) give the same ids
    assert [onnx_scorer.token_requests(task, it) for it in items] == [hf.token_requests(task, it) for it in items]
    a, b = onnx_scorer.score(task, items), hf.score(task, items)
    diff = np.array([abs(x.ll - y.ll) for xs, ys in zip(a, b) for x, y in zip(xs, ys)])
    assert diff.max() <= ATOL, f"{name}: max |Δ log-likelihood| {diff.max():.2e} > {ATOL} (ORT CPU vs PyTorch CPU, fp32)"
    for norm in ([False, True] if "acc_norm" in task.metrics else [False]):
        same = np.mean([choice(it, x, norm) == choice(it, y, norm) for it, x, y in zip(items, a, b)])
        assert same >= AGREE, f"{name}: the same {'acc_norm ' if norm else ''}choice on only {same:.1%} of {ITEMS} items"


def choice(item, scores, norm: bool) -> int:
    """The option picked: argmax of the log-likelihoods (divided by the option's characters for acc_norm)."""
    lls = np.array([s.ll for s in scores])
    return int(np.argmax(lls / np.array([float(len(c)) for c in item.choices]) if norm else lls))

"""An independent scoring path: transformers + PyTorch, for cross-checks and speed comparisons.

It shares only the lm-eval *rules* with the ONNX path (:func:`encoding.encode_pair`,
:func:`encoding.rolling_windows`, :func:`encoding.model_input`); the tokenizer (transformers'
``AutoTokenizer`` on the checkpoint folder), the forward pass (``AutoModelForCausalLM`` in
float32, or the PyTorch looped reference when a spec is given), the batching (a fixed number of
items per batch, every request its own row, no shared rows) and the log-softmax (torch) are its
own. The LM head runs only at the positions that are scored (``logits_to_keep``). torch and transformers are imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loopgraph.errors import LoopgraphError
from loopgraph.eval.encoding import TokenRequest, config_max_length, encode_pair, model_input, rolling_windows
from loopgraph.eval.scoring import Score
from loopgraph.eval.tasks import ROLLING, Item, Task
from loopgraph.spec import LoopSpec


class HFScorer:
    """Scores items with a Hugging Face checkpoint folder (config, weights, tokenizer files)."""

    def __init__(self, folder: str | Path, *, spec: LoopSpec | None = None, threads: int | None = None, batch_items: int = 1,
                 max_length: int | None = None, full_logits: bool = False) -> None:
        """``full_logits``: compute logits and log-softmax at every position, as lm-eval's Hugging Face
        backend does, instead of only where scored (same numbers, slower; for speed comparisons)."""
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise LoopgraphError("the PyTorch scorer needs torch and transformers; pip install 'loopgraph[export]'") from None
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise LoopgraphError(f"{folder} is not a Hugging Face checkpoint folder (no config.json)")
        if spec is not None and getattr(spec, "noise_seed", None) is not None:
            raise LoopgraphError("the PyTorch scorer has no noise control; score noise variants with the ONNX scorer")
        if threads:
            torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        self.torch = torch
        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.prefix_id = bos if bos is not None else eos
        self.max_length = max_length or config_max_length(self.model.config.to_dict(),
                                                          {"model_max_length": self.tokenizer.model_max_length})[0]
        self.batch_items = batch_items
        self.full_logits = full_logits

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)  # the tokenizer's default special tokens, as lm-eval

    def token_requests(self, task: Task, item: Item) -> list[TokenRequest]:
        if task.output_type == ROLLING:
            return rolling_windows(self.encode(item.requests[0][1]), self.prefix_id, self.max_length)
        return [encode_pair(c, x, self.encode, self.prefix_id) for c, x in item.requests]

    def _logits(self, ids, mask, positions):
        """Logits at ``positions`` (sorted sequence indices; None: all) of every row: [batch, positions, vocab].
        The model's own ``logits_to_keep`` applies the LM head (and any final soft-capping) there only."""
        if self.spec is None:
            keep = 0 if positions is None else positions  # 0: every position
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        from loopgraph.reference.looped import reference_logits
        logits = reference_logits(self.model, self.spec, ids, mask)
        return logits if positions is None else logits[:, positions]

    def score(self, task: Task, items: Sequence[Item]) -> list[list[Score]]:
        """Per item, the scores of its requests (windows for a rolling task)."""
        torch = self.torch
        groups = [[model_input(r, self.max_length) + (r[1],) for r in self.token_requests(task, it)] for it in items]
        order = sorted(range(len(groups)), key=lambda g: -max((len(f[0]) for f in groups[g]), default=0))
        out: list[list[Score]] = [[] for _ in groups]
        for s in range(0, len(order), self.batch_items):
            batch = [(g, f) for g in order[s:s + self.batch_items] for f in groups[g]]
            if not batch:
                continue
            width = max(len(f[0]) for _, f in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, (fed, _, _)) in enumerate(batch):
                ids[row, :len(fed)] = torch.tensor(fed)
                mask[row, :len(fed)] = 1
            if self.full_logits:
                keep = list(range(width))
                logp_all = torch.log_softmax(self._logits(ids, mask, None), dim=-1)
            else:
                keep = sorted({p for _, (fed, count, _) in batch for p in range(len(fed) - count, len(fed))})
                logits = self._logits(ids, mask, torch.tensor(keep, dtype=torch.long))
            column = {p: i for i, p in enumerate(keep)}
            for row, (g, (fed, count, cont)) in enumerate(batch):
                targets = torch.tensor(cont[len(cont) - count:], dtype=torch.long)
                cols = [column[p] for p in range(len(fed) - count, len(fed))]
                logp = logp_all[row, cols] if self.full_logits else torch.log_softmax(logits[row, cols], dim=-1)
                ll = float(logp.gather(-1, targets[:, None]).double().sum())
                out[g].append(Score(ll, bool((logp.argmax(-1) == targets).all())))
        return out

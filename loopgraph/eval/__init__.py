"""Evaluation: zero-shot benchmarks scored as lm-evaluation-harness does, baseline vs looped with paired statistics.

Modules: :mod:`tasks` (rendering records into requests), :mod:`encoding` (lm-eval's tokenisation
rules), :mod:`scoring` (batched log-likelihoods), :mod:`metrics`, :mod:`stats` (McNemar, paired
bootstrap), :mod:`cache` (resumable per-item scores), :mod:`runner` (ONNX Runtime path; its independent
PyTorch counterpart is :mod:`loopgraph.reference.hf_scorer`),
:mod:`report` and :mod:`cli` (``loopgraph eval``).
Nothing is imported here, so ``loopgraph --help`` stays instant.
"""

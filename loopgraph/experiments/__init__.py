"""Experiments over an exported model: where to loop (``loopgraph sweep``) and what looping does
to the hidden state (``loopgraph trace``).

Modules: :mod:`grid` (the cells of a sweep: ranges x N x regularizer), :mod:`sweep` (scoring the
cells with one ``--dynamic`` rewrite per range and regularizer, cached, on a process pool or Ray),
:mod:`graphs` (small graph edits: expose tensors as outputs, the logit-lens subgraph),
:mod:`trace` (per-iteration and per-block states, similarity table, logit lens), :mod:`plots`
(heatmaps and the latent trajectory, matplotlib with the Agg backend) and :mod:`cli`.
Nothing is imported here, so ``loopgraph --help`` stays instant.
"""

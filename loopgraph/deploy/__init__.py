"""Deployment and inspection tools for looped graphs (issue 7).

- :mod:`loopgraph.deploy.tensorrt`: does a graph meet TensorRT's ONNX ``Loop`` constraints?
- :mod:`loopgraph.deploy.diff`: a Loop-aware summary of what changed between two graphs.
- :mod:`loopgraph.deploy.view`: Netron servers, and a compact PNG of the block structure.
- :mod:`loopgraph.deploy.folder`: the runnable folder ``rewrite -o DIR/`` writes (Optimum, onnxruntime-genai).
- :mod:`loopgraph.deploy.cli`: the ``check``, ``diff`` and ``view`` subcommands.

Nothing here loads external weights, and nothing needs torch, transformers or onnxruntime;
``view`` needs the ``view`` extra (netron, graphviz) and graphviz's ``dot`` program.
"""

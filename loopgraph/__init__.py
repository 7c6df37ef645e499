"""loopgraph: regularized inner looping of frozen decoder LMs, as an ONNX graph rewrite.

The public API needs neither torch nor transformers::

    from loopgraph import LoopSpec, rewrite, find_blocks
"""

from loopgraph._version import __version__
from loopgraph.errors import LoopgraphError
from loopgraph.passes.blocks import Block, BlockMap, find_blocks
from loopgraph.rewrite import RewriteResult, rewrite
from loopgraph.spec import LoopSpec

__all__ = ["Block", "BlockMap", "LoopSpec", "LoopgraphError", "RewriteResult", "__version__", "find_blocks", "rewrite"]

"""loopgraph: regularized inner looping of frozen decoder LMs, as an ONNX graph rewrite.

The public API needs neither torch nor transformers::

    from loopgraph import LoopSpec, rewrite, find_blocks
"""

__version__ = "0.1.0"

from loopgraph.errors import LoopgraphError  # noqa: E402
from loopgraph.passes.blocks import Block, BlockMap, find_blocks  # noqa: E402
from loopgraph.rewrite import RewriteResult, rewrite  # noqa: E402
from loopgraph.spec import LoopSpec  # noqa: E402

__all__ = ["Block", "BlockMap", "LoopSpec", "LoopgraphError", "RewriteResult", "__version__", "find_blocks", "rewrite"]

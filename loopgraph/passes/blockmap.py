"""The result of block discovery: where each decoder block's residual stream enters and leaves.

Its own module so that every discovery strategy (:mod:`loopgraph.passes.blocks`,
:mod:`loopgraph.passes.skipnorm`) builds on the same types without importing each other.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Block:
    index: int
    input: str  # residual stream entering the block
    output: str  # residual stream leaving the block
    num_nodes: int  # nodes on the dataflow path input -> output


@dataclasses.dataclass(frozen=True)
class BlockMap:
    blocks: tuple[Block, ...]
    container: str  # module path of the block list, e.g. "model.layers"
    strategy: str  # which strategy found them
    #: model-builder graphs: (boundary tensor, the fused skip-norm that computes it), per block output
    fused: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def family(self) -> str:
        last = self.container.rsplit(".", 1)[-1]
        return {"layers": "llama-like (decoder layers)", "h": "gpt2-like (transformer.h)"}.get(
            last, f"generic ({self.container}.N)"
        )


@dataclasses.dataclass(frozen=True)
class BlocksReport:
    blocks: BlockMap

    @property
    def count(self) -> int:
        return len(self.blocks)

    @property
    def strategy(self) -> str:
        return self.blocks.strategy

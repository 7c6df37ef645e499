"""The one contract every graph transformation follows (in the spirit of onnx_ir's PassBase).

A pass is a named callable ``model -> PassResult``. It checks its preconditions first and only
then mutates, so a refused pass leaves the model untouched. :func:`run_passes` runs a pipeline
(a list of passes: pipelines are data) and says which pass failed after which others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import onnx

from loopgraph.errors import LoopgraphError


@dataclasses.dataclass
class PassResult:
    model: onnx.ModelProto
    changed: bool
    report: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[onnx.ModelProto], PassResult]

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        return self.fn(model)


def run_passes(model: onnx.ModelProto, passes: Sequence[Pass]) -> tuple[onnx.ModelProto, list[tuple[str, PassResult]]]:
    """Run ``passes`` in order; a user error is re-raised naming the failing pass."""
    done: list[tuple[str, PassResult]] = []
    for p in passes:
        try:
            result = p(model)
        except LoopgraphError as e:
            after = f" (after {', '.join(n for n, _ in done)})" if done else ""
            raise LoopgraphError(f"pass {p.name}{after}: {e}") from None
        model = result.model
        done.append((p.name, result))
    return model, done

"""The one contract every graph transformation follows (in the spirit of onnx_ir's PassBase).

A pass is an object with three phases, run in order by :meth:`Pass.__call__`:

1. ``requires(model, earlier)``: the preconditions. Reads ``model`` (never changes it) and the
   typed reports of the passes that ran before it; raises :class:`LoopgraphError` to refuse, or
   returns what it worked out (e.g. a range plan), which is handed to ``apply``.
2. ``apply(model, checked)``: the transformation. Returns a :class:`PassResult` holding the new
   model and a typed report (a dataclass per pass). A pass never edits its input model in
   place, so a refused (or failed) pass leaves it untouched.
3. ``ensures(result)``: the postconditions of the new model. A failure is a bug in loopgraph,
   not a user error, so it raises ``RuntimeError`` and keeps its traceback.

A :class:`Pipeline` is data: a sequence of passes. It checks when it is built that every report
a pass needs is given by a pass before it, and when a pass refuses it says which pass failed
after which others (``pass wrap-in-loop (after find-blocks): ...``).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import onnx

from loopgraph.errors import LoopgraphError

R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class PassResult(Generic[R]):
    model: onnx.ModelProto
    changed: bool
    report: R


class Reports:
    """The typed reports of the passes run so far, in order; looked up by report type."""

    def __init__(self) -> None:
        self._done: list[tuple[str, Any]] = []

    def add(self, name: str, report: Any) -> None:
        self._done.append((name, report))

    def get(self, kind: type[R]) -> R:
        """The latest report of type ``kind`` (a pipeline guarantees there is one)."""
        for _, report in reversed(self._done):
            if isinstance(report, kind):
                return report
        raise ValueError(f"no pass before this one gave a {kind.__name__}")

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._done]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self._done)


class Pass(abc.ABC):
    """A named graph transformation; see the module docstring for the three phases."""

    name: ClassVar[str]
    #: report types this pass reads from earlier passes (checked when a pipeline is built)
    needs: ClassVar[tuple[type, ...]] = ()
    #: the type of the report this pass returns
    gives: ClassVar[type]

    def requires(self, model: onnx.ModelProto, earlier: Reports) -> Any:
        """Preconditions; raise :class:`LoopgraphError` to refuse. The return value goes to ``apply``."""
        return None

    @abc.abstractmethod
    def apply(self, model: onnx.ModelProto, checked: Any) -> PassResult:
        """The transformation: a new model (``model`` is not modified) and the typed report."""

    def ensures(self, result: PassResult) -> None:
        """Postconditions of the new model; raise ``RuntimeError`` (a bug) when one fails."""
        return None

    def __call__(self, model: onnx.ModelProto, earlier: Reports | None = None) -> PassResult:
        checked = self.requires(model, earlier if earlier is not None else Reports())
        result = self.apply(model, checked)
        self.ensures(result)
        return result


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Passes run in order, each on the previous one's model."""

    passes: Sequence[Pass]

    def __post_init__(self) -> None:
        given: set[type] = set()
        for p in self.passes:
            missing = [k.__name__ for k in p.needs if not any(issubclass(g, k) for g in given)]
            if missing:
                raise ValueError(f"pass {p.name} needs {', '.join(missing)}, which no pass before it gives")
            given.add(p.gives)

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, Reports]:
        """The last model and every pass's report; a user error is re-raised naming the failing pass."""
        done = Reports()
        for p in self.passes:
            try:
                result = p(model, done)
            except LoopgraphError as e:
                after = f" (after {', '.join(done.names)})" if done.names else ""
                raise LoopgraphError(f"pass {p.name}{after}: {e}") from None
            model = result.model
            done.add(p.name, result.report)
        return model, done

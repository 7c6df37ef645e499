"""Dataflow queries over an ONNX graph (read-only, by node index in graph order).

The loop body is chosen by dataflow, not by names (DESIGN §4): a node belongs to the body when
it feeds the range output and its *value* depends on the range input (or it reads a tensor
computed in the body). Dependence on the range input itself stops at ``Shape``/``Size``: a
tensor computed from the shape of the hidden state only (the causal mask when the range starts
at block 0) does not change across iterations, so it stays outside.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import onnx

from loopgraph.metadata import subgraphs

SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


class GraphIndex:
    """Producer/consumer maps of one (main) graph. Subgraph reads of outer names count as reads
    by the node that owns the subgraph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        self.reads = [_node_reads(node) for node in self.nodes]
        self._parents: list[list[int]] | None = None  # producer node indices per node, built on first use
        for i, node in enumerate(self.nodes):
            for t in node.output:
                if t:
                    self.producer[t] = i
            for t in self.reads[i]:
                self.consumers[t].append(i)
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        self.initializers = {t.name for t in graph.initializer}

    def value_dependents(self, sources: Iterable[str], within: set[int] | None = None) -> set[int]:
        """Nodes whose output values depend on any of ``sources`` (not through Shape/Size),
        optionally only walking through the nodes in ``within``."""
        seen: set[int] = set()
        stack = list(sources)
        visited_t: set[str] = set()
        while stack:
            t = stack.pop()
            if t in visited_t:
                continue
            visited_t.add(t)
            for i in self.consumers.get(t, ()):
                if i in seen or self.nodes[i].op_type in SHAPE_ONLY_OPS or (within is not None and i not in within):
                    continue
                seen.add(i)
                stack.extend(o for o in self.nodes[i].output if o)
        return seen

    def ancestors(self, targets: Iterable[str]) -> set[int]:
        """Nodes that any of ``targets`` depends on (including their producers)."""
        if self._parents is None:
            self._parents = [[self.producer[t] for t in reads if t in self.producer] for reads in self.reads]
        stack = [self.producer[t] for t in targets if t in self.producer]
        seen = set(stack)
        while stack:
            for j in self._parents[stack.pop()]:
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        return seen

    def dynamic_tensors(self) -> set[str]:
        """Tensors whose values depend on a graph input that is not an initializer."""
        runtime_inputs = self.graph_inputs - self.initializers
        out = set(runtime_inputs)
        for i in self.downstream(runtime_inputs):
            out.update(o for o in self.nodes[i].output if o)
        return out

    def downstream(self, sources: Iterable[str]) -> set[int]:
        """Nodes downstream of ``sources`` through any op (shape reads included)."""
        seen: set[int] = set()
        stack = list(sources)
        while stack:
            t = stack.pop()
            for i in self.consumers.get(t, ()):
                if i not in seen:
                    seen.add(i)
                    stack.extend(o for o in self.nodes[i].output if o)
        return seen

    def between(self, source: str, targets: Iterable[str]) -> set[int]:
        """The range body: nodes that feed any of ``targets`` and either depend on the value of
        ``source`` or read a tensor computed in the body (``Shape`` of an attention input is
        per-iteration wiring too). ``Shape(source)`` itself stays outside: it is the same in
        every iteration."""
        feeding = self.ancestors(targets)
        body = self.value_dependents([source], within=feeding)
        stack = list(body)
        while stack:
            for t in self.nodes[stack.pop()].output:
                for j in self.consumers.get(t, ()):
                    if j in feeding and j not in body:
                        body.add(j)
                        stack.append(j)
        return body


def _node_reads(node: onnx.NodeProto) -> list[str]:
    reads = [t for t in node.input if t]
    for g in subgraphs(node):
        reads.extend(_outer_reads(g))
    return reads


def _outer_reads(graph: onnx.GraphProto) -> list[str]:
    """Names a subgraph reads from the enclosing scope. (Scopes nest, so this walks one level at a
    time through :func:`~loopgraph.metadata.subgraphs` rather than over all graphs at once.)"""
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for n in graph.node:
        local.update(n.output)
    reads: list[str] = []
    for n in graph.node:
        reads.extend(t for t in _node_reads(n) if t and t not in local)
    return reads

"""One definition per regularizer (loopgraph/regularizers.py), followed by both implementations."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.passes import regularize
from loopgraph.regularizers import ALL, BY_NAME, regularizer
from loopgraph.spec import REGULARIZERS, LoopSpec


def test_both_implementations_cover_every_regularizer():
    from loopgraph.reference.looped import STEPS  # the PyTorch reference (needs torch)
    assert set(regularize._UPDATES) == set(BY_NAME), "every regularizer needs its graph form"
    assert set(STEPS) == set(BY_NAME), "every regularizer needs its PyTorch reference"


def test_the_spec_cli_and_view_read_the_table():
    from loopgraph.cli import build_parser
    from loopgraph.deploy.view import REG_FORMULAS
    assert REGULARIZERS == {r.name: r.param for r in ALL}
    assert list(REG_FORMULAS) == [r.name for r in ALL] and "\n" not in "".join(REG_FORMULAS.values())
    assert REG_FORMULAS["auto-align"] == "x_t = Σ w_i·y_i / Σ w_i\\nw_i = max(0, cos(y_i, r))"  # graphviz line break
    rewrite = next(a for a in build_parser()._subparsers._group_actions[0].choices["rewrite"]._actions if a.dest == "reg")
    assert list(rewrite.choices) == [r.name for r in ALL]
    for r in ALL:  # defaults come from the definition
        spec = LoopSpec(0, 1, reg=r.name)
        assert (getattr(spec, r.param) if r.param else None) == r.default


def test_carried_states_follow_the_definition():
    shape = ["batch", "seq", 8]
    for r in ALL:
        states = regularize.carried_states(r, shape)
        assert [s.name for s in states] == list(r.carries)
    assert [s.name for s in regularize.carried_states(BY_NAME["uniform"], shape, need_r=True)] == ["r"]  # noise control
    wsum = regularize.carried_states(BY_NAME["auto-align"], shape)[-1]
    assert (wsum.name, wsum.shape, wsum.init) == ("wsum", ["batch", "seq", 1], "x0_sum")


def test_unknown_name_is_a_user_error():
    with pytest.raises(LoopgraphError, match=r"unknown regularizer 'cubic'; choose one of naive, uniform, ema, anchor, auto-align, damped"):
        regularizer("cubic")
    with pytest.raises(LoopgraphError, match="unknown regularizer 'cubic'"):
        LoopSpec(0, 1, reg="cubic")


def test_the_table_imports_neither_torch_nor_onnx():
    import ast
    from pathlib import Path

    import loopgraph.regularizers as table
    tree = ast.parse(Path(table.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
               {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "dataclasses", "loopgraph.errors"}, imported
    code = "import sys, loopgraph.regularizers, loopgraph.spec; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"

import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.spec import LoopSpec, parse_range


@pytest.mark.parametrize("text, want", [("6:12", (6, 12)), ("6:", (6, None)), (":8", (None, 8)), ("-5:", (-5, None)),
                                        (" 1 : -1 ", (1, -1)), (":", (None, None))])
def test_parse_range(text, want):
    assert parse_range(text) == want


@pytest.mark.parametrize("text", ["6", "6-12", "a:b", "1:2:3", "", "1.5:3"])
def test_parse_range_malformed(text):
    with pytest.raises(LoopgraphError, match="not of the form S:E"):
        parse_range(text)


@pytest.mark.parametrize("start, end, want", [(10, 20, (10, 20)), (-5, None, (25, 30)), (None, 8, (0, 8)),
                                              (None, None, (0, 30)), (0, -1, (0, 29)), (29, 30, (29, 30))])
def test_resolve_python_slice_rules(start, end, want):
    s = LoopSpec(start, end).resolve(30)
    assert (s.start, s.end) == want


@pytest.mark.parametrize("start, end, msg", [(6, 6, "empty"), (8, 4, "empty"), (0, 31, "blocks 0..29"), (-31, None, "blocks 0..29"),
                                             (40, 50, "blocks 0..29")])
def test_resolve_refuses(start, end, msg):
    with pytest.raises(LoopgraphError, match=msg):
        LoopSpec(start, end).resolve(30, "module-path names")


def test_resolve_message_names_evidence_and_fix():
    with pytest.raises(LoopgraphError) as e:
        LoopSpec(6, 12).resolve(4, "module-path names")
    assert str(e.value) == "--range 6:12 but the model has blocks 0..3 (found by module-path names); try --range 0:4"


@pytest.mark.parametrize("kwargs, msg", [
    ({"iters": 0}, "out of range"), ({"iters": 65}, "out of range"), ({"iters": 2.5}, "integer"),
    ({"reg": "cubic"}, "unknown regularizer"), ({"reg": "ema", "alpha": 0.0}, r"outside \(0, 1\]"),
    ({"reg": "anchor", "alpha": 1.5}, r"outside \(0, 1\]"), ({"reg": "uniform", "alpha": 0.5}, "applies to ema and anchor"),
    ({"reg": "damped", "k": 0.5}, ">= 1"), ({"reg": "ema", "k": 2}, "applies to damped"), ({"kv": "middle"}, "unknown --kv"),
])
def test_bad_specs(kwargs, msg):
    with pytest.raises(LoopgraphError, match=msg):
        LoopSpec(0, 2, **kwargs)


def test_defaults_and_weight():
    assert LoopSpec(0, 2, reg="ema").alpha == 0.5
    assert LoopSpec(0, 2, reg="damped").weight == 0.5
    assert LoopSpec(0, 2, reg="damped", k=4).weight == 0.25
    assert LoopSpec(0, 2, reg="uniform").weight is None


def test_slug_and_json_round_trip():
    s = LoopSpec(10, 20, iters=3, reg="anchor", alpha=0.25, dynamic=True)
    assert s.slug() == "loop10-20x3-anchor-a0.25-dyn"
    assert LoopSpec.from_json(s.to_json()) == s

"""Does an ONNX graph meet TensorRT's ONNX ``Loop`` constraints? (``loopgraph check --target tensorrt``)

The rules, from TensorRT's ONNX operator matrix (10.x: "Loop: scan output length cannot be
dynamic; the shape of loop-carried dependencies must be the same across all loop iterations"),
its Loop importer (M becomes a counted trip limit; a given ``cond`` becomes a while limit; scan
outputs take M as their length) and DESIGN §5 (always pass M, leave cond empty):

Handled, per Loop (nested ones included):
- ``M`` omitted -> error (no counted loop; TensorRT defines no iteration counter).
- ``cond`` given and not a constant, or the body's ``cond_out`` is not ``Identity(cond_in)``
  -> error (a data-dependent while loop); a constant ``cond`` -> warning (leave it empty).
- the standard layout's rotating KV-cache slots (``--kv exact`` in a Loop) -> error: their
  length changes across iterations (use ``--unroll`` or ``--kv stacked``).
  loopgraph's own halting condition (``--halt``, ``loopgraph/body/cond_out``) -> warning that
  says what it means there (a while loop; the counted forms are ``--unroll`` or a cached file).
- a carried value whose declared body input and output shapes differ -> error; shapes that
  are undeclared or not provably equal (different symbols) -> warning.
- a scan output while M is not a build-time constant (a graph input, as with ``--dynamic``)
  -> error (dynamic scan-output length); carried values alone are fine with a dynamic M.
For the whole model: data types TensorRT does not support (string, complex, int16, unsigned
16/32/64 -> error; float64 -> warning, cast down; int64 -> info), ORT contrib ops
(``com.microsoft``) and operators TensorRT lists as unsupported -> error, other custom domains
-> warning (need a plugin), an opset outside 9..24 -> warning.

Not checked: per-operator type restrictions, and whether the engine builds (that needs a GPU:
``benchmarks/trt_engine_check.py``).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable

import onnx

from loopgraph.deploy.graphs import LoopInfo, constant_value, dtype_name, format_shape, loops, shape_of, value_infos
from loopgraph.errors import LoopgraphError
from loopgraph.metadata import all_graphs
from loopgraph.naming import lg_name

#: body inputs of the standard layout's rotating cache slots (:func:`loopgraph.passes.kv.carry_kv`)
KV_SLOT_PREFIX = lg_name("body", "kv") + "/"

ERROR, WARNING, INFO = "error", "warning", "info"

_T = onnx.TensorProto
_UNSUPPORTED_DTYPES = {_T.STRING, _T.COMPLEX64, _T.COMPLEX128, _T.INT16, _T.UINT16, _T.UINT32, _T.UINT64}
#: operators marked "N" in TensorRT 10.x's ONNX operator support matrix
UNSUPPORTED_OPS = frozenset("""AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im
CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger
MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase
SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer
StringSplit TfIdfVectorizer Unique""".split())
OPSET_RANGE = (9, 24)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One observation: ``severity`` is ``error`` (TensorRT refuses it: blocking), ``warning``
    (may fail or lose something) or ``info``; ``where`` names the node or tensor."""
    severity: str
    where: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.problem}" + (f"; {self.fix}" if self.fix else "")

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def check_tensorrt(model: onnx.ModelProto) -> list[Finding]:
    """All findings for ``model``, errors first. Reads declared shapes only; never loads weights."""
    findings: list[Finding] = []
    try:
        found = loops(model)
    except LoopgraphError as e:  # a malformed Loop: TensorRT's importer fails on it too
        found, findings = [], [Finding(ERROR, "model", str(e), "")]
    for loop in found:
        findings += _check_loop(loop)
    findings += _check_dtypes(model)
    findings += _check_ops(model)
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    return sorted(findings, key=lambda f: order[f.severity])


def is_ready(findings: Iterable[Finding]) -> bool:
    return not any(f.severity == ERROR for f in findings)


def summary(findings: list[Finding]) -> str:
    """One line, e.g. ``ready (1 warning)`` or ``not ready: 2 errors (first: ...)``."""
    counts = {s: sum(f.severity == s for f in findings) for s in (ERROR, WARNING)}
    extra = f"{counts[WARNING]} warning{'s' * (counts[WARNING] != 1)}"
    if not counts[ERROR]:
        return f"ready ({extra})" if counts[WARNING] else "ready"
    first = next(f for f in findings if f.severity == ERROR)
    return f"not ready: {counts[ERROR]} error{'s' * (counts[ERROR] != 1)}, {extra} (first: {first.where}: {first.problem})"


def readiness(model: onnx.ModelProto) -> dict:
    """The short form ``inspect`` shows: ready, counts, the summary line."""
    findings = check_tensorrt(model)
    return {"ready": is_ready(findings), "errors": sum(f.severity == ERROR for f in findings),
            "warnings": sum(f.severity == WARNING for f in findings), "summary": summary(findings)}


def format_findings(findings: list[Finding], label: str) -> str:
    lines = [f"TensorRT readiness of {label}: {summary(findings)}"]
    lines += [f"  {f}" for f in findings]
    return "\n".join(lines)


# --- Loop rules ---------------------------------------------------------------------------------

def _check_loop(loop: LoopInfo) -> list[Finding]:
    out: list[Finding] = []
    where = loop.name
    if not loop.trip_count:
        out.append(Finding(ERROR, where, "the Loop has no trip count M, so TensorRT builds no counted loop and "
                           "defines no iteration counter", "pass M (loopgraph rewrite always does: re-run it)"))
    out += _check_cond(loop)
    out += _check_carried(loop)
    if loop.scan_outputs and loop.trip_value is None:
        why = "M is omitted" if not loop.trip_count else f"M ({loop.trip_count}) is not a build-time constant"
        names = ", ".join(final or body.name for body, final in loop.scan_outputs)
        out.append(Finding(ERROR, where, f"scan output(s) {names} have a dynamic length because {why}; TensorRT needs "
                           "a static scan-output length", "bake N into the file (rewrite without --dynamic) or drop the "
                           "scan outputs (no --trace, no per-iteration KV outputs)"))
    return out


def _check_cond(loop: LoopInfo) -> list[Finding]:
    where = loop.name
    if not loop.cond:
        return []  # cond omitted: the body's cond_out is ignored (ONNX) and no while limit is added (TensorRT)
    body = loop.body
    cond_in, cond_out = body.input[1].name, body.output[0].name
    producer = next((n for n in body.node if cond_out in n.output), None)
    passthrough = cond_out == cond_in or (producer is not None and producer.op_type == "Identity" and list(producer.input) == [cond_in])
    if not passthrough and cond_out == "loopgraph/body/cond_out":  # per-token halting (docs/halting.md)
        return [Finding(WARNING, where, "per-token halting (--halt) ends this Loop when no real token is still moving: "
                        "a data-dependent condition, which TensorRT builds as a while loop (a while trip limit besides M, "
                        "the condition read back every iteration) instead of a counted one; the work skipping inside it (NonZero, "
                        "a Gather and Slice of the moving rows and positions) gives the body data-dependent shapes; scan "
                        "outputs (--trace) then have a data-dependent length, which TensorRT refuses",
                        "for a counted loop rewrite with --unroll (the same frozen-token masks, every copy computed, "
                        "no early stop), or drop --halt")]
    if not passthrough:
        return [Finding(ERROR, where, f"the body computes its condition ({cond_out}), a data-dependent while loop "
                        "that TensorRT runs with a while trip limit", "leave cond empty, give M and return Identity(cond_in)")]
    if constant_value(loop.cond, list(loop.scopes)) is None:
        return [Finding(ERROR, where, f"cond ({loop.cond}) is a run-time value, so the loop is a while loop",
                        "leave cond empty and give M")]
    return [Finding(WARNING, where, f"cond ({loop.cond}) is a constant: TensorRT adds a while trip limit besides M",
                    "leave cond empty (a counted loop avoids TensorRT's while-loop extra-iteration issue)")]


def _check_carried(loop: LoopInfo) -> list[Finding]:
    out: list[Finding] = []
    declared = value_infos(loop.body)
    slots = [c for c in loop.carried if c.body_in.name.startswith(KV_SLOT_PREFIX)]
    if slots:  # the standard layout's rotating caches: a slot holds a past, later a present (past + new tokens)
        out.append(Finding(ERROR, slots[0].body_in.name, f"{len(slots)} carried KV-cache slots (--kv exact, standard layout) change "
                           "length across iterations (past -> past + new tokens)", "rewrite with --unroll (each copy reads and "
                           "writes its own cache pair, no Loop) or --kv stacked (per-iteration caches as scan outputs)"))
    for c in loop.carried:
        if any(c is slot for slot in slots):
            continue
        name = c.body_out.name
        a = shape_of(declared.get(c.body_in.name, c.body_in))
        b = shape_of(declared.get(name, c.body_out))
        if a is None or b is None:
            missing = c.body_in.name if a is None else name
            out.append(Finding(WARNING, name, f"carried value has no declared shape ({missing}), so it cannot be shown to keep "
                               "one shape across iterations", "declare the body input and output shapes"))
            continue
        verdict = _compare(a, b)
        if verdict == "differ":
            out.append(Finding(ERROR, name, f"carried value changes shape across iterations: body input {c.body_in.name} "
                               f"{format_shape(a)}, body output {format_shape(b)}", "carry a tensor of one fixed shape "
                               "(pad it, or move the growing part out of the Loop)"))
        elif verdict == "unknown":
            out.append(Finding(WARNING, name, f"carried value may change shape: body input {format_shape(a)}, body output "
                               f"{format_shape(b)} are not provably equal", "declare both with the same dims"))
    return out


def _compare(a: list, b: list) -> str:
    """``same``, ``differ`` (provably) or ``unknown``."""
    if len(a) != len(b):
        return "differ"
    verdict = "same"
    for x, y in zip(a, b):
        if isinstance(x, int) and isinstance(y, int):
            if x != y:
                return "differ"
        elif x is None or y is None or x != y:
            verdict = "unknown"
    return verdict


# --- whole-model rules ----------------------------------------------------------------------------

def _typed_names(model: onnx.ModelProto) -> dict[int, list[str]]:
    """Names of every tensor with a known dtype, by dtype."""
    by_type: dict[int, list[str]] = defaultdict(list)
    seen: set[str] = set()

    def add(name: str, elem_type: int) -> None:
        if elem_type and name not in seen:
            seen.add(name)
            by_type[elem_type].append(name)

    for g in all_graphs(model.graph):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            add(v.name, v.type.tensor_type.elem_type)
        for t in g.initializer:
            add(t.name, t.data_type)
        for node in g.node:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR and node.output:
                    add(node.output[0], a.t.data_type)
                if a.name == "to" and node.op_type == "Cast" and node.output:
                    add(node.output[0], a.i)
    return by_type


def _some(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _check_dtypes(model: onnx.ModelProto) -> list[Finding]:
    out = []
    for elem_type, names in sorted(_typed_names(model).items()):
        dt, n = dtype_name(elem_type), len(names)
        if elem_type in _UNSUPPORTED_DTYPES:
            out.append(Finding(ERROR, names[0], f"{n} tensor(s) of type {dt} ({_some(names)}), which TensorRT does not support",
                               "cast to a supported type (float32/16, bfloat16, int32, int64, int8, bool) before export"))
        elif elem_type == _T.DOUBLE:
            out.append(Finding(WARNING, names[0], f"{n} tensor(s) of type float64 ({_some(names)}); TensorRT casts them down "
                               "to float32, clamping to +-FLT_MAX", "export in float32"))
        elif elem_type == _T.INT64:
            out.append(Finding(INFO, names[0], f"{n} int64 tensor(s) ({_some(names)}); TensorRT 10 runs int64, TensorRT 8.x "
                               "casts them to int32 with parser warnings", ""))
    return out


def _check_ops(model: onnx.ModelProto) -> list[Finding]:
    out = []
    custom: dict[tuple[str, str], list[str]] = defaultdict(list)
    unsupported: dict[str, list[str]] = defaultdict(list)
    for g in all_graphs(model.graph):
        for node in g.node:
            label = node.name or (node.output[0] if node.output else node.op_type)
            if node.domain not in ("", "ai.onnx"):
                custom[(node.domain, node.op_type)].append(label)
            elif node.op_type in UNSUPPORTED_OPS:
                unsupported[node.op_type].append(label)
    for (domain, op), names in sorted(custom.items()):
        if domain.startswith("com.microsoft"):
            out.append(Finding(ERROR, names[0], f"ONNX Runtime contrib op {op} ({domain}, {len(names)} node(s)) is not part of "
                               "TensorRT's ONNX parser", "rewrite the unoptimized export (no optimum-cli --optimize, no ORT "
                               "offline optimizer)"))
        else:
            out.append(Finding(WARNING, names[0], f"custom op {op} (domain {domain}, {len(names)} node(s)) needs a TensorRT plugin",
                               "provide a plugin or re-export without the custom op"))
    for op, names in sorted(unsupported.items()):
        out.append(Finding(ERROR, names[0], f"operator {op} ({len(names)} node(s)) is not supported by TensorRT's ONNX parser",
                           "re-export without it"))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        out.append(Finding(WARNING, "model", f"opset {opset} is outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]}, the range TensorRT "
                           "10.x's parser supports", "re-export with --opset 18"))
    return out

"""Mutants of a tiny export, and a driver that runs CLI commands on them in one process.

:func:`mutants` turns a model (serialized bytes) into damaged variants with a seeded generator:
bit flips, random bytes, truncation, deleted nodes, renamed tensors (also to invalid UTF-8),
changed input types and shapes, dropped attributes and initializers, attributes of no or an
empty type, cycles, bad opset and IR versions. ``python -m tests.fuzzing CASES.json RESULTS.jsonl``
runs each case through ``loopgraph.cli.main`` in-process (fast), with a per-case alarm, and
appends one JSON line per case as soon as it finishes (so a hang is attributable to its case).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

MARK = "lgfuzzmark"  # a name that is replaced by invalid UTF-8 in the serialized bytes
BAD_UTF8 = b"\xff\xfe" + b"x" * (len(MARK) - 2)


def _bytes_mutant(fn: Callable[[np.random.Generator, bytearray], bytes]) -> Callable:
    def mutate(rng: np.random.Generator, model: onnx.ModelProto) -> bytes:
        return fn(rng, bytearray(model.SerializeToString()))
    mutate.__name__ = fn.__name__
    return mutate


@_bytes_mutant
def bit_flips(rng, data: bytearray) -> bytes:
    for pos in rng.integers(0, len(data), int(rng.integers(1, 9))):
        data[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(data)


@_bytes_mutant
def random_span(rng, data: bytearray) -> bytes:
    # the graph part (node list) sits before the weights' raw data in a serialized export's header
    start = int(rng.integers(0, min(len(data), 20_000)))
    n = int(rng.integers(1, 64))
    data[start:start + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(data)


@_bytes_mutant
def truncate(rng, data: bytearray) -> bytes:
    return bytes(data[: int(rng.integers(1, len(data)))])


def _model_mutant(fn: Callable[[np.random.Generator, onnx.ModelProto], None]) -> Callable:
    def mutate(rng: np.random.Generator, model: onnx.ModelProto) -> bytes:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        fn(rng, m)
        return m.SerializeToString().replace(MARK.encode(), BAD_UTF8)
    mutate.__name__ = fn.__name__
    return mutate


def _pick(rng, seq):
    return seq[int(rng.integers(0, len(seq)))]


@_model_mutant
def delete_nodes(rng, m):
    for _ in range(int(rng.integers(1, 4))):
        del m.graph.node[int(rng.integers(0, len(m.graph.node)))]


@_model_mutant
def rename_tensor(rng, m):
    node = _pick(rng, m.graph.node)
    where = node.output if rng.random() < 0.5 or not node.input else node.input
    i = int(rng.integers(0, len(where)))
    where[i] = MARK if rng.random() < 0.4 else f"renamed_{int(rng.integers(0, 1 << 30))}"


@_model_mutant
def rename_node(rng, m):
    _pick(rng, m.graph.node).name = MARK


@_model_mutant
def input_type(rng, m):
    _pick(rng, m.graph.input).type.tensor_type.elem_type = int(_pick(rng, [0, 1, 2, 6, 9, 10, 11, 16, 17, 99]))


@_model_mutant
def input_shape(rng, m):
    shape = _pick(rng, m.graph.input).type.tensor_type.shape
    choice = rng.random()
    if choice < 0.3:
        shape.dim.add().dim_value = int(rng.integers(1, 5))
    elif choice < 0.6 and len(shape.dim):
        del shape.dim[int(rng.integers(0, len(shape.dim)))]
    else:
        for d in shape.dim:
            d.dim_value = int(_pick(rng, [0, 1, 3, 7]))


@_model_mutant
def drop_attribute(rng, m):
    nodes = [n for n in m.graph.node if n.attribute]
    node = _pick(rng, nodes)
    del node.attribute[int(rng.integers(0, len(node.attribute)))]


@_model_mutant
def undefined_attribute(rng, m):
    nodes = [n for n in m.graph.node if n.attribute]
    attr = _pick(rng, _pick(rng, nodes).attribute)
    if rng.random() < 0.5:
        attr.type = onnx.AttributeProto.UNDEFINED  # "Unsupported type: 0"
    else:  # a list attribute with no values: its type cannot be inferred
        for f in ("ints", "floats", "strings"):
            attr.ClearField(f)
        attr.ClearField("t")
        attr.type = int(_pick(rng, [onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS, onnx.AttributeProto.UNDEFINED]))


@_model_mutant
def drop_initializer(rng, m):
    del m.graph.initializer[int(rng.integers(0, len(m.graph.initializer)))]


@_model_mutant
def initializer_dims(rng, m):
    t = _pick(rng, m.graph.initializer)
    if t.dims:
        t.dims[int(rng.integers(0, len(t.dims)))] += int(_pick(rng, [-1, 1, 5]))


@_model_mutant
def cycle(rng, m):
    i = int(rng.integers(1, len(m.graph.node)))
    j = int(rng.integers(0, i))
    if m.graph.node[j].input and m.graph.node[i].output:
        m.graph.node[j].input[0] = m.graph.node[i].output[0]


@_model_mutant
def opset(rng, m):
    m.opset_import[0].version = int(_pick(rng, [0, 1, 7, 12, 99, 1000, -1]))


@_model_mutant
def ir_version(rng, m):
    m.ir_version = int(_pick(rng, [0, 1, 3, 99, -1]))


@_model_mutant
def metadata(rng, m):
    m.metadata_props.add(key=_pick(rng, ["loopgraph.spec", "loopgraph.source", MARK]),
                         value=_pick(rng, ["{", "[]", '{"start": "x"}', "../../../../etc/passwd", MARK]))


MUTATORS: tuple[Callable, ...] = (bit_flips, random_span, truncate, delete_nodes, rename_tensor, rename_node, input_type,
                                  input_shape, drop_attribute, undefined_attribute, drop_initializer, initializer_dims,
                                  cycle, opset, ir_version, metadata)


def mutants(model: onnx.ModelProto, count: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``count`` mutants, the mutators taken in turn (so every kind is covered), each with its own
    draws from one seeded generator. Yields (name, serialized bytes)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        fn = MUTATORS[i % len(MUTATORS)]
        yield f"{i:03d}-{fn.__name__}", fn(rng, model)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


# --- the driver ------------------------------------------------------------------------------

class _Alarm(BaseException):
    """Raised by the per-case alarm; a BaseException so no ``except Exception`` swallows it."""


def _on_alarm(signum, frame):
    raise _Alarm()


def run_case(argv: list[str], timeout: int) -> dict:
    """One CLI run in-process: exit code, stdout, stderr, and the traceback of anything that escaped."""
    from loopgraph.cli import main
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    for h in list(root.handlers):  # main() calls basicConfig: bind its handler to this case's stderr
        root.removeHandler(h)
    result = {"argv": argv, "rc": None, "stderr": "", "stdout": "", "escaped": None}
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result["rc"] = main(argv)
    except SystemExit as e:
        result["rc"] = e.code if isinstance(e.code, int) else 2
    except _Alarm:
        result["escaped"] = f"timeout after {timeout} s"
    except BaseException as e:  # noqa: BLE001 - a traceback is exactly what the fuzz test looks for
        result["escaped"] = "".join(traceback.format_exception(e))[-3000:]
    finally:
        signal.alarm(0)
    result["stdout"], result["stderr"] = out.getvalue()[-2000:], err.getvalue()[-3000:]
    return result


def check_output(path: Path) -> str | None:
    """None when ``path`` passes onnx.checker (full) and loads in ONNX Runtime; else why not."""
    import onnxruntime as ort
    try:
        onnx.checker.check_model(str(path), full_check=True)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - reported, the test fails on it
        return f"{type(e).__name__}: {e}"[:500]
    return None


def main(cases_file: str, results_file: str) -> None:
    cases = json.loads(Path(cases_file).read_text())
    with open(results_file, "a", encoding="utf-8") as f:
        for case in cases:
            hashes = {p: sha256(Path(p)) for p in case["inputs"]}
            r = run_case(case["argv"], case.get("timeout", 60))
            r["id"] = case["id"]
            r["changed_inputs"] = [p for p, h in hashes.items() if sha256(Path(p)) != h]
            out = case.get("output")
            r["output_problem"] = check_output(Path(out)) if out and r["rc"] == 0 and Path(out).is_file() else None
            f.write(json.dumps(r) + "\n")
            f.flush()


if __name__ == "__main__":
    main(*sys.argv[1:])

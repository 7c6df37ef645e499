"""The benchmark tasks, rendered exactly as lm-evaluation-harness does zero-shot.

Each task turns the records of its JSONL file(s) into :class:`Item` objects: the
``(context, continuation)`` string pairs lm-eval would request (its ``Instance.args``), the gold
index and the option strings that ``acc_norm`` divides by. The rules (prompt formats, the
``" " + option`` continuations, Winogrande's one-context-per-option form, HellaSwag's
preprocessing, LAMBADA's last-word target, WikiText's detokenizer) follow lm-eval at commit
4e7e0d47 as summarised in ``shared/data/benchmarks/CONVENTIONS.md``; the golden tests check the
rendered first item of every task.

Data layout (the ``--data-dir`` folder): ``<folder>/<file>`` as listed in ``Task.files``, one
JSON object per line (PIQA's gold labels in a line-aligned ``valid-labels.lst``). A missing
file, a line that is not a JSON object or a record without the fields a task needs is refused
with an error naming the file and line.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loopgraph.errors import LoopgraphError

MULTIPLE_CHOICE = "multiple_choice"
LOGLIKELIHOOD = "loglikelihood"
ROLLING = "loglikelihood_rolling"
DELIMITER = " "  # lm-eval's default target_delimiter, put in front of every option


@dataclasses.dataclass(frozen=True)
class Item:
    """One scored record. ``requests`` are lm-eval's ``(context, continuation)`` pairs; for a
    rolling (perplexity) task there is one pair ``("", text)`` and ``words``/``bytes`` count
    the original record's text."""
    index: int  # 0-based line number in the data file
    requests: tuple[tuple[str, str], ...]
    gold: int | None = None
    choices: tuple[str, ...] = ()  # option strings without the delimiter (acc_norm lengths)
    words: int = 0
    bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    files: tuple[str, ...]  # relative to the data folder; the first holds the records
    split: str  # the split scored, as lm-eval names it ("validation" where lm-eval uses test: said in `note`)
    output_type: str
    metrics: tuple[str, ...]
    render: Callable[[dict[str, Any]], Item]  # record -> Item with index 0
    licence: str
    note: str = ""


class RecordError(ValueError):
    """A record lacks what its task needs (turned into a one-line error with file and line)."""


def _field(doc: dict[str, Any], key: str) -> Any:
    if key not in doc:
        raise RecordError(f"no field {key!r} (fields: {', '.join(doc) or 'none'})")
    return doc[key]


def _text(doc: dict[str, Any], key: str) -> str:
    value = _field(doc, key)
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} is {type(value).__name__}, expected a string")
    return value


def _mc(context: str, choices: list[str], gold: int) -> Item:
    if not 0 <= gold < len(choices):
        raise RecordError(f"gold index {gold} is outside the {len(choices)} options")
    return Item(0, tuple((context, DELIMITER + c) for c in choices), gold, tuple(choices))


def _lettered(doc: dict[str, Any], strip: bool = False) -> int:
    """ARC / OpenBookQA: the position of ``answerKey`` (left-stripped for OpenBookQA) among ``choices.label``."""
    choices = _field(doc, "choices")
    labels = choices.get("label") if isinstance(choices, dict) else None
    if not isinstance(labels, list):
        raise RecordError("field 'choices' has no 'label' list")
    answer = _text(doc, "answerKey")
    answer = answer.lstrip() if strip else answer
    if answer not in labels:
        raise RecordError(f"answerKey {answer!r} is not one of the labels {labels}")
    return labels.index(answer)


def _options(doc: dict[str, Any]) -> list[str]:
    choices = _field(doc, "choices")
    texts = choices.get("text") if isinstance(choices, dict) else None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise RecordError("field 'choices' has no 'text' list of strings")
    return texts


def render_arc(doc: dict[str, Any]) -> Item:
    return _mc(f"Question: {_text(doc, 'question')}\nAnswer:", _options(doc), _lettered(doc))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: strip, ``" [title]"`` -> ``". "``, drop ``[...]`` tags, ``"  "`` -> ``" "``."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def render_hellaswag(doc: dict[str, Any]) -> Item:
    ctx = _text(doc, "ctx_a") + " " + _text(doc, "ctx_b").capitalize()
    query = hellaswag_preprocess(_text(doc, "activity_label") + ": " + ctx)
    endings = _field(doc, "endings")
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise RecordError("field 'endings' is not a list of strings")
    label = _field(doc, "label")
    try:
        gold = int(label)
    except (TypeError, ValueError):
        raise RecordError(f"field 'label' is {label!r}, expected an integer") from None
    return _mc(query, [hellaswag_preprocess(e) for e in endings], gold)


def render_piqa(doc: dict[str, Any]) -> Item:
    """``doc["label"]`` comes from the line-aligned ``valid-labels.lst`` (see :func:`load_items`)."""
    return _mc(f"Question: {_text(doc, 'goal')}\nAnswer:", [_text(doc, "sol1"), _text(doc, "sol2")], _field(doc, "label"))


def render_winogrande(doc: dict[str, Any]) -> Item:
    """lm-eval's "multiple input" form: one context per option, one shared continuation."""
    sentence = _text(doc, "sentence")
    if "_" not in sentence:
        raise RecordError("field 'sentence' has no '_' blank")
    i = sentence.index("_")
    options = [_text(doc, "option1"), _text(doc, "option2")]
    answer = _field(doc, "answer")
    if answer not in ("1", "2"):
        raise RecordError(f"field 'answer' is {answer!r}, expected \"1\" or \"2\"")
    continuation = DELIMITER + sentence[i + 1:].strip()
    return Item(0, tuple((sentence[:i] + o, continuation) for o in options), int(answer) - 1, tuple(options))


def render_boolq(doc: dict[str, Any]) -> Item:
    answer = _field(doc, "answer")
    if not isinstance(answer, bool):
        raise RecordError(f"field 'answer' is {answer!r}, expected true or false")
    context = f"{_text(doc, 'passage')}\nQuestion: {_text(doc, 'question')}?\nAnswer:"
    return _mc(context, ["no", "yes"], int(answer))


def render_openbookqa(doc: dict[str, Any]) -> Item:
    return _mc(_text(doc, "question_stem"), _options(doc), _lettered(doc, strip=True))


def render_sciq(doc: dict[str, Any]) -> Item:
    context = f"{_text(doc, 'support').lstrip()}\nQuestion: {_text(doc, 'question')}\nAnswer:"
    options = [_text(doc, k) for k in ("distractor1", "distractor2", "distractor3", "correct_answer")]
    return _mc(context, options, 3)


def render_lambada(doc: dict[str, Any]) -> Item:
    words = _text(doc, "text").split(" ")
    if len(words) < 2:
        raise RecordError("field 'text' has no space, so there is no last word to predict")
    return Item(0, ((" ".join(words[:-1]), " " + words[-1]),))


def wikitext_detokenizer(page: str) -> str:
    """lm-eval's ``wikitext_detokenizer``: undo WikiText's tokenisation (same replacements, same order)."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"), ("\n ", "\n"),
                 (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(a, b)
    return s


def render_wikitext(doc: dict[str, Any]) -> Item:
    """Scored text: the detokenised page; words and bytes: counted on the original page (as lm-eval does)."""
    page = _text(doc, "page")
    return Item(0, (("", wikitext_detokenizer(page)),), words=len(re.split(r"\s+", page)), bytes=len(page.encode("utf-8")))


_ACC_NORM = ("acc", "acc_norm")
_CC_BY_SA_4 = "CC BY-SA 4.0"
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("arc_easy", ("arc_easy/arc_easy_test.jsonl",), "test", MULTIPLE_CHOICE, _ACC_NORM, render_arc, _CC_BY_SA_4),
    Task("arc_challenge", ("arc_challenge/arc_challenge_test.jsonl",), "test", MULTIPLE_CHOICE, _ACC_NORM, render_arc, _CC_BY_SA_4),
    Task("hellaswag", ("hellaswag/hellaswag_val.jsonl",), "validation", MULTIPLE_CHOICE, _ACC_NORM, render_hellaswag, "MIT"),
    Task("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation", MULTIPLE_CHOICE, _ACC_NORM, render_piqa, "AFL-3.0"),
    Task("winogrande", ("winogrande/winogrande_xl_dev.jsonl",), "validation", MULTIPLE_CHOICE, ("acc",), render_winogrande, "CC-BY"),
    Task("boolq", ("boolq/boolq_dev.jsonl",), "validation", MULTIPLE_CHOICE, ("acc",), render_boolq, "CC BY-SA 3.0"),
    Task("openbookqa", ("openbookqa/openbookqa_test.jsonl",), "test", MULTIPLE_CHOICE, _ACC_NORM, render_openbookqa,
         "unknown (AI2 research data; repository Apache-2.0)"),
    Task("sciq", ("sciq/sciq_dev.jsonl",), "validation", MULTIPLE_CHOICE, _ACC_NORM, render_sciq, "CC BY-NC 3.0 (non-commercial)",
         note="lm-eval scores the test split, which is not available offline: numbers are on validation"),
    Task("lambada_openai", ("lambada/lambada_test.jsonl",), "test", LOGLIKELIHOOD, ("acc", "perplexity"), render_lambada,
         "CC BY 4.0"),
    Task("wikitext", ("wikitext2/wikitext2_raw_test_pages.jsonl",), "test", ROLLING,
         ("word_perplexity", "byte_perplexity", "bits_per_byte"), render_wikitext, "CC BY-SA 3.0 / GFDL"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LoopgraphError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def parse_tasks(text: str) -> list[Task]:
    """``"arc_easy,winogrande"`` -> tasks, in the order given, duplicates dropped."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        raise LoopgraphError(f"--tasks is empty; give a comma-separated list from {', '.join(TASKS)}")
    return [get_task(n) for n in dict.fromkeys(names)]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; blank lines are refused like any other bad line."""
    records = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise LoopgraphError(f"{path} line {line}: not valid UTF-8 (byte {e.object[e.start]:#04x}); "
                             "copy the file again from the data release") from None
    for number, line in enumerate(io.StringIO(text, newline=None), 1):  # the lines open() would give
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoopgraphError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); "
                                 "fix the line or copy the file again from the data release") from None
        if not isinstance(doc, dict):
            raise LoopgraphError(f"{path} line {number}: a JSON {type(doc).__name__}, expected an object; "
                                 "fix the line or copy the file again from the data release")
        records.append(doc)
    return records


def _piqa_labels(path: Path, n: int) -> list[int]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise LoopgraphError(f"{path}: not valid UTF-8; copy the file again from the data release") from None
    if len(lines) != n:
        raise LoopgraphError(f"{path} has {len(lines)} labels for {n} records in valid.jsonl; the two files must be line-aligned")
    for number, line in enumerate(lines, 1):
        if line.strip() not in ("0", "1"):
            raise LoopgraphError(f"{path} line {number}: label {line!r}, expected 0 or 1; copy the file again from the data release")
    return [int(x) for x in lines]


def task_files(task: Task, data_dir: Path) -> list[Path]:
    """The task's files in ``data_dir``, or a one-line error naming the missing one."""
    if not data_dir.is_dir():
        raise LoopgraphError(f"data folder {data_dir} does not exist; pass --data-dir with the benchmarks folder "
                             "(layout in docs/eval.md, section Data) or drop --data-dir to use the shipped samples")
    paths = [data_dir / f for f in task.files]
    for p in paths:
        if not p.is_file():
            hint = (" (SciQ is not shipped with loopgraph: its licence is non-commercial)"
                    if task.name == "sciq" else "")
            raise LoopgraphError(f"{task.name}: {p} is missing{hint}; pass --data-dir with a folder that has "
                                 f"{task.files[0]} (layout in docs/eval.md, section Data)")
    return paths


def load_items(task: Task, data_dir: Path) -> list[Item]:
    """All items of ``task`` from ``data_dir``, in file order (``Item.index`` = line number - 1)."""
    paths = task_files(task, data_dir)
    docs = read_jsonl(paths[0])
    if task.name == "piqa":
        docs = [{**d, "label": y} for d, y in zip(docs, _piqa_labels(paths[1], len(docs)))]
    items = []
    for i, doc in enumerate(docs):
        try:
            item = task.render(doc)
        except RecordError as e:
            raise LoopgraphError(f"{paths[0]} line {i + 1}: {e}; this is not a {task.name} record "
                                 "(fix the line or copy the file again from the data release)") from None
        items.append(dataclasses.replace(item, index=i))
    return items

"""Rendering of benchmark records into lm-eval requests: golden first items, preprocessing, bad data."""

import json
from pathlib import Path

import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.eval.runner import SAMPLES_DIR, select
from loopgraph.eval.tasks import TASKS, get_task, hellaswag_preprocess, load_items, parse_tasks, wikitext_detokenizer
from tests.conftest import DATA_DIR

needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not at {DATA_DIR} (set LOOPGRAPH_DATA)")

# The rendered first items, as shared/data/benchmarks/CONVENTIONS.md lists them (exact strings).
ARC_EASY_CTX = "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
GOLDEN = {
    "arc_easy": (ARC_EASY_CTX, [" Sunlight is the source of energy for nearly all ecosystems.",
                                " Most ecosystems are found on land instead of in water.",
                                " Carbon dioxide is more available than other gases.",
                                " The producers in all ecosystems are plants."], 0),
    "arc_challenge": ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely "
                      "effect of this increase in rotation?\nAnswer:",
                      [" Planetary density will decrease.", " Planetary years will become longer.", " Planetary days will become shorter.",
                       " Planetary gravity will become stronger."], 2),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He",
                  [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.", " is holding a rubik's cube.",
                   " starts pulling up roofing on a roof."], 3),
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
             [" Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will also need to "
              "supply it with a water bottle and a food dish.",
              " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you will also need to "
              "supply it with a water bottle and a food dish."], 0),
    "openbookqa": ("A person wants to start saving money so that they can afford a nice vacation at the end of the year. After looking "
                   "over their budget and expenses, they decide the best way to save money is to",
                   [" make more phone calls", " quit eating lunch out", " buy less with monopoly money", " have lunch with friends"], 1),
    "sciq": ("\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:", [" Linnaeus", " shaw", " Scopes", " darwin"], 3),
}


@needs_data
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_first_item_shared_context(name):
    context, continuations, gold = GOLDEN[name]
    item = load_items(TASKS[name], DATA_DIR)[0]
    assert item.index == 0
    assert [c for c, _ in item.requests] == [context] * len(continuations)
    assert [x for _, x in item.requests] == continuations
    assert item.gold == gold
    assert list(item.choices) == [x[1:] for x in continuations]  # acc_norm divides by these (no leading space)


@needs_data
def test_golden_winogrande_one_context_per_option():
    item = load_items(TASKS["winogrande"], DATA_DIR)[0]
    assert item.requests == (("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))
    assert item.gold == 1


@needs_data
def test_golden_boolq():
    item = load_items(TASKS["boolq"], DATA_DIR)[0]
    passage = json.loads((DATA_DIR / "boolq/boolq_dev.jsonl").open().readline())["passage"]
    context = passage + "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    assert item.requests == ((context, " no"), (context, " yes"))
    assert item.gold == 0 and item.choices == ("no", "yes")


@needs_data
def test_golden_lambada():
    item = load_items(TASKS["lambada_openai"], DATA_DIR)[0]
    ((context, target),) = item.requests
    assert context.endswith("his mouth curved in a confident grin, I don't care about")
    assert target == " signs"


@needs_data
def test_wikitext_counts_words_and_bytes_of_the_original_pages():
    items = load_items(TASKS["wikitext"], DATA_DIR)
    assert len(items) == 62
    assert sum(it.words for it in items) == 241_335  # CONVENTIONS.md: counted on the un-detokenised pages
    assert sum(it.bytes for it in items) == 1_290_527
    ((context, text),) = items[0].requests
    assert context == "" and text.startswith(" = Robert Boulter =\n\nRobert Boulter is an English film, television and theatre actor.")


@needs_data
def test_every_split_has_its_documented_size():
    sizes = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267, "boolq": 3270,
             "openbookqa": 500, "sciq": 1000, "lambada_openai": 5153, "wikitext": 62}
    assert {name: len(load_items(TASKS[name], DATA_DIR)) for name in sizes} == sizes


@needs_data
@pytest.mark.parametrize("name", [n for n in TASKS if n != "sciq"])
def test_shipped_samples_are_the_first_records_of_the_full_files(name):
    task = TASKS[name]
    for rel in task.files:
        sample = (SAMPLES_DIR / rel).read_bytes()
        assert (DATA_DIR / rel).read_bytes().startswith(sample), rel
    assert 1 <= len(load_items(task, SAMPLES_DIR)) <= 200


def test_sciq_is_not_shipped_and_the_error_says_why():
    with pytest.raises(LoopgraphError, match="non-commercial"):
        load_items(TASKS["sciq"], SAMPLES_DIR)


def test_hellaswag_preprocess():
    # one pass of "  " -> " " (as lm-eval): the three spaces left by a removed tag become two
    assert hellaswag_preprocess("  How to cook [title] Boil water.  [step] Add  salt ") == "How to cook. Boil water.  Add salt"
    # strip comes before the tag removal (as lm-eval), so a leading tag leaves a leading space
    assert hellaswag_preprocess("[header] Title [title] x") == " Title. x"


def test_wikitext_detokenizer():
    page = ' = Title = \n The 1 @,@ 000 @-@ year old " quoted " word , and ( paren ) . It \'s N years \n = = Sub = = \n'
    assert wikitext_detokenizer(page) == ' = Title =\nThe 1,000-year old "quoted" word, and (paren). It\'s 1 years\n== Sub ==\n'


def test_parse_tasks_and_unknown_task():
    assert [t.name for t in parse_tasks(" arc_easy, winogrande ,arc_easy")] == ["arc_easy", "winogrande"]
    with pytest.raises(LoopgraphError, match=r"unknown task 'arc_medium'; choose from arc_easy, arc_challenge"):
        get_task("arc_medium")
    with pytest.raises(LoopgraphError, match="--tasks is empty"):
        parse_tasks(" , ")


def _write(folder: Path, rel: str, lines: list[str]) -> Path:
    p = folder / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


WINO = json.dumps({"sentence": "A beat B so _ won.", "option1": "A", "option2": "B", "answer": "1"})


def test_missing_data_folder(tmp_path):
    with pytest.raises(LoopgraphError, match=r"data folder .*nowhere does not exist; pass --data-dir"):
        load_items(TASKS["winogrande"], tmp_path / "nowhere")


def test_missing_task_file(tmp_path):
    with pytest.raises(LoopgraphError, match=r"winogrande: .*winogrande_xl_dev.jsonl is missing; pass --data-dir"):
        load_items(TASKS["winogrande"], tmp_path)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = _write(tmp_path, "winogrande/winogrande_xl_dev.jsonl", [WINO, WINO, '{"sentence": "broken'])
    with pytest.raises(LoopgraphError) as e:
        load_items(TASKS["winogrande"], tmp_path)
    assert str(e.value).startswith(f"{p} line 3: not valid JSON")


@pytest.mark.parametrize("line, problem", [
    ("[1, 2]", "a JSON list, expected an object"),
    ("", "not valid JSON"),
    (json.dumps({"sentence": "no blank here", "option1": "A", "option2": "B", "answer": "1"}), "has no '_' blank"),
    (json.dumps({"sentence": "A _ B", "option1": "A", "answer": "1"}), "no field 'option2'"),
    (json.dumps({"sentence": "A _ B", "option1": "A", "option2": "B", "answer": 3}), "expected \"1\" or \"2\""),
])
def test_bad_records_name_file_and_line(tmp_path, line, problem):
    p = _write(tmp_path, "winogrande/winogrande_xl_dev.jsonl", [WINO, line])
    with pytest.raises(LoopgraphError) as e:
        load_items(TASKS["winogrande"], tmp_path)
    assert str(e.value).startswith(f"{p} line 2: ") and problem in str(e.value)


def test_arc_answer_key_must_be_a_label(tmp_path):
    doc = {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}
    p = _write(tmp_path, "arc_easy/arc_easy_test.jsonl", [json.dumps(doc)])
    with pytest.raises(LoopgraphError, match=rf"{p} line 1: answerKey 'C' is not one of the labels"):
        load_items(TASKS["arc_easy"], tmp_path)


def test_piqa_labels_must_be_line_aligned(tmp_path):
    doc = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})
    _write(tmp_path, "piqa/valid.jsonl", [doc, doc])
    _write(tmp_path, "piqa/valid-labels.lst", ["1"])
    with pytest.raises(LoopgraphError, match="1 labels for 2 records"):
        load_items(TASKS["piqa"], tmp_path)
    _write(tmp_path, "piqa/valid-labels.lst", ["1", "x"])
    with pytest.raises(LoopgraphError, match="line 2: label 'x'"):
        load_items(TASKS["piqa"], tmp_path)
    _write(tmp_path, "piqa/valid-labels.lst", ["1", "0"])
    assert [it.gold for it in load_items(TASKS["piqa"], tmp_path)] == [1, 0]


def test_openbookqa_strips_the_answer_key(tmp_path):
    doc = {"question_stem": "Stem", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": " B"}
    _write(tmp_path, "openbookqa/openbookqa_test.jsonl", [json.dumps(doc)])
    (item,) = load_items(TASKS["openbookqa"], tmp_path)
    assert item.requests == (("Stem", " a"), ("Stem", " b")) and item.gold == 1


def test_select_limit_and_seed():
    items = load_items(TASKS["winogrande"], SAMPLES_DIR)
    assert select(items, None, 1) == items and select(items, 500, 1) == items
    a, b, c = select(items, 10, 1), select(items, 10, 1), select(items, 10, 2)
    assert a == b and a != c and len(a) == 10
    assert [it.index for it in a] == sorted(it.index for it in a)
    for bad in (0, -3):
        with pytest.raises(LoopgraphError, match=f"--limit {bad} evaluates nothing"):
            select(items, bad, 1)

"""ScienceQA: the generated fixture in the repo's layout, the loader, prompt rendering, and seed
003's table of accuracies."""

import json

import pytest

from alignment.data import build_datasets
from alignment.data.scienceqa import is_scienceqa, load_scienceqa, render_question
from alignment.data.scienceqa_fixture import write_scienceqa_fixture
from alignment.scienceqa import COLUMNS, columns_of, format_table, predicted_index, scienceqa_scores


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return write_scienceqa_fixture(tmp_path_factory.mktemp("sqa"), num_problems=40, seed=0)


def test_fixture_has_scienceqa_layout_and_loads(fixture):
    problems = json.loads(fixture.read_text())
    first = next(p for p in problems.values() if p["image"])
    assert set(first) >= {"question", "choices", "answer", "hint", "image", "grade", "subject", "category", "split"}
    pid = next(k for k, p in problems.items() if p["image"])
    assert (fixture.parent / "images" / problems[pid]["split"] / pid / "image.png").exists()
    assert is_scienceqa(fixture) and is_scienceqa(fixture.parent)
    examples = load_scienceqa(fixture.parent)
    assert len(examples) == 40
    subjects = {e["subject"] for e in examples}
    assert subjects == {"natural science", "social science", "language science"}
    e = next(x for x in examples if x["row"] == pid)
    assert e["answer"] == "ABCDE"[problems[pid]["answer"]] and e["has_image"]
    assert sum(not x["has_image"] for x in examples) == 16  # templates 3 and 4 of every 5


def test_render_question():
    text = render_question("Which is hot?", ["ice", "fire"], hint="Think of summer.")
    assert text == ("Context: Think of summer.\nQuestion: Which is hot?\nOptions: (A) ice (B) fire\n"
                    "Answer with the option's letter from the given choices directly.")
    assert not render_question("Q?", ["a", "b"]).startswith("Context")


def test_build_datasets_splits_and_validates(fixture):
    train, evaluation, report = build_datasets(fixture, task="sft")
    assert {e["split"] for e in train} == {"train"} and {e["split"] for e in evaluation} == {"val"}
    assert all(e["image"].size == (112, 112) for e in train + evaluation)  # blank image for text-only
    assert report.kept == len(train) + len(evaluation)
    with pytest.raises(Exception, match="not preference pairs"):
        build_datasets(fixture, task="preference")


def test_predicted_index():
    choices = ["red", "blue", "green"]
    assert predicted_index("B", choices) == 1
    assert predicted_index("(C)", choices) == 2
    assert predicted_index("The answer is A.", choices) == 0
    assert predicted_index("blue", choices) == 1
    assert predicted_index("D", choices) is None and predicted_index("purple", choices) is None


def test_table_by_hand():
    """Four questions: NAT image grade 2 (right), SOC hint grade 8 (wrong), LAN no context grade 3
    (right), NAT image+hint grade 10 (right). NAT 2/2, SOC 0/1, LAN 1/1, TXT 1/2, IMG 2/2, NO 1/1,
    G1-6 2/2, G7-12 1/2, Average 3/4."""
    rows = [
        dict(subject="natural science", hint="", has_image=True, grade="grade2"),
        dict(subject="social science", hint="A fact.", has_image=False, grade="grade8"),
        dict(subject="language science", hint="", has_image=False, grade="grade3"),
        dict(subject="natural science", hint="See.", has_image=True, grade="grade10"),
    ]
    examples = [dict(r, choices=["x", "y"], answer_index=0) for r in rows]
    assert columns_of(examples[3]) == ["NAT", "TXT", "IMG", "G7-12", "Average"]
    scores = scienceqa_scores(examples, ["A", "B", "x", "(A)"])
    assert scores == {"NAT": 1.0, "SOC": 0.0, "LAN": 1.0, "TXT": 0.5, "IMG": 1.0, "NO": 1.0,
                      "G1-6": 1.0, "G7-12": 0.5, "Average": 0.75}
    table = format_table(scores, "ours")
    assert table.splitlines()[0].split() == ["Method", *COLUMNS]
    assert table.splitlines()[1].split() == ["ours", "100.00", "0.00", "100.00", "50.00", "100.00", "100.00",
                                            "100.00", "50.00", "75.00"]

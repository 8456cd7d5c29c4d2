"""Transforms: multi-QA split, verbose SFT mix, preference pairs; all deterministic."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.data import (
    build_datasets,
    catalog,
    make_preference_pairs,
    question_kind,
    sft_verbose_mix,
    split_qa,
    verbose_answer,
    verbose_questions,
)

ROW = {"image": b"png", "image_id": "c1",
       "questions": ["Who wrote this book?", "What is the title of this book?", "What type of book is this?",
                     "Is this a Travel book?", "Is this book related to Romance?"],
       "answers": ["Maria Lopez", "Winter Garden", "Travel", "Yes", "No"]}


def qa_examples(n=40):
    rows = [dict(ROW, image_id=f"c{i}") for i in range(n // 5)]
    return [e for i, row in enumerate(rows) for e in split_qa(row, source="rows.parquet", row_index=i)]


def is_verbose(answer, concise):
    return any(t.format(answer=concise) == answer for t in catalog.VERBOSE_TEMPLATES)


def test_split_qa_gives_one_question_per_example():
    examples = split_qa(ROW, source="f.parquet", row_index=7)
    assert [(e["question"], e["answer"]) for e in examples] == list(zip(ROW["questions"], ROW["answers"]))
    assert [e["kind"] for e in examples] == ["author", "title", "genre", "yesno", "yesno"]
    assert len({e["id"] for e in examples}) == 5 and {e["image_id"] for e in examples} == {"c1"}
    assert all(e["image"] is ROW["image"] and e["row"] == 7 and e["source"] == "f.parquet" for e in examples)
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        split_qa(dict(ROW, questions=["a", "b"], answers=["c"]), source="f", row_index=0)


def test_question_kind():
    assert question_kind("Who is the author of this book?", "Kenji Sato") == "author"
    assert question_kind("Is this a comedy book?", "no") == "yesno"
    assert question_kind("How many pages?", "300") == "other"


def test_preference_pairs_mix_verbose_and_wrong():
    examples = qa_examples(40)
    pairs = make_preference_pairs(examples, verbose_fraction=0.5, seed=0)
    assert len(pairs) == 40
    verbose = [p for p in pairs if is_verbose(p["rejected"], p["chosen"])]
    assert len(verbose) == 20
    for pair, example in zip(pairs, examples):
        assert pair["chosen"] == pair["answer"] == example["answer"] and pair["rejected"] != pair["chosen"]
        assert pair["id"] == example["id"] and pair["kind"] == example["kind"]
        if pair in verbose:
            continue
        if pair["kind"] == "yesno":
            assert {pair["chosen"], pair["rejected"]} == {"Yes", "No"}
        else:
            closed = {"author": catalog.AUTHORS, "title": catalog.TITLES, "genre": catalog.GENRES}[pair["kind"]]
            assert pair["rejected"] in closed


@pytest.mark.parametrize("fraction, expected_verbose", [(0.0, 0), (1.0, 40)])
def test_verbose_fraction_extremes(fraction, expected_verbose):
    pairs = make_preference_pairs(qa_examples(40), verbose_fraction=fraction, seed=1)
    assert sum(is_verbose(p["rejected"], p["chosen"]) for p in pairs) == expected_verbose


def test_open_answers_without_alternatives_fall_back_to_verbose():
    lone = [{"id": "x", "image_id": "x", "image": None, "question": "How many pages?", "answer": "300", "kind": "other"}]
    pair = make_preference_pairs(lone, verbose_fraction=0.0)[0]
    assert is_verbose(pair["rejected"], "300")


def test_transforms_are_deterministic():
    examples = qa_examples(40)
    assert make_preference_pairs(examples, seed=3) == make_preference_pairs(examples, seed=3)
    assert make_preference_pairs(examples, seed=3) != make_preference_pairs(examples, seed=4)
    assert sft_verbose_mix(examples, 0.3, seed=3) == sft_verbose_mix(examples, 0.3, seed=3)


def test_sft_verbose_mix_follows_the_question():
    """Verbosity is a property of the question phrasing, so greedy decoding can reproduce it."""
    examples = qa_examples(40)
    mixed = sft_verbose_mix(examples, sft_verbose_fraction=0.3, seed=0)
    verbose = verbose_questions(examples, 0.3, seed=0)
    assert verbose
    for m, e in zip(mixed, examples):
        if e["question"] in verbose:
            assert is_verbose(m["answer"], e["answer"])
            assert m["reference"] == e["answer"]  # the concise answer a verifiable reward checks against
        else:
            assert m["answer"] == e["answer"] and "reference" not in m
    # one template per question
    per_question = {}
    for m, e in zip(mixed, examples):
        if e["question"] in verbose:
            per_question.setdefault(e["question"], set()).add(m["answer"].replace(e["answer"], "{a}"))
    assert all(len(t) == 1 for t in per_question.values())
    share = sum(e["question"] in verbose for e in examples) / len(examples)
    counts = sorted({sum(x["question"] == q for x in examples) / len(examples) for q in {x["question"] for x in examples}})
    assert abs(share - 0.3) <= max(counts) / 2 + 1e-9  # within half a question's share
    assert examples[0]["answer"] == "Maria Lopez"  # inputs untouched
    assert sft_verbose_mix(examples, 0.0) == examples
    with pytest.raises(ValueError, match="sft_verbose_fraction"):
        sft_verbose_mix(examples, 1.5)


def test_sft_verbose_rate_explains_a_share_of_those_questions():
    """Below 1, a verbose phrasing's examples explain at that rate (seeded), the rest stay concise."""
    examples = qa_examples(400)
    verbose = verbose_questions(examples, 0.4, seed=0)
    assert sft_verbose_mix(examples, 0.4, seed=0, sft_verbose_rate=1.0) == sft_verbose_mix(examples, 0.4, seed=0)
    mixed = sft_verbose_mix(examples, 0.4, seed=0, sft_verbose_rate=0.6)
    assert mixed == sft_verbose_mix(examples, 0.4, seed=0, sft_verbose_rate=0.6)
    for question in verbose:
        answers = [(m["answer"], e["answer"]) for m, e in zip(mixed, examples) if e["question"] == question]
        explained = sum(is_verbose(m, e) for m, e in answers)
        assert all(is_verbose(m, e) or m == e for m, e in answers)
        assert 0.45 <= explained / len(answers) <= 0.75, (question, explained, len(answers))  # both answers learnt
    assert all(m["answer"] == e["answer"] for m, e in zip(mixed, examples) if e["question"] not in verbose)
    assert sft_verbose_mix(examples, 0.4, sft_verbose_rate=0.0) == examples
    with pytest.raises(ValueError, match="sft_verbose_rate"):
        sft_verbose_mix(examples, 0.4, sft_verbose_rate=1.2)


def test_answer_first_style_starts_every_explaining_answer_with_the_concise_one():
    examples = qa_examples(200)
    mixed = sft_verbose_mix(examples, 0.6, seed=0, sft_verbose_style="answer_first")
    explained = [(m["answer"], e["answer"]) for m, e in zip(mixed, examples) if is_verbose(m["answer"], e["answer"])]
    assert len(explained) > 50
    assert all(m.startswith(e + ".") and len(m.split()) > len(e.split()) + 3 for m, e in explained)
    # The default style also uses templates that explain first.
    default = sft_verbose_mix(examples, 0.6, seed=0)
    assert any(not m["answer"].startswith(e["answer"]) for m, e in zip(default, examples)
               if is_verbose(m["answer"], e["answer"]))
    with pytest.raises(ValueError, match="sft_verbose_style"):
        sft_verbose_mix(examples, 0.6, sft_verbose_style="answer_last")


def test_empty_answers_stay_empty_for_validation():
    import random

    assert verbose_answer("", random.Random(0)) == ""


def test_build_datasets_tasks(tmp_path):
    sft_train, sft_eval, _ = build_datasets(num_covers=30, seed=0, cache_dir=tmp_path, sft_verbose_fraction=0.3)
    verbose = sum(len(e["answer"].split()) > 5 for e in sft_train)
    assert 0.15 <= verbose / len(sft_train) <= 0.45  # whole question phrasings, about 0.3
    assert all(len(e["answer"].split()) <= 5 for e in sft_eval)  # eval answers stay concise
    pref_train, pref_eval, report = build_datasets(num_covers=30, seed=0, cache_dir=tmp_path, task="preference")
    assert len(pref_train) == len(sft_train) and len(pref_eval) == len(sft_eval)
    assert report.kept == len(pref_train) + len(pref_eval)
    assert all(p["chosen"] != p["rejected"] for p in pref_train + pref_eval)
    small, _, _ = build_datasets(num_covers=30, seed=0, cache_dir=tmp_path, max_train_samples=10)
    assert len(small) == 10
    with pytest.raises(ValueError, match="task must be one of"):
        build_datasets(num_covers=30, cache_dir=tmp_path, task="ppo")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["Who wrote this book?", "What type of book is this?",
                                           "Is this a Travel book?", "How old?"]),
                          st.text(min_size=1, max_size=12).filter(str.strip)), min_size=1, max_size=12),
       st.floats(0.0, 1.0), st.integers(0, 5))
def test_pairs_always_differ(rows, fraction, seed):
    examples = [{"id": str(i), "image_id": "c", "image": None, "question": q, "answer": a.strip(),
                 "kind": question_kind(q, a.strip())} for i, (q, a) in enumerate(rows)]
    for pair in make_preference_pairs(examples, verbose_fraction=fraction, seed=seed):
        assert pair["rejected"] != pair["chosen"] and pair["chosen"] == pair["answer"]


def test_off_kind_rejections_answer_another_kind_and_leave_the_rest_alone():
    from alignment.evaluate import rejection_type

    examples = qa_examples(200)
    plain = make_preference_pairs(examples, verbose_fraction=0.5, seed=0)
    assert make_preference_pairs(examples, verbose_fraction=0.5, seed=0, off_kind_fraction=0.0) == plain
    mixed = make_preference_pairs(examples, verbose_fraction=0.5, seed=0, off_kind_fraction=0.5)
    answers_of = {}
    for e in examples:
        answers_of.setdefault(e["kind"], set()).add(e["answer"])
    changed = [(p, m) for p, m in zip(plain, mixed) if p != m]
    wrong = [p for p in plain if rejection_type(p["chosen"], p["rejected"]) == "wrong"]
    assert 0.3 * len(wrong) < len(changed) < 0.7 * len(wrong)  # about half of the wrong ones
    for before, after in changed:
        assert rejection_type(before["chosen"], before["rejected"]) == "wrong"  # verbose pairs untouched
        assert after["chosen"] == before["chosen"] and after["rejected"] != after["chosen"]
        assert after["rejected"] not in answers_of[after["kind"]]  # an answer to another kind of question
    with pytest.raises(ValueError, match="off_kind_fraction"):
        make_preference_pairs(examples, off_kind_fraction=1.5)

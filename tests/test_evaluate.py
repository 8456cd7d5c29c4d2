"""Metrics of alignment.evaluate: answer normalisation, exact match, preference accuracy breakdown."""

import io
import random
import sys

import pytest
import torch

from alignment.data.transforms import verbose_answer
from alignment.evaluate import (
    answer_metrics,
    exact_match,
    generate_answers,
    normalize_answer,
    preference_metrics,
    rejection_type,
)


def test_normalisation_and_exact_match():
    assert normalize_answer("The  Art of War!") == "art of war"
    assert exact_match(["the art of war", "No"], ["Art of War.", "Yes"]) == 0.5
    assert exact_match([], []) == 0.0
    metrics = answer_metrics(["Yes", "a b c"], ["Yes", "b"], ["yesno", "title"])
    assert metrics == {"exact_match": 0.5, "mean_answer_words": 2.0,
                       "exact_match/title": 0.0, "exact_match/yesno": 1.0}


def test_rejection_type_tells_verbose_from_wrong():
    rng = random.Random(0)
    for _ in range(20):  # every verbose template is recognised
        assert rejection_type("Jane Austen", verbose_answer("Jane Austen", rng)) == "verbose"
    assert rejection_type("Yes", "No") == "wrong"
    assert rejection_type("Romance", "Mystery") == "wrong"
    assert rejection_type("Yes", "Yesterday was fine") == "wrong"  # a word, not a prefix, must match


def test_preference_metrics_break_accuracy_down():
    pairs = [{"chosen": "Yes", "rejected": "No", "kind": "yesno"},
             {"chosen": "Yes", "rejected": "Based on the cover shown in the image, the answer is Yes.", "kind": "yesno"},
             {"chosen": "Romance", "rejected": "Mystery", "kind": "genre"},
             {"chosen": "Romance", "rejected": "Romance. This can be read from the cover.", "kind": "genre"}]
    metrics = preference_metrics(pairs, [1.0, 2.0, 0.0, 3.0], [0.0, 1.0, 0.5, 3.0], name="acc")
    assert metrics == {"acc": 0.5, "acc/verbose": 0.5, "acc/wrong": 0.5,
                       "acc/kind/genre": 0.0, "acc/kind/yesno": 1.0}  # ties count as losses


class _Terminal(io.StringIO):
    def isatty(self):
        return True


class _EchoPolicy:
    """Answers each prompt with its question (no model): enough to drive `generate_answers`' loop."""

    device = torch.device("cpu")

    def generate(self, batch, max_new_tokens, temperature):
        return batch["questions"]

    def decode(self, tokens):
        return list(tokens)


def _prompts(examples):
    return {"questions": [e["question"] for e in examples], "answers": [e["answer"] for e in examples],
            "kinds": [e["kind"] for e in examples]}


@pytest.mark.parametrize("terminal, rank, shown", [(True, "0", True), (False, "0", False), (True, "1", False)])
def test_generation_shows_a_progress_bar_on_the_main_process_in_a_terminal(terminal, rank, shown, monkeypatch):
    examples = [{"question": f"q{i}", "answer": f"a{i}", "kind": "other"} for i in range(5)]
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setenv("RANK", rank)
    predictions, references, kinds = generate_answers(_EchoPolicy(), examples, _prompts, batch_size=2)
    assert predictions == [f"q{i}" for i in range(5)] and references == [f"a{i}" for i in range(5)]
    assert ("answering:" in stderr.getvalue() and "/5 [" in stderr.getvalue()) == shown  # a bar over the 5 answers

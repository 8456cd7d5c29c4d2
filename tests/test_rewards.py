"""Reward functions for online RL: built-ins, resolution by name or dotted path, checked calls."""

import pytest

from alignment import rewards
from alignment.rewards import REWARD_MODEL, call_reward, resolve

EXAMPLES = [{"answer": "Laura Chen", "question": "Who wrote this book?"}, {"answer": "Travel", "question": "Genre?"}]


def test_exact_match_uses_the_evaluation_normalisation():
    assert rewards.exact_match(EXAMPLES, ["laura chen.", "The Travel"]) == [1.0, 1.0]
    assert rewards.exact_match(EXAMPLES, ["Laura Chen wrote it", "Cooking"]) == [0.0, 0.0]


def test_an_explaining_training_answer_is_checked_against_its_concise_reference():
    example = {"answer": "Travel. This can be read from the cover.", "reference": "Travel", "question": "Genre?"}
    assert rewards.exact_match([example], ["Travel"]) == [1.0]
    assert rewards.exact_match([example], ["Travel. This can be read from the cover."]) == [0.0]


def test_contains_answer_needs_whole_words():
    assert rewards.contains_answer(EXAMPLES, ["It is by Laura Chen.", "Travelling"]) == [1.0, 0.0]


def test_concise_falls_linearly_with_words():
    values = rewards.concise(EXAMPLES * 2, ["Travel", "Laura Chen", " ".join(["w"] * 20), ""])
    assert values[0] == 1.0 and values[1] == pytest.approx(1 - 1 / 19) and values[2] == 0.0 and values[3] == 0.0


def test_format_rewards_answers_that_stopped():
    assert rewards.format_reward(EXAMPLES, ["a", "b"], finished=[True, False]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="needs `finished`"):
        rewards.format_reward(EXAMPLES, ["a", "b"])


def test_resolve_built_ins_dotted_paths_and_errors():
    assert resolve("exact_match") is rewards.exact_match and resolve(REWARD_MODEL) is None
    assert resolve("alignment.rewards:concise") is rewards.concise
    with pytest.raises(ValueError, match="unknown reward 'exactmatch'; built-ins"):
        resolve("exactmatch")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        resolve("no_such_module:f")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        resolve("alignment.rewards:nope")


@pytest.mark.parametrize("returned, message", [
    (0.5, "returned float; it must return a list of 2 floats"),
    ([1.0], "returned 1 values for 2 completions"),
    ([1.0, "x"], "returned 'x' for completion 1"),
    ([1.0, float("nan")], "returned nan for completion 1"),
])
def test_call_reward_checks_what_a_user_function_returns(returned, message):
    with pytest.raises(ValueError, match=message):
        call_reward("mine:f", lambda examples, completions: returned, EXAMPLES, ["a", "b"], [True, True])


def test_call_reward_accepts_tuples_and_tensors():
    import torch

    assert call_reward("mine:f", lambda e, c: (1, 2), EXAMPLES, ["a", "b"], [True, True]) == [1.0, 2.0]
    assert call_reward("mine:f", lambda e, c: torch.tensor([0.5, 1.5]), EXAMPLES, ["a", "b"], [True, True]) == [0.5, 1.5]

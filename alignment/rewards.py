"""Verifiable rewards for online RL (the GRPO stage): named functions of the examples and the sampled
answers, weighted and summed per answer.

A reward function takes ``(examples, completions)`` (B example dicts, each with ``answer`` and
``question``, and ``reference`` where the training answer explains at length: the concise answer;
B answer strings, cut at the stop token) and returns B floats. Built-ins also see
``finished`` (B bools: the answer ended with a stop token rather than at the token budget).
``reward_model`` is not a function of strings: the stage scores those answers with a trained
reward adapter; it is named here so recipes can weight it like the others.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

from alignment.evaluate import normalize_answer

REWARD_MODEL = "reward_model"  # scored by the stage with the `reward` adapter, not by a function here
CONCISE_WORDS = 20  # `concise` is 0 at this many words or more


def reference_answer(example: dict) -> str:
    """The answer a verifiable reward checks against: ``reference`` when the example has one (its
    training answer explains at length), else ``answer``."""
    return example.get("reference") or example["answer"]


def exact_match(examples: list[dict], completions: list[str], **_) -> list[float]:
    """1.0 where the answer equals the reference after `evaluate.normalize_answer`, else 0.0."""
    return [float(normalize_answer(c) == normalize_answer(reference_answer(e))) for e, c in zip(examples, completions)]


def contains_answer(examples: list[dict], completions: list[str], **_) -> list[float]:
    """1.0 where the normalised reference appears, as whole words, in the normalised answer."""
    return [float(f" {normalize_answer(reference_answer(e))} " in f" {normalize_answer(c)} ")
            for e, c in zip(examples, completions)]


def concise(examples: list[dict], completions: list[str], **_) -> list[float]:
    """1.0 for a one-word answer, falling linearly to 0.0 at `CONCISE_WORDS` words or more."""
    return [max(0.0, 1.0 - (len(c.split()) - 1) / (CONCISE_WORDS - 1)) if c.split() else 0.0 for c in completions]


def format_reward(examples: list[dict], completions: list[str], finished: list[bool] | None = None, **_) -> list[float]:
    """1.0 where the answer ended with a stop token (``<|eot_id|>``) within the token budget, else 0.0."""
    if finished is None:
        raise ValueError("the format reward needs `finished` (whether each answer ended with a stop token)")
    return [float(done) for done in finished]


BUILT_IN: dict[str, Callable] = {"exact_match": exact_match, "contains_answer": contains_answer,
                                 "concise": concise, "format": format_reward}


def resolve(name: str) -> Callable | None:
    """The function of reward `name`: a built-in, or ``module:function`` imported; None for
    `reward_model`. Raises ValueError with a one-line reason when it cannot be found."""
    if name == REWARD_MODEL:
        return None
    if name in BUILT_IN:
        return BUILT_IN[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}; built-ins: {sorted([*BUILT_IN, REWARD_MODEL])}, "
                         "or a function as module:function")
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"reward {name!r}: module {module_name!r} has no function {function_name!r}")
    return function


def call_reward(name: str, function: Callable, examples: list[dict], completions: list[str],
                finished: list[bool]) -> list[float]:
    """One reward function's values for B answers, checked: a list (or tuple) of B finite numbers.
    User functions get ``(examples, completions)``; built-ins also ``finished``."""
    if name in BUILT_IN:
        values = function(examples, completions, finished=finished)
    else:
        values = function(examples, completions)
    if hasattr(values, "tolist"):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"reward {name!r} returned {type(values).__name__}; it must return a list of "
                         f"{len(completions)} floats (one per completion)")
    if len(values) != len(completions):
        raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
    out = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"reward {name!r} returned {value!r} for completion {index}; each value must be a "
                             "finite float")
        out.append(float(value))
    return out

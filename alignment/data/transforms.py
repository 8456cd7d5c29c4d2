"""Transforms between example lists: multi-QA rows split, verbose SFT mix, preference pairs, blind.

Every transform is deterministic given its ``seed``, returns new dicts and leaves images alone
(except ``image_blind``). Empty answers stay empty so that validation reports them.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from alignment.data import catalog
from alignment.data.covers import blank_cover
from alignment.data.images import image_fingerprint, images_of, with_images

KINDS = ("author", "title", "genre", "yesno", "other")

_KIND_OF_QUESTION = {
    **{q.lower(): "author" for q in catalog.AUTHOR_QUESTIONS},
    **{q.lower(): "title" for q in catalog.TITLE_QUESTIONS},
    **{q.lower(): "genre" for q in catalog.GENRE_QUESTIONS},
}
_CLOSED_SETS = {"author": list(catalog.AUTHORS), "title": list(catalog.TITLES), "genre": list(catalog.GENRES)}


def question_kind(question: str, answer: str | None = None) -> str:
    """One of ``KINDS``: from OCR-VQA's question templates, and a Yes/No answer."""
    if answer is not None and answer.strip().lower() in ("yes", "no"):
        return "yesno"
    return _KIND_OF_QUESTION.get(question.strip().lower(), "other")


def split_qa(row: dict[str, Any], *, source: str, row_index: int) -> list[dict[str, Any]]:
    """One OCR-VQA row (image, questions[], answers[]) -> one SFT example per question (seed 000).

    Raises ``ValueError`` when questions and answers differ in length (the caller names the row).
    """
    questions, answers = list(row["questions"] or []), list(row["answers"] or [])
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    image_id = str(row.get("image_id") or image_fingerprint(row["image"]))
    return [
        {"id": f"{image_id}/q{j}", "image_id": image_id, "image": row["image"],
         "question": (q or "").strip(), "answer": (a or "").strip(),
         "kind": question_kind(q or "", a or ""), "source": source, "row": row_index,
         "fields": {"question": f"questions[{j}]", "answer": f"answers[{j}]", "images": ["image"]}}
        for j, (q, a) in enumerate(zip(questions, answers))
    ]


def verbose_answer(answer: str, rng: random.Random) -> str:
    """The answer wrapped in an explaining sentence (``catalog.VERBOSE_TEMPLATES``); "" stays ""."""
    return rng.choice(catalog.VERBOSE_TEMPLATES).format(answer=answer) if answer else answer


def _answer_pools(examples: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Distinct answers per kind (for kinds without a closed set in the catalog)."""
    pools: dict[str, set[str]] = defaultdict(set)
    for example in examples:
        pools[example["kind"]].add(example["answer"])
    return {kind: sorted(answers) for kind, answers in pools.items()}


def wrong_answer(answer: str, kind: str, rng: random.Random, pools: dict[str, list[str]]) -> str | None:
    """A wrong answer from the same closed set (yes/no: the opposite), or None when there is none."""
    if not answer:
        return answer
    if kind == "yesno":
        opposite = "No" if answer.strip().lower() == "yes" else "Yes"
        return opposite.upper() if answer.isupper() else opposite
    candidates = _CLOSED_SETS.get(kind) if answer in _CLOSED_SETS.get(kind, ()) else pools.get(kind, [])
    candidates = [c for c in candidates if c != answer]
    return rng.choice(candidates) if candidates else None


def _chosen_indices(n: int, fraction: float, rng: random.Random, name: str) -> set[int]:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {fraction}")
    return set(rng.sample(range(n), round(n * fraction)))


def verbose_questions(examples: list[dict[str, Any]], sft_verbose_fraction: float, seed: int = 0) -> set[str]:
    """The question phrasings whose answers explain in the raw SFT data.

    Distinct questions are taken most frequent first (ties in a seeded order) while adding one
    brings their share of the examples closer to ``sft_verbose_fraction`` (others are skipped).
    """
    if not 0.0 <= sft_verbose_fraction <= 1.0:
        raise ValueError(f"sft_verbose_fraction must be in [0, 1], got {sft_verbose_fraction}")
    counts: dict[str, int] = defaultdict(int)
    for example in examples:
        counts[example["question"]] += 1
    rng = random.Random(seed)
    order = sorted(counts, key=lambda q: (-counts[q], rng.random()))
    chosen, share = set(), 0.0
    for question in order:
        candidate = share + counts[question] / max(1, len(examples))
        if abs(candidate - sft_verbose_fraction) >= abs(share - sft_verbose_fraction):
            continue
        chosen.add(question)
        share = candidate
    return chosen


def sft_verbose_mix(examples: list[dict[str, Any]], sft_verbose_fraction: float = 0.3,
                    seed: int = 0, sft_verbose_rate: float = 1.0,
                    sft_verbose_style: str = "any") -> list[dict[str, Any]]:
    """SFT examples in which the answers to some question phrasings explain, as raw data does.

    Verbosity follows the question (``verbose_questions``), each with one fixed explaining
    template, so a model trained on the mix learns *when* to explain and greedy decoding
    reproduces it: about ``sft_verbose_fraction`` of the examples, and of the held-out questions,
    get long answers, which is what DPO then fixes. (Verbosity drawn at random per example would
    leave greedy decoding concise and give DPO nothing to fix.) ``sft_verbose_rate`` < 1 explains
    only that share of those phrasings' examples (seeded): the model then learns both answers for
    them, explaining one a little more likely, so greedy decoding still explains while the concise
    answer stays close (the starting point PPO can improve on without moving far).
    ``sft_verbose_style`` picks the templates (``catalog.VERBOSE_STYLES``): "answer_first" ones
    begin with the concise answer, so SFT learns that answer's tokens from every example.
    An explaining example keeps its concise answer as ``reference`` (what a verifiable reward
    checks an answer against: GRPO's ``exact_match``).
    """
    if not 0.0 <= sft_verbose_rate <= 1.0:
        raise ValueError(f"sft_verbose_rate must be in [0, 1], got {sft_verbose_rate}")
    if sft_verbose_style not in catalog.VERBOSE_STYLES:
        raise ValueError(f"sft_verbose_style must be one of {tuple(catalog.VERBOSE_STYLES)}, "
                         f"got {sft_verbose_style!r}")
    verbose = verbose_questions(examples, sft_verbose_fraction, seed)
    templates = catalog.VERBOSE_STYLES[sft_verbose_style]
    template_of = {q: templates[i % len(templates)] for i, q in enumerate(sorted(verbose))}
    rng = random.Random(seed + 7_919)
    explains = [e["question"] in verbose and bool(e["answer"]) and rng.random() < sft_verbose_rate
                for e in examples]
    return [{**e, "answer": template_of[e["question"]].format(answer=e["answer"]), "reference": e["answer"]}
            if explain else dict(e) for e, explain in zip(examples, explains)]


def make_preference_pairs(examples: list[dict[str, Any]], verbose_fraction: float = 0.5,
                          seed: int = 0, off_kind_fraction: float = 0.0) -> list[dict[str, Any]]:
    """SFT examples -> preference examples: chosen = the concise answer; rejected = a verbose one
    for ``round(n * verbose_fraction)`` of them, a wrong one otherwise (verbose when no wrong
    answer exists). ``off_kind_fraction`` of the wrong ones answer another kind of question (e.g.
    "No" to "What is the title?"), which a reward model must also rank low. ``answer`` keeps the
    concise correct answer. With ``off_kind_fraction=0`` the pairs do not depend on it.
    """
    if not 0.0 <= off_kind_fraction <= 1.0:
        raise ValueError(f"off_kind_fraction must be in [0, 1], got {off_kind_fraction}")
    rng = random.Random(seed)
    off_kind_rng = random.Random(seed + 104_729)  # its own stream: the other pairs stay as they were
    pools = _answer_pools(examples)
    off_kind = {kind: sorted({a for other, answers in pools.items() if other != kind for a in answers})
                for kind in pools} if off_kind_fraction else {}  # kind -> the other kinds' answers
    verbose = _chosen_indices(len(examples), verbose_fraction, rng, "verbose_fraction")
    pairs = []
    for i, example in enumerate(examples):
        answer = example["answer"]
        rejected = None if i in verbose else wrong_answer(answer, example["kind"], rng, pools)
        if rejected is None:
            rejected = verbose_answer(answer, rng)
        elif off_kind_fraction and off_kind_rng.random() < off_kind_fraction:
            others = [a for a in off_kind[example["kind"]] if a != answer]
            rejected = off_kind_rng.choice(others) if others else rejected
        pair = {k: v for k, v in example.items() if k != "answer"}
        pairs.append({**pair, "chosen": answer, "rejected": rejected, "answer": answer})
    return pairs


def image_blind(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The image-blind control: every image replaced by one neutral gray image of the same size."""
    blanks: dict[tuple[int, int], Any] = {}
    blind = []
    for example in examples:
        sizes = [getattr(image, "size", None) for image in images_of(example)]
        if None in sizes:
            raise TypeError(f"example {example.get('id')!r}: image is not decoded; run validate_examples first")
        blank = [blanks.setdefault(tuple(size), blank_cover(tuple(size))) for size in sizes]
        blind.append(with_images(example, blank))
    return blind

"""Metrics: exact match, answer length, preference accuracy; greedy answering of held-out prompts."""

from __future__ import annotations

import os
import re
import string

import torch
from tqdm.auto import tqdm

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (SQuAD-style)."""
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(references)


def mean_words(texts: list[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(1, len(texts))


def answer_metrics(predictions: list[str], references: list[str], kinds: list[str] | None = None,
                   prefix: str = "") -> dict[str, float]:
    """`exact_match`, `mean_answer_words`, and exact match per question kind."""
    metrics = {f"{prefix}exact_match": exact_match(predictions, references),
               f"{prefix}mean_answer_words": mean_words(predictions)}
    for kind in sorted(set(kinds or [])):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        metrics[f"{prefix}exact_match/{kind}"] = exact_match([predictions[i] for i in rows], [references[i] for i in rows])
    return metrics


def _is_main_process() -> bool:
    """Rank 0 of a launch (`RANK`, set by torchrun / accelerate launch), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


@torch.no_grad()
def generate_answers(policy, examples: list[dict], collate_prompts, batch_size: int = 32,
                     max_new_tokens: int = 24, desc: str = "answering") -> tuple[list[str], list[str], list[str]]:
    """Greedy answers for `examples` -> (predictions, reference answers, question kinds). A progress
    bar counts the answers on the main process when stderr is a terminal."""
    predictions, references, kinds = [], [], []
    bar = tqdm(total=len(examples), desc=desc, unit="answer", leave=False, dynamic_ncols=True,
               disable=None if _is_main_process() else True)  # None: off when not a terminal
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate_prompts(examples[start : start + batch_size])
            batch = {k: v.to(policy.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            tokens = policy.generate(batch, max_new_tokens=max_new_tokens, temperature=0.0)
            predictions += policy.decode(tokens)
            references += batch["answers"]
            kinds += batch["kinds"]
            bar.update(len(batch["answers"]))
    finally:
        bar.close()
    return predictions, references, kinds


def rejection_type(chosen: str, rejected: str) -> str:
    """"verbose" when the rejected answer wraps the chosen one in more words, else "wrong"."""
    c, r = normalize_answer(chosen), normalize_answer(rejected)
    return "verbose" if c and len(r) > len(c) and f" {c} " in f" {r} " else "wrong"


def preference_metrics(pairs: list[dict], chosen_rewards: list[float], rejected_rewards: list[float],
                       name: str = "preference_accuracy") -> dict[str, float]:
    """Share of pairs whose chosen reward beats the rejected one: overall, per rejection type
    (verbose / wrong) and per question kind, as `name`, `name/verbose`, `name/kind/<kind>`."""
    wins = [c > r for c, r in zip(chosen_rewards, rejected_rewards)]
    metrics = {name: sum(wins) / max(1, len(wins))}
    groups: dict[str, list[bool]] = {}
    for pair, win in zip(pairs, wins):
        groups.setdefault(rejection_type(pair["chosen"], pair["rejected"]), []).append(win)
        groups.setdefault(f"kind/{pair.get('kind', 'unknown')}", []).append(win)
    metrics.update({f"{name}/{group}": sum(w) / len(w) for group, w in sorted(groups.items())})
    return metrics

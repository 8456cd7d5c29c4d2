"""What a run prints for a person: each stage's metrics as a small table, and an end-of-run summary
(where report.json, the run page and the adapters are; the commands to try next).

    [dpo] evaluation
      metric            val    test
      -----------  ------  ------
      exact_match  0.9900  0.9850
      ...
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

ABSENT = "—"  # a metric a split does not have (no examples there): never printed as 0.0
POLICY_TYPES = ("sft", "dpo", "ppo", "grpo")  # stages `generate` and `merge` take
SAMPLE_QUESTION = "Who wrote this book?"


def sample_cover_path() -> Path:
    """The book cover shipped with the package (alignment/assets/sample_cover.png), for examples."""
    return Path(__file__).resolve().parent / "assets" / "sample_cover.png"


def scalar_metrics(block: dict | None) -> dict[str, float]:
    """The finite numbers of a metrics block (`eval` or `test` of a report entry), in order; lists
    (samples), booleans, None (an absent split) and NaN are left out."""
    return {key: value for key, value in (block or {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def metric_keys(*blocks: dict | None) -> list[str]:
    """The metric names of metrics blocks, in order: numbers, and None (a split with no examples: shown
    as absent rather than dropped, so the reader sees that it is missing)."""
    return list(dict.fromkeys(key for block in blocks for key, value in (block or {}).items()
                              if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))))


def format_table(rows: list[list[str]], indent: str = "") -> str:
    """Rows of cells as aligned text: the first column left-aligned, the others right-aligned, a rule
    under the header row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(indent + line.rstrip() for line in lines)


def _fmt(value) -> str:
    if value is None:
        return ABSENT
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def stage_metrics_table(entry: dict) -> str:
    """A report entry's headline metrics (no per-kind breakdowns: report.json has those), val and test
    side by side; a split the stage has no value on shows "—"."""
    val, test = scalar_metrics(entry.get("eval")), scalar_metrics(entry.get("test"))
    keys = [k for k in metric_keys(entry.get("eval"), entry.get("test")) if "/" not in k]
    if not keys:
        return f"[{entry['name']}] no metrics (no held-out examples)"
    rows = [["metric", "val", "test"]] + [[key, _fmt(val.get(key)), _fmt(test.get(key))] for key in keys]
    return f"[{entry['name']}] evaluation\n" + format_table(rows, indent="  ")


def _target(stages: list[dict]) -> dict | None:
    """The last finished policy stage (what a user generates with), else the last stage."""
    policy = [s for s in stages if s.get("type") in POLICY_TYPES]
    return (policy or stages or [None])[-1]


def _example_image(out: Path, stage: str) -> tuple[str, str]:
    """(image path, question) for `generate`: the stage's first held-out sample, else the shipped cover."""
    from alignment.samples import read_samples

    samples = read_samples(out / stage)
    for example in (samples or {}).get("examples", []):
        if example.get("images"):
            return str(out / stage / example["images"][0]), example["question"]
    return str(sample_cover_path()), SAMPLE_QUESTION


def run_summary(out: Path, report: dict) -> str:
    """Where a finished run's results are and what to run next (paths as the recipe's output_dir names them)."""
    out = Path(out)
    stages = report.get("stages", [])
    seconds = sum(s.get("seconds") or 0 for s in stages)
    q = shlex.quote
    lines = [f"done: {report.get('recipe', 'run')}, {len(stages)} stage(s) in {seconds:.0f} s",
             f"  metrics:    {out / 'report.json'}",
             f"  run page:   {out / 'report.html'}  (open it in a browser)",
             f"  model card: {out / 'README.md'}",
             "  adapters:   " + ", ".join(f"{s['name']} {out / s['name']}" for s in stages),
             f"  curves:     tensorboard --logdir {q(str(out / 'runs'))}"]
    target = _target(stages)
    if target is None:
        return "\n".join(lines)
    folder = q(str(out / target["name"]))
    lines += ["next:", f"  vlm-align eval {folder} --split test"]
    if target.get("type") in POLICY_TYPES:
        image, question = _example_image(out, target["name"])
        lines += [f"  vlm-align generate {folder} --image {q(image)} --question {q(question)}",
                  f"  vlm-align merge {folder} {q(str(out) + '-merged')} --dtype bf16"]
    lines.append(f"  vlm-align report {q(str(out))}   # rebuild report.html")
    return "\n".join(lines)

"""Reports people can read: a PNG of the training curves and a model card (README.md) per run.

Both are rewritten after every stage from `report.json` and the resolved recipe; see
`write_curves` and `write_model_card`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

# Panels of a stage's row in training_curves.png: (title, history keys drawn on it).
PANELS = (
    ("loss", ("loss", "policy_loss", "value_loss")),
    ("rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins")),
    ("preference accuracy", ("rewards/accuracies",)),
    ("KL and score", ("kl", "score")),
)
CURVES = tuple(key for _, keys in PANELS for key in keys)
POLICY_TYPES = ("sft", "dpo", "ppo", "grpo")
SAMPLES_SHOWN = 4
SAMPLE_COVER = "alignment/assets/sample_cover.png"  # shipped with the package; the card's commands run from a clone's root


def _panels(stage: dict) -> list[tuple[str, list[tuple[str, list, list]]]]:
    """The panels with data for one stage: [(title, [(key, steps, values), ...])]."""
    panels = []
    for title, keys in PANELS:
        lines = []
        for key in keys:
            points = [(h["step"], h[key]) for h in stage.get("history", []) if key in h]
            if points:
                steps, values = zip(*points)
                lines.append((key, list(steps), list(values)))
        if lines:
            panels.append((title, lines))
    return panels


def write_curves(path: Path, report: dict) -> None:
    """One row per stage, one panel per kind of curve (loss; reward margins; accuracy; KL and score),
    each against the optimizer step with its own scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [(stage, _panels(stage)) for stage in report["stages"]]
    rows = [(stage, panels) for stage, panels in rows if panels]
    if not rows:
        return
    ncols = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(4.2 * ncols, 3.0 * len(rows)), squeeze=False)
    for row, (stage, panels) in enumerate(rows):
        for col in range(ncols):
            ax = axes[row][col]
            if col >= len(panels):
                ax.axis("off")
                continue
            title, lines = panels[col]
            for key, steps, values in lines:
                ax.plot(steps, values, label=key, marker="." if len(steps) < 20 else None)
            ax.set_title(f"{stage['name']} ({stage['type']}): {title}", fontsize=9)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if len(lines) > 1 or lines[0][0] != "loss":
                ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _numbers(metrics: dict | None) -> dict:
    """The numeric metrics of an `eval` / `test` block (absent: none)."""
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _stage_section(stage: dict) -> list[str]:
    lines = [f"### {stage['name']} ({stage['type']})", "",
             f"{stage.get('steps', '?')} steps in {_fmt(stage.get('seconds'))} s. "
             f"Training loss {_fmt(stage.get('train', {}).get('loss_first'))} -> "
             f"{_fmt(stage.get('train', {}).get('loss_last'))}.", ""]
    val, test = _numbers(stage.get("eval")), _numbers(stage.get("test"))
    if val or test:
        lines += ["| metric | val | test |", "|---|---|---|"]
        lines += [f"| {key} | {_fmt(val[key]) if key in val else '-'} | {_fmt(test[key]) if key in test else '-'} |"
                  for key in {**val, **test}]
    if "eval" not in stage:
        lines += [""] if val or test else []
        lines.append("No val examples, so no val metrics: tag rows `split: val` in the data or raise "
                     "`data.eval_fraction` to get them.")
    samples = (stage.get("eval") or {}).get("samples") or []
    if samples:
        lines += ["", "Held-out examples (greedy):", "", "| question | reference | answer |", "|---|---|---|"]
        lines += [f"| {_cell(s.get('question', ''))} | {_cell(s.get('answer', ''))} | {_cell(s.get('prediction', ''))} |"
                  for s in samples[:SAMPLES_SHOWN]]
    return lines + [""]


def _data_section(recipe) -> list[str]:
    from alignment.data.catalog import DEFAULT_INSTRUCTION

    data = recipe.data
    lines = ["## Data", "", f"- source: `{data.source}`" + (f" (format `{data.format}`)" if data.format else "")]
    if data.source == "synthetic_bookcover":
        lines.append(f"- {data.num_covers} synthetic book covers (seed {data.seed}), OCR-VQA's schema")
    lines += [
        f"- held out: {data.eval_fraction:.0%} of the covers when the source has no eval split; "
        f"at most {data.max_eval_examples} eval examples",
        f"- prompt instruction: \"{data.instruction or DEFAULT_INSTRUCTION}\"",
        f"- SFT answers that explain: {data.sft_verbose_fraction * data.sft_verbose_rate:.0%} "
        f"(templates: {data.sft_verbose_style}); rejected answers that are verbose "
        f"(the rest wrong): {data.verbose_fraction:.0%}",
        f"- rows over {data.max_length} tokens or otherwise bad: {data.on_error}",
        "",
    ]
    return lines


def write_model_card(path: Path, recipe, report: dict) -> None:
    """README.md of a run: what was trained, the metrics per stage, the data, how to use and
    reproduce it, and the resolved recipe."""
    import yaml

    out = recipe.output_dir
    stages = report["stages"]
    chain = " -> ".join(f"{s.name} ({s.type})" for s in recipe.stages)
    policy_stages = [s.name for s in recipe.stages if s.type in POLICY_TYPES]
    finished = {s["name"] for s in stages}
    target = next((n for n in reversed(policy_stages) if n in finished), policy_stages[-1] if policy_stages else None)
    lines = [
        f"# {report['recipe']}",
        "",
        f"Post-training of `{recipe.model.name}` ({recipe.model.quantization}) with vlm-align: {chain}.",
        f"Stages finished: {len(stages)} of {len(recipe.stages)}. Each stage's LoRA adapter is in PEFT's "
        "format (safetensors) in a folder named after it; reward models and critics add `head.safetensors`.",
        "",
        "## Results",
        "",
        "Metrics on held-out examples after each stage: `val` (what recipes are tuned on) and `test` (never "
        "used for tuning); `report.json` has them all.",
        "",
    ]
    for stage in stages:
        lines += _stage_section(stage)
    lines += ["![training curves](training_curves.png)", ""]
    lines += _data_section(recipe)
    lines += ["## Use it", "", "From the root of a vlm-align clone; `report.html` beside this card shows the "
              "metrics, the curves and each stage's answers to held-out examples.", "", "```bash"]
    if target:
        lines += [f"vlm-align eval {out}/{target}                     # metrics again, on the run's eval split",
                  f"vlm-align eval {out}/{target} data.path=my.jsonl  # ... or on your own data",
                  f"vlm-align generate {out}/{target} --image {SAMPLE_COVER} --question \"Who wrote this book?\"",
                  f"vlm-align merge {out}/{target} {out}-merged --dtype bf16  # plain transformers checkpoint"]
    lines += [f"tensorboard --logdir {out}/runs", "```", "",
              "## Reproduce", "",
              "The resolved recipe (below) is saved as `recipe.yaml` next to this card:", "",
              "```bash",
              f"vlm-align train {out}/recipe.yaml output_dir={out}-repro",
              f"accelerate launch --config_file launch/accelerate/ddp.yaml -m alignment.cli train "
              f"{out}/recipe.yaml output_dir={out}-repro",
              "```", "",
              "## Recipe", "", "```yaml",
              yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False).rstrip(), "```", ""]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)

"""Reports people can read: a PNG of the training curves and a short model card."""

from __future__ import annotations

from pathlib import Path

CURVES = ("loss", "rewards/margins", "rewards/accuracies", "kl", "score")


def write_curves(path: Path, report: dict) -> None:
    """One panel per stage: loss (and reward margins / KL where logged) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in report["stages"] if s.get("history")]
    if not stages:
        return
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for key in CURVES:
            points = [(h["step"], h[key]) for h in stage["history"] if key in h]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=key)
        ax.set_title(f"{stage['name']} ({stage['type']})")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_model_card(path: Path, recipe, report: dict) -> None:
    lines = [
        f"# {report['recipe']}",
        "",
        f"Base model: `{recipe.model.name}` ({recipe.model.quantization}); data: `{recipe.data.source}`.",
        "Adapters are in PEFT's format (safetensors), one folder per stage.",
        "",
        "| stage | type | steps | seconds | metric | value |",
        "|---|---|---|---|---|---|",
    ]
    for stage in report["stages"]:
        metrics = {k: v for k, v in stage.get("eval", {}).items() if isinstance(v, (int, float)) and "/" not in k}
        for i, (key, value) in enumerate(sorted(metrics.items())):
            head = f"{stage['name']} | {stage['type']} | {stage['steps']} | {stage['seconds']}" if i == 0 else " | | |"
            lines.append(f"| {head} | {key} | {_fmt(value)} |")
    lines += ["", "Reproduce:", "", "```", f"accelerate launch launch/run.py <recipe.yaml> output_dir={recipe.output_dir}",
              "```", "", "![training curves](training_curves.png)", ""]
    path.write_text("\n".join(lines))

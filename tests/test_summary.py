"""alignment.summary: a stage's metrics as a small table, the end-of-run summary whose commands are
real `vlm-align` command lines, and the shipped sample cover they can use."""

import json
import shlex

from PIL import Image, ImageChops, ImageStat

from alignment.cli import build_parser
from alignment.data.covers import render_sample_cover
from alignment.summary import run_summary, sample_cover_path, stage_metrics_table


def test_metrics_table_shows_val_and_test_and_a_dash_where_a_split_has_none():
    entry = {"name": "dpo", "eval": {"preference_accuracy": 0.75, "loss": None, "exact_match/author": 1.0,
                                     "samples": [{"question": "q"}]},
             "test": {"preference_accuracy": 0.5, "loss": 0.25}}
    lines = stage_metrics_table(entry).splitlines()
    assert lines[0] == "[dpo] evaluation"
    assert lines[1].split() == ["metric", "val", "test"]
    assert [line.split() for line in lines[3:]] == [["preference_accuracy", "0.7500", "0.5000"], ["loss", "—", "0.2500"]]
    assert stage_metrics_table({"name": "sft", "eval": {}, "test": None}) == "[sft] no metrics (no held-out examples)"


def _commands(summary: str) -> dict[str, list[str]]:
    lines = [line.strip().split("   #")[0] for line in summary.splitlines() if line.strip().startswith("vlm-align ")]
    return {shlex.split(line)[1]: shlex.split(line)[1:] for line in lines}


def test_summary_names_the_results_and_commands_the_cli_accepts(tmp_path):
    out = tmp_path / "my run"
    (out / "dpo" / "samples").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(out / "dpo" / "samples" / "c.png")
    (out / "dpo" / "samples.json").write_text(json.dumps({"split": "test", "examples": [
        {"images": ["samples/c.png"], "question": "Who wrote it?", "reference": "A", "answer": "B"}]}))
    report = {"recipe": "r", "stages": [{"name": "sft", "type": "sft", "seconds": 2.0},
                                        {"name": "dpo", "type": "dpo", "seconds": 3.0}]}
    summary = run_summary(out, report)
    for text in (str(out / "report.json"), str(out / "report.html"), f"sft {out / 'sft'}", f"dpo {out / 'dpo'}",
                 "2 stage(s) in 5 s"):
        assert text in summary, text
    commands = _commands(summary)
    assert set(commands) == {"eval", "generate", "merge", "report"}
    parser = build_parser()
    for name in ("eval", "generate", "merge"):  # `report` is wired into the CLI separately
        args = parser.parse_args(commands[name])
        assert args.stage == str(out / "dpo")
    generate = parser.parse_args(commands["generate"])
    assert generate.image == str(out / "dpo" / "samples" / "c.png") and generate.question == "Who wrote it?"


def test_without_held_out_images_generate_uses_the_shipped_cover(tmp_path):
    commands = _commands(run_summary(tmp_path, {"stages": [{"name": "grpo", "type": "grpo"}]}))
    args = build_parser().parse_args(commands["generate"])
    assert args.image == str(sample_cover_path()) and sample_cover_path().is_file()
    reward_only = _commands(run_summary(tmp_path, {"stages": [{"name": "reward", "type": "reward"}]}))
    assert set(reward_only) == {"eval", "report"}  # a reward model neither generates nor merges


def test_the_shipped_cover_is_the_rendered_sample_cover():
    with Image.open(sample_cover_path()) as shipped:
        assert shipped.mode == "RGB" and shipped.size == (224, 224)
        difference = ImageStat.Stat(ImageChops.difference(shipped, render_sample_cover())).mean
    assert max(difference) < 2.0  # the same drawing (text rendering may differ by a grey level across Pillow builds)
    assert sample_cover_path().stat().st_size < 16_000

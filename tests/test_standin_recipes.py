"""The Llama 3.2 Vision 11B recipes, unchanged but for their length, on the real-geometry stand-in:
4-bit, bf16, gradient checkpointing, LoRA dropout 0.05, 600x900 portrait covers (4 of Mllama's 560-px
tiles), Llama 3's real token ids and chat template; then `vlm-align generate`, `eval` and `merge` on
the result. The default suite runs the DPO recipe shortened to a step a stage; `-m slow` runs both
recipes a few steps longer, with the PPO recipe's four roles on one base."""

import json
from pathlib import Path

import pytest

from alignment.cli import main
from alignment.recipe import load_recipe, run_recipe

ROOT = Path(__file__).resolve().parent.parent
PORTRAIT = ["model.name=standin-mllama", "data.image_size=600", "data.image_height=900", "data.max_eval_examples=4"]


def shortened(stage_count: int, steps: int, covers: int) -> list[str]:
    overrides = [f"data.num_covers={covers}"]
    for i in range(stage_count):
        overrides += [f"stages.{i}.batch_size=1", f"stages.{i}.grad_accum=2", f"stages.{i}.eval_examples=2",
                      f"stages.{i}.eval_batch_size=2", f"stages.{i}.max_new_tokens=3", f"stages.{i}.save_every=100"]
    return overrides + [f"stages.{i}.max_steps={steps}" for i in range(stage_count)]


def run_11b(name: str, out: Path, stage_count: int, steps: int, covers: int, extra=()) -> dict:
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml",
                         [f"output_dir={out}", *PORTRAIT, *shortened(stage_count, steps, covers), *extra])
    assert recipe.model.quantization == "4bit" and recipe.model.dtype == "bfloat16"
    assert recipe.model.gradient_checkpointing and recipe.stages[0].lora.dropout == 0.05
    return run_recipe(recipe)


def check_report(report: dict, names: list[str]) -> None:
    assert [s["name"] for s in report["stages"]] == names
    for stage in report["stages"]:
        losses = [h["loss"] for h in stage["history"] if "loss" in h]
        assert losses and all(loss == loss for loss in losses), stage["name"]  # finite, present
        assert set(stage["test"]) >= {k for k in stage["eval"] if "/" not in k}


def test_dpo_11b_recipe_runs_on_the_standin_then_generate(tmp_path, capsys):
    report = run_11b("dpo_llama32_vision_11b", tmp_path, stage_count=2, steps=1, covers=24)
    check_report(report, ["sft", "dpo"])
    dpo = report["stages"][1]
    assert dpo["history"][0]["rewards/margins"] == 0.0  # bf16 + dropout 0.05: step 0's log-ratio is exactly 0
    cover = tmp_path / "cover.png"
    from PIL import Image

    Image.new("RGB", (600, 900), (150, 40, 40)).save(cover)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "dpo"), "--image", str(cover), "--question", "Who wrote this book?",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()  # an answer (random weights: any tokens)


def test_grpo_11b_recipe_dry_runs_on_the_standin(tmp_path):
    """`--dry-run`: the recipe validates, and one real batch of each stage (GRPO: a generation, then
    the update's forward) runs on the stand-in's 600x900 covers."""
    dry = load_recipe(ROOT / "recipes" / "grpo_llama32_vision_11b.yaml",
                      [f"output_dir={tmp_path}", *PORTRAIT, "data.num_covers=24", "stages.0.batch_size=1",
                       "stages.1.batch_size=1"])
    report = run_recipe(dry, dry_run=True)
    assert [s["name"] for s in report["stages"]] == ["sft", "grpo"]
    assert report["stages"][1]["batch"]["tiles_used"][1] == 4  # portrait covers fill Mllama's 4 tiles


QWEN = ["model.name=standin-qwen25vl", "data.image_size=600", "data.image_height=900", "data.max_eval_examples=4"]


def test_dpo_qwen_recipe_runs_on_the_standin(tmp_path):
    """`dpo_qwen25vl_7b.yaml` unchanged but for its length on Qwen2.5-VL-7B's geometry (real ids and
    template, 4-bit, bf16, checkpointing, pixel budget 128-512 tokens): a 600x900 cover is 486 image
    tokens, encoded once per pair; DPO's first log-ratio is exactly 0."""
    recipe = load_recipe(ROOT / "recipes" / "dpo_qwen25vl_7b.yaml",
                         [f"output_dir={tmp_path}", *QWEN, *shortened(2, 1, 24)])
    assert (recipe.model.min_pixels, recipe.model.max_pixels) == (100352, 401408)
    report = run_recipe(recipe)
    check_report(report, ["sft", "dpo"])
    assert report["stages"][1]["history"][0]["rewards/margins"] == 0.0


def test_grpo_qwen_recipe_dry_runs_on_the_standin(tmp_path):
    dry = load_recipe(ROOT / "recipes" / "grpo_qwen25vl_7b.yaml",
                      [f"output_dir={tmp_path}", *QWEN, "data.num_covers=24", "stages.0.batch_size=1",
                       "stages.1.batch_size=1"])
    report = run_recipe(dry, dry_run=True)
    assert [s["name"] for s in report["stages"]] == ["sft", "grpo"]
    assert report["stages"][1]["batch"]["vision_tokens_per_image"] == 486  # 600x900 within 512 x 28 x 28


@pytest.mark.slow
def test_grpo_11b_recipe_runs_a_step_on_the_standin(tmp_path):
    report = run_11b("grpo_llama32_vision_11b", tmp_path / "run", stage_count=2, steps=1, covers=24,
                     extra=["stages.1.num_minibatches=1", "stages.1.grad_accum=1", "stages.1.num_generations=2",
                            "stages.1.eval_kl_samples=1"])
    check_report(report, ["sft", "grpo"])
    assert report["stages"][1]["history"][0]["clipfrac"] == 0.0  # bf16 + dropout 0.05: the first ratio is 1


@pytest.mark.slow
def test_both_11b_recipes_run_on_the_standin_then_eval_and_merge(tmp_path):
    dpo = run_11b("dpo_llama32_vision_11b", tmp_path / "dpo", stage_count=2, steps=3, covers=40)
    check_report(dpo, ["sft", "dpo"])
    ppo = run_11b("ppo_llama32_vision_11b", tmp_path / "ppo", stage_count=3, steps=4, covers=40,
                  extra=["stages.2.num_minibatches=1", "stages.2.ppo_epochs=2", "stages.2.grad_accum=1",
                         "stages.2.save_every=2", "stages.2.eval_kl_samples=1"])
    check_report(ppo, ["sft", "reward", "ppo"])
    assert ppo["stages"][2]["history"][0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "ppo" / "ppo"), "--split", "test", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["exact_match"] >= 0
    assert main(["merge", str(tmp_path / "dpo" / "dpo"), str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    from transformers import AutoModelForImageTextToText, AutoProcessor

    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert merged.config.text_config.vocab_size == 128256
    assert AutoProcessor.from_pretrained(tmp_path / "merged").image_processor.max_image_tiles == 4

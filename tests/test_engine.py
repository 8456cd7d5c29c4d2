"""The step engine: DDP and DeepSpeed ZeRO-2/3 through accelerate on 2 CPU processes (gloo) give the
losses, gradient norms and adapters of one process with twice the batch; ZeRO-2 halves each rank's
optimizer state, ZeRO-3 its parameters too; report.json says which engine ran and what each rank held.

Each launch starts real processes (`accelerate launch launch/run.py`), about 30-50 s here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.stages.engine import fill_deepspeed_config, per_rank_bytes

ROOT = Path(__file__).resolve().parent.parent
deepspeed = pytest.importorskip("deepspeed")


def test_the_recipe_fills_the_deepspeed_json():
    config = json.loads((ROOT / "launch" / "deepspeed" / "zero3.json").read_text())
    filled = fill_deepspeed_config(config, batch_size=4, world_size=2, max_grad_norm=0.5, bf16=True)
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["train_batch_size"] == 8
    assert filled["gradient_accumulation_steps"] == 1 and filled["managed_gradient_accumulation"] is False
    assert filled["gradient_clipping"] == 0.5 and filled["bf16"] == {"enabled": True}
    assert filled["zero_optimization"]["stage"] == 3
    assert "auto" not in json.dumps(filled)
    assert fill_deepspeed_config({}, 2, 1, None, False)["gradient_clipping"] == 0.0  # no clipping


def test_report_per_rank_bytes_is_the_most_any_rank_held_in_any_stage():
    def rank(params, grads, state, masters):
        return {"parameter_bytes": params, "gradient_bytes": grads, "optimizer_state_bytes": state,
                "master_weight_bytes": masters}

    stages = [{"distributed": {"per_rank": [rank(100, 10, 20, 0), rank(90, 12, 20, 0)]}},
              {"distributed": {"per_rank": [rank(100, None, 8, 4), rank(100, 5, 30, 6)]}}, {"name": "untrained"}]
    assert per_rank_bytes(stages) == {"parameters": 100, "gradients": 12, "optimizer": 36}
    assert per_rank_bytes([{"name": "x"}]) is None


# Runs launch/run.py, but SIGKILLs rank 0 when optimizer step DIE_AFTER is done, before its checkpoint.
DIE = """
import os, runpy, signal, sys
from alignment.stages import base
real = base.Stage._save
def save(self, step, *args, **kwargs):
    if step == int(os.environ["DIE_AFTER"]) and self.ctx.rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, step, *args, **kwargs)
base.Stage._save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def launch(config: str, out: Path, recipe: str, batch_size: int, overrides=(), steps=2, die_after=None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in [k for k in env if k.startswith("ACCELERATE_")] + ["WORLD_SIZE"]:
        env.pop(key, None)  # what an earlier test's Accelerator left in this process's environment
    entry = [str(ROOT / "launch" / "run.py")]
    if die_after is not None:
        (out.parent / "die.py").write_text(DIE)
        entry, env["DIE_AFTER"] = [str(out.parent / "die.py"), *entry], str(die_after)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config), *entry,
           str(ROOT / "recipes" / recipe), f"output_dir={out}",
           "model.quantization=none", "data.num_covers=60", "data.max_eval_examples=2", *overrides]
    stages = {"sft_bookcover.yaml": 1, "dpo_bookcover.yaml": 2, "ppo_bookcover.yaml": 3}[recipe]
    for i in range(stages):
        cmd += [f"stages.{i}.max_steps={steps}", f"stages.{i}.batch_size={batch_size}", f"stages.{i}.eval_examples=2",
                f"stages.{i}.max_new_tokens=2", f"stages.{i}.warmup_steps=0", f"stages.{i}.grad_accum=1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=out.parent)
    if die_after is not None:
        assert result.returncode != 0, "the run was to be killed"
        return {}
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def curves(report: dict) -> dict:
    return {s["name"]: [(h["loss"], h["grad_norm"]) for h in s["history"] if "loss" in h] for s in report["stages"]}


def assert_same_training(one: dict, two: dict, out_one: Path, out_two: Path) -> None:
    a, b = curves(one), curves(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(torch.tensor(b[name]), torch.tensor(a[name]), atol=1e-4, rtol=1e-5)
        first, second = (load_file(str(o / name / "adapter_model.safetensors")) for o in (out_one, out_two))
        assert first.keys() == second.keys()
        for key in first:  # Adam turns summation-order noise in near-zero gradients into ~lr-sized steps
            torch.testing.assert_close(second[key], first[key], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def one_process_sft(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    return out, launch("launch/accelerate/cpu.yaml", out, "sft_bookcover.yaml", 8)


@pytest.mark.parametrize("config, engine, zero", [("launch/accelerate/ddp_cpu.yaml", "ddp", 0),
                                                  ("launch/accelerate/deepspeed_zero2_cpu.yaml", "deepspeed", 2),
                                                  ("launch/accelerate/deepspeed_zero3_cpu.yaml", "deepspeed", 3)])
def test_two_processes_train_as_one_with_twice_the_batch(tmp_path, one_process_sft, config, engine, zero):
    out_one, one = one_process_sft
    two = launch(config, tmp_path / "run", "sft_bookcover.yaml", 4)
    assert_same_training(one, two, out_one, tmp_path / "run")
    facts = {k: v for k, v in two["distributed"].items() if k != "per_rank_bytes"}
    assert facts == {"engine": engine, "zero_stage": zero, "world_size": 2}
    assert {k: v for k, v in one["distributed"].items() if k != "per_rank_bytes"} == {
        "engine": "none", "zero_stage": 0, "world_size": 1}
    peak, alone_peak = two["distributed"]["per_rank_bytes"], one["distributed"]["per_rank_bytes"]
    assert set(peak) == {"parameters", "gradients", "optimizer"} and peak["gradients"] > 0
    ranks, alone = two["stages"][0]["distributed"]["per_rank"], one["stages"][0]["distributed"]["per_rank"][0]
    assert len(ranks) == 2
    for held in ranks:
        share = held["optimizer_state_bytes"] / alone["optimizer_state_bytes"]
        params = held["parameter_bytes"] / alone["parameter_bytes"]
        if zero in (2, 3):  # each rank keeps half of Adam's moments, and an fp32 copy of half the weights
            assert 0.45 < share < 0.55, share
            assert 0.45 < peak["gradients"] / alone_peak["gradients"] < 0.55  # and half the reduced gradients
            trained = alone["optimizer_state_bytes"] / 2  # Adam: two fp32 moments per trained weight
            assert 0.45 < held["master_weight_bytes"] / trained < 0.55
        else:
            assert share == 1.0
        if zero == 3:  # and half of every parameter, the frozen base's included
            assert 0.45 < params < 0.55, params
        else:
            assert params == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("config", ["launch/accelerate/ddp_cpu.yaml", "launch/accelerate/deepspeed_zero2_cpu.yaml",
                                    "launch/accelerate/deepspeed_zero3_cpu.yaml"])
def test_dpo_recipe_on_two_processes_trains_as_one(tmp_path, config):
    """SFT then DPO (reference log-probs, two rows per pair): the same curves and adapters."""
    one = launch("launch/accelerate/cpu.yaml", tmp_path / "one", "dpo_bookcover.yaml", 8)
    two = launch(config, tmp_path / "two", "dpo_bookcover.yaml", 4)
    assert_same_training(one, two, tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["launch/accelerate/ddp_cpu.yaml", "launch/accelerate/deepspeed_zero2_cpu.yaml",
                                    "launch/accelerate/deepspeed_zero3_cpu.yaml"])
def test_reward_and_ppo_on_two_processes(tmp_path, config):
    """SFT, reward model, PPO (actor and critic backward separately) on 2 processes train as one process
    with twice the batch: each answer's sampling is seeded by its example's draw number, advantages are
    whitened over both processes' tokens. With one minibatch per rollout (as here) the update sees the
    same rows; with several, each process shuffles its own rollout into its share of each minibatch."""
    one_update = ["stages.2.ppo_epochs=1", "stages.2.num_minibatches=1"]
    one = launch("launch/accelerate/cpu.yaml", tmp_path / "one", "ppo_bookcover.yaml", 8, one_update)
    two = launch(config, tmp_path / "two", "ppo_bookcover.yaml", 4, one_update)
    assert_same_training(one, two, tmp_path / "one", tmp_path / "two")
    ppo = [s for s in two["stages"] if s["name"] == "ppo"][0]
    first = [h for h in ppo["history"] if "loss" in h][0]
    alone = [h for h in [s for s in one["stages"] if s["name"] == "ppo"][0]["history"] if "loss" in h][0]
    for key in ("score", "score_std", "kl", "response_length", "reward_total"):  # the same rollout was sampled
        assert abs(first[key] - alone[key]) <= 1e-4 * max(1.0, abs(alone[key])), (key, first[key], alone[key])
    assert two["distributed"]["world_size"] == 2


def test_a_four_bit_base_trains_under_zero3_each_rank_holding_half(tmp_path):
    """QLoRA under ZeRO-3: the packed NF4 weights are stored as the compute dtype so DeepSpeed splits
    them too; training is that of one process with twice the batch."""
    quantized = ["model.quantization=4bit"]
    one = launch("launch/accelerate/cpu.yaml", tmp_path / "one", "sft_bookcover.yaml", 8, quantized)
    two = launch("launch/accelerate/deepspeed_zero3_cpu.yaml", tmp_path / "two", "sft_bookcover.yaml", 4, quantized)
    assert_same_training(one, two, tmp_path / "one", tmp_path / "two")
    alone = one["stages"][0]["distributed"]["per_rank"][0]["parameter_bytes"]
    for held in two["stages"][0]["distributed"]["per_rank"]:
        assert 0.45 < held["parameter_bytes"] / alone < 0.55


def test_kill_9_under_zero3_then_resume_ends_with_the_uninterrupted_adapters(tmp_path):
    """Rank 0 is SIGKILLed after step 2 of 3 (checkpoints every step: step 1 complete); `resume=true`
    on the same 2 processes ends with the adapters of an uninterrupted ZeRO-3 run, bit for bit."""
    config, every_step = "launch/accelerate/deepspeed_zero3_cpu.yaml", ["stages.0.save_every=1"]
    (tmp_path / "full").mkdir()
    (tmp_path / "cut").mkdir()
    full = launch(config, tmp_path / "full" / "run", "sft_bookcover.yaml", 4, every_step, steps=3)
    launch(config, tmp_path / "cut" / "run", "sft_bookcover.yaml", 4, every_step, steps=3, die_after=2)
    assert not (tmp_path / "cut" / "run" / "sft" / "adapter_model.safetensors").exists()
    resumed = launch(config, tmp_path / "cut" / "run", "sft_bookcover.yaml", 4, [*every_step, "resume=true"], steps=3)
    assert curves(resumed) == curves(full)
    first, second = (load_file(str(tmp_path / d / "run" / "sft" / "adapter_model.safetensors")) for d in ("full", "cut"))
    assert all(torch.equal(first[k], second[k]) for k in first)

"""The GRPO stage: G answers per prompt from one prefill and one image encoding, rewards from named
functions, group advantages, whole groups per micro-batch, resumable rollouts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignment.config import ConfigError
from alignment.losses import group_advantages
from alignment.policy import MultimodalPolicy
from alignment.recipe import make_accelerator, recipe_from_dict
from alignment.stages import GRPOStage, RunContext
from alignment.stages.stream import ExampleStream
from tests._adapters import save_perturbed_adapters
from tests._online import check_kill_mid_rollout_then_resume
from tests._recipes import build, tiny_recipe

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread

LOGGED = ("score", "score_std", "response_length", "informative_groups", "clipfrac", "ratio_mean", "policy_loss",
          "reward/exact_match", "reward/exact_match_std", "reward/concise")


def counting_reward(examples, completions):
    """A user reward (module:function): the answer's length in characters."""
    return [float(len(c)) for c in completions]


def constant_reward(examples, completions):
    return [1.0] * len(completions)


def wrong_length_reward(examples, completions):
    return [1.0]


def make_stage(out, prompts, adapters, resume=False, model="tiny-mllama", **overrides):
    raw = tiny_recipe(out, stages=("grpo",), steps=4, batch_size=2, resume=resume)
    raw["model"]["name"] = model
    raw["stages"][0].update({"num_generations": 3, "num_minibatches": 2, "max_new_tokens": 4, "eval_examples": 4,
                             "eval_batch_size": 6, "lr": 1e-3, "init_adapter": str(adapters / "sft"),
                             "temperature": 1.5,
                             "rewards": [{"name": "exact_match"}, {"name": "concise", "weight": 0.5}], **overrides})
    recipe = build(raw)
    policy = MultimodalPolicy.from_pretrained(model)
    ctx = RunContext(accelerator=make_accelerator(recipe), output_dir=Path(out), resume=resume)
    return GRPOStage(recipe.stages[0], policy, ctx, *prompts), policy


def count_vision_calls(policy):
    seen = []
    vision = policy.family.vision_modules(policy.model)[0]
    handle = vision.register_forward_hook(lambda m, args, kwargs, out: seen.append(1), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("model", ["tiny-qwen25vl", "tiny-qwen3vl"])
def test_qwen_rollout_encodes_each_image_once_and_prefills_each_prompt_once(tmp_path, prompts, model):
    """Qwen-VL: one vision call per rollout; the prompt forward runs on P rows (M-RoPE positions from the
    images' grids), every later decode step on P x G rows; the update trains on the shared features."""
    stage, policy = make_stage(tmp_path, prompts, tmp_path, model=model, num_minibatches=1, init_adapter=None)
    stage.setup(None)
    text_rows = []
    language = policy.family.inner_model(policy.model).language_model
    hook = language.register_forward_hook(
        lambda m, args, kwargs, out: text_rows.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    seen, handle = count_vision_calls(policy)
    rollout = stage.make_rollout(ExampleStream(stage.train_examples, 2, seed=0))
    hook.remove()
    assert len(seen) == 1 and len(rollout.image_features) == 2
    assert rollout.image_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert text_rows[0][0] == 2 and text_rows[0][1] > 1  # the prefill: one row per prompt
    decode_steps = [rows for rows, length in text_rows[1:] if length == 1]
    assert decode_steps and set(decode_steps) == {6}  # then one token for each of P x G rows
    losses, _ = stage.train_step(rollout)
    handle.remove()
    assert torch.isfinite(torch.as_tensor(losses["actor"])) and len(seen) == 1  # no vision call in the update


def test_one_rollout_encodes_each_image_once_and_scores_groups(tmp_path, prompts, adapters):
    stage, policy = make_stage(tmp_path, prompts, adapters, num_minibatches=1, eval_batch_size=12)
    stage.setup(None)
    stream = ExampleStream(stage.train_examples, 2, seed=0)
    seen, handle = count_vision_calls(policy)
    rollout = stage.make_rollout(stream)
    assert len(seen) == 1  # one vision pass for 2 prompts x 3 answers (sampling and every scoring pass)
    assert rollout.size == 6 and len(rollout.image_features) == 2
    assert rollout.image_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert rollout.ids[0] == rollout.ids[1] == rollout.ids[2] != rollout.ids[3]
    prompt_rows = torch.where(rollout.response_mask.bool(), 0, rollout.input_ids[:, 1:])
    assert torch.equal(prompt_rows[0], prompt_rows[2]) and not torch.equal(prompt_rows[0], prompt_rows[3])
    assert rollout.old_logprobs is None and rollout.ref_logprobs is None  # one update per rollout: on-policy
    expected = group_advantages(rollout.scores.view(2, 3).double(), "grpo").flatten().float()
    torch.testing.assert_close(rollout.group_advantages, expected)
    losses, metrics = stage.train_step(rollout)
    assert set(losses) == {"actor"}
    losses["actor"].backward()
    handle.remove()
    assert len(seen) == 1  # the update reuses the rollout's features
    assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["clipfrac"] == 0.0


def test_answers_of_a_group_share_one_prefill(tmp_path, prompts, adapters):
    """G answers come from one prompt forward (the KV cache is repeated), and greedy G answers equal
    the answer of the prompt alone."""
    stage, policy = make_stage(tmp_path, prompts, adapters)
    stage.setup(None)
    batch = stage.collate(stage.train_examples[:2])
    calls = []
    handle = policy.model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    with torch.no_grad():
        shared = policy.generate(batch, max_new_tokens=4, num_samples=3)
    handle.remove()
    prefills = [shape for shape in calls if shape[1] > 1]
    assert prefills == [batch["input_ids"].shape]  # [2, T]: one row per prompt, not per answer
    assert all(shape[0] == 6 for shape in calls if shape[1] == 1)
    with torch.no_grad():
        alone = policy.generate(batch, max_new_tokens=4)
    assert torch.equal(shared, alone.repeat_interleave(3, dim=0))


def test_sampled_answers_follow_the_generator_and_rows_of_one_prompt_differ(tmp_path, prompts, adapters):
    stage, policy = make_stage(tmp_path, prompts, adapters)
    stage.setup(None)
    batch = stage.collate(stage.train_examples[:2])
    with torch.no_grad():
        a = policy.generate(batch, 4, temperature=1.5, num_samples=4, generator=torch.Generator().manual_seed(3))
        b = policy.generate(batch, 4, temperature=1.5, num_samples=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert len({tuple(row) for row in a[:4].tolist()}) > 1


def test_stage_runs_logs_and_reports(tmp_path, prompts, adapters):
    stage, _ = make_stage(tmp_path, prompts, adapters, max_steps=2)
    entry = stage.run(None)
    assert entry["steps"] == 2 and len(entry["history"]) == 2
    for record in entry["history"]:
        assert set(LOGGED) <= set(record), set(LOGGED) - set(record)
        assert all(torch.isfinite(torch.tensor(record[k])) for k in LOGGED)
    assert entry["history"][0]["clipfrac"] == 0.0  # first update: the sampling policy itself
    for key in ("exact_match", "mean_answer_words", "mean_reward_before", "mean_reward_after", "kl",
                "mean_reward_before/exact_match", "mean_reward_after/concise"):
        assert key in entry["eval"], key
    assert set(entry["test"]) >= {"exact_match", "mean_reward_after"} if "test" in entry else True
    assert (tmp_path / "grpo" / "adapter_model.safetensors").exists()


def test_two_updates_per_rollout_keep_old_logprobs_and_the_reference_when_kl_is_on(tmp_path, prompts, adapters):
    stage, _ = make_stage(tmp_path, prompts, adapters, kl_beta=0.1, importance_sampling="sequence")
    stage.setup(None)
    rollout = stage.make_rollout(ExampleStream(stage.train_examples, 2, seed=0))
    assert rollout.old_logprobs is not None and rollout.ref_logprobs is not None
    # actor == reference at the start: the sampled KL is 0
    torch.testing.assert_close(rollout.old_logprobs, rollout.ref_logprobs, atol=1e-5, rtol=0)
    assert stage.rollout_stats["kl"] == pytest.approx(0.0, abs=1e-4)


def test_micro_batches_hold_whole_groups(tmp_path, prompts, adapters):
    stage, _ = make_stage(tmp_path, prompts, adapters, batch_size=2, grad_accum=2, num_minibatches=1, max_steps=1)
    stage.setup(None)
    stream = ExampleStream(stage.train_examples, 2, seed=0)
    batches = stage.next_micro_batches(stream)
    assert len(batches) == 2 and all(b.size == 6 for b in batches)
    for b in batches:
        assert len(b.image_features) == 2
        ids = b.ids
        assert all(ids.count(i) == 3 for i in ids)


def test_dynamic_sampling_replaces_groups_whose_rewards_are_all_equal(tmp_path, prompts, adapters):
    """With a reward that is the same for every answer, every group is flat: dynamic sampling samples
    `max_sampling_rounds` rounds of prompts, then fills the rollout with flat groups."""
    stage, _ = make_stage(tmp_path, prompts, adapters, dynamic_sampling=True, max_sampling_rounds=3,
                          rewards=[{"name": "tests.test_stage_grpo:constant_reward"}], num_minibatches=1)
    stage.setup(None)
    stream = ExampleStream(stage.train_examples, 2, seed=0)
    rollout = stage.make_rollout(stream)
    assert rollout.size == 6 and stream.position == 3  # three rounds drawn, one rollout kept
    assert stage.rollout_stats["informative_groups"] == 0.0 and stage.rollout_stats["sampling_rounds"] == 3
    assert torch.all(rollout.group_advantages == 0)


def test_user_reward_by_dotted_path_and_clear_errors(tmp_path, prompts, adapters):
    stage, _ = make_stage(tmp_path, prompts, adapters, rewards=[{"name": "tests.test_stage_grpo:counting_reward"}])
    stage.setup(None)
    total, terms = stage.score([{"answer": "x"}] * 2, ["ab", "abcd"], [True, True])
    assert total.tolist() == [2.0, 4.0] and list(terms) == ["tests.test_stage_grpo:counting_reward"]
    stage, _ = make_stage(tmp_path, prompts, adapters, rewards=[{"name": "tests.test_stage_grpo:wrong_length_reward"}])
    stage.setup(None)
    with pytest.raises(ValueError, match="wrong_length_reward' returned 1 values for 2 completions"):
        stage.score([{"answer": "x"}] * 2, ["a", "b"], [True, True])
    with pytest.raises(ConfigError, match="rewards.0.name: .*no function 'nope'"):
        recipe_from_dict({"stages": [{"type": "grpo", "rewards": [{"name": "tests.test_stage_grpo:nope"}]}]})
    with pytest.raises(ConfigError, match="reward_model reward needs a reward stage"):
        recipe_from_dict({"stages": [{"type": "grpo", "rewards": [{"name": "reward_model"}]}]})


def test_overlong_answers_lose_the_penalty(tmp_path, prompts, adapters):
    stage, _ = make_stage(tmp_path, prompts, adapters, overlong_penalty=0.5, rewards=[{"name": "exact_match"}])
    stage.setup(None)
    total, _ = stage.score([{"answer": "Travel"}] * 2, ["travel", "travel"], [True, False])
    assert total.tolist() == [1.0, 0.5]


def test_reward_model_term_scores_with_the_reward_adapter(tmp_path, prompts, adapters):
    stage, policy = make_stage(tmp_path, prompts, adapters, reward_adapter=str(adapters / "reward"),
                               rewards=[{"name": "reward_model"}], num_minibatches=1)
    stage.setup(None)
    assert "reward" in policy.adapters and stage.models["reward"] is policy
    rollout = stage.make_rollout(ExampleStream(stage.train_examples, 2, seed=0))
    assert rollout.scores.std() > 0  # real scores, not a constant
    assert stage.rollout_stats["reward/reward_model"] == pytest.approx(rollout.scores.mean().item(), abs=1e-5)


def test_llava_rollout_and_update(tmp_path, prompts):
    adapters = save_perturbed_adapters(tmp_path / "adapters", model="tiny-llava")
    stage, policy = make_stage(tmp_path / "run", prompts, adapters, model="tiny-llava", max_steps=2)
    entry = stage.run(None)
    assert entry["steps"] == 2 and torch.isfinite(torch.tensor(entry["history"][-1]["loss"]))


def test_killed_mid_rollout_and_resumed_equals_uninterrupted(tmp_path, prompts, adapters, monkeypatch):
    check_kill_mid_rollout_then_resume(
        tmp_path, lambda out, resume=False: make_stage(out, prompts, adapters, resume=resume)[0], "grpo",
        ("grpo",), monkeypatch)


def test_config_checks():
    grpo = {"type": "grpo", "num_iterations": 2, "num_minibatches": 3}
    recipe = recipe_from_dict({"stages": [{**grpo, "max_steps": 12, "save_every": 5}]})
    assert recipe.stages[0].steps_per_iteration == 6 and recipe.stages[0].save_every == 6
    with pytest.raises(ConfigError, match="multiple of num_iterations x num_minibatches = 6"):
        recipe_from_dict({"stages": [{**grpo, "max_steps": 10}]})
    for bad, message in ((("advantage", "mean"), "advantage"), (("loss_agg", "sum"), "loss_agg"),
                         (("importance_sampling", "seq"), "importance_sampling"), (("clip_low", 1.0), "clip_low")):
        with pytest.raises(ConfigError, match=message):
            recipe_from_dict({"stages": [{"type": "grpo", bad[0]: bad[1]}]})
    with pytest.raises(ConfigError, match="rloo needs at least 2"):
        recipe_from_dict({"stages": [{"type": "grpo", "advantage": "rloo", "num_generations": 1}]})


@pytest.mark.parametrize("config", ["ddp_cpu.yaml", "deepspeed_zero3_cpu.yaml"])
def test_two_process_grpo_finishes(tmp_path, config):
    """SFT -> GRPO under `accelerate launch` with 2 gloo processes, DDP and ZeRO-3, dynamic sampling on:
    processes whose groups differ keep sampling rounds together (under ZeRO-3 every generation step
    gathers parameters with all processes, so a process sampling alone would hang)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in [k for k in env if k.startswith("ACCELERATE_")] + ["WORLD_SIZE"]:
        env.pop(key, None)  # what an earlier test's Accelerator left in this process's environment
    small = ["model.quantization=none", "data.num_covers=60", "data.max_eval_examples=4"]
    for i in range(2):
        small += [f"stages.{i}.batch_size=2", f"stages.{i}.eval_examples=4", f"stages.{i}.eval_batch_size=8",
                  f"stages.{i}.max_new_tokens=4", f"stages.{i}.warmup_steps=0", f"stages.{i}.max_steps=2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch/accelerate" / config), str(ROOT / "launch/run.py"),
           str(ROOT / "recipes/grpo_bookcover.yaml"), f"output_dir={out}", *small,
           "stages.1.dynamic_sampling=true", "stages.1.max_sampling_rounds=3", "stages.1.num_generations=4"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    grpo = report["stages"][1]
    assert grpo["type"] == "grpo" and grpo["steps"] == 2 and report["distributed"]["world_size"] == 2
    assert "reward/exact_match" in grpo["history"][-1]
    assert report["distributed"]["engine"] == ("ddp" if config.startswith("ddp") else "deepspeed")
    assert all(h["sampling_rounds"] >= 1 for h in grpo["history"])

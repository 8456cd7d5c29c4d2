"""PPO stage: the rollout record, one iteration's logs, the shared base's roles, exact resume, 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignment.config import ConfigError
from alignment.policy import LoraSpec, MultimodalPolicy
from alignment.recipe import make_accelerator, recipe_from_dict
from alignment.stages import PPOStage, RunContext
from tests._online import check_kill_mid_rollout_then_resume
from tests._recipes import build, tiny_recipe

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread

LOGGED = ("score", "kl", "kl_coef", "entropy", "clipfrac", "value_clipfrac", "approx_kl", "policy_loss",
          "value_loss", "explained_variance", "response_length")


def make_stage(out, prompts, adapters, resume=False, policy=None, **overrides):
    raw = tiny_recipe(out, stages=("ppo",), steps=4, batch_size=2, resume=resume)
    raw["stages"][0].update({"num_minibatches": 2, "ppo_epochs": 1, "max_new_tokens": 4, "eval_examples": 4,
                             "eval_batch_size": 4, "lr": 1e-3, "init_adapter": str(adapters / "sft"),
                             "reward_adapter": str(adapters / "reward"), **overrides})
    recipe = build(raw)
    policy = policy or MultimodalPolicy.from_pretrained("tiny-mllama")
    ctx = RunContext(accelerator=make_accelerator(recipe), output_dir=Path(out), resume=resume,
                     load_policy=lambda: MultimodalPolicy.from_pretrained("tiny-mllama"))
    return PPOStage(recipe.stages[0], policy, ctx, *prompts), policy


def test_each_answer_is_sampled_from_its_own_draw_whatever_shares_its_batch(tmp_path, prompts, adapters):
    """A rollout of 4 prompts samples the answers of two rollouts of 2 (what 2 processes sample), by
    draw number: the basis of 2-process PPO training as 1 process with twice the batch."""
    stage, _ = make_stage(tmp_path, prompts, adapters, temperature=3.0)  # flatter than the tiny heads
    stage.setup(None)
    examples = stage.train_examples[:4]

    def answers(rollout):
        return [row[mask.bool()].tolist() for row, mask in zip(rollout.input_ids[:, 1:], rollout.response_mask)]

    whole = answers(stage.make_rollout(examples, iteration=0, draws=[10, 11, 12, 13]))
    halves = (answers(stage.make_rollout(examples[:2], iteration=0, draws=[10, 11]))
              + answers(stage.make_rollout(examples[2:], iteration=0, draws=[12, 13])))
    assert whole == halves
    assert answers(stage.make_rollout(examples, iteration=0, draws=[20, 21, 22, 23])) != whole


def count_images_encoded(policy):
    seen = []
    vision = policy.base_model.model.vision_model
    handle = vision.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["pixel_values"].shape[0]),
                                          with_kwargs=True)
    return seen, handle


def test_rollout_record_shapes_and_padding(tmp_path, prompts, adapters):
    stage, policy = make_stage(tmp_path, prompts, adapters)
    stage.setup(None)
    seen, handle = count_images_encoded(policy)
    rollout = stage.make_rollout(stage.train_examples[:4], iteration=0)
    assert seen == [4]  # one vision pass for sampling, old/reference log-probs, values and scores
    losses, _ = stage.train_step(rollout.select([0, 1]))
    assert set(losses) == {"actor", "critic"}  # one summed loss per role, each backpropagated inside it
    sum(losses.values()).backward()
    handle.remove()
    assert seen == [4]  # updates reuse the rollout's image features
    B, T = rollout.input_ids.shape
    assert B == 4 and rollout.attention_mask.shape == (B, T)
    assert rollout.cross_attention_mask.shape[:2] == (B, T)
    assert len(rollout.image_features) == B
    for name in ("response_mask", "old_logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
        assert getattr(rollout, name).shape == (B, T - 1), name
    assert rollout.scores.shape == (B,) and len(rollout.ids) == B
    mask = rollout.response_mask.bool()
    assert mask.any(dim=1).all() and (mask.sum(1) <= 4).all()  # every row has an answer of <= max_new_tokens
    padding = ~mask
    assert (rollout.advantages[padding] == 0).all() and (rollout.returns[padding] == 0).all()
    assert (rollout.rewards[padding] == 0).all()
    # The answer's tokens are attended; prompt padding (left) and answer padding (right) are not.
    assert (rollout.attention_mask[:, 1:].bool() | ~mask).all()
    # First iteration: the actor is the reference, so the KL part of the reward is 0 and the
    # summed reward of each row is its score.
    torch.testing.assert_close(rollout.old_logprobs, rollout.ref_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.rewards.sum(1), rollout.scores, atol=1e-4, rtol=0)
    # Whitened advantages: mean 0, std 1 over the answer tokens.
    assert abs(rollout.advantages[mask].mean().item()) < 1e-5
    assert abs(rollout.advantages[mask].std().item() - 1) < 1e-3
    # A micro-batch of two rows drops the columns both leave padded and keeps every answer token.
    part = rollout.select([0, 1])
    assert part.response_mask.sum() == rollout.response_mask[:2].sum()
    assert part.input_ids.shape[1] == part.response_mask.shape[1] + 1


def test_one_iteration_runs_and_logs(tmp_path, prompts, adapters):
    stage, policy = make_stage(tmp_path, prompts, adapters, max_steps=2)
    entry = stage.run(None)
    assert entry["steps"] == 2 and len(entry["history"]) == 2
    for record in entry["history"]:
        assert set(LOGGED) <= set(record), set(LOGGED) - set(record)
        assert all(torch.isfinite(torch.tensor(record[k])) for k in LOGGED)
    assert entry["history"][0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # first update: pi == pi_old
    for key in ("mean_reward_before", "mean_reward_after", "kl", "exact_match", "mean_answer_words"):
        assert key in entry["eval"]
    assert (tmp_path / "ppo" / "adapter_model.safetensors").exists()
    assert (tmp_path / "ppo" / "critic" / "head.safetensors").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_update_has_ratio_one_under_lora_dropout(tmp_path, prompts, dtype):
    """The 11B recipe's LoRA dropout 0.05 on a 4-bit base: rollouts (eval mode) and updates (train mode)
    see one policy, because the stage switches dropout off (`disable_dropout`, as TRL does), so the
    first minibatch's ratio is 1: no clipping, approx_kl 0."""
    policy = MultimodalPolicy.from_pretrained("tiny-mllama", quantization="4bit", dtype=getattr(torch, dtype))
    policy.add_adapter("policy", LoraSpec(r=4, dropout=0.05))
    policy.add_adapter("reward", LoraSpec(r=4, dropout=0.05), head=True)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
    policy.save_adapter("policy", tmp_path / "sft")
    policy.save_adapter("reward", tmp_path / "reward")
    raw = tiny_recipe(tmp_path / "run", stages=("ppo",), steps=1, batch_size=2)
    raw["model"].update(quantization="4bit", dtype=dtype)
    raw["stages"][0].update({"num_minibatches": 1, "ppo_epochs": 1, "max_new_tokens": 4, "eval_examples": 0,
                             "init_adapter": str(tmp_path / "sft"), "reward_adapter": str(tmp_path / "reward")})
    recipe = build(raw)
    fresh = MultimodalPolicy.from_pretrained("tiny-mllama", quantization="4bit", dtype=getattr(torch, dtype))
    ctx = RunContext(accelerator=make_accelerator(recipe), output_dir=tmp_path / "run")
    first = PPOStage(recipe.stages[0], fresh, ctx, *prompts).run(None)["history"][0]
    assert first["clipfrac"] == 0.0
    assert first["approx_kl"] == pytest.approx(0.0, abs=1e-6)


def test_vision_tower_runs_once_per_distinct_vision_adapter(tmp_path, prompts):
    """An `all`-preset reward adapter (LoRA on the vision tower) makes the reward role encode the images
    under its own weights; actor, reference and a fresh language-only critic keep sharing one encoding:
    2 vision passes per rollout chunk, not one per role."""
    policy = MultimodalPolicy.from_pretrained("tiny-mllama")
    policy.add_adapter("policy", LoraSpec(r=4))
    policy.add_adapter("reward", LoraSpec(r=4, preset="all"), head=True)
    policy.save_adapter("policy", tmp_path / "sft")
    policy.save_adapter("reward", tmp_path / "reward")
    raw = tiny_recipe(tmp_path / "run", stages=("ppo",), steps=2, batch_size=2)
    raw["stages"][0].update({"num_minibatches": 2, "ppo_epochs": 1, "max_new_tokens": 4, "eval_batch_size": 4,
                             "critic_init": "fresh", "init_adapter": str(tmp_path / "sft"),
                             "reward_adapter": str(tmp_path / "reward")})
    recipe = build(raw)
    fresh = MultimodalPolicy.from_pretrained("tiny-mllama")
    ctx = RunContext(accelerator=make_accelerator(recipe), output_dir=tmp_path / "run")
    stage = PPOStage(recipe.stages[0], fresh, ctx, *prompts)
    stage.setup(None)
    assert stage.vision_adapted == {"actor": False, "reference": False, "critic": False, "reward": True}
    seen, handle = count_images_encoded(fresh)
    stage.make_rollout(stage.train_examples[:4], iteration=0)
    handle.remove()
    assert seen == [4, 4]  # one shared encoding + the reward adapter's own


def test_shared_base_carries_every_role(tmp_path, prompts, adapters):
    stage, policy = make_stage(tmp_path, prompts, adapters)
    stage.setup(None)
    assert all(model is policy for model in stage.models.values())  # one base model object
    assert {"policy", "critic", "reward", "reference"} <= set(policy.adapters)
    assert set(policy.heads) == {"critic", "reward"}
    assert policy.trainable_adapters == {"policy", "critic"}
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".policy." in n or ".critic." in n or n.startswith("heads.critic") for n in trainable)
    batch = stage.collate(stage.eval_examples[:2])
    features = policy.encode_images(batch)
    tokens = policy.generate(batch, max_new_tokens=3, image_features=features)
    answers = stage._answer_batch(batch, tokens)
    with torch.no_grad():
        before = policy.completion_logprobs(answers, features)[1]
        for name, param in policy.named_parameters():  # a training step's worth of change to the actor
            if "lora_B" in name and ".policy." in name:
                param.add_(0.05)
        with policy.reference():
            reference = policy.completion_logprobs(answers, features)[1]
        moved = policy.completion_logprobs(answers, features)[1]
    assert policy.active_adapter == "policy"  # reference() gave the actor back
    torch.testing.assert_close(reference, before, atol=1e-6, rtol=0)  # reference = the starting policy
    assert (moved - before).abs().max() > 1e-3


def test_evaluation_kl_is_sampled_from_the_actor(tmp_path, prompts, adapters):
    """`kl` in the evaluation: 0 while the actor is the reference; after the actor moves, a Monte
    Carlo estimate of KL(actor || reference) over sampled answers. With one-token answers the exact
    KL of the two next-token distributions (logits / temperature) is computable: they agree."""
    stage, policy = make_stage(tmp_path, prompts, adapters, temperature=0.7, max_new_tokens=1, eval_kl_samples=100)
    stage.setup(None)
    assert stage.sampled_kl() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name and ".policy." in name:
                param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    policy.eval()
    batch = stage.collate(stage.eval_examples[:4])
    with torch.no_grad():
        features = policy.encode_images(batch)
        actor = torch.log_softmax(policy.forward(batch, features).logits[:, -1].float() / 0.7, -1)
        with policy.reference():
            reference = torch.log_softmax(policy.forward(batch, features).logits[:, -1].float() / 0.7, -1)
    exact = (actor.exp() * (actor - reference)).sum(-1).mean().item()
    generator = torch.Generator().manual_seed(0)
    with stage._eval_mode():
        samples = torch.tensor([r for _ in range(300) for r in stage._sampled_log_ratios(stage.eval_examples[:4],
                                                                                         generator)])
    standard_error = samples.std().item() / len(samples) ** 0.5
    assert exact > 5 * standard_error  # the move is large enough to be seen
    assert abs(samples.mean().item() - exact) < 4 * standard_error, (samples.mean().item(), exact, standard_error)
    assert stage.sampled_kl() == pytest.approx(exact, abs=5 * standard_error)


def test_separate_models_hold_their_own_bases(tmp_path, prompts, adapters):
    stage, policy = make_stage(tmp_path, prompts, adapters, separate_models=True)
    stage.setup(None)
    models = stage.models
    assert len({id(m) for m in models.values()}) == 4
    assert models["actor"].adapters == ["policy"] and "critic" in models["critic"].adapters
    assert stage.trained_models() == [models["actor"], models["critic"]]
    rollout = stage.make_rollout(stage.train_examples[:2], iteration=0)
    torch.testing.assert_close(rollout.old_logprobs, rollout.ref_logprobs, atol=1e-5, rtol=0)


def test_killed_mid_iteration_and_resumed_equals_uninterrupted(tmp_path, prompts, adapters, monkeypatch):
    check_kill_mid_rollout_then_resume(
        tmp_path, lambda out, resume=False: make_stage(out, prompts, adapters, resume=resume)[0], "ppo",
        ("ppo", "ppo/critic"), monkeypatch)


def test_sigterm_mid_iteration_waits_for_the_boundary(tmp_path, prompts, adapters):
    stage, _ = make_stage(tmp_path, prompts, adapters, max_steps=4)
    stage.setup(None)
    stage.remaining = 1  # one update of the current rollout left
    stage.buffer = [["last"]]
    stage._stop(15, None)  # the loop's handler gets SIGTERM with one update of the rollout left
    assert stage._stop_signal() == 0  # not mid-iteration
    assert stage.next_micro_batches(None) == ["last"]
    assert stage._stop_signal() == 15  # the loop checkpoints after this step, at the boundary, then stops


def test_config_keeps_checkpoints_on_iteration_boundaries():
    ppo = {"type": "ppo", "reward_adapter": "x", "ppo_epochs": 2, "num_minibatches": 3}
    recipe = recipe_from_dict({"stages": [{**ppo, "max_steps": 12, "save_every": 5}]})
    assert recipe.stages[0].steps_per_iteration == 6 and recipe.stages[0].save_every == 6
    with pytest.raises(ConfigError, match="multiple of ppo_epochs x num_minibatches = 6"):
        recipe_from_dict({"stages": [{**ppo, "max_steps": 10}]})
    with pytest.raises(ConfigError, match="critic_init"):
        recipe_from_dict({"stages": [{**ppo, "max_steps": 6, "critic_init": "policy"}]})


def test_two_process_ppo_finishes(tmp_path):
    """SFT -> reward -> PPO under `accelerate launch` with 2 gloo processes (about 20 s)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    small = ["model.quantization=none", "data.num_covers=60", "data.max_eval_examples=4"]
    for i in range(3):
        small += [f"stages.{i}.batch_size=2", f"stages.{i}.eval_examples=4", f"stages.{i}.eval_batch_size=4",
                  f"stages.{i}.max_new_tokens=4", f"stages.{i}.warmup_steps=0"]
    small += ["stages.0.max_steps=2", "stages.1.max_steps=2", "stages.2.max_steps=4"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch/accelerate/ddp_cpu.yaml"), str(ROOT / "launch/run.py"),
           str(ROOT / "recipes/ppo_bookcover.yaml"), f"output_dir={out}", *small]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    ppo = report["stages"][2]
    assert ppo["type"] == "ppo" and ppo["steps"] == 4
    assert set(LOGGED) <= set(ppo["history"][-1])
    assert (out / "ppo" / "adapter_model.safetensors").exists()

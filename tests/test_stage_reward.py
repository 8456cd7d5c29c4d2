"""Reward-model stage: Bradley-Terry training on image preference pairs, one vision pass per pair."""

import pytest
import torch

from alignment.data import build_datasets
from alignment.losses import bradley_terry_loss, reward_centering_loss
from alignment.policy import MultimodalPolicy
from alignment.recipe import make_accelerator
from alignment.stages import RewardModelStage, RunContext
from tests._recipes import build, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def pairs():
    train, evaluation, _ = build_datasets(num_covers=60, seed=0, task="preference", max_eval_samples=16)
    return train, evaluation


def make_stage(tmp_path, pairs, **overrides):
    raw = tiny_recipe(tmp_path, stages=("reward",), steps=12, batch_size=8)
    raw["stages"][0].update({"eval_examples": 16, "eval_batch_size": 16, "save_every": 100,
                             "lr_schedule": "constant", **overrides})
    recipe = build(raw)
    policy = MultimodalPolicy.from_pretrained("tiny-mllama")
    ctx = RunContext(accelerator=make_accelerator(recipe), output_dir=tmp_path)
    return RewardModelStage(recipe.stages[0], policy, ctx, *pairs), policy


def test_a_few_steps_lower_the_loss_and_beat_chance(tmp_path, pairs):
    """12 steps of 8 pairs over a 16-pair set: the Bradley-Terry loss falls and the pairs are ranked."""
    train = pairs[0][:16]
    stage, policy = make_stage(tmp_path, (train, train), lr=1e-3)
    entry = stage.run(None)
    losses = [h["loss"] for h in entry["history"]]
    assert sum(losses[-4:]) / 4 < 0.5 * losses[0]
    metrics = entry["eval"]
    assert metrics["pairwise_accuracy"] >= 0.8  # chance is 0.5
    assert metrics["reward_std"] > 0 and metrics["reward_mean_chosen"] > metrics["reward_mean_rejected"]
    assert (tmp_path / "reward" / "adapter_model.safetensors").exists()
    assert (tmp_path / "reward" / "head.safetensors").exists()
    assert policy.trainable_parameters() == []  # nothing of the reward model stays trainable for later stages


def test_vision_tower_runs_once_per_pair_per_step(tmp_path, pairs):
    stage, policy = make_stage(tmp_path, pairs)
    stage.setup(None)
    batch = stage.collate(stage.train_examples[:4])
    seen = []
    vision = policy.base_model.model.vision_model
    handle = vision.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["pixel_values"].shape[0]),
                                          with_kwargs=True)
    loss, metrics = stage.train_step(batch)
    loss.backward()
    handle.remove()
    assert batch["input_ids"].shape[0] == 8 and seen == [4]  # 8 sequences, 4 images, one call
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    # Trainable: the reward adapter and its head only.
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert names and all(".reward." in n or n.startswith("heads.reward") for n in names)


def test_train_step_is_the_summed_bradley_terry_loss_with_margin(tmp_path, pairs):
    stage, _ = make_stage(tmp_path, pairs, margin=0.5)
    stage.setup(None)
    batch = stage.collate(stage.train_examples[:4])
    with torch.no_grad():
        loss, _ = stage.train_step(batch)
        chosen, rejected = stage.pair_rewards(batch)
    torch.testing.assert_close(loss, 4 * bradley_terry_loss(chosen, rejected, 0.5))
    assert loss / 4 > bradley_terry_loss(chosen, rejected)  # a margin raises the loss


def test_train_step_adds_the_weighted_centering_term(tmp_path, pairs):
    stage, _ = make_stage(tmp_path, pairs, center_rewards=0.5)
    stage.setup(None)
    batch = stage.collate(stage.train_examples[:4])
    with torch.no_grad():
        stage.policy.heads["reward"].bias.fill_(3.0)  # every reward offset by 3: the term is far from 0
        loss, _ = stage.train_step(batch)
        chosen, rejected = stage.pair_rewards(batch)
    expected = 4 * (bradley_terry_loss(chosen, rejected) + 0.5 * reward_centering_loss(chosen, rejected))
    torch.testing.assert_close(loss, expected)
    assert reward_centering_loss(chosen, rejected) > 1.0

"""DPO stage: one vision-tower pass per preference pair per step, for policy and reference together."""

import pytest
import torch

from alignment.data import build_datasets
from alignment.policy import LoraSpec, MultimodalPolicy
from alignment.recipe import make_accelerator, recipe_from_dict
from alignment.stages import DPOStage, RunContext
from tests._recipes import tiny_recipe


def make_stage(tmp_path, name="tiny-mllama", **overrides):
    raw = tiny_recipe(tmp_path, stages=("dpo",))
    raw["stages"][0].update(overrides)
    recipe = recipe_from_dict(raw, "test")
    policy = MultimodalPolicy.from_pretrained(name)
    train, evaluation, _ = build_datasets(num_covers=60, seed=0, task="preference", max_eval_samples=8)
    ctx = RunContext(accelerator=make_accelerator(recipe), output_dir=tmp_path)
    stage = DPOStage(recipe.stages[0], policy, ctx, train, evaluation)
    return stage, policy


def count_images_encoded(policy):
    """A hook on the family's vision tower recording how many images each call encodes (Mllama: one
    pixel_values entry each; Qwen: one image_grid_thw row each, its patches flattened)."""
    seen = []

    def images(args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        return (grid if grid is not None else kwargs["pixel_values"]).shape[0]

    vision = policy.family.vision_modules(policy.model)[0]
    handle = vision.register_forward_hook(lambda m, args, kwargs, out: seen.append(images(args, kwargs)),
                                          with_kwargs=True)
    return seen, handle


FAMILIES = ["tiny-mllama", "tiny-qwen25vl", "tiny-qwen3vl"]


@pytest.mark.parametrize("name", FAMILIES)
def test_one_vision_pass_per_pair_per_step(tmp_path, name):
    stage, policy = make_stage(tmp_path, name)
    policy.add_adapter("policy", LoraSpec(r=4))
    policy.freeze_reference("policy")  # reference = frozen copy, as after SFT
    stage.setup(None)
    batch = stage.collate(stage.train_examples[:4])
    seen, handle = count_images_encoded(policy)
    loss, metrics = stage.train_step(batch)
    loss.backward()
    handle.remove()
    assert batch["num_pairs"] == 4 and batch["input_ids"].shape[0] == 8  # chosen + rejected rows
    assert seen == [4]  # one vision call encoding 4 images: once per pair, shared by all 4 sequences
    assert torch.isfinite(loss)
    # At step 0 the policy equals the reference: every pair's loss is ln 2.
    torch.testing.assert_close(loss / 4, torch.tensor(0.6931472), atol=1e-5, rtol=0)
    assert metrics["rewards/margins"] == 0.0


@pytest.mark.parametrize("name", FAMILIES)
def test_vision_lora_encodes_for_policy_and_reference(tmp_path, name):
    """With LoRA on the vision tower the features differ, so the reference needs its own pass."""
    stage, policy = make_stage(tmp_path, name)
    policy.add_adapter("policy", LoraSpec(r=4, preset="multimodal"))
    stage.setup(None)
    batch = stage.collate(stage.train_examples[:4])
    seen, handle = count_images_encoded(policy)
    stage.train_step(batch)
    handle.remove()
    assert seen == [4, 4]


def test_precomputed_reference_logprobs_match_live_ones(tmp_path):
    stage, policy = make_stage(tmp_path, precompute_ref_logprobs=True)
    stage.train_examples = stage.train_examples[:8]
    policy.add_adapter("policy", LoraSpec(r=4))
    stage.setup(None)
    stage.before_training()
    batch = stage.collate(stage.train_examples[:4])
    with torch.no_grad():
        cached = stage._reference_logps(batch, None)
        stage.reference_logps = None
        live = stage._reference_logps(batch, policy.encode_images(batch))
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=0)


def test_rpo_alpha_adds_the_chosen_answers_token_nll(tmp_path):
    stage, policy = make_stage(tmp_path, rpo_alpha=0.5)
    policy.add_adapter("policy", LoraSpec(r=4))
    policy.freeze_reference("policy")
    stage.setup(None)
    batch = stage.collate(stage.train_examples[:4])
    with torch.no_grad():
        loss, metrics = stage.train_step(batch)
        _, chosen_logps, mask = policy.completion_logprobs(batch, policy.encode_images(batch))
    nll = -(chosen_logps[:4] / mask[:4].sum(-1))  # per-token NLL of each chosen answer
    assert (nll > 0).all()
    # Policy == reference at step 0, so each pair's DPO part is ln 2; RPO adds 0.5 x its NLL.
    torch.testing.assert_close(loss, (torch.log(torch.tensor(2.0)) + 0.5 * nll).sum(), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(metrics["nll/chosen"]), nll.mean(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("precompute", [False, True])
def test_step_zero_log_ratio_is_exactly_zero_in_bf16_with_dropout(tmp_path, precompute):
    """bf16, 4-bit, LoRA dropout 0.05 (the 11B recipe's): at step 0 the policy equals its reference, and
    both the live and the precomputed reference pass give a log-ratio of exactly 0 (dropout is off for
    the stage; reference passes run under the same autocast and on the same micro-batches)."""
    raw = tiny_recipe(tmp_path, stages=("dpo",), steps=1, batch_size=4)
    raw["model"].update(dtype="bfloat16", quantization="4bit")
    raw["stages"][0].update(precompute_ref_logprobs=precompute, eval_examples=0)
    recipe = recipe_from_dict(raw, "test")
    policy = MultimodalPolicy.from_pretrained("tiny-mllama", quantization="4bit", dtype=torch.bfloat16)
    policy.add_adapter("policy", LoraSpec(r=4, dropout=0.05))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
    policy.freeze_reference("policy")
    train, evaluation, _ = build_datasets(num_covers=40, seed=0, task="preference", max_eval_samples=4)
    ctx = RunContext(accelerator=make_accelerator(recipe), output_dir=tmp_path)
    first = DPOStage(recipe.stages[0], policy, ctx, train, evaluation).run(None)["history"][0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.05 for m in policy.modules())  # restored after

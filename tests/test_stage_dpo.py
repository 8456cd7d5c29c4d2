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


# ----------------------------------------------------------------------------- the preference family
# Each loss type in a DPO stage (besides sigmoid, ipo, hinge): its settings in the stage.
FAMILY = {
    "apo_zero": {"loss_type": "apo_zero"},
    "apo_down": {"loss_type": "apo_down"},
    "bco_pair": {"loss_type": "bco_pair"},
    "orpo": {"loss_type": "orpo"},
    "simpo": {"loss_type": "simpo", "beta": 2.0},
    "cpo": {"loss_type": "cpo"},
    "mpo": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
}
REFERENCE_FREE = {"orpo": "orpo", "simpo": "simpo", "cpo": "cpo", "simpo+sft": ["simpo", "sft"]}


def family_stage(tmp_path, name="tiny-mllama", **overrides):
    """A DPO stage on 8 training pairs (2 micro-batches of 4), a fresh LoRA policy adapter (so the
    policy equals its reference, the bare base, at step 0), evaluation off."""
    stage, policy = make_stage(tmp_path, name, **{"max_steps": 3, "lr": 5e-3, "eval_examples": 0, **overrides})
    stage.train_examples = stage.train_examples[:8]
    stage.ctx.report_to = ("none",)
    policy.add_adapter("policy", LoraSpec(r=4))
    return stage, policy


def mean_loss(stage, policy, batch) -> float:
    """The stage's loss per pair on `batch` (no update, BCO's δ left as it is)."""
    policy.eval()
    with torch.no_grad():
        return stage._pair_rewards(batch)[0].mean().item()


OTHER_FAMILIES = [pytest.param(name, kind, id=f"{name}-{kind}")
                  for name in ("tiny-llava", "tiny-qwen25vl") for kind in FAMILY]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name, kind", [("tiny-mllama", kind) for kind in FAMILY] + OTHER_FAMILIES)
def test_every_loss_type_trains_and_lowers_its_loss(tmp_path, name, kind):
    """3 steps on the same 4 pairs (one micro-batch of 4): the stage's own loss on them falls
    on tiny-mllama, tiny-llava and tiny-qwen25vl (about a second each)."""
    stage, policy = family_stage(tmp_path, name, **FAMILY[kind])
    stage.train_examples = stage.train_examples[:4]
    stage.setup(None)
    batch = stage.collate(stage.train_examples)
    before = mean_loss(stage, policy, batch)
    assert stage.train() == 3
    after = mean_loss(stage, policy, batch)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in stage.history)
    assert after < before - 0.01, (before, after)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("loss_type", REFERENCE_FREE.values(), ids=list(REFERENCE_FREE))
def test_reference_free_losses_load_no_reference(tmp_path, capsys, monkeypatch, loss_type):
    stage, policy = family_stage(tmp_path, loss_type=loss_type)
    calls = {"reference": 0, "encode": 0}
    reference, encode = policy.reference, policy.encode_images

    def counted(name, method):
        def call(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)
        return call

    monkeypatch.setattr(policy, "reference", counted("reference", reference))
    monkeypatch.setattr(policy, "encode_images", counted("encode", encode))
    stage.setup(tmp_path)  # as after SFT: a DPO stage with a reference would freeze a copy here
    assert "reference" not in policy.adapters
    assert capsys.readouterr().out.count("reference-free") == 1
    stage.before_training()
    loss, metrics = stage.train_step(stage.collate(stage.train_examples[:4]))
    loss.backward()
    with torch.no_grad():
        stage._pair_rewards(stage.collate(stage.train_examples[4:8]))  # evaluation's pass
    assert calls == {"reference": 0, "encode": 2}  # one image encoding per step, no reference pass
    assert stage.reference_logps is None and torch.isfinite(loss)


@pytest.mark.usefixtures("one_thread")
def test_sigmoid_with_a_reference_still_runs_the_reference(tmp_path, monkeypatch):
    stage, policy = family_stage(tmp_path)
    calls = []
    reference = policy.reference
    monkeypatch.setattr(policy, "reference", lambda: calls.append(1) or reference())
    stage.setup(tmp_path)
    assert "reference" in policy.adapters
    stage.train_step(stage.collate(stage.train_examples[:4]))
    assert calls == [1]


def perturbed(policy):
    """Move the policy's LoRA B off zero (after freezing the reference) so that log-ratios are not 0."""
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name and ".policy." in name:
                param.add_(0.05 * torch.randn_like(param))


@pytest.mark.usefixtures("one_thread")
def test_bco_delta_is_the_running_mean_of_the_rewards_seen(tmp_path):
    from alignment.losses import bco_pair_loss

    stage, policy = family_stage(tmp_path, loss_type="bco_pair")
    stage.setup(tmp_path)
    perturbed(policy)
    rewards = []
    with torch.no_grad():
        for start in (0, 4):
            batch = stage.collate(stage.train_examples[start : start + 4])
            loss, metrics = stage.train_step(batch)
            logps = stage._pair_logps(batch)
            chosen, rejected = stage._rewards(logps)
            rewards += chosen.tolist() + rejected.tolist()
            delta = sum(rewards) / len(rewards)  # this batch's rewards counted before its loss
            expected = bco_pair_loss(logps.chosen_logratios, logps.rejected_logratios, stage.config.beta, delta)
            torch.testing.assert_close(loss, expected.sum(), atol=1e-5, rtol=0)
    assert stage.bco_reward_count == 16 and abs(delta) > 1e-4
    assert stage.bco_delta == pytest.approx(delta, abs=1e-6) and metrics["bco/delta"] == stage.bco_delta


@pytest.mark.usefixtures("one_thread")
def test_bco_delta_is_restored_on_resume(tmp_path):
    first, _ = family_stage(tmp_path, loss_type="bco_pair", max_steps=2, save_every=2)
    first.setup(None)
    first.train()
    assert first.bco_reward_count == 16 and first.bco_delta != 0.0
    again, _ = family_stage(tmp_path, loss_type="bco_pair", max_steps=2, save_every=2)
    again.ctx.resume = True
    again.setup(None)
    assert again.bco_delta == 0.0
    assert again.train() == 2  # resumed at its last step: nothing left to train
    assert (again.bco_reward_sum, again.bco_reward_count) == (first.bco_reward_sum, first.bco_reward_count)


@pytest.mark.usefixtures("one_thread")
def test_mpo_is_the_weighted_sum_of_sigmoid_bco_and_the_chosen_nll(tmp_path):
    stage, policy = family_stage(tmp_path, **FAMILY["mpo"])
    stage.setup(None)
    batch = stage.collate(stage.train_examples[:4])
    with torch.no_grad():
        loss, metrics = stage.train_step(batch)
        logps = stage._pair_logps(batch)
    nll = -(logps.chosen / logps.chosen_lengths)
    ln2 = torch.log(torch.tensor(2.0))
    # Step 0: policy == reference, every reward 0 (so δ = 0): DPO ln 2, BCO 2 ln 2, plus the NLL.
    torch.testing.assert_close(loss, (0.8 * ln2 + 0.2 * 2 * ln2 + 1.0 * nll).sum(), atol=1e-4, rtol=0)
    assert metrics["loss/sigmoid"] == pytest.approx(ln2.item(), abs=1e-5)
    assert metrics["loss/bco_pair"] == pytest.approx(2 * ln2.item(), abs=1e-5)
    assert metrics["loss/sft"] == pytest.approx(nll.mean().item(), abs=1e-5) == metrics["nll/chosen"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind, expected", [
    ("simpo", lambda c, r, lc, lr: -torch.nn.functional.logsigmoid(2.0 * (c / lc - r / lr) - 0.5)),
    ("cpo", lambda c, r, lc, lr: -torch.nn.functional.logsigmoid(0.1 * (c - r)) - c / lc),
])
def test_reference_free_losses_use_means_or_sums_and_add_the_nll(tmp_path, kind, expected):
    """SimPO on per-token means (beta 2, gamma 0.5), CPO on sums plus the chosen answers' NLL."""
    stage, policy = family_stage(tmp_path, **FAMILY[kind])
    stage.setup(None)
    perturbed(policy)
    batch = stage.collate(stage.train_examples[:4])
    with torch.no_grad():
        loss, _ = stage.train_step(batch)
        logps = stage._pair_logps(batch)
    want = expected(logps.chosen, logps.rejected, logps.chosen_lengths, logps.rejected_lengths)
    torch.testing.assert_close(loss, want.sum(), atol=1e-4, rtol=0)


def test_checkpoints_from_before_the_preference_family_keys_still_resume():
    """A DPO checkpoint written before `simpo_gamma` and `loss_weights` existed holds neither: at their defaults
    they are not part of the fingerprint; set, they are."""
    from alignment.config import DPOConfig
    from alignment.stages.base import config_fingerprint

    default = config_fingerprint(DPOConfig(name="dpo"))
    assert "simpo_gamma" not in default and "loss_weights" not in default
    changed = config_fingerprint(DPOConfig(name="dpo", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                                           simpo_gamma=1.0))
    assert changed["simpo_gamma"] == 1.0 and changed["loss_weights"] == [1.0, 0.5]


def test_the_stage_has_a_loss_for_every_name_recipes_may_pick():
    from alignment.losses import DPO_LOSS_TYPES
    from alignment.presets import PAIR_LOSSES, REFERENCE_PAIR_LOSSES, needs_reference
    from alignment.stages.dpo import LOSSES

    assert set(LOSSES) == set(PAIR_LOSSES) and set(DPO_LOSS_TYPES) <= set(REFERENCE_PAIR_LOSSES)
    assert needs_reference(["simpo", "sft"]) is False and needs_reference(["sigmoid", "sft"]) is True

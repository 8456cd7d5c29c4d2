"""Gradient checkpointing changes memory, never gradients: in every stage (SFT, DPO, reward model,
PPO actor and critic), on a 4-bit and an unquantised base, every trained adapter's gradients with
checkpointing equal those without it.

How roles and backward interact: checkpointing recomputes a layer's forward during backward, under
whatever adapter is active *then*. PPO's actor and critic share one base under different adapters,
so the loop runs one backward per role, inside that role (`Stage.backward_context`); a single
backward after the roles switched back sends the critic's gradient through the actor's adapter
(checked below: that is what happened before)."""

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from alignment.data import build_datasets
from alignment.policy import LoraSpec, MultimodalPolicy
from alignment.recipe import make_accelerator
from alignment.stages import STAGES, RunContext
from tests._adapters import save_perturbed_adapters
from tests._recipes import build, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    sft = build_datasets(num_covers=40, seed=0, task="sft", max_eval_samples=4)
    pairs = build_datasets(num_covers=40, seed=0, task="preference", max_eval_samples=4)
    return {"sft": sft[:2], "preference": pairs[:2]}


@pytest.fixture(scope="module")
def portrait_data():
    """600x900 covers: 4 of the stand-in's 560-px tiles each."""
    sft = build_datasets(num_covers=12, seed=0, task="sft", max_eval_samples=2, image_size=(600, 900))
    pairs = build_datasets(num_covers=12, seed=0, task="preference", max_eval_samples=2, image_size=(600, 900))
    return {"sft": sft[:2], "preference": pairs[:2]}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return save_perturbed_adapters(tmp_path_factory.mktemp("ckpt-adapters"), seed=3, preset="all")


@pytest.fixture(scope="module")
def standin_adapters(tmp_path_factory):
    return save_perturbed_adapters(tmp_path_factory.mktemp("ckpt-standin"), "standin-mllama", seed=3, preset="all")


def stage_for(kind, out, data, adapters, quantization, checkpointing, model="tiny-mllama"):
    raw = tiny_recipe(out, stages=(kind,), steps=2, batch_size=2)
    stage_raw = raw["stages"][0]
    if kind == "ppo":
        stage_raw.update({"num_minibatches": 1, "ppo_epochs": 1, "max_new_tokens": 4, "reward_adapter":
                          str(adapters / "reward"), "init_adapter": str(adapters / "sft")})
    elif kind == "reward":
        stage_raw["init_adapter"] = str(adapters / "reward")
    else:
        stage_raw["init_adapter"] = str(adapters / "sft")
    raw["model"]["name"] = model
    recipe = build(raw)
    policy = MultimodalPolicy.from_pretrained(model, quantization=quantization, gradient_checkpointing=checkpointing)
    ctx = RunContext(accelerator=make_accelerator(recipe), output_dir=Path(out))
    task = "sft" if kind in ("sft", "ppo") else "preference"
    return STAGES[kind](recipe.stages[0], policy, ctx, *data[task]), policy


def step_gradients(kind, out, data, adapters, quantization, checkpointing, per_role=True, model="tiny-mllama"):
    """Every trainable parameter's gradient after one micro-batch's backward, as the loop runs it."""
    torch.manual_seed(0)
    stage, policy = stage_for(kind, out, data, adapters, quantization, checkpointing, model)
    stage.setup(None)
    if kind == "ppo":
        batch = stage.make_rollout(stage.train_examples[:2], iteration=0)
    else:
        batch = stage.collate(stage.train_examples[:2])
    if not per_role:
        stage.backward_context = lambda role: nullcontext()
    for model in stage.trained_models():
        model.train()
    loss, _ = stage.train_step(batch)
    stage.backward(loss, 1.0)
    return {name: p.grad.clone() for model in stage.trained_models()
            for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def max_difference(a, b):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:4]
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("quantization", ["none", "4bit"])
@pytest.mark.parametrize("kind", ["sft", "dpo", "reward", "ppo"])
def test_checkpointing_leaves_every_adapters_gradient_unchanged(tmp_path, data, adapters, kind, quantization):
    plain = step_gradients(kind, tmp_path / "a", data, adapters, quantization, checkpointing=False)
    checkpointed = step_gradients(kind, tmp_path / "b", data, adapters, quantization, checkpointing=True)
    adapters_with_grads = {part for name in plain for part in ("policy", "critic", "reward") if f".{part}." in name}
    expected = {"sft": {"policy"}, "dpo": {"policy"}, "reward": {"reward"}, "ppo": {"policy", "critic"}}[kind]
    assert adapters_with_grads == expected
    assert all(g.abs().sum() > 0 for name, g in plain.items() if "lora_" in name)
    assert max_difference(plain, checkpointed) < 1e-5


@pytest.mark.parametrize("kind", ["sft", "dpo", "reward", "ppo"])
def test_checkpointing_leaves_gradients_unchanged_on_the_real_geometry(tmp_path, portrait_data, standin_adapters,
                                                                      kind):
    """The same on the Llama 3.2 Vision stand-in, 4-bit: 4 tiles per image, 128k vocabulary, <|image|> = 128256."""
    plain = step_gradients(kind, tmp_path / "a", portrait_data, standin_adapters, "4bit", False, model="standin-mllama")
    checkpointed = step_gradients(kind, tmp_path / "b", portrait_data, standin_adapters, "4bit", True,
                                  model="standin-mllama")
    assert all(g.abs().sum() > 0 for name, g in plain.items() if "lora_" in name)
    assert max_difference(plain, checkpointed) < 1e-5


def test_one_backward_after_the_roles_switched_back_is_wrong_under_checkpointing(tmp_path, data, adapters):
    """The bug this guards against: PPO's critic loss backpropagated with the actor's adapter active
    recomputes the critic's layers through the actor's LoRA. Non-reentrant checkpointing notices that
    the recomputation differs (CheckpointError); were it to run, the critic's gradient would be wrong."""
    plain = step_gradients("ppo", tmp_path / "a", data, adapters, "none", checkpointing=False)
    try:
        wrong = step_gradients("ppo", tmp_path / "b", data, adapters, "none", checkpointing=True, per_role=False)
    except torch.utils.checkpoint.CheckpointError:
        return
    critic = [k for k in plain if ".critic." in k and "lora_" in k]
    assert max((plain[k] - wrong.get(k, torch.zeros_like(plain[k]))).abs().max().item() for k in critic) > 1e-4


def vision_layer_calls(checkpointing: bool, grad: bool) -> int:
    """Runs of Mllama's vision encoder layers (their attention) over one forward (+ backward when `grad`)."""
    from alignment.models.mllama import inner_model

    policy = MultimodalPolicy.from_pretrained("tiny-mllama", gradient_checkpointing=checkpointing)
    policy.add_adapter("policy", LoraSpec(r=4, preset="vision"))
    policy.train()
    vision = inner_model(policy.base_model).vision_model
    calls = []
    for encoder in (vision.transformer, vision.global_transformer):
        for layer in encoder.layers:
            # a pre-hook: recomputation stops early, once the tensors backward needs exist again
            layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    pixels = {"pixel_values": torch.randn(1, 1, 1, 3, 112, 112), "aspect_ratio_ids": torch.tensor([[1]]),
              "aspect_ratio_mask": torch.tensor([[[1]]])}
    with torch.set_grad_enabled(grad):
        features = policy.encode_images(pixels)
        if grad:
            features.embeds.square().mean().backward()
    return len(calls)


def test_mllama_vision_layers_are_checkpointed_too():
    """transformers checkpoints Mllama's text layers only; the vision encoder's 32+8 layers over 4x1601
    tokens kept every activation (15.5 GB of an 11B DPO step, measured). With checkpointing on, each
    vision layer runs again in backward; without gradients it runs once."""
    layers = 3 + 1  # tiny-mllama: 3 local + 1 global vision layers
    assert vision_layer_calls(checkpointing=False, grad=True) == layers
    assert vision_layer_calls(checkpointing=True, grad=True) == 2 * layers
    assert vision_layer_calls(checkpointing=True, grad=False) == layers

"""The `projector` stage (LLaVA's first phase): only the projector and Mllama's cross-attention gates
train; the weights are saved in the stage folder, carried into the next stage, and reloaded on resume."""

import pytest
import torch
from safetensors.torch import load_file

from alignment.config import ConfigError
from alignment.policy import MultimodalPolicy
from alignment.recipe import recipe_from_dict, run_recipe
from alignment.stages.common import ensure_policy_adapter
from tests._recipes import build, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


PROJECTOR_NAMES = {"model.multi_modal_projector.weight", "model.multi_modal_projector.bias",
                   "model.language_model.layers.1.cross_attn_attn_gate", "model.language_model.layers.1.cross_attn_mlp_gate",
                   "model.language_model.layers.4.cross_attn_attn_gate", "model.language_model.layers.4.cross_attn_mlp_gate"}


def test_projector_then_sft(tmp_path):
    raw = tiny_recipe(tmp_path, stages=("projector", "sft"), steps=2, batch_size=4, report_to=["none"])
    raw["stages"][0]["lr"] = 1e-2
    base = MultimodalPolicy.from_pretrained("tiny-mllama")
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    report = run_recipe(build(raw))
    stage = report["stages"][0]
    assert stage["type"] == "projector" and stage["train"]["loss_last"] is not None
    saved = load_file(str(tmp_path / "projector" / "adapter_model.safetensors"))
    assert set(saved) == PROJECTOR_NAMES
    changed = {n for n in PROJECTOR_NAMES if not torch.equal(saved[n], before[n])}
    assert changed == PROJECTOR_NAMES  # every projector tensor trained (nothing else is in the file)
    # The SFT folder carries the projector weights; loading it gives the trained projector.
    carried = load_file(str(tmp_path / "sft" / "base_weights.safetensors"))
    assert all(torch.equal(carried[n], saved[n]) for n in PROJECTOR_NAMES)
    fresh = MultimodalPolicy.from_pretrained("tiny-mllama")
    fresh.load_adapter("policy", tmp_path / "sft", trainable=False)
    params = dict(fresh.base_model.named_parameters())
    assert all(torch.equal(params[n], saved[n]) for n in PROJECTOR_NAMES)
    # On resume, a later stage set up from the projector folder gets the weights, frozen, and a fresh adapter.
    resumed = MultimodalPolicy.from_pretrained("tiny-mllama")
    ensure_policy_adapter(resumed, build(raw).stages[1], tmp_path / "projector")
    params = dict(resumed.base_model.named_parameters())
    assert all(torch.equal(params[n], saved[n]) and not params[n].requires_grad for n in PROJECTOR_NAMES)
    assert all(".lora_" in n for n, p in resumed.named_parameters() if p.requires_grad)


def test_only_projector_trains_in_the_stage(tmp_path):
    from alignment.data import build_datasets
    from alignment.recipe import make_accelerator
    from alignment.stages import ProjectorStage, RunContext

    recipe = build(tiny_recipe(tmp_path, stages=("projector",), steps=1, batch_size=4))
    policy = MultimodalPolicy.from_pretrained("tiny-mllama")
    train, evaluation, _ = build_datasets(num_covers=20, seed=0, task="sft", max_eval_samples=4)
    ctx = RunContext(accelerator=make_accelerator(recipe), output_dir=tmp_path, report_to=("none",))
    stage = ProjectorStage(recipe.stages[0], policy, ctx, train, evaluation)
    stage.setup(None)
    names = {n.removeprefix("model.") for n, p in policy.named_parameters() if p.requires_grad}
    assert names == PROJECTOR_NAMES
    assert sum(p.numel() for p in policy.trainable_parameters()) == 192 * 192 + 192 + 4


def test_projector_stage_must_come_first():
    with pytest.raises(ConfigError, match="projector stage must come before"):
        recipe_from_dict({"stages": [{"type": "sft"}, {"type": "projector"}]})

"""`lora.method: full` (`alignment/adapters/full.py`): exactly the targeted base weights train, the
bare base is the weights the stage started from, a frozen reference set is a copy, save/load is
exact, a quantised base is refused, and SFT then DPO run on it through the recipe."""

import copy
import json
import math

import pytest
import torch

from alignment.adapters.menu import check_method
from alignment.config import ConfigError, DPOConfig, SFTConfig
from alignment.policy import LoraSpec, MultimodalPolicy
from alignment.recipe import recipe_from_dict, run_recipe
from alignment.stages.base import RunContext
from alignment.stages.dpo import DPOStage
from alignment.stages.sft import SFTStage
from tests._adapters import sft_losses
from tests._policy import make_batch
from tests._recipes import build, tiny_recipe
from tests._toy_stage import ToyAccelerator

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def base():
    return MultimodalPolicy.from_pretrained("tiny-mllama")


def _fresh(base, **spec):
    policy = MultimodalPolicy(copy.deepcopy(base.model), base.processor)
    policy.add_adapter("policy", LoraSpec(method="full", **spec))
    return policy


def _logps(policy, batch):
    with torch.no_grad():
        return policy.completion_logprobs(batch)[1]


def test_language_preset_trains_the_text_decoder_and_nothing_else(base):
    """Trainable = every element of model.language_model.* and lm_head (2,681,476 on tiny-mllama);
    three AdamW steps lower the loss and leave the vision tower and projector bit-identical."""
    policy = _fresh(base)
    batch = make_batch(policy)
    text = [n for n in policy.named_parameters() if ".language_model." in n[0] or ".lm_head." in n[0]]
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {n for n, _ in text}
    assert sum(p.numel() for p in policy.trainable_parameters()) == sum(p.numel() for _, p in text) == 2_681_476
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    losses = sft_losses(policy, batch, steps=3, lr=1e-3)
    assert losses[-1] < losses[0] - 2.0, losses
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if n in frozen)


def test_preset_and_target_modules_narrow_it(base):
    policy = _fresh(base, target_modules=[r"lm_head\.weight", r".*\.norm\.weight"])
    assert sorted(policy.own["full"].configs["policy"]["parameters"]) == ["lm_head.weight",
                                                                         "model.language_model.norm.weight"]
    policy = _fresh(base, preset="vision")
    names = policy.own["full"].configs["policy"]["parameters"]
    assert names and all("vision_model" in n for n in names) and policy.vision_adapted_by("policy")
    with pytest.raises(ValueError, match="no floating-point parameter"):
        _fresh(base, target_modules=["nothing"])


def test_refused_on_a_quantised_base():
    for quantization in ("4bit", "8bit"):
        with pytest.raises(ConfigError, match=rf"lora\.method: full cannot run on the {quantization} base .*"
                                              "set model.quantization: none"):
            check_method("full", quantization)
    with pytest.raises(ConfigError, match=r"stages\.0\.lora\.method: full cannot run on the 4bit base"):
        recipe_from_dict({"stages": [{"type": "sft", "lora": {"method": "full"}}]})  # 4bit is the default
    assert recipe_from_dict({"model": {"quantization": "none"},
                             "stages": [{"type": "sft", "lora": {"method": "full"}}]}).stages[0].lora.method == "full"


def test_save_and_load_round_trip_exactly(base, tmp_path):
    policy = _fresh(base)
    batch = make_batch(policy)
    sft_losses(policy, batch, steps=1, lr=1e-3)
    trained = _logps(policy, batch)
    policy.save_adapter("policy", tmp_path / "full")
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert config["peft_type"] == "FULL" and config["preset"] == "language" and len(config["parameters"]) == 65
    loaded = MultimodalPolicy(copy.deepcopy(base.model), base.processor)
    loaded.load_adapter("policy", tmp_path / "full", trainable=False)
    saved, mine = policy.own["full"].state_of("policy"), loaded.own["full"].state_of("policy")
    assert saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k]) for k in saved)
    torch.testing.assert_close(_logps(loaded, batch), trained, atol=0, rtol=0)
    assert loaded.trainable_parameters() == []


def test_bare_base_is_the_start_weights(base):
    """`reference()` without a reference set: the weights at `add` (kept at the first use, while
    unchanged, or by keep_start); after an update with nothing kept, a clear error."""
    policy = _fresh(base)
    batch = make_batch(policy)
    start = _logps(policy, batch)
    with policy.reference():  # kept now: nothing changed since add
        torch.testing.assert_close(_logps(policy, batch), start, atol=0, rtol=0)
    sft_losses(policy, batch, steps=1, lr=1e-3)
    trained = _logps(policy, batch)
    assert not torch.equal(trained, start)
    with policy.reference():
        torch.testing.assert_close(_logps(policy, batch), start, atol=0, rtol=0)
    torch.testing.assert_close(_logps(policy, batch), trained, atol=0, rtol=0)
    policy.own["full"].drop_start()  # the trained weights are now what a next stage starts from

    policy = _fresh(base)
    sft_losses(policy, batch, steps=1, lr=1e-3)
    with pytest.raises(RuntimeError, match="the bare base .* was not kept"), policy.reference():
        pass
    policy = _fresh(base)
    policy.own["full"].keep_start()
    sft_losses(policy, batch, steps=1, lr=1e-3)
    with policy.reference():
        torch.testing.assert_close(_logps(policy, batch), start, atol=0, rtol=0)


def test_frozen_reference_set_is_a_copy_and_swaps_keep_the_parameters(base):
    policy = _fresh(base)
    batch = make_batch(policy)
    params = {id(p) for p in policy.trainable_parameters()}
    sft_losses(policy, batch, steps=1, lr=1e-3)
    policy.freeze_reference("policy")
    sft = _logps(policy, batch)
    assert {id(p) for p in policy.trainable_parameters()} == params  # an optimizer's hold stays valid
    sft_losses(policy, batch, steps=1, lr=1e-3)
    with policy.reference():
        torch.testing.assert_close(_logps(policy, batch), sft, atol=0, rtol=0)
        assert policy.trainable_parameters() == []  # the reference set is frozen
    assert not torch.equal(_logps(policy, batch), sft)
    assert {id(p) for p in policy.trainable_parameters()} == params


def test_the_loop_keeps_the_start_only_for_a_stage_that_compares_to_the_bare_base(base, tmp_path):
    ctx = RunContext(accelerator=ToyAccelerator(), output_dir=tmp_path)
    for stage_class, config, kept in ((SFTStage, SFTConfig(name="sft"), False), (DPOStage, DPOConfig(name="dpo"), True)):
        policy = _fresh(base)
        stage_class(config, policy, ctx, [], [])._keep_start_weights()
        assert policy.own["full"].start_kept == kept
    policy.freeze_reference("policy")  # DPO after SFT: its reference set, no copy of the bare base
    policy.own["full"].drop_start()
    DPOStage(DPOConfig(name="dpo"), policy, ctx, [], [])._keep_start_weights()
    assert not policy.own["full"].start_kept
    policy.trainable_adapters.add("reference")
    with pytest.raises(ConfigError, match=r"stages\.dpo\.lora\.method: full fine-tuning trains one set"):
        DPOStage(DPOConfig(name="dpo"), policy, ctx, [], [])._check_trainable()


def test_sft_with_lomo_then_dpo_with_adamw_on_full_weights(tmp_path):
    """SFT (LOMO) lowers its loss; DPO starts from SFT's weights with a frozen copy as reference, so
    its first loss is exactly ln 2, and lowers it; each stage saves the text decoder's weights."""
    raw = tiny_recipe(tmp_path, stages=("sft", "dpo"), steps=3, batch_size=4)
    for stage in raw["stages"]:
        stage.update(lora={"method": "full"}, eval_examples=2, max_new_tokens=2)
    raw["stages"][0].update(optimizer="lomo", lr=3e-2, blind_control=False)
    raw["stages"][1].update(lr=1e-4, max_grad_norm=None)
    report = run_recipe(build(raw))
    sft, dpo = report["stages"]
    assert sft["train"]["loss_last"] < sft["train"]["loss_first"] - 1.0, sft["train"]
    assert sft["distributed"]["per_rank"][0]["optimizer_state_bytes"] == 0
    assert abs(dpo["train"]["loss_first"] - math.log(2)) < 1e-5 and dpo["train"]["loss_last"] < dpo["train"]["loss_first"]
    for name in ("sft", "dpo"):
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "FULL" and all(".language_model." in n or n.startswith("lm_head")
                                                     for n in config["parameters"])


@pytest.mark.slow
@pytest.mark.parametrize("kind,optimizer", [("sft", "mezo"), ("dpo", "lomo")])
def test_a_resumed_full_run_reproduces_the_uninterrupted_one(tmp_path, monkeypatch, kind, optimizer):
    """A one-stage recipe on full weights, crashed after its step-2 checkpoint and resumed, saves the
    same weights and logs the same losses. DPO from the bare base keeps the start weights (its
    reference) before the resume loads the checkpoint's. Fast variants: the toy resume tests of
    tests/test_optimizers.py and the exact save/load above."""
    from safetensors.torch import load_file

    from alignment.stages.base import Stage

    def recipe(out, resume=False):
        raw = tiny_recipe(out, stages=(kind,), steps=4, batch_size=4, resume=resume)
        raw["stages"][0].update(lora={"method": "full"}, optimizer=optimizer, eval_examples=1, max_new_tokens=1,
                                lr=1e-4 if optimizer == "mezo" else 1e-2)
        return build(raw)

    straight = run_recipe(recipe(tmp_path / "straight"))
    original = Stage._optimizer_step

    def crash_at_step_3(self, optimizer, params, stream, step):
        if step == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(self, optimizer, params, stream, step)

    monkeypatch.setattr(Stage, "_optimizer_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe(tmp_path / "crashed"))
    monkeypatch.setattr(Stage, "_optimizer_step", original)
    resumed = run_recipe(recipe(tmp_path / "crashed", resume=True))
    a, b = (load_file(str(tmp_path / run / kind / "adapter_model.safetensors")) for run in ("straight", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed["stages"][0]["history"]] == [h["loss"] for h in straight["stages"][0]["history"]]

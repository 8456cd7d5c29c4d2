"""`vlm-align merge`: the merged folder loads with plain transformers (no code of ours), holds
W + (alpha/r)·B·A, and answers held-out covers greedily exactly as base + adapter do."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alignment.cli import main
from alignment.data import DEFAULT_INSTRUCTION, render_prompt
from alignment.generation.command import generate_answer
from alignment.merge import MERGE_INFO, MergeError, merge_adapter
from alignment.recipe import load_recipe
from alignment.runs import load_base
from tests._cli_run import held_out, tiny_run

LAYER = "model.language_model.layers.0.self_attn.q_proj"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "dpo-fp32"
    assert main(["merge", str(run / "dpo"), str(out), "--dtype", "fp32"]) == 0
    return out


def _plain_answers(folder, examples, max_new_tokens):
    """Greedy answers with transformers alone: Auto classes, the saved chat template, generate()."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    answers = []
    for example in examples:
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": f" {DEFAULT_INSTRUCTION} {example['question']}"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert text == render_prompt(example["question"])  # seed 000's prompt, from the saved template
        inputs = processor(text=text, images=[example["image"]], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return model, answers


def test_merged_model_answers_like_the_adapter(run, merged):
    examples = held_out(run, "dpo")
    model, plain = _plain_answers(merged, examples, max_new_tokens=6)
    assert not any("lora_" in name for name, _ in model.named_parameters())
    assert model.config.get_text_config().use_cache and model.dtype == torch.float32

    policy = load_base(load_recipe(run / "recipe.yaml"), "cpu")
    policy.load_adapter("policy", run / "dpo", trainable=False)
    policy.eval()
    with torch.no_grad():
        ours = [generate_answer(policy, e["image"], e["question"], DEFAULT_INSTRUCTION, 6) for e in examples]
    assert plain == ours and any(ours)


def _card_snippet(folder) -> str:
    card = (folder / "README.md").read_text()
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def _run_snippet(code: str, capsys) -> str:
    capsys.readouterr()
    exec(compile(code, "card-snippet", "exec"), {})  # the card's code as a user pastes it
    return capsys.readouterr().out.strip()


def test_the_merged_card_snippet_answers_like_vlm_align_generate(run, merged, capsys):
    """The merged folder carries the run's instruction and stop tokens: its card's plain-transformers snippet,
    run as written (the shipped sample cover), prints what `vlm-align generate` prints with the adapter."""
    from alignment.merge import PROMPT_FILE
    from alignment.summary import sample_cover_path as sample_cover

    prompt = json.loads((merged / PROMPT_FILE).read_text())
    assert prompt["instruction"] == DEFAULT_INSTRUCTION and "{question}" in prompt["template"]
    plain = _run_snippet(_card_snippet(merged), capsys)
    assert main(["generate", str(run / "dpo"), "--image", str(sample_cover()), "--question", "Who wrote this book?"]) == 0
    assert plain and plain == capsys.readouterr().out.strip()


def test_merged_weights_are_base_plus_scaled_lora(run, merged):
    """W' = W + (alpha / r) · B · A on a targeted layer; layers LoRA does not touch are unchanged."""
    from transformers import AutoModelForImageTextToText

    from alignment.models import resolve_model_path

    base = AutoModelForImageTextToText.from_pretrained(resolve_model_path("tiny-mllama"), dtype=torch.float32).state_dict()
    out = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).state_dict()
    lora = load_file(f"{run}/dpo/adapter_model.safetensors")
    config = json.loads((run / "dpo" / "adapter_config.json").read_text())
    a = next(v for k, v in lora.items() if f"{LAYER}.lora_A" in k)
    b = next(v for k, v in lora.items() if f"{LAYER}.lora_B" in k)
    delta = (config["lora_alpha"] / config["r"]) * b @ a
    assert delta.abs().max() > 0  # training moved the adapter, so merging changes the weights
    torch.testing.assert_close(out[f"{LAYER}.weight"], base[f"{LAYER}.weight"] + delta, rtol=1e-5, atol=1e-6)
    assert out.keys() == base.keys()
    vision = next(k for k in base if "vision_model" in k and k.endswith("weight"))
    torch.testing.assert_close(out[vision], base[vision], rtol=0, atol=0)
    info = json.loads((merged / MERGE_INFO).read_text())
    assert info["base_model"] == "tiny-mllama" and info["dtype"] == "float32"


def test_merge_refuses_heads_bad_dtype_and_a_full_folder(run, tmp_path):
    head_dir = tmp_path / "reward"
    head_dir.mkdir()
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        (head_dir / file).write_bytes((run / "dpo" / file).read_bytes())
    (head_dir / "head.safetensors").write_bytes(b"")
    with pytest.raises(MergeError, match="reward model or critic"):
        merge_adapter("tiny-mllama", head_dir, tmp_path / "out")
    with pytest.raises(MergeError, match="dtype must be one of"):
        merge_adapter("tiny-mllama", run / "dpo", tmp_path / "out", dtype="int8")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    with pytest.raises(MergeError, match="not empty"):
        merge_adapter("tiny-mllama", run / "dpo", full)
    assert (full / "x").read_text() == "keep me"


def test_merge_defaults_to_bf16(run, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "dpo-bf16"
    assert main(["merge", str(run / "dpo"), str(out)]) == 0
    assert "AutoModelForImageTextToText.from_pretrained" in capsys.readouterr().out
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("peft_type, message", [("BOTTLENECK", "bottleneck adapter"), ("BITFIT", "bitfit adapter"),
                                                 ("BASE_WEIGHTS", "projector stage's base weights")])
def test_merge_refuses_adapters_that_do_not_merge_with_a_clear_message(tmp_path, peft_type, message):
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(MergeError, match=message):
        merge_adapter("tiny-mllama", folder, tmp_path / "out")


def test_a_full_fine_tune_merges_to_its_own_weights(tmp_path):
    """`full`'s folder holds the trained text weights: the merged checkpoint is the base with them in place."""
    from transformers import AutoModelForImageTextToText

    from alignment.policy import LoraSpec, MultimodalPolicy

    policy = MultimodalPolicy.from_pretrained("tiny-mllama")
    policy.add_adapter("policy", LoraSpec(method="full"))
    trained = next(p for p in policy.trainable_parameters() if p.dim() == 2)
    with torch.no_grad():
        trained.add_(0.5)
    policy.save_adapter("policy", tmp_path / "sft")
    out = merge_adapter("tiny-mllama", tmp_path / "sft", tmp_path / "merged", dtype="fp32")
    merged = dict(AutoModelForImageTextToText.from_pretrained(out).named_parameters())
    name = next(n for n, p in policy.base_model.named_parameters() if p is trained)
    torch.testing.assert_close(merged[name], trained.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("standin", ["standin-llava", "standin-mllama"])
def test_the_merged_card_snippet_answers_like_generate_on_a_real_geometry_standin(standin, tmp_path, capsys):
    """The same on a stand-in of real geometry (real vocabulary, chat template, image placeholders and stop ids;
    LLaVA: 576 image tokens; Mllama: 560-px tiles): a stage folder holding a LoRA whose B is random (so the
    merge changes the weights), merged, then the card's snippet against `vlm-align generate`."""
    from alignment.policy import LoraSpec
    from alignment.recipe import recipe_from_dict, save_recipe
    from alignment.summary import sample_cover_path as sample_cover

    run = tmp_path / "run"
    run.mkdir()
    recipe = recipe_from_dict({"output_dir": str(run), "model": {"name": standin, "quantization": "none"},
                               "stages": [{"type": "sft", "max_new_tokens": 5}]})
    save_recipe(recipe, run / "recipe.yaml")
    policy = load_base(recipe, "cpu")
    policy.add_adapter("policy", LoraSpec(r=4, preset="language"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    policy.save_adapter("policy", run / "sft")
    del policy
    out = tmp_path / "merged"
    assert main(["merge", str(run / "sft"), str(out), "--dtype", "fp32"]) == 0
    plain = _run_snippet(_card_snippet(out), capsys)
    assert main(["generate", str(run / "sft"), "--image", str(sample_cover()), "--question", "Who wrote this book?"]) == 0
    assert plain == capsys.readouterr().out.strip()

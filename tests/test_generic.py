"""The generic fallback (alignment/models/generic.py) on the tiny Idefics3, fp32.

Idefics3 has no family file: `encode_images` only holds the pixels (`PixelRows`), each forward is the
model's own on its rows' pixel entries (one entry per text row: `pixel_values [rows, sub-images, 3, H,
W]`), and generation uses the model's KV cache with no position ids. Every check compares with
transformers' own forward or `generate` on the same processor output (docs/families.md, section 4;
measured here: forward 0.0, KV-cache decode 1.4e-06 (G=1) / 8.3e-07 (G=3), greedy tokens equal)."""

import re

import pytest
import torch
from PIL import Image

from alignment.models import generic
from alignment.models.features import repeat_state
from alignment.policy import LoraSpec, MultimodalPolicy
from tests._adapters import check_lora_gradients_survive_an_eval_pass

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "tiny-idefics3"
ATOL = 1e-5


@pytest.fixture(scope="module")
def policy():
    return MultimodalPolicy.from_pretrained(NAME).eval()


@pytest.fixture(scope="module")
def images():
    """Three random images of different shapes (so different sub-image grids)."""
    g = torch.Generator().manual_seed(1)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
            for h, w in ((56, 84), (112, 56), (70, 70))]


def turn(policy, n_images: int, question: str, answer: str | None = None) -> str:
    from alignment.data.prompts import prompt_format

    fmt = prompt_format(policy.processor)
    prompt = fmt.prompt(question, "").replace(fmt.image_token, fmt.image_token * n_images, 1)
    return prompt if answer is None else prompt + fmt.completion(answer)


def encode(policy, rows, images, side="right") -> dict:
    """The processor's output for rows `(text, [image numbers])`, labels on every real token."""
    batch = dict(policy.processor(text=[t for t, _ in rows], images=[[images[i] for i in shown] for _, shown in rows],
                                  padding=True, padding_side=side, add_special_tokens=False, return_tensors="pt"))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def maxdiff(a, b) -> float:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    return (a - b).abs().max().item()


def plain(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "image_index")}


@pytest.mark.parametrize("side", ["left", "right"])
def test_policy_forward_equals_the_models_own_forward(policy, images, side):
    """Rows [img0], [img1, img0] (two images in one pixel entry), [img2]: `policy.forward` (pixels held by
    `encode_images`, picked per row by `image_index`) == model(**processor output), at every real token."""
    rows = [(turn(policy, 1, "title?", "Yes"), [0]), (turn(policy, 2, "same author?", "No"), [1, 0]),
            (turn(policy, 1, "who wrote it?", "Ann Lee"), [2])]
    batch = encode(policy, rows, images, side)
    assert set(generic.PIXEL_KEYS) & set(batch) == {"pixel_values", "pixel_attention_mask"}
    with torch.no_grad():
        reference = policy.model(**plain(batch)).logits
        features = policy.encode_images(batch)
        ours = policy.forward(batch, features).logits
    assert isinstance(features, generic.PixelRows) and len(features) == 3
    mask = batch["attention_mask"].bool()
    print(f"policy forward vs model forward ({side} padding): max diff {maxdiff(ours[mask], reference[mask]):.3e}")


def test_pixel_rows_select_and_cat_keep_each_rows_forward(policy, images):
    """Entries of two batches with different sub-image counts (5 vs 10 per row), concatenated (`PixelRows.cat`
    zero-pads the shorter) and picked in another order by `image_index` [B] and [B, 1]: each row's
    logits == its own batch's plain forward."""
    one = encode(policy, [(turn(policy, 1, "title?", "Yes"), [0]), (turn(policy, 1, "genre?", "Travel"), [2])], images)
    two = encode(policy, [(turn(policy, 2, "same author?", "No"), [1, 0])], images)
    with torch.no_grad():
        references = [policy.model(**plain(b)).logits for b in (one, two)]
        held = generic.PixelRows.cat([policy.encode_images(one), policy.encode_images(two)])
        assert len(held) == 3 and held.pixels["pixel_values"].shape[1] == two["pixel_values"].shape[1] > \
            one["pixel_values"].shape[1]
        assert held.to(torch.float64).pixels["pixel_attention_mask"].dtype == one["pixel_attention_mask"].dtype
        order = torch.tensor([1, 0])  # two's row reads entry 2, one's rows 0 and 1
        worst = 0.0
        for index in (torch.tensor([2]), torch.tensor([[2]])):
            out = generic.forward_with_features(policy.model, two["input_ids"], two["attention_mask"], held, index)
            worst = max(worst, maxdiff(out.logits, references[1]))
        out = generic.forward_with_features(policy.model, one["input_ids"][order], one["attention_mask"][order],
                                            held.select(torch.tensor([1, 0])).detach(), torch.tensor([0, 1]))
        worst = max(worst, maxdiff(out.logits, references[0][order]))
    print(f"rows through PixelRows.cat / select (zero-padded sub-images) vs their own batch: max diff {worst:.3e}")
    assert generic.select_pixels(plain(two), torch.tensor([0, 0]))["pixel_values"].shape[0] == 2
    with pytest.raises(ValueError, match="one pixel entry per row"):
        generic.forward_with_features(policy.model, two["input_ids"], two["attention_mask"], held, torch.tensor([[2, 0]]))


def _prompts(policy, images) -> dict:
    rows = [(turn(policy, 1, "title?"), [0]), (turn(policy, 2, "who wrote the book cover author?"), [1, 2])]
    return encode(policy, rows, images, "left")


@pytest.mark.parametrize("samples", [1, 3])
def test_kv_cache_decode_equals_recomputation(policy, images, samples):
    """`prefill` + `decode` with the model's cache and no position ids (left padding, a two-image row):
    each step's logits == a full forward over prompt + tokens; G=3 (`repeat_state`) feeds each copy a
    different token, so every repeated cache row is checked."""
    model, steps = policy.model, 5
    batch = _prompts(policy, images)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        features = policy.encode_images(batch)
        logits, state = generic.prefill(model, batch["input_ids"], batch["attention_mask"], features, torch.arange(2))
        index = torch.arange(2).repeat_interleave(samples)
        ids, mask = (batch[k].repeat_interleave(samples, 0) for k in ("input_ids", "attention_mask"))
        if samples > 1:
            state = repeat_state(state, samples)
            logits = logits.repeat_interleave(samples, 0)
        worst = maxdiff(logits, generic.forward_with_features(model, ids, mask, features, index).logits[:, -1])
        for _ in range(steps):
            token = logits.argmax(-1) if samples == 1 else torch.randint(8, 600, (ids.shape[0],), generator=g)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
            logits = generic.decode(model, state, token, mask)
            full = generic.forward_with_features(model, ids, mask, features, index).logits[:, -1]
            worst = max(worst, maxdiff(logits, full))
    print(f"G={samples}: KV-cache decode vs full recomputation, max diff {worst:.3e}")


def test_policy_generate_equals_model_generate_and_samples_equal_single(policy, images):
    """Greedy `policy.generate` == `model.generate(do_sample=False)` (stop tokens and suppressed placeholder
    alike), and with `num_samples=3` each prompt's 3 greedy rows == its single-sample row."""
    batch = _prompts(policy, images)
    steps = 6
    stops = sorted(policy.stop_token_ids())
    never = generic.unsampled_token_ids(policy.config)
    assert never == [policy.config.image_token_id]
    with torch.no_grad():
        ours = policy.generate(batch, max_new_tokens=steps)
        theirs = policy.model.generate(**plain(batch), do_sample=False, max_new_tokens=steps, suppress_tokens=never,
                                       eos_token_id=stops, pad_token_id=policy.processor.tokenizer.pad_token_id)
        grouped = policy.generate(batch, max_new_tokens=steps, num_samples=3)
    theirs = theirs[:, batch["input_ids"].shape[1]:]
    print("greedy tokens:", ours.tolist())
    assert torch.equal(ours, theirs)
    assert torch.equal(grouped, ours.repeat_interleave(3, 0))


def _quantised(model, kind):
    return [n for n, m in model.named_modules() if isinstance(m, kind)]


def test_four_bit_keeps_vision_connector_and_head_and_lora_gradients_survive_an_eval_pass(images):
    """NF4 with GENERIC_SKIP: only text layers are 4-bit (vision tower, connector and lm_head full precision);
    LoRA gradients after an eval no-grad pass (log-probs + generation) equal those before, exactly."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    policy = MultimodalPolicy.from_pretrained(NAME, quantization="4bit")
    model = policy.model
    quantised = _quantised(model, bnb.nn.Linear4bit)
    assert len(quantised) == 14 and all(".text_model.layers." in n for n in quantised)
    assert not _quantised(generic.vision_modules(model)[0], bnb.nn.Linear4bit)
    assert not _quantised(generic.inner_model(model).connector, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)

    batch = encode(policy, [(turn(policy, 1, "title?", "Yes"), [0]), (turn(policy, 2, "same?", "No"), [1, 0])], images)
    check_lora_gradients_survive_an_eval_pass(policy, batch, _prompts(policy, images))


def test_eight_bit_quantises_text_layers_only_and_trains_lora(images):
    """LLM.int8 with the same skip list: only text layers are 8-bit; `language` LoRA gets finite, non-zero gradients."""
    import bitsandbytes as bnb

    policy = MultimodalPolicy.from_pretrained(NAME, quantization="8bit")
    quantised = _quantised(policy.model, bnb.nn.Linear8bitLt)
    assert len(quantised) == 14 and all(".text_model.layers." in n for n in quantised)
    policy.add_adapter("policy", LoraSpec(r=4))
    batch = encode(policy, [(turn(policy, 1, "title?", "Yes"), [0])], images)
    policy.model.train()
    (-policy.completion_logprobs(batch)[1].sum()).backward()
    grads = torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0


def test_presets_and_patterns_resolve_to_the_intended_modules(policy):
    """language: the text layers' 7 projections; cross_attention: the connector; vision: the vision tower's
    linears; multimodal = connector + vision; all = everything but lm_head. VISION_PATTERN and
    PROJECTOR_PATTERNS alike."""
    model = policy.model
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    hit = {p: {n for n in names if re.fullmatch(rx, n)} for p, rx in generic.PRESET_PATTERNS.items()}
    assert len(hit["language"]) == 7 * model.config.text_config.num_hidden_layers
    assert all(".text_model.layers." in n for n in hit["language"])
    assert hit["cross_attention"] == {"model.connector.modality_projection.proj"}
    assert hit["vision"] and all(n.startswith("model.vision_model.") for n in hit["vision"])
    assert hit["multimodal"] == hit["vision"] | hit["cross_attention"]
    assert hit["all"] == hit["multimodal"] | hit["language"] == set(names) - {"lm_head"}
    assert {n for n in names if re.search(generic.VISION_PATTERN, n)} == hit["multimodal"]
    projector = [n for n, _ in model.named_parameters() if any(re.fullmatch(p, n) for p in generic.PROJECTOR_PATTERNS)]
    assert projector == ["model.connector.modality_projection.proj.weight"]
    assert generic.vision_modules(model) == [model.model.vision_model]
    assert generic.inner_model(model) is model.model


def test_the_note_is_printed_once_and_a_text_model_is_refused(policy, monkeypatch, capsys):
    """A model type without a family file that transformers maps to image-text-to-text gets `generic` and
    one note on stderr per process, however often it is looked up; a text-only Llama stays refused."""
    from transformers import LlamaConfig, LlavaConfig

    from alignment.models import llava, registry

    monkeypatch.setattr(registry, "_NOTED", set())
    capsys.readouterr()
    assert registry.TINY_FAMILIES[NAME] is generic and registry.TINY_MODELS[NAME] == "idefics3"
    for _ in range(3):
        assert registry.family_of(policy.model) is generic
    registry.load_processor(NAME)
    assert registry.family_of(LlavaConfig()) is llava
    with pytest.raises(registry.UnsupportedModelError, match="model type 'llama'"):
        registry.family_of(LlamaConfig())
    err = capsys.readouterr().err.splitlines()
    notes = [line for line in err if line.startswith("note:")]
    assert notes == ["note: model type 'idefics3' has no family file: every stage runs the plain forward with each "
                     "row's pixels (images are not shared between rows, roles or samples)"]


def test_every_stage_runs_on_the_tiny_build(tmp_path):
    """SFT -> DPO -> reward -> PPO -> GRPO through `run_recipe`, by name (the registry builds the model):
    every stage trains with finite losses and DPO's loss goes down from ln 2 on the covers."""
    from tests._recipes import run_every_stage

    run_every_stage(tmp_path / "run", NAME)


def test_sft_and_dpo_train_on_idefics3s_template_with_llama3s_split(tmp_path):
    """Idefics3-8B-Llama3's chat template (`Assistant:` prompt, `Assistant: answer` turns) over a BPE with
    Llama 3's pre-tokenizer (a colon joins the next word: `:Laura`), from a local folder: SFT and DPO train
    (no boundary error; DPO's loss falls from ln 2), every row's completion the template's ` answer<end_of_utterance>`."""
    import math

    from alignment.recipe import run_recipe
    from tests._recipes import build, tiny_recipe

    folder = tmp_path / "idefics3-llama3"
    generic.write_tiny(generic.build_tokenizer(split="llama3", chat_template=generic.IDEFICS3_TEMPLATE), folder)
    raw = tiny_recipe(tmp_path / "run", stages=("sft", "dpo"), steps=4, model={"name": str(folder)})
    raw["stages"][1]["lr"] = 5e-3
    stages = {s["name"]: s for s in run_recipe(build(raw))["stages"]}
    for stage in stages.values():
        assert stage["steps"] == 4 and all(math.isfinite(h["loss"]) for h in stage["history"]), stage["name"]
    dpo = stages["dpo"]["train"]
    assert abs(dpo["loss_first"] - math.log(2)) < 1e-5 and dpo["loss_last"] < dpo["loss_first"] - 0.02, dpo

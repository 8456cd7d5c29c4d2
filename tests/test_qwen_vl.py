"""Qwen2.5-VL and Qwen3-VL (alignment/models/qwen_vl.py) on tiny random builds, fp32.

Images are encoded once (`encode_images`) and handed back per row (`forward_with_features`), with
M-RoPE positions recomputed from the rows' image grids; every check compares with transformers' own
forward or `generate` on the same rows (docs/families.md, section 3, measured 0.0 / ~2e-7)."""

import json
import re

import pytest
import torch
from PIL import Image

from alignment.models import qwen_vl
from alignment.models.features import ImageFeatures, repeat_state

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = sorted(qwen_vl.TINY_MODELS)
ATOL = 1e-5
IMG = "<|vision_start|><|image_pad|><|vision_end|>"


def turn(n_images: int, question: str, answer: str | None = None) -> str:
    prompt = f"<|im_start|>user\n{IMG * n_images}{question}<|im_end|>\n<|im_start|>assistant\n"
    return prompt if answer is None else f"{prompt}{answer}<|im_end|>"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    out = {}
    for name in NAMES:
        (root / name).mkdir()
        qwen_vl.build_tiny(name, root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module", params=NAMES)
def tiny(request, folders):
    """(folder, model in eval mode, processor) of one tiny build."""
    from transformers import AutoModelForImageTextToText

    folder = folders[request.param]
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, qwen_vl.load_processor(str(folder))


@pytest.fixture(scope="module")
def images():
    """Three random images of different shapes (so different grids and token counts)."""
    g = torch.Generator().manual_seed(1)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
            for h, w in ((56, 84), (112, 56), (70, 70))]


def real_logits(logits, mask):
    return logits[mask.bool()]


def maxdiff(a, b) -> float:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("side", ["left", "right"])
def test_features_path_equals_plain_forward(tiny, images, side):
    """2 rows, 2 images of different sizes: one vision call, features handed back == model(**processor output)."""
    _, model, processor = tiny
    batch = processor(text=[turn(1, "title?", "Yes"), turn(1, "who wrote the book cover?", "Ann Lee")],
                      images=[[images[0]], [images[1]]], padding=True, padding_side=side, return_tensors="pt")
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == model.config.image_token_id)
    with torch.no_grad():
        plain = model(**batch).logits
        features = qwen_vl.encode_images(model, **{k: batch[k] for k in qwen_vl.PIXEL_KEYS})
        ours = qwen_vl.forward_with_features(model, batch["input_ids"], batch["attention_mask"], features,
                                             torch.arange(2)).logits
    assert features.lengths.tolist() == (batch["image_grid_thw"].prod(-1) // 4).tolist()
    assert (features.deepstack is not None) == (model.config.model_type == "qwen3_vl")
    mask = batch["attention_mask"]
    maxdiff(real_logits(ours, mask), real_logits(plain, mask))


def _padded(rows: list[torch.Tensor], pad: int, side: str):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_shared_images_multi_image_and_text_rows_equal_each_row_alone(tiny, images, side):
    """Rows [img0], [img1], [img0], [img1] (DPO pairs sharing images), [img1, img0] and a text-only row,
    from 2 images encoded once (`image_index [B, 2]`, -1 = empty), == each row's plain forward alone."""
    _, model, processor = tiny
    rows = [(turn(1, "title?", "Yes"), [0]), (turn(1, "who wrote it?", "Ann Lee"), [1]),
            (turn(1, "title?", "No"), [0]), (turn(1, "who wrote it?", "Bob"), [1]),
            (turn(2, "same author?", "Yes"), [1, 0]), (turn(0, "hello?", "Hi"), [])]
    alone, ids = [], []
    with torch.no_grad():
        for text, shown in rows:
            if shown:
                one = processor(text=[text], images=[[images[i] for i in shown]], return_tensors="pt")
            else:
                one = processor.tokenizer([text], return_tensors="pt")
            alone.append(model(**one).logits[0])
            ids.append(one["input_ids"][0])
        input_ids, mask = _padded(ids, processor.tokenizer.pad_token_id, side)
        pixels = processor.image_processor(images=images[:2], return_tensors="pt")
        features = qwen_vl.encode_images(model, **pixels)
        index = torch.tensor([[0, -1], [1, -1], [0, -1], [1, -1], [1, 0], [-1, -1]])
        ours = qwen_vl.forward_with_features(model, input_ids, mask, features, index).logits
        no_images = qwen_vl.forward_with_features(model, input_ids[-1:], mask[-1:], None, None).logits
    for r in range(len(rows)):
        maxdiff(ours[r][mask[r].bool()], alone[r])
    maxdiff(no_images[0][mask[-1].bool()], alone[-1])


def test_select_pixels_and_feature_selection_commute(tiny, images):
    """encode(select_pixels(pixels, [2, 1])) == encode(pixels).select([2, 1]); select + cat reorders and
    re-pads images without changing a row's forward."""
    _, model, processor = tiny
    pixels = dict(processor.image_processor(images=images, return_tensors="pt"))
    with torch.no_grad():
        full = qwen_vl.encode_images(model, **pixels)
        chosen = torch.tensor([2, 1])
        part = qwen_vl.encode_images(model, **qwen_vl.select_pixels(pixels, chosen))
        expected = full.select(chosen)
        assert torch.equal(part.lengths, expected.lengths) and torch.equal(part.grid_thw, expected.grid_thw)
        width = part.embeds.shape[1]
        maxdiff(part.embeds, expected.embeds[:, :width])
        if part.deepstack is not None:
            maxdiff(part.deepstack, expected.deepstack[:, :, :width])
        assert qwen_vl.select_pixels(pixels, torch.tensor([], dtype=torch.long))["pixel_values"].shape[0] == 0

        batch = processor(text=[turn(1, "title?", "Yes"), turn(2, "same?", "No")],
                          images=[[images[0]], [images[1], images[2]]], padding=True, return_tensors="pt")
        index = torch.tensor([[0, -1], [1, 2]])
        before = qwen_vl.forward_with_features(model, batch["input_ids"], batch["attention_mask"], full, index).logits
        shuffled = ImageFeatures.cat([full.select(torch.tensor([2])), full.select(torch.tensor([0, 1]))])
        after = qwen_vl.forward_with_features(model, batch["input_ids"], batch["attention_mask"], shuffled,
                                              torch.tensor([[1, -1], [2, 0]])).logits
    assert torch.equal(before, after)


def _greedy_reference(model, batch, steps, never):
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                             suppress_tokens=never)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("samples", [1, 3])
def test_kv_cache_decode_equals_recomputation_and_generate(tiny, images, samples):
    """prefill + decode with M-RoPE positions `text_positions + rope_deltas`: each step's logits == a
    full forward over prompt + tokens; G=1 greedy == `model.generate`; G=3 feeds each copy a different
    token, so every repeated cache row is checked."""
    _, model, processor = tiny
    steps = 5
    batch = processor(text=[turn(1, "title?"), turn(1, "who wrote the book cover author?")],
                      images=[[images[0]], [images[1]]], padding=True, padding_side="left", return_tensors="pt")
    stops = model.generation_config.eos_token_id
    never = qwen_vl.unsampled_token_ids(model.config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        features = qwen_vl.encode_images(model, **{k: batch[k] for k in qwen_vl.PIXEL_KEYS})
        logits, state = qwen_vl.prefill(model, batch["input_ids"], batch["attention_mask"], features,
                                        torch.arange(2))
        index = torch.arange(2).repeat_interleave(samples)
        ids, mask = (batch[k].repeat_interleave(samples, 0) for k in ("input_ids", "attention_mask"))
        if samples > 1:
            state = repeat_state(state, samples)
            logits = logits.repeat_interleave(samples, 0)
        full = qwen_vl.forward_with_features(model, ids, mask, features, index).logits[:, -1]
        worst = [maxdiff(logits, full)]
        tokens = []
        for _ in range(steps):
            if samples == 1:
                logits[:, stops + never] = float("-inf")  # as min_new_tokens and suppress_tokens do
                token = logits.argmax(-1)
            else:
                token = torch.randint(8, 600, (ids.shape[0],), generator=g)
            tokens.append(token)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
            logits = qwen_vl.decode(model, state, token, mask)
            full = qwen_vl.forward_with_features(model, ids, mask, features, index).logits[:, -1]
            worst.append(maxdiff(logits, full))
    assert state["text_positions"].shape == (len(ids), 1) and state["rope_deltas"].shape == (len(ids), 1)
    if samples == 1:
        assert torch.equal(torch.stack(tokens, 1), _greedy_reference(model, batch, steps, never))


def check_quantised_features_path(model, processor, images) -> dict:
    """On a quantised model: the features path equals its own plain forward on two one-image rows; returns
    the processor batch."""
    batch = processor(text=[turn(1, "title?", "Yes"), turn(1, "who wrote it?", "Ann Lee")],
                      images=[[images[0]], [images[1]]], padding=True, padding_side="right", return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pixels = {k: batch[k] for k in qwen_vl.PIXEL_KEYS}
    with torch.no_grad():
        plain = model(**batch).logits
        ours = qwen_vl.forward_with_features(model, ids, mask, qwen_vl.encode_images(model, **pixels),
                                             torch.arange(2)).logits
    maxdiff(real_logits(ours, mask), real_logits(plain, mask))
    return batch


def _four_bit(folder):
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from alignment.models.registry import keep_four_bit_weights_unpacked

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=qwen_vl.QUANT_SKIP_MODULES)
    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=config, device_map={"": "cpu"},
                                                        dtype=torch.float32)
    keep_four_bit_weights_unpacked(model)
    return model


def test_four_bit_keeps_vision_and_head_and_lora_gradients_survive_an_eval_pass(tiny, images):
    """NF4 with QUANT_SKIP_MODULES: only text layers are 4-bit; features path == plain forward; LoRA
    (`language` preset) gradients after an eval no-grad pass (forward + prefill + decode) equal those before."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    folder, _, processor = tiny
    model = _four_bit(folder).eval()
    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and all(".language_model.layers." in n for n in quantised)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in qwen_vl.vision_modules(model)[0].modules())

    batch = check_quantised_features_path(model, processor, images)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pixels = {k: batch[k] for k in qwen_vl.PIXEL_KEYS}

    model.requires_grad_(False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                             target_modules=qwen_vl.PRESET_PATTERNS["language"]))

    def gradients():
        model.train()
        model.zero_grad()
        features = qwen_vl.encode_images(model, **pixels)
        logits = qwen_vl.forward_with_features(model, ids, mask, features, torch.arange(2)).logits
        logits.log_softmax(-1)[mask.bool()].logsumexp(-1).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    before = gradients()
    model.eval()
    with torch.no_grad():
        features = qwen_vl.encode_images(model, **pixels)
        qwen_vl.forward_with_features(model, ids, mask, features, torch.arange(2))
        logits, state = qwen_vl.prefill(model, ids, mask, features, torch.arange(2))
        qwen_vl.decode(model, state, logits.argmax(-1), torch.cat([mask, mask.new_ones(2, 1)], 1))
    after = gradients()
    assert before.abs().sum() > 0
    assert torch.equal(before, after)


def test_eight_bit_keeps_vision_and_head_and_trains_lora(tiny, images):
    """LLM.int8 with QUANT_SKIP_MODULES: only text layers are 8-bit; features path == plain forward on the
    8-bit model; `language` LoRA gets finite, non-zero gradients."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    folder, _, processor = tiny
    assert qwen_vl.SUPPORTS_8BIT
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=qwen_vl.QUANT_SKIP_MODULES)
    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=config, device_map={"": "cpu"},
                                                        dtype=torch.float32).eval()
    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert quantised and all(".language_model.layers." in n for n in quantised)
    batch = check_quantised_features_path(model, processor, images)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pixels = {k: batch[k] for k in qwen_vl.PIXEL_KEYS}
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False,
                                             target_modules=qwen_vl.PRESET_PATTERNS["language"])).train()
    logits = qwen_vl.forward_with_features(model, ids, mask, qwen_vl.encode_images(model, **pixels), torch.arange(2)).logits
    logits.log_softmax(-1)[mask.bool()].logsumexp(-1).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_presets_resolve_to_the_intended_modules(tiny):
    """language: the text layers' 7 projections; cross_attention: the merger(s); vision: the vision blocks;
    multimodal = merger + vision; all = everything but lm_head. VISION_PATTERN and PROJECTOR_PATTERNS alike."""
    _, model, _ = tiny
    names = _linear_names(model)
    hit = {p: {n for n in names if re.fullmatch(rx, n)} for p, rx in qwen_vl.PRESET_PATTERNS.items()}
    qwen3 = model.config.model_type == "qwen3_vl"
    text = model.config.text_config.num_hidden_layers
    blocks = model.config.vision_config.depth
    mergers = 1 + (len(model.config.vision_config.deepstack_visual_indexes) if qwen3 else 0)
    assert len(hit["language"]) == 7 * text and all(".language_model.layers." in n for n in hit["language"])
    assert len(hit["vision"]) == (4 if qwen3 else 5) * blocks and all(".visual.blocks." in n for n in hit["vision"])
    assert len(hit["cross_attention"]) == 2 * mergers
    assert all(re.search(r"\.visual\.(merger|deepstack_merger_list)\.", n) for n in hit["cross_attention"])
    assert not hit["language"] & hit["vision"] and not hit["language"] & hit["cross_attention"]
    assert not hit["vision"] & hit["cross_attention"]
    assert hit["multimodal"] == hit["vision"] | hit["cross_attention"]
    assert hit["all"] == hit["multimodal"] | hit["language"] == set(names) - {"lm_head"}
    assert {n for n in names if re.search(qwen_vl.VISION_PATTERN, n)} == hit["multimodal"]

    projector = [n for n, _ in model.named_parameters() if any(re.fullmatch(p, n) for p in qwen_vl.PROJECTOR_PATTERNS)]
    merger = [n for n, _ in model.named_parameters() if re.search(r"\.visual\.(merger|deepstack_merger_list)\.", n)]
    assert projector and projector == merger

    vocab = model.config.text_config.vocab_size
    never = qwen_vl.unsampled_token_ids(model.config)
    assert model.config.image_token_id in never and model.config.video_token_id in never
    assert all(0 <= i < vocab for i in never)
    assert qwen_vl.vision_modules(model) == [model.model.visual]
    assert qwen_vl.inner_model(model) is model.model


def test_gradient_checkpointing_recomputes_vision_blocks_with_equal_gradients(tiny, images):
    """With `enable_gradient_checkpointing` each vision block's attention runs twice in a training step (forward and
    recomputation), and the gradients equal those without checkpointing."""
    folder, _, processor = tiny
    from transformers import AutoModelForImageTextToText

    batch = processor(text=[turn(1, "title?", "Yes")], images=[[images[0]]], return_tensors="pt")

    def step(checkpointing: bool):
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        if checkpointing:
            qwen_vl.enable_gradient_checkpointing(model)
        model.train()
        calls = []
        # transformers checkpoints a layer's `forward` (hooks on the layer stay outside), and the recomputation
        # stops once the saved tensors are back (inside the MLP): count the block's attention calls
        qwen_vl.vision_modules(model)[0].blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
        model(**batch).logits.logsumexp(-1).sum().backward()
        return len(calls), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    calls, reference = step(False)
    calls_checkpointed, grads = step(True)
    assert (calls, calls_checkpointed) == (1, 2)
    torch.testing.assert_close(grads, reference, atol=1e-6, rtol=0)


def test_processor_reloads_without_torchvision_and_pixel_budget(tiny, images, tmp_path):
    """The tiny folder keeps the hub layout (stock processor_class, a video processor config); without
    torchvision `load_processor` falls back to the video-free processor, with the same tensors as the
    processor it was saved from; `min_pixels`/`max_pixels` change image tokens and pixel rows together."""
    folder, model, processor = tiny
    model_type = model.config.model_type
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == \
        qwen_vl._STOCK_PROCESSOR[model_type]
    assert (folder / "video_preprocessor_config.json").exists()
    built = qwen_vl.build_processor(model_type, qwen_vl.build_tokenizer())
    texts, shown = [turn(1, "title?", "Yes"), turn(2, "same?", "No")], [[images[0]], [images[1], images[2]]]
    reference = built(text=texts, images=shown, padding=True, return_tensors="pt")
    processor.save_pretrained(tmp_path)  # a loaded processor saves the hub layout again
    for loaded in (processor, qwen_vl.load_processor(str(tmp_path))):
        assert type(loaded).__name__.startswith("VideoFree")
        out = loaded(text=texts, images=shown, padding=True, return_tensors="pt")
        assert out.keys() == reference.keys() and all(torch.equal(out[k], reference[k]) for k in out)
    assert processor.tokenizer.pad_token == "<|endoftext|>" and processor.tokenizer.eos_token == "<|im_end|>"

    big = Image.new("RGB", (448, 336), (200, 30, 30))
    unit = (processor.image_processor.patch_size * processor.image_processor.merge_size) ** 2
    counts = []
    for budget in (None, (4 * unit, 64 * unit)):
        kwargs = {} if budget is None else dict(min_pixels=budget[0], max_pixels=budget[1])
        loaded = qwen_vl.load_processor(str(folder), **kwargs)
        assert type(loaded.image_processor.size) is type(processor.image_processor.size)
        out = loaded(text=[turn(1, "x")], images=[[big]], return_tensors="pt")
        tokens = (out["input_ids"] == model.config.image_token_id).sum().item()
        assert tokens == out["image_grid_thw"].prod().item() // 4 == out["pixel_values"].shape[0] // 4
        counts.append(tokens)
    assert counts[0] <= 16 < counts[1] <= 64
    with pytest.raises(ValueError, match="min_pixels"):
        qwen_vl.load_processor(str(folder), min_pixels=64 * unit, max_pixels=4 * unit)


def test_processor_loads_the_hubs_separate_config_layout(tiny, images, tmp_path):
    """A folder laid out like the hub's Qwen checkpoints (preprocessor_config.json naming the torchvision
    `Qwen2VLImageProcessor`, tokenizer files, chat_template.json, no video config) loads without
    torchvision, with the same tensors as the tiny build's processor."""
    _, model, processor = tiny
    model_type = model.config.model_type
    tokenizer = qwen_vl.build_tokenizer()
    qwen_vl.image_processor(model_type).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config.update(image_processor_type="Qwen2VLImageProcessor", processor_class=qwen_vl._STOCK_PROCESSOR[model_type])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": tokenizer.chat_template}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    loaded = qwen_vl.load_processor(str(tmp_path))
    texts, shown = [turn(1, "title?", "Yes"), turn(2, "same?", "No")], [[images[0]], [images[1], images[2]]]
    out = loaded(text=texts, images=shown, padding=True, return_tensors="pt")
    reference = processor(text=texts, images=shown, padding=True, return_tensors="pt")
    assert out.keys() == reference.keys() and all(torch.equal(out[k], reference[k]) for k in out)


def test_prompt_format_renders_a_qwen_turn(tiny, images):
    from alignment.data.prompts import prompt_format

    _, model, processor = tiny
    fmt = prompt_format(processor)
    assert fmt.end_of_turn == "<|im_end|>" and fmt.image_token == "<|image_pad|>"
    prompt = fmt.prompt("Who wrote it?")
    assert prompt.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")
    assert prompt.endswith("Who wrote it?<|im_end|>\n<|im_start|>assistant\n") and prompt.count("<|image_pad|>") == 1
    out = processor(text=[prompt + fmt.completion("Ann")], images=[[images[0]]], return_tensors="pt")
    assert (out["input_ids"] == model.config.image_token_id).sum() == out["image_grid_thw"].prod() // 4 > 1


@pytest.mark.parametrize("name, quantization", [("tiny-qwen25vl", "none"), ("tiny-qwen3vl", "4bit")])
def test_every_stage_runs_on_the_tiny_build(tmp_path, name, quantization):
    """SFT -> DPO -> reward -> PPO -> GRPO through `run_recipe`, by name (the registry builds the model):
    every stage trains with finite losses and DPO's loss goes down from ln 2 on the covers."""
    from tests._recipes import run_every_stage

    run_every_stage(tmp_path / "run", name, quantization)

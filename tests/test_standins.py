"""Real-geometry stand-ins (alignment/models/standins.py): their shapes and token ids are the real
checkpoints', and every path that touches model inputs (collate, encode once, features path,
KV-cache generation) agrees with plain transformers on them: several 560-px tiles, mixed aspect
ratios in one batch, 576 LLaVA image tokens, ids past the output head, Qwen2.5-VL's hundreds of
`<|image_pad|>` per cover (a different number per image size) placed by M-RoPE."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from alignment.data import collate_preference, collate_prompts, collate_sft
from alignment.data.prompts import SEED_000, prompt_format, render_prompt
from alignment.models import load_processor, qwen_vl, resolve_model_path
from alignment.models.standins import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_ID,
    QWEN_ADDED_TOKENS,
    STOP_IDS,
    build_llama3_tokenizer,
    build_qwen2_tokenizer,
)
from alignment.policy import MultimodalPolicy
from alignment.recipe import load_recipe, run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent

# (width, height) -> Mllama tiles used: 560x560 one tile, 1120x560 two, 1120x1120 four,
# 600x900 (an OCR-VQA-like portrait cover) four (a 2x2 canvas).
SIZES = {1: (560, 560), 2: (1120, 560), 4: (1120, 1120)}
# Qwen2.5-VL's pixel budget here: 512 merged tokens of 28x28 px at most (the checkpoint's default is 16,384).
QWEN_MAX_PIXELS = 512 * 28 * 28


@pytest.fixture(scope="module")
def mllama():
    return MultimodalPolicy.from_pretrained("standin-mllama")


@pytest.fixture(scope="module")
def llava():
    return MultimodalPolicy.from_pretrained("standin-llava")


@pytest.fixture(scope="module")
def qwen():
    return MultimodalPolicy.from_pretrained("standin-qwen25vl", max_pixels=QWEN_MAX_PIXELS)


def cover(size, colour=(180, 40, 40)):
    image = Image.new("RGB", size, colour)
    image.paste(Image.new("RGB", (size[0] // 3, size[1] // 4), (20, 160, 200)), (size[0] // 5, size[1] // 2))
    return image


def examples(sizes, answers=None):
    answers = answers or ["Maria Lopez", "Travel", "Yes", "No"]
    return [{"id": f"s{i}", "question": "Who wrote this book?", "answer": answers[i % len(answers)],
             "chosen": answers[i % len(answers)], "rejected": "The cover shows a book by someone else.",
             "image": cover(size, (40 * i + 60, 90, 150))} for i, size in enumerate(sizes)]


def plain_forward(policy, batch, **kwargs):
    """transformers' own forward over the processor's output (one image per row, no features handed in)."""
    keys = ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
            "cross_attention_mask", "image_grid_thw", "mm_token_type_ids")
    return policy.model(**{k: batch[k] for k in keys if k in batch}, **kwargs)


def plain_logits(policy, batch):
    return plain_forward(policy, batch).logits


def image_count(batch) -> int:
    """Images the batch holds: one `image_grid_thw` row each (Qwen's pixel_values are flat patches)."""
    return int(batch["image_grid_thw"].shape[0] if "image_grid_thw" in batch else batch["pixel_values"].shape[0])


def each_row_its_image(batch):
    """The batch with a copy of its image per row (`image_index` [B]), as the processor would give it unshared."""
    index = batch["image_index"]
    if "image_grid_thw" in batch:  # Qwen: flat patches, image i's are rows offsets[i]:offsets[i+1]
        return {**batch, **qwen_vl.select_pixels(batch, index)}
    return {k: (v[index] if k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask") else v)
            for k, v in batch.items()}


def test_mllama_standin_has_the_real_geometry(mllama):
    tokenizer, config = mllama.processor.tokenizer, mllama.config
    assert len(tokenizer) == 128257 and config.text_config.vocab_size == 128256
    assert mllama.base_model.get_output_embeddings().out_features == 128256
    assert [tokenizer.convert_tokens_to_ids(t) for t in
            ("<|begin_of_text|>", "<|eot_id|>", "<|image|>", "<|finetune_right_pad_id|>", "<|start_header_id|>")] == \
        [128000, 128009, 128256, 128004, 128006]
    images = mllama.processor.image_processor
    assert (images.size["height"], images.max_image_tiles) == (560, 4)
    assert config.vision_config.supported_aspect_ratios == [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
    features = mllama.encode_images(collate_sft(examples([(560, 560)]), mllama.processor))
    assert features.embeds.shape[:2] == (1, 4 * 1601)  # 4 tile slots of 1601 vision tokens
    assert mllama.stop_token_ids() == set(STOP_IDS)


def test_llava_standin_expands_its_placeholder_to_576_tokens(llava):
    batch = collate_sft(examples([(336, 336)]), llava.processor)
    assert llava.processor.image_token == "<image>"
    assert int((batch["input_ids"] == IMAGE_ID).sum()) == 576
    assert llava.encode_images(batch).embeds.shape[:2] == (1, 576)


def test_prompts_come_from_the_chat_template(mllama, llava):
    # seed 000's prompt is exactly what Llama 3.2 Vision's template renders for it
    assert render_prompt("Who wrote this book?", fmt=prompt_format(mllama.processor)) == \
        render_prompt("Who wrote this book?", fmt=SEED_000)
    llava_prompt = render_prompt("Who wrote this book?", fmt=prompt_format(llava.processor))
    assert "<image>\nAnswer question" in llava_prompt and "<|image|>" not in llava_prompt
    assert prompt_format(llava.processor).end_of_turn == "<|eot_id|>"


def test_real_tokenizer_layout_is_deterministic():
    a = build_llama3_tokenizer("<|image|>", "{{ bos_token }}")
    b = build_llama3_tokenizer("<|image|>", "{{ bos_token }}")
    text = "<|begin_of_text|>Maria Lopez wrote it.<|eot_id|>"
    assert a(text, add_special_tokens=False)["input_ids"] == b(text, add_special_tokens=False)["input_ids"]
    assert a("Travel", add_special_tokens=True)["input_ids"][0] == 128000


@pytest.mark.parametrize("tiles", [1, 2, 4, "mixed", "portrait"])
def test_mllama_features_path_equals_plain_forward(mllama, tiles):
    sizes = {"mixed": [SIZES[1], SIZES[4], SIZES[2]], "portrait": [(600, 900), (600, 900)]}.get(tiles)
    batch = collate_sft(examples(sizes or [SIZES[tiles], SIZES[tiles]]), mllama.processor)
    used = batch["aspect_ratio_mask"].sum(-1).flatten().tolist()
    expected = {"mixed": [1, 4, 2], "portrait": [4, 4]}.get(tiles, [tiles, tiles])
    assert used == expected
    with torch.no_grad():
        plain = plain_logits(mllama, batch)
        via_features = mllama.forward(batch, mllama.encode_images(batch)).logits
    torch.testing.assert_close(via_features, plain, atol=1e-5, rtol=0)


def test_llava_features_path_equals_plain_forward(llava):
    batch = collate_sft(examples([(336, 336), (600, 900)]), llava.processor)
    with torch.no_grad():
        plain = plain_logits(llava, batch)
        via_features = llava.forward(batch, llava.encode_images(batch)).logits
    torch.testing.assert_close(via_features, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["mllama", "llava", "qwen"])
def test_chosen_and_rejected_share_one_image(family, request):
    """A preference batch encodes each pair's image once; each row equals its own plain forward."""
    policy = request.getfixturevalue(family)
    batch = collate_preference(examples([SIZES[4], SIZES[2]]), policy.processor)
    assert image_count(batch) == 2 and batch["image_index"].tolist() == [0, 1, 0, 1]
    with torch.no_grad():
        features = policy.encode_images(batch)
        logps = policy.completion_logprobs(batch, features)[1]
        plain = plain_logits(policy, each_row_its_image(batch))
    from alignment.losses import sequence_logprobs

    labels = batch["labels"]
    _, plain_logps = sequence_logprobs(plain.float(), labels.clamp(min=0), (labels != -100).float())
    torch.testing.assert_close(logps, plain_logps, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["mllama", "llava", "qwen"])
def test_kv_cache_generation_equals_full_recomputation(family, request):
    """Greedy tokens from the KV-cache loop are the argmax of a full forward over prompt + tokens so far."""
    policy = request.getfixturevalue(family)
    prompts = collate_prompts(examples([SIZES[4], SIZES[1], (600, 900)]), policy.processor)
    with torch.no_grad():
        tokens = policy.generate(prompts, max_new_tokens=4)
        rows = prompts["input_ids"].shape[0]
        for step in range(tokens.shape[1]):
            ids = torch.cat([prompts["input_ids"], tokens[:, :step]], dim=1)
            mask = torch.cat([prompts["attention_mask"], torch.ones(rows, step, dtype=torch.long)], dim=1)
            batch = {**prompts, "input_ids": ids, "attention_mask": mask}
            if "cross_attention_mask" in prompts:
                cross = prompts["cross_attention_mask"]
                batch["cross_attention_mask"] = torch.cat([cross, cross[:, -1:].expand(-1, step, -1, -1)], dim=1)
            # M-RoPE (Qwen) places rows from their image grids itself; the others count real tokens
            positions = {} if "image_grid_thw" in prompts else {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
            logits = policy.family.forward_with_features(
                policy.model, input_ids=ids, attention_mask=mask, **positions,
                features=policy.encode_images(prompts), image_index=prompts["image_index"], use_cache=False,
                logits_to_keep=1,
                **({"cross_attention_mask": batch["cross_attention_mask"]} if "cross_attention_mask" in batch else {}),
            ).logits[:, -1]
            # rows already finished hold the pad id; compare the live ones
            live = ~torch.isin(tokens[:, :step], torch.tensor(sorted(policy.stop_token_ids()))).any(1)
            assert torch.equal(logits.argmax(-1)[live], tokens[live, step])


QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # the template's default turn
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def test_qwen25vl_standin_has_the_real_token_protocol(qwen):
    """Qwen2.5's 151,643 BPE ids, its 22 added tokens at 151643..151664 (14 special), 152,064 embedding rows
    (untied); pad <|endoftext|>, EOS <|im_end|>, no BOS; the chat template's default system turn."""
    tokenizer, config = qwen.processor.tokenizer, qwen.config
    assert (tokenizer.vocab_size, len(tokenizer)) == (151643, 151665)
    assert config.text_config.vocab_size == 152064 and not config.tie_word_embeddings
    assert qwen.base_model.get_input_embeddings().num_embeddings == 152064
    assert qwen.base_model.get_output_embeddings().out_features == 152064
    assert {t.content: i for i, t in tokenizer.added_tokens_decoder.items()} == \
        {token: 151643 + i for i, (token, _) in enumerate(QWEN_ADDED_TOKENS)}
    assert set(tokenizer.all_special_tokens) == {token for token, special in QWEN_ADDED_TOKENS if special}
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token) == (151643, 151645, None)
    assert tokenizer("Who wrote this book?")["input_ids"][0] < 151643  # no BOS in front
    assert (config.image_token_id, config.video_token_id, config.vision_start_token_id,
            config.vision_end_token_id) == (151655, 151656, 151652, 151653)
    assert qwen.stop_token_ids() == {151643, 151645}
    assert {151652, 151653, 151655, 151656} <= set(qwen.unsampled_token_ids(152064))

    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who wrote this book?"}]}
    assert qwen.processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False) == (
        f"{QWEN_SYSTEM}<|im_start|>user\n{QWEN_IMAGE}Who wrote this book?<|im_end|>\n<|im_start|>assistant\n")
    own = qwen.processor.apply_chat_template([{"role": "system", "content": "Be brief."}, user], tokenize=False)
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n") and QWEN_SYSTEM not in own
    fmt = prompt_format(qwen.processor)
    assert fmt.before.startswith(QWEN_SYSTEM) and fmt.end_of_turn == "<|im_end|>"


def test_real_qwen_tokenizer_layout_is_deterministic():
    a, b = build_qwen2_tokenizer("{{ messages }}"), build_qwen2_tokenizer("{{ messages }}")
    text = "<|im_start|>user\nWho wrote this book?<|im_end|>\n<tool_call>"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert a(text)["input_ids"][0] == 151644 and a(text)["input_ids"][-1] == 151657


def test_qwen25vl_standin_has_the_real_image_geometry(qwen):
    """A 600x900 cover is resized to multiples of 28 px (patch 14, merge 2) with an area in [min_pixels,
    max_pixels]: 896x588, grid [1, 64, 42], 672 <|image_pad|> under the checkpoint's 3136..12845056; 756x504,
    grid [1, 54, 36], 486 under max_pixels 401,408 = 512 * 28 * 28 (`load_processor(..., max_pixels=)`)."""
    vision, text = qwen.config.vision_config, qwen.config.text_config
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size, vision.window_size) == (14, 2, 2, 112)
    assert (vision.depth, vision.fullatt_block_indexes) == (4, [1, 3])
    assert text.hidden_size // text.num_attention_heads == 128 and text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (text.rope_parameters["rope_theta"], text.max_position_embeddings) == (1e6, 128000)
    stock = load_processor("standin-qwen25vl")
    images = stock.image_processor
    assert (images.size["shortest_edge"], images.size["longest_edge"]) == (3136, 12845056)
    assert (images.patch_size, images.merge_size, images.temporal_patch_size) == (14, 2, 2)
    assert (list(images.image_mean), list(images.image_std)) == (CLIP_MEAN, CLIP_STD)
    for processor, grid in ((stock, [1, 64, 42]), (qwen.processor, [1, 54, 36])):
        batch = collate_sft(examples([(600, 900)]), processor)
        assert batch["image_grid_thw"].tolist() == [grid]
        assert int((batch["input_ids"] == 151655).sum()) == grid[1] * grid[2] // 4
        size = processor.image_processor.size
        assert size["shortest_edge"] <= grid[1] * grid[2] * 14 * 14 <= size["longest_edge"]
    folder = Path(resolve_model_path("standin-qwen25vl"))  # the hub layout: AutoProcessor where torchvision is
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    assert (folder / "video_preprocessor_config.json").is_file()


def test_qwen25vl_features_path_equals_plain_forward(qwen):
    """Rows [600x900 cover, 448x336 cover, the first cover again]: the 2 images encoded once (486 and 192
    merged tokens) and handed back at M-RoPE positions from their grids == transformers' forward over the
    processor's 3 images: the last hidden state at every position, the logits (all 152,064) where answers
    are scored. (All positions' logits agree too, 0.0 apart, but comparing [3, 540, 152064] twice costs
    12 s of CPU and 4 GB.)"""
    rows = examples([(600, 900), (448, 336)])
    rows.append({**rows[0], "id": "s2", "question": "What is the title of this book?", "answer": "Travel"})
    batch = collate_sft(rows, qwen.processor)
    with torch.no_grad():
        plain = plain_forward(qwen, batch, output_hidden_states=True)
        features = qwen.encode_images(qwen_vl.select_pixels(batch, torch.tensor([0, 1])))
        ours = qwen.forward({**batch, "image_index": torch.tensor([0, 1, 0])}, features, hidden=True)
    assert features.lengths.tolist() == [486, 192]
    torch.testing.assert_close(ours.hidden_states[-1], plain.hidden_states[-1], atol=1e-5, rtol=0)
    scored = batch["labels"] != -100
    torch.testing.assert_close(ours.logits[scored], plain.logits[scored], atol=1e-5, rtol=0)


def test_dpo_recipe_dry_runs_on_the_qwen_standin(tmp_path):
    """The book-cover DPO recipe on the Qwen2.5-VL stand-in, unquantised, 600x900 covers at max_pixels
    401,408: validation, then one real SFT and one real DPO batch (2 pairs sharing 2 images of 486 tokens)."""
    recipe = load_recipe(ROOT / "recipes" / "dpo_bookcover.yaml", [
        f"output_dir={tmp_path}", "model.name=standin-qwen25vl", "model.quantization=none",
        f"model.max_pixels={QWEN_MAX_PIXELS}", "data.image_size=600", "data.image_height=900", "data.num_covers=20",
        "data.max_length=1024", "stages.0.batch_size=2", "stages.1.batch_size=2"])
    report = run_recipe(recipe, dry_run=True)
    assert [s["name"] for s in report["stages"]] == ["sft", "dpo"]
    dpo = report["stages"][1]["batch"]
    assert (dpo["rows"], dpo["images"], dpo["vision_tokens_per_image"]) == (4, 2, 486)

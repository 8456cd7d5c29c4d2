"""Real-geometry stand-ins (alignment/models/standins.py): their shapes and token ids are the real
checkpoints', and every path that touches model inputs (collate, encode once, features path,
KV-cache generation) agrees with plain transformers on them: several 560-px tiles, mixed aspect
ratios in one batch, 576 LLaVA image tokens, ids past the output head."""

import pytest
import torch
from PIL import Image

from alignment.data import collate_preference, collate_prompts, collate_sft
from alignment.data.prompts import SEED_000, prompt_format, render_prompt
from alignment.models.standins import IMAGE_ID, STOP_IDS, build_llama3_tokenizer
from alignment.policy import MultimodalPolicy

pytestmark = pytest.mark.usefixtures("one_thread")

# (width, height) -> Mllama tiles used: 560x560 one tile, 1120x560 two, 1120x1120 four,
# 600x900 (an OCR-VQA-like portrait cover) four (a 2x2 canvas).
SIZES = {1: (560, 560), 2: (1120, 560), 4: (1120, 1120)}


@pytest.fixture(scope="module")
def mllama():
    return MultimodalPolicy.from_pretrained("standin-mllama")


@pytest.fixture(scope="module")
def llava():
    return MultimodalPolicy.from_pretrained("standin-llava")


def cover(size, colour=(180, 40, 40)):
    image = Image.new("RGB", size, colour)
    image.paste(Image.new("RGB", (size[0] // 3, size[1] // 4), (20, 160, 200)), (size[0] // 5, size[1] // 2))
    return image


def examples(sizes, answers=None):
    answers = answers or ["Maria Lopez", "Travel", "Yes", "No"]
    return [{"id": f"s{i}", "question": "Who wrote this book?", "answer": answers[i % len(answers)],
             "chosen": answers[i % len(answers)], "rejected": "The cover shows a book by someone else.",
             "image": cover(size, (40 * i + 60, 90, 150))} for i, size in enumerate(sizes)]


def plain_logits(policy, batch):
    keys = ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
            "cross_attention_mask")
    return policy.model(**{k: batch[k] for k in keys if k in batch}).logits


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
    assert features.shape[:2] == (1, 4 * 1601)  # 4 tile slots of 1601 vision tokens
    assert mllama._stop_token_ids() == set(STOP_IDS)


def test_llava_standin_expands_its_placeholder_to_576_tokens(llava):
    batch = collate_sft(examples([(336, 336)]), llava.processor)
    assert llava.processor.image_token == "<image>"
    assert int((batch["input_ids"] == IMAGE_ID).sum()) == 576
    assert llava.encode_images(batch).shape[:2] == (1, 576)


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


@pytest.mark.parametrize("family", ["mllama", "llava"])
def test_chosen_and_rejected_share_one_image(family, request):
    """A preference batch encodes each pair's image once; each row equals its own plain forward."""
    policy = request.getfixturevalue(family)
    batch = collate_preference(examples([SIZES[4], SIZES[2]]), policy.processor)
    assert batch["pixel_values"].shape[0] == 2 and batch["image_index"].tolist() == [0, 1, 0, 1]
    with torch.no_grad():
        features = policy.encode_images(batch)
        logps = policy.completion_logprobs(batch, features)[1]
        expanded = {k: (v[batch["image_index"]] if k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
                        else v) for k, v in batch.items()}
        plain = plain_logits(policy, expanded)
    from alignment.losses import sequence_logprobs

    labels = batch["labels"]
    _, plain_logps = sequence_logprobs(plain.float(), labels.clamp(min=0), (labels != -100).float())
    torch.testing.assert_close(logps, plain_logps, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["mllama", "llava"])
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
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = policy.family.forward_with_features(
                policy.model, input_ids=ids, attention_mask=mask, position_ids=position_ids,
                image_features=policy.encode_images(prompts), use_cache=False,
                **({"cross_attention_mask": batch["cross_attention_mask"]} if "cross_attention_mask" in batch else {}),
            ).logits[:, -1]
            # rows already finished hold the pad id; compare the live ones
            live = ~torch.isin(tokens[:, :step], torch.tensor(sorted(policy._stop_token_ids()))).any(1)
            assert torch.equal(logits.argmax(-1)[live], tokens[live, step])

"""Collators for Mllama and LLaVA: shapes, label masking, cross-attention over the completion."""

import pytest
import torch

from alignment.data import (
    DataValidationError,
    collate_preference,
    collate_prompts,
    collate_sft,
    image_blind,
    make_preference_pairs,
    processor_family,
    render_completion,
    render_prompt,
)
from alignment.data.catalog import DEFAULT_INSTRUCTION
from alignment.data.covers import render_cover

FAMILIES = ["tiny-mllama", "tiny-llava"]


@pytest.fixture(scope="module", params=FAMILIES)
def processor(request):
    from alignment.models import load_processor

    return load_processor(request.param)


@pytest.fixture(scope="module")
def examples():
    import random

    rng = random.Random(0)
    qa = [("Who wrote this book?", "Maria Lopez", "author"), ("Is this a Travel book?", "No", "yesno"),
          ("What type of book is this?", "Science Fiction & Fantasy", "genre")]
    covers = [("The Blue Door", "Maria Lopez", "Travel"), ("Winter Garden", "Kenji Sato", "Romance"),
              ("A Map of Stars", "Anna Weber", "Science Fiction & Fantasy")]
    return [{"id": f"s{i}", "image_id": f"c{i}", "image": render_cover(*cover, rng), "question": q,
             "answer": a, "kind": k} for i, ((q, a, k), cover) in enumerate(zip(qa, covers))]


def image_shapes(family, n):
    if family == "mllama":
        return {"pixel_values": (n, 1, 1, 3, 112, 112), "aspect_ratio_ids": (n, 1), "aspect_ratio_mask": (n, 1, 1)}
    return {"pixel_values": (n, 3, 112, 112)}


def completion_ids(processor, answer):
    return processor.tokenizer(render_completion(answer), add_special_tokens=False)["input_ids"]


def test_processor_family(processor):
    assert processor_family(processor) in ("mllama", "llava")
    with pytest.raises(ValueError, match="unsupported processor"):
        processor_family(object())


def test_sft_shapes_and_dtypes(processor, examples):
    family = processor_family(processor)
    batch = collate_sft(examples, processor)
    b, t = batch["input_ids"].shape
    assert b == 3 and batch["attention_mask"].shape == batch["labels"].shape == (b, t)
    for key, shape in image_shapes(family, 3).items():
        assert tuple(batch[key].shape) == shape, key
    assert batch["pixel_values"].dtype == torch.float32 and batch["labels"].dtype == torch.int64
    if family == "mllama":
        assert tuple(batch["cross_attention_mask"].shape) == (b, t, 1, 1)
    else:
        assert "cross_attention_mask" not in batch
        assert (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [64] * 3
    assert batch["image_index"].tolist() == [0, 1, 2] and batch["ids"] == ["s0", "s1", "s2"]


def test_labels_are_exactly_the_completion(processor, examples):
    """Right padding; labels == input_ids on answer<|eot_id|> tokens, -100 on prompt and padding."""
    batch = collate_sft(examples, processor)
    pad = processor.tokenizer.pad_token_id
    for row, example in enumerate(examples):
        mask = batch["attention_mask"][row]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # right padding
        assert (batch["input_ids"][row, length:] == pad).all()
        completion = completion_ids(processor, example["answer"])
        labelled = batch["labels"][row] != -100
        assert labelled.nonzero().flatten().tolist() == list(range(length - len(completion), length))
        assert batch["labels"][row, labelled].tolist() == completion
        assert processor.tokenizer.decode(completion) == example["answer"] + "<|eot_id|>"


def test_cross_attention_mask_covers_the_completion(examples):
    """Mllama: 1 on every real token from <|image|> on (prompt rest and completion), 0 elsewhere."""
    from alignment.models import load_processor

    mllama = load_processor("tiny-mllama")
    batch = collate_sft(examples, mllama)
    for row in range(len(examples)):
        image_at = (batch["input_ids"][row] == mllama.image_token_id).nonzero().item()
        length = int(batch["attention_mask"][row].sum())
        mask = batch["cross_attention_mask"][row, :, 0, 0]
        assert not mask[:image_at].any()
        assert mask[image_at:length].all()  # every prompt and completion token after the image
        assert not mask[length:].any()


def test_preference_row_order_and_image_index(processor, examples):
    family = processor_family(processor)
    pairs = make_preference_pairs(examples, verbose_fraction=0.5, seed=0)
    batch = collate_preference(pairs, processor)
    t = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == batch["labels"].shape == (6, t) and batch["num_pairs"] == 3
    assert batch["image_index"].tolist() == [0, 1, 2, 0, 1, 2] and batch["ids"] == ["s0", "s1", "s2"]
    for key, shape in image_shapes(family, 3).items():
        assert tuple(batch[key].shape) == shape, key
    if family == "mllama":
        assert tuple(batch["cross_attention_mask"].shape) == (6, t, 1, 1)
    answers = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    for row, answer in enumerate(answers):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled == completion_ids(processor, answer)
    single = collate_sft(examples, processor)
    torch.testing.assert_close(batch["pixel_values"], single["pixel_values"])


def test_prompts_are_left_padded(processor, examples):
    family = processor_family(processor)
    batch = collate_prompts(examples, processor)
    b, t = batch["input_ids"].shape
    for key, shape in image_shapes(family, 3).items():
        assert tuple(batch[key].shape) == shape, key
    assert "labels" not in batch and batch["answers"] == [e["answer"] for e in examples]
    assert batch["kinds"] == ["author", "yesno", "genre"] and batch["image_index"].tolist() == [0, 1, 2]
    prompt_end = processor.tokenizer(render_prompt("x"), add_special_tokens=False)["input_ids"][-4:]
    for row in range(b):
        length = int(batch["attention_mask"][row].sum())
        assert batch["attention_mask"][row, t - length:].all() and not batch["attention_mask"][row, : t - length].any()
        assert batch["input_ids"][row, -4:].tolist() == prompt_end  # ends with "assistant<|end_header_id|>\n\n"
    if family == "mllama":
        image_at = (batch["input_ids"] == processor.image_token_id).float().argmax(dim=1)
        for row in range(b):
            assert batch["cross_attention_mask"][row, image_at[row]:, 0, 0].all()


def test_over_long_rows_are_refused_not_truncated(processor, examples):
    length = int(collate_sft(examples, processor)["attention_mask"].sum(dim=1).max())
    assert collate_sft(examples, processor, max_length=length)["input_ids"].shape[1] == length
    with pytest.raises(DataValidationError, match="over max_length.*never truncated"):
        collate_sft(examples, processor, max_length=length - 1)


def test_blind_batch_has_one_image(processor, examples):
    batch = collate_sft(image_blind(examples), processor)
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][2])
    assert not torch.equal(collate_sft(examples, processor)["pixel_values"][0], batch["pixel_values"][0])


def test_tiny_model_takes_the_batch(processor, examples):
    """The collated tensors are what the model's forward expects: a finite loss on the completion."""
    from alignment.models import load_model

    model = load_model("tiny-mllama" if processor_family(processor) == "mllama" else "tiny-llava")
    batch = collate_sft(examples, processor)
    inputs = {k: v for k, v in batch.items() if k not in ("ids", "image_index")}
    with torch.no_grad():
        loss = model(**inputs).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen25vl"])
def test_rows_with_several_images_collate_and_pairs_hold_them_once(name, examples):
    """A two-image example beside a one-image one: one placeholder per image, image_index [B, 2] with -1
    on the empty slot, labels exactly the answer; a preference pair's rows share its images."""
    from alignment.data.prompts import prompt_format
    from alignment.models import load_processor

    processor = load_processor(name)
    two = {**examples[0], "images": [examples[0]["image"], examples[1]["image"]]}
    del two["image"]
    batch = collate_sft([two, examples[2]], processor)
    assert batch["image_index"].tolist() == [[0, 1], [2, -1]]
    fmt = prompt_format(processor)
    answer = processor.tokenizer(fmt.completion(two["answer"]), add_special_tokens=False)["input_ids"]
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled == answer
    pairs = make_preference_pairs([two, examples[2]], seed=0)
    prefs = collate_preference(pairs, processor)
    n = prefs["num_pairs"]
    assert torch.equal(prefs["image_index"][:n], prefs["image_index"][n:])
    held = prefs["image_grid_thw"].shape[0] if "image_grid_thw" in prefs else prefs["pixel_values"].shape[0]
    assert held == 3  # the pairs' images, each once


def test_llama_vision_refuses_a_row_with_two_images(examples):
    from alignment.models import load_processor

    two = {**examples[0], "images": [examples[0]["image"], examples[1]["image"]]}
    with pytest.raises(DataValidationError, match="'s0': 2 images; Llama 3.2 Vision reads one image per row"):
        collate_sft([two, examples[1]], load_processor("tiny-mllama"))


@pytest.mark.parametrize("name", ["tiny-mllama", "tiny-llava", "tiny-qwen25vl"])
def test_appending_the_completion_to_the_prompts_equals_the_whole_rows(name, examples):
    """Where the tokenizer does not merge across the boundary, the prompts tokenized alone with each
    completion's tokens appended (the fallback) are the whole rows token for token, per-token tensors
    (Mllama's cross-attention mask, Qwen's token types) and labels included."""
    from alignment.data.collate import _appended, _encode, _prompts
    from alignment.data.prompts import prompt_format
    from alignment.models import load_processor

    processor = load_processor(name)
    whole = collate_sft(examples, processor)
    prompts, images = _prompts(examples, processor, DEFAULT_INSTRUCTION)
    completions = [prompt_format(processor).completion(e["answer"]) for e in examples]
    completion_tokens = processor.tokenizer(completions, add_special_tokens=False)["input_ids"]
    appended = _appended(_encode(processor, prompts, images, "right"), completion_tokens,
                         processor.tokenizer.pad_token_id, [e["id"] for e in examples])
    assert set(appended) == set(whole) - {"image_index", "ids"}
    for key, value in appended.items():
        assert torch.equal(value, whole[key]), key


def test_a_tokenizer_merging_across_the_boundary_gets_the_templates_boundary(examples):
    """Llama 3's split joins a colon to the next word: with a template that glues the answer to `Assistant:`,
    `Assistant:Maria` is one piece, so the whole row does not end with the answer's own tokens. Each row is
    then the prompt's tokens (as generation sees them) followed by the completion's, labels on the latter."""
    from alignment.data.prompts import prompt_format
    from alignment.models import generic

    processor = generic.build_processor(generic.build_tokenizer(split="llama3"))
    tokenizer = processor.tokenizer
    fmt = prompt_format(processor)
    assert fmt.after.endswith("Assistant:") and fmt.answer_prefix == ""
    answer = tokenizer("Maria Lopez", add_special_tokens=False)["input_ids"]
    assert tokenizer(fmt.after + "Maria Lopez", add_special_tokens=False)["input_ids"][-len(answer):] != answer
    batch = collate_sft(examples, processor)
    prompts = collate_prompts(examples, processor)
    for row, example in enumerate(examples):
        completion = tokenizer(fmt.completion(example["answer"]), add_special_tokens=False)["input_ids"]
        prompt = prompts["input_ids"][row][prompts["attention_mask"][row].bool()].tolist()
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == prompt + completion
        assert batch["labels"][row][batch["labels"][row] != -100].tolist() == completion
    pairs = make_preference_pairs(examples, seed=0)
    prefs = collate_preference(pairs, processor)
    for row, answer in enumerate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]):
        labelled = prefs["labels"][row][prefs["labels"][row] != -100].tolist()
        assert tokenizer.decode(labelled) == answer + "<end_of_utterance>"

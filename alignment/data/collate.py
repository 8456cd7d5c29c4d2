"""Collators: examples -> model tensors, for Mllama and LLaVA processors.

Shapes (B rows, T tokens; ``tiles`` = the image processor's max tiles):

    input_ids, attention_mask            [B, T]        int64
    labels (sft, preference)             [B, T]        int64, -100 on prompt and padding
    pixel_values                         Mllama [N, 1, tiles, 3, H, W], LLaVA [N, 3, H, W]  float32
    aspect_ratio_ids / aspect_ratio_mask Mllama only, [N, 1] / [N, 1, tiles]
    cross_attention_mask                 Mllama only, [B, T, 1, tiles]: 1 from the <|image|>
                                         token to the row's last real token, 0 before and on pads
    image_index                          [B] int64: row -> its image in pixel_values
    ids                                  list[str] of sample ids (one per example)

N is the number of images: one per example (for preference pairs, one per pair). Each sequence is
tokenized whole (prompt + completion) by the processor, so Mllama's cross-attention mask spans
the completion; the prompt, tokenized alone, must be a prefix of it (checked), which gives the labels.
Rows are never truncated: a row over ``max_length`` raises ``DataValidationError``.
"""

from __future__ import annotations

from typing import Any

import torch

from alignment.data.catalog import DEFAULT_INSTRUCTION
from alignment.data.errors import DataValidationError
from alignment.data.prompts import prompt_format

IGNORE_INDEX = -100
_IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


def processor_family(processor: Any) -> str:
    """``"mllama"`` or ``"llava"``, from the processor's or its image processor's class name."""
    names = [type(processor).__name__, type(getattr(processor, "image_processor", None)).__name__]
    for name in names:
        if "Mllama" in name:
            return "mllama"
        if "Llava" in name or "CLIP" in name:
            return "llava"
    raise ValueError(f"unsupported processor {names[0]} (image processor {names[1]}); expected a "
                     "MllamaProcessor or a LlavaProcessor")


def _encode(processor: Any, texts: list[str], images: list[Any], padding_side: str) -> dict[str, torch.Tensor]:
    """Run the processor over whole texts (one image placeholder each) with one image per text."""
    encoded = processor(text=texts, images=[[image] for image in images], padding=True,
                        padding_side=padding_side, add_special_tokens=False, return_tensors="pt")
    batch = dict(encoded)
    batch["pixel_values"] = batch["pixel_values"].to(torch.float32)
    if "cross_attention_mask" in batch:  # zero on padding; the processor fills pads after the image
        batch["cross_attention_mask"] = batch["cross_attention_mask"] * batch["attention_mask"][:, :, None, None]
    return batch


def _check_length(batch: dict[str, torch.Tensor], ids: list[str], max_length: int | None) -> None:
    if max_length is None:
        return
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    for row, length in enumerate(lengths):
        if length > max_length:
            raise DataValidationError(
                f"sample {ids[row % len(ids)]!r} (batch row {row}): {length} tokens, over max_length={max_length}. "
                "Rows are never truncated (that could cut the image tokens or the answer away): raise "
                "max_length, or validate the data with the tokenizer and policy='skip' first")


def _labels(batch: dict[str, torch.Tensor], processor: Any, prompts: list[str], ids: list[str]) -> torch.Tensor:
    """``input_ids`` with -100 on each row's prompt tokens and on padding (right-padded rows)."""
    tokenizer = processor.tokenizer
    image_token_id = processor.image_token_id
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    labels = batch["input_ids"].clone()
    for row, prefix in enumerate(prompt_ids):
        full = batch["input_ids"][row].tolist()
        expanded = []  # LLaVA's processor repeats <|image|> once per patch
        for token in prefix:
            expanded.extend([token] * full.count(image_token_id) if token == image_token_id else [token])
        if full[: len(expanded)] != expanded:
            raise DataValidationError(
                f"sample {ids[row % len(ids)]!r} (batch row {row}): the prompt's tokens are not a prefix of "
                "prompt + completion's tokens, so the completion cannot be located; the tokenizer merges "
                "across the boundary (check the tokenizer's pre-tokenizer)")
        labels[row, : len(expanded)] = IGNORE_INDEX
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    return labels


def collate_sft(examples: list[dict[str, Any]], processor: Any, max_length: int | None = None,
                instruction: str = DEFAULT_INSTRUCTION) -> dict[str, Any]:
    """SFT batch: prompt + answer + end of turn (``<|eot_id|>``), right-padded, labels on the completion only.
    Prompt and end of turn come from the processor's chat template (`prompt_format`)."""
    ids = [e["id"] for e in examples]
    fmt = prompt_format(processor)
    prompts = [fmt.prompt(e["question"], instruction) for e in examples]
    texts = [p + fmt.completion(e["answer"]) for p, e in zip(prompts, examples)]
    batch = _encode(processor, texts, [e["image"] for e in examples], "right")
    _check_length(batch, ids, max_length)
    batch["labels"] = _labels(batch, processor, prompts, ids)
    batch["image_index"] = torch.arange(len(examples))
    batch["ids"] = ids
    return batch


def collate_preference(examples: list[dict[str, Any]], processor: Any, max_length: int | None = None,
                       instruction: str = DEFAULT_INSTRUCTION) -> dict[str, Any]:
    """Preference batch of B pairs: rows 0..B-1 chosen, B..2B-1 rejected, one padded length.

    Image tensors hold one image per pair (N = B); ``image_index = [0..B-1, 0..B-1]``;
    ``num_pairs = B``; ``ids`` has one id per pair.
    """
    ids = [e["id"] for e in examples]
    fmt = prompt_format(processor)
    prompts = [fmt.prompt(e["question"], instruction) for e in examples] * 2
    answers = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    texts = [p + fmt.completion(a) for p, a in zip(prompts, answers)]
    images = [e["image"] for e in examples]
    batch = _encode(processor, texts, images + images, "right")
    _check_length(batch, ids, max_length)
    batch["labels"] = _labels(batch, processor, prompts, ids)
    for key in _IMAGE_KEYS:
        if key in batch:
            batch[key] = batch[key][: len(examples)]
    batch["image_index"] = torch.arange(len(examples)).repeat(2)
    batch["num_pairs"] = len(examples)
    batch["ids"] = ids
    return batch


def collate_prompts(examples: list[dict[str, Any]], processor: Any,
                    instruction: str = DEFAULT_INSTRUCTION) -> dict[str, Any]:
    """Prompts only, left-padded for generation; plus ``answers`` (reference), ``questions``, ``kinds``."""
    fmt = prompt_format(processor)
    batch = _encode(processor, [fmt.prompt(e["question"], instruction) for e in examples],
                    [e["image"] for e in examples], "left")
    batch["image_index"] = torch.arange(len(examples))
    batch["ids"] = [e["id"] for e in examples]
    batch["answers"] = [e.get("answer", e.get("chosen")) for e in examples]
    batch["questions"] = [e["question"] for e in examples]
    batch["kinds"] = [e.get("kind", "other") for e in examples]
    return batch

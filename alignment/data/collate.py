"""Collators: examples -> model tensors, for every family's processor (Mllama, LLaVA, Qwen-VL, ...).

Shapes (B rows, T tokens, N images; ``tiles`` = the image processor's max tiles):

    input_ids, attention_mask            [B, T]        int64
    labels (sft, preference)             [B, T]        int64, -100 on prompt and padding
    pixel_values                         Mllama [N, 1, tiles, 3, H, W], LLaVA [N, 3, H, W],
                                         Qwen [sum of patches, C*T*P*P] (+ image_grid_thw [N, 3])
    aspect_ratio_ids / aspect_ratio_mask Mllama only, [N, 1] / [N, 1, tiles]
    cross_attention_mask                 Mllama only, [B, T, 1, tiles]: 1 from the <|image|>
                                         token to the row's last real token, 0 before and on pads
    image_index                          [B] int64: row -> its image; [B, K] when a row shows several
                                         images (slots in placeholder order, -1 on empty ones)
    ids                                  list[str] of sample ids (one per example)

An example shows its ``image`` or its ``images`` (a list; one placeholder each, in order). Each image
is held once per batch; a preference pair's two rows point at the same images. Each sequence is
tokenized whole (prompt + completion) by the processor, so Mllama's cross-attention mask spans the
completion; the completion, tokenized alone, ends each row's real tokens (checked), which gives the
labels. Where the tokenizer merges across the boundary, the prompts are tokenized alone by the
processor and the completions' tokens appended (the template's boundary, as generation sees it). Rows are never truncated: a row over ``max_length`` raises ``DataValidationError``.
"""

from __future__ import annotations

from typing import Any

import torch

from alignment.data.catalog import DEFAULT_INSTRUCTION
from alignment.data.errors import DataValidationError
from alignment.data.images import images_of
from alignment.data.prompts import prompt_format

IGNORE_INDEX = -100
# Pixel keys with one entry per image (or per row's images) along dim 0, never per token.
_IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "image_grid_thw", "pixel_attention_mask",
               "image_sizes")
# Per-token processor outputs besides input_ids / attention_mask that a completion can be appended to.
_APPENDABLE_KEYS = ("cross_attention_mask", "token_type_ids", "mm_token_type_ids")


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


def _encode(processor: Any, texts: list[str], images: list[list[Any]], padding_side: str) -> dict[str, torch.Tensor]:
    """Run the processor over whole texts, row i showing the images ``images[i]`` (one placeholder each)."""
    encoded = processor(text=texts, images=[list(row) for row in images], padding=True,
                        padding_side=padding_side, add_special_tokens=False, return_tensors="pt")
    batch = dict(encoded)
    batch["pixel_values"] = batch["pixel_values"].to(torch.float32)
    if "cross_attention_mask" in batch:  # zero on padding; the processor fills pads after the image
        batch["cross_attention_mask"] = batch["cross_attention_mask"] * batch["attention_mask"][:, :, None, None]
    return batch


def _image_entries(batch: dict[str, torch.Tensor]) -> int:
    """How many entries the batch's pixel tensors hold along dim 0 (Qwen: one image_grid_thw row per image)."""
    return int(batch["image_grid_thw"].shape[0] if "image_grid_thw" in batch else batch["pixel_values"].shape[0])


def _image_index(batch: dict[str, torch.Tensor], counts: list[int], ids: list[str]) -> tuple[torch.Tensor, int]:
    """``(image_index, entries)`` for rows showing ``counts[i]`` images each: ``[B]`` row -> its entry when
    each pixel entry is one row's images (one image per row; Mllama and Idefics3 lay several out per row),
    else ``[B, K]`` into the images laid out one per entry, row-major, -1 on empty slots."""
    rows, entries = len(counts), _image_entries(batch)
    if entries == rows and (max(counts) == 1 or entries != sum(counts)):
        if max(counts) > 1 and "cross_attention_mask" in batch:
            row = max(range(rows), key=lambda i: counts[i])
            raise DataValidationError(
                f"sample {ids[row % len(ids)]!r}: {counts[row]} images; Llama 3.2 Vision reads one image per row "
                "(its cross-attention mask has one image slot): keep one image per example for this model")
        return torch.arange(rows), entries
    if entries != sum(counts):
        raise DataValidationError(f"the processor returned {entries} image entries for {sum(counts)} images "
                                  f"in rows {ids[:3]}...: each image placeholder must match one image")
    index = torch.full((rows, max(counts)), -1, dtype=torch.long)
    start = 0
    for row, count in enumerate(counts):
        index[row, :count] = torch.arange(start, start + count)
        start += count
    return index, entries


def _first_images(batch: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """The pixel tensors of the batch's first `count` images. One entry per image along dim 0, except
    Qwen's flat `pixel_values [sum of patches, D]`, where image i holds `image_grid_thw[i].prod()` rows."""
    out = {key: batch[key][:count] for key in _IMAGE_KEYS if key in batch}
    if "image_grid_thw" in batch:
        patches = int(batch["image_grid_thw"][:count].prod(-1).sum())
        out["pixel_values"] = batch["pixel_values"][:patches]
    return out


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


def _completion_labels(batch: dict[str, torch.Tensor], completion_ids: list[list[int]]) -> torch.Tensor | None:
    """``input_ids`` with -100 everywhere but each row's completion: the last tokens of its real (right-padded)
    tokens, found as the completion tokenized alone (`completion_ids`); None when a row does not end with
    them (the tokenizer merged across the boundary). Working from the end leaves the prompt's image tokens
    alone, however the processor expanded each placeholder (one token, 576 copies, a grid of tile markers)."""
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    for row, completion in enumerate(completion_ids):
        end = lengths[row]
        start = end - len(completion)
        if start < 0 or batch["input_ids"][row, start:end].tolist() != completion:
            return None
        labels[row, start:end] = batch["input_ids"][row, start:end]
    return labels


def _appended(prompts: dict[str, torch.Tensor], completion_ids: list[list[int]], pad_id: int,
              ids: list[str]) -> dict[str, torch.Tensor]:
    """The processor's right-padded prompt rows with each row's completion tokens appended after its real
    tokens (labels on them only): the tokens of prompt and completion each tokenized alone, as generation
    sees them. Per-token tensors go along: Mllama's cross-attention mask keeps the prompt's last real entry
    over the completion (as the processor fills it to a row's end), token type ids are 0 (text) there."""
    rows, old_width = prompts["input_ids"].shape
    lengths = prompts["attention_mask"].sum(dim=1).tolist()
    width = max(length + len(c) for length, c in zip(lengths, completion_ids))
    per_token = [k for k, v in prompts.items() if k not in ("input_ids", "attention_mask") and k not in _IMAGE_KEYS
                 and torch.is_tensor(v) and v.dim() >= 2 and tuple(v.shape[:2]) == (rows, old_width)]
    unknown = [k for k in per_token if k not in _APPENDABLE_KEYS]
    if unknown:
        raise DataValidationError(
            f"sample {ids[0]!r}: the completion's tokens are not the end of prompt + completion's tokens (the "
            f"tokenizer merges across the boundary), and the processor's per-token {unknown[0]!r} cannot be "
            "extended over a completion tokenized alone (check the tokenizer's pre-tokenizer)")
    out = {k: v for k, v in prompts.items() if k not in per_token}
    out["input_ids"] = torch.full((rows, width), pad_id, dtype=prompts["input_ids"].dtype)
    out["attention_mask"] = torch.zeros((rows, width), dtype=prompts["attention_mask"].dtype)
    out["labels"] = torch.full((rows, width), IGNORE_INDEX, dtype=prompts["input_ids"].dtype)
    for key in per_token:
        out[key] = prompts[key].new_zeros((rows, width, *prompts[key].shape[2:]))
    for row, (length, completion) in enumerate(zip(lengths, completion_ids)):
        end = length + len(completion)
        tokens = torch.tensor(completion, dtype=prompts["input_ids"].dtype)
        out["input_ids"][row, :length] = prompts["input_ids"][row, :length]
        out["input_ids"][row, length:end] = tokens
        out["labels"][row, length:end] = tokens
        out["attention_mask"][row, :end] = 1
        for key in per_token:
            out[key][row, :length] = prompts[key][row, :length]
            if key == "cross_attention_mask" and length:
                out[key][row, length:end] = prompts[key][row, length - 1]
    return out


def _encode_answered(processor: Any, prompts: list[str], completions: list[str], images: list[list[Any]],
                     ids: list[str]) -> dict[str, torch.Tensor]:
    """Rows prompt + completion, right-padded, with ``labels`` on the completion only. Each row is tokenized
    whole by the processor; where the tokenizer merges across the boundary (Llama 3's split joins
    `Assistant:` to a glued answer: `:Laura`), the prompts go through the processor alone and the
    completions' own tokens are appended, so that the boundary is the template's (`_appended`)."""
    completion_ids = processor.tokenizer(completions, add_special_tokens=False)["input_ids"]
    batch = _encode(processor, [p + c for p, c in zip(prompts, completions)], images, "right")
    labels = _completion_labels(batch, completion_ids)
    if labels is not None:
        batch["labels"] = labels
        return batch
    return _appended(_encode(processor, prompts, images, "right"), completion_ids,
                     processor.tokenizer.pad_token_id, ids)


def _prompts(examples: list[dict[str, Any]], processor: Any, instruction: str) -> tuple[list[str], list[list[Any]]]:
    """Each example's prompt text (one image placeholder per image) and its images."""
    images = [images_of(e) for e in examples]
    return [prompt_format(processor, len(i)).prompt(e["question"], instruction) for e, i in zip(examples, images)], images


def collate_sft(examples: list[dict[str, Any]], processor: Any, max_length: int | None = None,
                instruction: str = DEFAULT_INSTRUCTION) -> dict[str, Any]:
    """SFT batch: prompt + answer + end of turn (``<|eot_id|>``), right-padded, labels on the completion only.
    Prompt and end of turn come from the processor's chat template (`prompt_format`)."""
    ids = [e["id"] for e in examples]
    prompts, images = _prompts(examples, processor, instruction)
    completions = [prompt_format(processor).completion(e["answer"]) for e in examples]
    batch = _encode_answered(processor, prompts, completions, images, ids)
    _check_length(batch, ids, max_length)
    batch["image_index"], _ = _image_index(batch, [len(i) for i in images], ids)
    batch["ids"] = ids
    return batch


def collate_preference(examples: list[dict[str, Any]], processor: Any, max_length: int | None = None,
                       instruction: str = DEFAULT_INSTRUCTION) -> dict[str, Any]:
    """Preference batch of P pairs: rows 0..P-1 chosen, P..2P-1 rejected, one padded length.

    A pair's images are held once (N = the pairs' images), and both of its rows point at them:
    ``image_index`` of row P+i equals row i's; ``num_pairs = P``; ``ids`` has one id per pair.
    """
    ids = [e["id"] for e in examples]
    prompts, images = _prompts(examples, processor, instruction)
    fmt = prompt_format(processor)
    completions = [fmt.completion(e["chosen"]) for e in examples] + [fmt.completion(e["rejected"]) for e in examples]
    batch = _encode_answered(processor, prompts * 2, completions, images * 2, ids)
    _check_length(batch, ids, max_length)
    index, entries = _image_index(batch, [len(i) for i in images] * 2, ids)
    chosen = index[: len(examples)]
    batch.update(_first_images(batch, entries // 2))
    batch["image_index"] = torch.cat([chosen, chosen])
    batch["num_pairs"] = len(examples)
    batch["ids"] = ids
    return batch


def collate_prompts(examples: list[dict[str, Any]], processor: Any,
                    instruction: str = DEFAULT_INSTRUCTION) -> dict[str, Any]:
    """Prompts only, left-padded for generation; plus ``answers`` (reference), ``questions``, ``kinds``."""
    ids = [e["id"] for e in examples]
    prompts, images = _prompts(examples, processor, instruction)
    batch = _encode(processor, prompts, images, "left")
    batch["image_index"], _ = _image_index(batch, [len(i) for i in images], ids)
    batch["ids"] = ids
    batch["answers"] = [e.get("answer", e.get("chosen")) for e in examples]
    batch["questions"] = [e["question"] for e in examples]
    batch["kinds"] = [e.get("kind", "other") for e in examples]
    return batch

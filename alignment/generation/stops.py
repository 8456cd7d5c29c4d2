"""Where an answer ends and which tokens it may hold: a model's stop tokens, the ids it must never sample,
and new tokens decoded into answer strings."""

from __future__ import annotations

import torch


def stop_token_ids(processor, model) -> set[int]:
    """Token ids that end an answer: the generation config's and text config's EOS ids (Llama 3.2
    Vision: 128001, 128008, 128009), the tokenizer's EOS, and the chat template's end of turn.
    `model`: the transformers model (its `config` and `generation_config`)."""
    from alignment.data.prompts import prompt_format  # the data package loads only when generation runs

    tokenizer = processor.tokenizer
    ids = {tokenizer.eos_token_id}
    end_of_turn = prompt_format(processor).end_of_turn
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None
    if isinstance(end_id, int) and end_id != tokenizer.unk_token_id:
        ids.add(end_id)
    generation = getattr(model, "generation_config", None)
    for eos in (model.config.get_text_config().eos_token_id, getattr(generation, "eos_token_id", None)):
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return {i for i in ids if i is not None and i >= 0}


def unsampled_token_ids(family, config, vocab_size: int) -> list[int]:
    """Ids generation must never emit (the family's: image placeholders where the output head has a
    row for them). A sampled placeholder would make the next forward look for image features that
    are not there."""
    return [i for i in family.unsampled_token_ids(config) if 0 <= i < vocab_size]


def decode_answers(tokenizer, tokens: torch.Tensor, stops: set[int]) -> list[str]:
    """New tokens [B, L] -> answer strings, each cut at its first stop token."""
    texts = []
    for row in tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return texts

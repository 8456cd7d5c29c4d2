"""Prompt tuning: n trainable virtual-token embeddings in front of every sequence (seed 004's menu).

PEFT's `PromptEmbedding` holds the prompt (initialised from sampled vocabulary embeddings), but
PEFT's prompt-learning forward cannot extend Mllama's cross-attention mask nor our KV-cached
generation, so the prompt is put in front here, by hooks on the text decoder (`language_model`):

- before it: `inputs_embeds [B, T, h]` -> `[B, n+T, h]` (the prompt first), `attention_mask`
  gains n ones, `position_ids` shift by n, and Mllama's prepared cross-attention mask
  `[B, 1, T, S]` and row mask `[B, 1, T, 1]` gain n zero rows (the prompt does not see the image);
  on cached decoding steps only the masks and positions grow (the cache holds the prompt);
- after it: `last_hidden_state` (and every `hidden_states`) drop the n prompt positions, so the
  LM head, logits `[B, T, V]`, labels and value heads are as without a prompt.

Trainable parameters = n * hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from alignment.adapters.base import OwnAdapters


def _decoder(model: nn.Module) -> nn.Module:
    core = model.model if hasattr(model, "model") else model
    if not hasattr(core, "language_model"):
        raise ValueError(f"{type(model).__name__} has no language_model to put a prompt in front of")
    return core.language_model


class PromptAdapters(OwnAdapters):
    method = "prompt_tuning"
    peft_type = "VLM_PROMPT_TUNING"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._added: int | None = None  # prompt length added to the current forward, for the post-hook
        decoder = _decoder(model)
        decoder.register_forward_pre_hook(self._before, with_kwargs=True)
        decoder.register_forward_hook(self._after)

    def add(self, name: str, spec) -> list[str]:
        from peft import PromptTuningConfig
        from peft.tuners.prompt_tuning import PromptEmbedding

        embed = _decoder(self.model).get_input_embeddings()
        config = PromptTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, token_dim=embed.embedding_dim,
                                    num_transformer_submodules=1, prompt_tuning_init="SAMPLE_VOCAB",
                                    task_type="CAUSAL_LM")
        self.adapters[name] = PromptEmbedding(config, embed).to(embed.weight.device)
        self.configs[name] = {"num_virtual_tokens": spec.num_virtual_tokens, "target_modules": ["language_model"]}
        return ["language_model"]

    def _before(self, module, args, kwargs):
        self._added = None
        if self.active is None or self.active not in self.adapters:
            return None
        kwargs = dict(kwargs)
        if args:  # language_model is called with keywords; a positional input_ids is moved there
            kwargs["input_ids"], args = args[0], args[1:]
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.24 passes `cache`
        first = past is None or past.get_seq_length() == 0
        prompt = self.adapters[self.active].embedding.weight  # [n, h]
        n = prompt.shape[0]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        positions = kwargs.get("position_ids")
        if first:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                embeds = module.get_input_embeddings()(kwargs.pop("input_ids"))
            kwargs["input_ids"] = None
            batch = embeds.shape[0]
            kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
            if positions is not None:
                head = torch.arange(n, device=positions.device).expand(positions.shape[0], -1)
                kwargs["position_ids"] = torch.cat([head, positions + n], dim=1)
            for key in ("cross_attention_mask", "full_text_row_masked_out_mask"):
                value = kwargs.get(key)
                if value is not None:  # [B, 1, T, S] / [B, 1, T, 1]: zero rows for the prompt
                    pad = value.new_zeros(value.shape[0], value.shape[1], n, value.shape[3])
                    kwargs[key] = torch.cat([pad, value], dim=2)
            self._added = n
        elif positions is not None:
            kwargs["position_ids"] = positions + n
        return args, kwargs

    def _after(self, module, args, output):
        n, self._added = self._added, None
        if not n:
            return None
        output.last_hidden_state = output.last_hidden_state[:, n:]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, n:] for h in output.hidden_states)
        return output

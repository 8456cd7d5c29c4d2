"""Scoring with a `MultimodalPolicy`: image features, forwards, completion and pair log-probs, scalar heads.

Images are encoded once (`encode_images`) and the features are reused by every sequence that shows the same
image (chosen and rejected, policy and reference), through `image_index`. Batch keys (from `alignment.data`
collators): `input_ids [B,T]`, `attention_mask [B,T]`, `labels [B,T]` (-100 off the completion),
`image_index [B]` or `[B, K]` (row -> image), the family's pixel inputs for N images, and for Mllama
`cross_attention_mask [B,T,1,tiles]`.

A mixin of `MultimodalPolicy`: it reads `self.model`, `self.family`, `self.heads`, `self.own`, `self.config`.
"""

from __future__ import annotations

import torch
from torch import nn

from alignment.losses import logprobs_at, sequence_logprobs
from alignment.models.features import ImageFeatures
from alignment.models.shared_prefix import ATTENTION_KINDS, attention_mask_for, is_right_padded
from alignment.models.shared_prefix import share_prefix as pack_pairs


def window_logprobs(batch: dict, logits: torch.Tensor, labels: torch.Tensor, start: int):
    """`completion_logprobs`' triple from logits `[B, W, V]` over positions `start .. start+W-1` and their
    labels `[B, W]`: token log-probs padded back to `[B, T-1]`, their sum per row, the completion mask."""
    window_logprobs, seq_logprobs = sequence_logprobs(logits, labels.clamp(min=0), (labels != -100).float())
    columns = batch["labels"].shape[1] - 1
    token_logprobs = nn.functional.pad(window_logprobs, (start, columns - start - window_logprobs.shape[1]))
    return token_logprobs, seq_logprobs, (batch["labels"][:, 1:] != -100).float()


class Scoring:
    """Forwards over a batch's rows under the active adapter; see the module docstring."""

    # ------------------------------------------------------------------ images
    def pixel_inputs(self, batch: dict) -> dict:
        """The batch's pixel tensors for its N images (the family's `PIXEL_KEYS`)."""
        return {k: batch[k] for k in self.family.PIXEL_KEYS if k in batch}

    def token_inputs(self, batch: dict) -> dict:
        """The batch's token-aligned tensors the family's forward reads (its `TOKEN_KEYS`: Mllama's
        cross-attention mask)."""
        return {k: batch[k] for k in self.family.TOKEN_KEYS if k in batch}

    def encode_images(self, batch: dict) -> ImageFeatures:
        """The batch's N images encoded once, in one vision call (`ImageFeatures`: Mllama
        `[N, tiles*patches, hidden]` cross-attention states, LLaVA `[N, patches, hidden]`, Qwen merged
        patches of a different length per image)."""
        return self.family.encode_images(self.model, **self.pixel_inputs(batch))

    def features_of(self, batch: dict, image_features: ImageFeatures | None) -> ImageFeatures | None:
        """`image_features`, else the batch's images encoded now (None for a batch without images)."""
        if image_features is not None:
            return image_features
        return self.encode_images(batch) if "pixel_values" in batch else None

    def image_index(self, batch: dict) -> torch.Tensor:
        """`[B]` or `[B, K]` (-1: empty slot): which images each row shows; row i -> image i by default."""
        index = batch.get("image_index")
        if index is None:
            index = torch.arange(batch["input_ids"].shape[0])
        return index.to(batch["input_ids"].device)

    # ---------------------------------------------------------------- forwards
    def forward(self, batch: dict, image_features: ImageFeatures | None = None, hidden: bool = False,
                logits_at: torch.Tensor | int | None = None):
        """Causal-LM output for the batch's rows; `image_features` from `encode_images` skips the
        vision tower. With `hidden=True` the output carries `hidden_states` (last one used by heads).
        `logits_at`: positions `[W]` (or the last n) whose logits are computed; None: every position."""
        kwargs = self.token_inputs(batch)
        if logits_at is not None:
            kwargs["logits_to_keep"] = logits_at
        return self.family.forward_with_features(
            self.model,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            features=self.features_of(batch, image_features),
            image_index=self.image_index(batch),
            output_hidden_states=hidden,
            use_cache=False,
            **kwargs,
        )

    def windowed_logits(self, batch: dict, image_features: ImageFeatures | None = None):
        """Logits only where labels count: `(logits [B, W, V] in the model's dtype, labels [B, W], start)`.

        The window is positions `start .. start+W-1` of the rows, the span from the first position whose
        logits predict a labelled token (`labels[:, t+1] != -100` in some row) to one past the last, so a
        shifted loss on `(logits, labels)` (`logits[:, :-1]` against `labels[:, 1:]`) counts exactly what
        it counts on the whole rows. The LM head and its `[B, T, V]` output never run over the prompt
        (LLaVA's 576 image tokens, Qwen's hundreds)."""
        labels = batch["labels"]
        counted = (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()
        start, end = (int(counted[0]), int(counted[-1]) + 2) if counted.numel() else (0, min(2, labels.shape[1]))
        positions = torch.arange(start, end, device=labels.device)
        return self.forward(batch, image_features, logits_at=positions).logits, labels[:, start:end], start

    def completion_logprobs(self, batch: dict, image_features: ImageFeatures | None = None):
        """Log-probs of the labelled (completion) tokens under the active adapter.

        Returns `(token_logprobs [B, T-1], seq_logprobs [B], mask [B, T-1])`; position t scores
        token t+1 given tokens <= t; mask is 1.0 on completion tokens. Logits are computed over the
        labelled window only (`windowed_logits`) and upcast one row at a time (`gather_logprobs`).
        """
        logits, labels, start = self.windowed_logits(batch, image_features)
        return window_logprobs(batch, logits, labels, start)

    # ------------------------------------------------- preference pairs, shared prefix
    def shares_prefix(self) -> bool:
        """Whether a preference pair can run as one row (`alignment.models.shared_prefix`): the family carries
        positions over, and the attention implementation takes a custom mask (SDPA, eager)."""
        kind = getattr(self.config.get_text_config(), "_attn_implementation", None)
        # prompt tuning prepends its virtual tokens to 2-D masks only
        return bool(getattr(self.family, "SHARES_PREFIX", False)) and kind in ATTENTION_KINDS and "prompt_tuning" not in self.own

    def _pairs_packed(self, batch: dict, share: bool):
        """The batch's pairs as one row each, or None where they run as two rows (not asked, not supported)."""
        if not (share and "num_pairs" in batch and self.shares_prefix() and is_right_padded(batch["attention_mask"])):
            return None
        return pack_pairs(batch["input_ids"], batch["attention_mask"], batch["num_pairs"])

    def _packed_forward(self, batch: dict, packed, image_features, hidden: bool = False, logits_at=None):
        """The causal-LM output over the packed rows `[P, S]`: each token at its own row's position (2-D or
        M-RoPE, from the family), the block mask of `packed.allowed`, token-aligned inputs carried over."""
        features = self.features_of(batch, image_features)
        index = self.image_index(batch)
        positions = self.family.position_ids(self.model, batch["input_ids"], batch["attention_mask"], features, index)
        kwargs = {key: packed.gather(value) for key, value in self.token_inputs(batch).items()}
        if logits_at is not None:
            kwargs["logits_to_keep"] = logits_at
        kind = self.config.get_text_config()._attn_implementation
        return self.family.forward_with_features(
            self.model,
            input_ids=packed.input_ids,
            attention_mask=attention_mask_for(packed.allowed, kind, self.compute_dtype()),
            features=features,
            image_index=index[: packed.num_pairs],  # a pair's rows show the same images
            position_ids=packed.gather(positions, row_dim=positions.dim() - 2),
            output_hidden_states=hidden,
            use_cache=False,
            **kwargs,
        )

    def pair_logprobs(self, batch: dict, image_features: ImageFeatures | None = None, share_prefix: bool = True):
        """`completion_logprobs` of a preference batch (rows 0..P-1 chosen, P..2P-1 rejected), each pair's
        image + prompt prefix through the language model once (one packed row per pair) where the family and
        attention allow it; the same values and gradients as two rows, up to float rounding."""
        packed = self._pairs_packed(batch, share_prefix)
        labels = batch["labels"]
        counted = labels[:, 1:] != -100  # [2P, T-1]: position t predicts a counted token t+1
        if packed is None or not bool(counted.any()):
            return self.completion_logprobs(batch, image_features)
        rows, steps = counted.nonzero(as_tuple=True)  # original row, and the position predicting its token
        where = packed.packed_pos[rows, steps]  # that position in the pair's packed row
        low, high = int(where.min()), int(where.max()) + 1
        out = self._packed_forward(batch, packed, image_features,
                                   logits_at=torch.arange(low, high, device=labels.device))
        picked = logprobs_at(out.logits, packed.pair_of_row()[rows], where - low, labels[rows, steps + 1])
        mask = counted.float()
        token_logprobs = mask.new_zeros(mask.shape).index_put((rows, steps), picked)
        return token_logprobs, token_logprobs.sum(dim=-1), mask

    # ------------------------------------------------------------------- heads
    def pair_sequence_scores(self, batch: dict, head: str, image_features: ImageFeatures | None = None,
                             share_prefix: bool = True) -> torch.Tensor:
        """`sequence_scores` of a preference batch's 2P rows, each pair's prefix run once (see `pair_logprobs`)."""
        packed = self._pairs_packed(batch, share_prefix)
        if packed is None:
            return self.sequence_scores(batch, head, image_features)
        out = self._packed_forward(batch, packed, image_features, hidden=True, logits_at=1)
        last = batch["attention_mask"].long().cumsum(-1).argmax(-1)  # [2P]
        where = packed.packed_pos.gather(1, last[:, None]).squeeze(1)
        hidden = out.hidden_states[-1][packed.pair_of_row(), where]  # [2P, H]
        return self.heads[head](hidden.float()).squeeze(-1)

    def head_values(self, batch: dict, head: str, image_features: ImageFeatures | None = None) -> torch.Tensor:
        """Scalar head `head` on every position's last hidden state: values [B, T] (float32).

        Call under `use_adapter(head)` (or another adapter) to choose the LoRA weights under it."""
        out = self.forward(batch, image_features, hidden=True, logits_at=1)  # the LM head: last position only
        return self.heads[head](out.hidden_states[-1].float()).squeeze(-1)

    def sequence_scores(self, batch: dict, head: str, image_features: ImageFeatures | None = None) -> torch.Tensor:
        """The head's value at each row's last non-padding token: scores [B] (the reward model's output)."""
        values = self.head_values(batch, head, image_features)
        last = batch["attention_mask"].long().cumsum(-1).argmax(-1)
        return values.gather(1, last[:, None]).squeeze(1)

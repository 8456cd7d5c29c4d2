"""What every family shares: encoded images (`ImageFeatures`), which images a row shows
(`image_index`), and the KV-cache state generation carries between steps (`repeat_state`).

Shapes: N images in a batch, S_max the longest image's feature length, H the text hidden size, B rows,
K image slots per row. `image_index` is `[B]` (one image per row) or `[B, K]` int64 with -1 for an
empty slot; slots are in placeholder order, so the images a batch's placeholders take, row-major,
are `flat_images(image_index)`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class ImageFeatures:
    """N images encoded once: `embeds [N, S_max, H]`, zero-padded past `lengths [N]` (int64).

    Mllama: `S = tiles * patches` cross-attention states, LLaVA: patches, Qwen: merged patches
    (`grid_thw.prod(-1) // merge**2`, different per image). Qwen also keeps `grid_thw [N, 3]` (M-RoPE
    positions) and Qwen3-VL its DeepStack features `deepstack [L, N, S_max, H]`."""

    embeds: torch.Tensor
    lengths: torch.Tensor
    grid_thw: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None

    @classmethod
    def dense(cls, embeds: torch.Tensor) -> ImageFeatures:
        """Features of equal length per image ([N, S, H]: Mllama, LLaVA)."""
        lengths = torch.full((embeds.shape[0],), embeds.shape[1], dtype=torch.long, device=embeds.device)
        return cls(embeds, lengths)

    @classmethod
    def from_list(cls, per_image: list[torch.Tensor], grid_thw=None, deepstack_levels=None) -> ImageFeatures:
        """Features from one `[S_i, H]` tensor per image (and, for DeepStack, L lists of them)."""
        embeds = torch.nn.utils.rnn.pad_sequence(list(per_image), batch_first=True)
        lengths = torch.tensor([t.shape[0] for t in per_image], dtype=torch.long, device=embeds.device)
        deepstack = None
        if deepstack_levels is not None:
            deepstack = torch.stack([torch.nn.utils.rnn.pad_sequence(list(level), batch_first=True)
                                     for level in deepstack_levels])
        return cls(embeds, lengths, grid_thw, deepstack)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    def select(self, images) -> ImageFeatures:
        """Images `images` ([M] int64 or a slice), in that order."""
        if torch.is_tensor(images):
            images = images.to(self.embeds.device)
        return ImageFeatures(
            self.embeds[images], self.lengths[images],
            None if self.grid_thw is None else self.grid_thw[images],
            None if self.deepstack is None else self.deepstack[:, images],
        )

    __getitem__ = select

    def detach(self) -> ImageFeatures:
        return self.apply(lambda t: t.detach())

    def to(self, *args, **kwargs) -> ImageFeatures:
        """Floating tensors moved/cast like `Tensor.to`; integer ones (lengths, grids) only moved."""
        return self.apply(lambda t: move_tensor(t, *args, **kwargs))

    def apply(self, fn) -> ImageFeatures:
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})

    @staticmethod
    def cat(parts: list[ImageFeatures]) -> ImageFeatures:
        """Concatenated along images, each re-padded to the longest."""
        longest = max(p.embeds.shape[1] for p in parts)

        def pad(x):
            return torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[-2]))

        return ImageFeatures(
            torch.cat([pad(p.embeds) for p in parts]),
            torch.cat([p.lengths for p in parts]),
            None if parts[0].grid_thw is None else torch.cat([p.grid_thw for p in parts]),
            None if parts[0].deepstack is None else torch.cat([pad(p.deepstack) for p in parts], dim=1),
        )

    def unpadded(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images `images` (in that order) without padding: one `[S_i, H]` each."""
        lengths = self.lengths.tolist()
        return [self.embeds[i, : lengths[i]] for i in images.tolist()]

    def rows(self, images: torch.Tensor) -> torch.Tensor:
        """The images' features stacked, `[len(images), S_max, H]` (padding kept: equal-length families)."""
        return self.embeds[images.to(self.embeds.device)]


def move_tensor(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`tensor.to(*args, **kwargs)` for a floating tensor; an integer or boolean one (lengths, grids, masks)
    is only moved to the device named, never cast."""
    if tensor.is_floating_point():
        return tensor.to(*args, **kwargs)
    device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), tensor.device))
    return tensor.to(device=device)


def padded_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenated along dim 0, every later dim zero-padded to the largest (a plain `cat` when shapes agree)."""
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    out = tensors[0].new_zeros((sum(t.shape[0] for t in tensors), *shape[1:]))
    start = 0
    for t in tensors:
        out[(slice(start, start + t.shape[0]), *(slice(0, n) for n in t.shape[1:]))] = t
        start += t.shape[0]
    return out


def as_slots(image_index: torch.Tensor) -> torch.Tensor:
    """`image_index` as `[B, K]` (a `[B]` index is one slot per row)."""
    return image_index if image_index.dim() == 2 else image_index[:, None]


def flat_images(image_index: torch.Tensor) -> torch.Tensor:
    """The images the rows' placeholders take, in row-major placeholder order: `[sum of valid slots]`."""
    slots = as_slots(image_index)
    return slots[slots >= 0]


def default_image_index(batch_size: int, device) -> torch.Tensor:
    """Row i shows image i."""
    return torch.arange(batch_size, device=device)


def repeat_state(state: dict, times: int) -> dict:
    """A generation state (`{"cache": Cache, per-row tensors...}`) with each row repeated `times` times
    in place (rows p*times .. p*times + times-1 continue row p)."""
    state["cache"].batch_repeat_interleave(times)
    for key, value in state.items():
        if key != "cache" and torch.is_tensor(value):
            state[key] = value.repeat_interleave(times, dim=0)
    return state


def prefill_step(forward, model, input_ids, attention_mask, features, image_index, **extra):
    """The prompt forward with a KV cache and 2-D text positions (Mllama, LLaVA), the LM head on the last
    position only: `(logits [B, V], {"cache", "text_positions" [B, 1]})`. `forward` is the family's
    `forward_with_features`; `extra` goes to it (Mllama's cross-attention mask)."""
    positions = text_positions(attention_mask)
    out = forward(model, input_ids, attention_mask, features, image_index, position_ids=positions, use_cache=True,
                  logits_to_keep=1, **extra)
    return out.logits[:, -1], {"cache": out.cache, "text_positions": positions[:, -1:]}


def decode_step(model, state: dict, token: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
    """One KV-cache step for `token [B]` with 2-D text positions (Mllama, LLaVA): logits [B, V]; advances
    `state["text_positions"]` and `state["cache"]`; `extra` goes to the model (Mllama's mask column)."""
    state["text_positions"] = state["text_positions"] + 1
    out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=state["text_positions"],
                cache=state["cache"], use_cache=True, **extra)
    state["cache"] = out.cache
    return out.logits[:, -1]


def placeholder_ids(config, keys: tuple[str, ...] = ("image_token_id", "image_token_index")) -> list[int]:
    """The ids the config names under `keys` that the output head has a row for (generation must never emit
    an image placeholder: the next forward would look for features that are not there)."""
    vocab = config.get_text_config().vocab_size
    ids = {getattr(config, key, None) for key in keys}
    return sorted(i for i in ids if isinstance(i, int) and 0 <= i < vocab)


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """`[B, T]` positions counting real tokens only (left padding gets 0): `cumsum(mask) - 1`."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def compact_images(image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct images some rows use, and the rows' index into them: `(images [M], index)` with
    `index` shaped like `image_index` ([B] or [B, K]) and -1 slots kept."""
    valid = image_index >= 0
    images, inverse = torch.unique(image_index[valid], return_inverse=True)
    index = torch.full_like(image_index, -1)
    index[valid] = inverse
    return images, index


def cat_image_indices(indices: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """Row-wise concatenation of image indices over parts holding `counts` images each: each part's
    valid entries shifted past the images before it; `[B]` if every part is `[B_i]`, else `[B, K_max]`."""
    offsets = torch.tensor([0] + counts[:-1]).cumsum(0).tolist()
    shifted = [torch.where(i >= 0, i + offset, i) for i, offset in zip(indices, offsets)]
    if all(i.dim() == 1 for i in shifted):
        return torch.cat(shifted)
    slots = [as_slots(i) for i in shifted]
    width = max(s.shape[1] for s in slots)
    return torch.cat([torch.nn.functional.pad(s, (0, width - s.shape[1]), value=-1) for s in slots])


def checkpoint_layers(model) -> None:
    """transformers' non-reentrant activation checkpointing of the layers it checkpoints (its
    `activation_checkpointing_enable`; the older name `gradient_checkpointing_enable` where that is all there is,
    which transformers 5 still answers, with a FutureWarning)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

"""Prototype of the proposed Qwen family functions (shared by Qwen2.5-VL and Qwen3-VL), as docs/families.md
describes them. Per-image features are kept padded: ImageFeatures(embeds [N, S_max, H], lengths [N],
grid_thw [N, 3], deepstack [L, N, S_max, H] or None)."""
from dataclasses import dataclass
import torch


@dataclass
class ImageFeatures:
    embeds: torch.Tensor            # [N, S_max, H] merged-patch features, zero-padded past lengths[i]
    lengths: torch.Tensor           # [N] int64 tokens per image = grid_thw.prod(-1) // merge**2
    grid_thw: torch.Tensor | None = None   # [N, 3] (Qwen: M-RoPE needs it for every row that shows the image)
    deepstack: torch.Tensor | None = None  # [L, N, S_max, H] Qwen3-VL DeepStack features

    def __len__(self):
        return self.embeds.shape[0]

    def select(self, images: torch.Tensor) -> "ImageFeatures":
        """Images `images` (Rollout.select / micro-batches)."""
        return ImageFeatures(self.embeds[images], self.lengths[images],
                             None if self.grid_thw is None else self.grid_thw[images],
                             None if self.deepstack is None else self.deepstack[:, images])

    @staticmethod
    def cat(parts: list["ImageFeatures"]) -> "ImageFeatures":
        """Concatenate along images, padding to the longest (cat_rollouts)."""
        s = max(p.embeds.shape[1] for p in parts)
        pad = lambda x, dim: torch.nn.functional.pad(x, (0, 0, 0, s - x.shape[dim]))
        return ImageFeatures(torch.cat([pad(p.embeds, 1) for p in parts]), torch.cat([p.lengths for p in parts]),
                             None if parts[0].grid_thw is None else torch.cat([p.grid_thw for p in parts]),
                             None if parts[0].deepstack is None else torch.cat([pad(p.deepstack, 2) for p in parts], dim=1))

    def unpadded(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images `images` (in that order) without padding: list of [S_i, H]."""
        return [self.embeds[i, : self.lengths[i]] for i in images.tolist()]


def encode_images(model, pixel_values, image_grid_thw, **_) -> ImageFeatures:
    """pixel_values [sum patches, C*T*P*P], image_grid_thw [N, 3] -> ImageFeatures (one vision call)."""
    core = model.model
    out = core.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    per_image = list(out.pooler_output)
    lengths = torch.tensor([t.shape[0] for t in per_image], device=pixel_values.device)
    embeds = torch.nn.utils.rnn.pad_sequence(per_image, batch_first=True)
    deep = getattr(out, "deepstack_features", None)
    deepstack = (torch.stack([torch.nn.utils.rnn.pad_sequence(list(level), batch_first=True) for level in deep])
                 if deep is not None else None)
    return ImageFeatures(embeds, lengths, image_grid_thw, deepstack)


def flat_images(image_index: torch.Tensor) -> torch.Tensor:
    """image_index [B] or [B, K] (-1 = no image in that slot) -> the images in placeholder order (row-major)."""
    index = image_index if image_index.dim() == 2 else image_index[:, None]
    return index[index >= 0]


def mrope_positions(model, input_ids, attention_mask, grid_thw):
    """M-RoPE position ids [3, B, T] and rope deltas [B, 1] of rows whose image placeholders are filled, in
    row-major order, by images of `grid_thw` [M, 3]."""
    types = (input_ids == model.config.image_token_id).int()
    return model.model.get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=grid_thw,
                                      attention_mask=attention_mask)


def forward_with_features(model, input_ids, attention_mask, features: ImageFeatures, image_index, position_ids=None,
                          **kwargs):
    """Rows' forward with each row's images taken from `features` by `image_index`. Returns (output, rope_deltas)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    images = flat_images(image_index).to(features.embeds.device)
    rope_deltas = None
    if position_ids is None:
        position_ids, rope_deltas = mrope_positions(model, input_ids, attention_mask, features.grid_thw[images])
    pooler = tuple(features.unpadded(images))
    if features.deepstack is not None:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
        deep = [tuple(level[i, : features.lengths[i]] for i in images.tolist()) for level in features.deepstack]
        enc = BaseModelOutputWithDeepstackFeatures(pooler_output=pooler, deepstack_features=deep)
    else:
        enc = BaseModelOutputWithPooling(pooler_output=pooler)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                mm_encoder_outputs={"image": enc}, **kwargs)
    return out, rope_deltas


def select_pixels(pixels: dict, images: torch.Tensor) -> dict:
    """Qwen pixel inputs of images `images`: pixel_values is [sum_i patches_i, D] (image i's patches are
    rows offsets[i] .. offsets[i+1]), image_grid_thw [N, 3]."""
    grid = pixels["image_grid_thw"]
    offsets = torch.cat([grid.new_zeros(1), grid.prod(-1).cumsum(0)]).tolist()
    rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in images.tolist()])
    return {"pixel_values": pixels["pixel_values"][rows.to(pixels["pixel_values"].device)], "image_grid_thw": grid[images]}

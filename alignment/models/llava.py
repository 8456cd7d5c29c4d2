"""LLaVA (CLIP vision + Llama text): the tiny config, and how the family encodes images and takes
them back.

LLaVA splices projected image features into the token embeddings at the `<|image|>` placeholders.
`encode_images` returns `image_features [N_img, patches, hidden]`; a forward builds
`inputs_embeds` and scatters each row's features into its placeholder positions.
"""

from __future__ import annotations

import torch

from alignment.models.features import (
    ImageFeatures,
    checkpoint_layers,
    decode_step,
    default_image_index,
    flat_images,
    placeholder_ids,
    prefill_step,
    text_positions,
)

MODEL_TYPES = ("llava",)
TINY_MODELS = {"tiny-llava": "llava"}
SHARES_FEATURES = True
SHARES_PREFIX = True  # preference pairs run as one row each (`shared_prefix`)
MAX_IMAGES_PER_ROW = None
PIXEL_KEYS = ("pixel_values",)
TOKEN_KEYS = ()
IMAGE_SIZE = 112
PATCH_SIZE = 14


def tiny_config(tokenizer):
    from transformers import LlavaConfig

    image_token_id = tokenizer.convert_tokens_to_ids("<|image|>")
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=96,
    )
    text = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.convert_tokens_to_ids("<|end_of_text|>")],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def build_processor(tokenizer):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
        image_token="<|image|>",
        num_additional_image_tokens=1,
    )


def build_tiny(name: str, folder) -> None:
    """Write the tiny random build of `name` (tokenizer, processor, config, weights; seed 0) into `folder`."""
    from transformers import LlavaForConditionalGeneration

    from alignment.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    build_processor(tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_config(tokenizer))
    model.save_pretrained(folder)


def inner_model(model):
    """The `LlavaModel` below the LM head (works through PEFT wrappers)."""
    return model.get_base_model().model if hasattr(model, "get_base_model") else model.model


def encode_images(model, pixel_values, **_) -> ImageFeatures:
    """pixel_values [N, 3, H, W] -> features of N images, `embeds [N, patches, hidden]`."""
    core = inner_model(model)
    out = core.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=core.config.vision_feature_layer,
        vision_feature_select_strategy=core.config.vision_feature_select_strategy,
    )
    return ImageFeatures.dense(torch.stack(list(out.pooler_output)))


def select_pixels(pixels: dict, images: torch.Tensor) -> dict:
    """The pixel inputs of images `images` [M], in that order (one entry per image along dim 0)."""
    return {key: value[images.to(value.device)] for key, value in pixels.items()}


def _embeds(model, input_ids, features: ImageFeatures | None, image_index) -> torch.Tensor:
    """Token embeddings with each row's images' features at its placeholders, in placeholder order."""
    core = inner_model(model)
    embeds = core.get_input_embeddings()(input_ids)
    if features is None:
        return embeds
    index = image_index if image_index is not None else default_image_index(input_ids.shape[0], input_ids.device)
    images = flat_images(index).to(features.device)
    placeholders = (input_ids == core.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    taken = torch.cat(features.unpadded(images)) if len(images) else embeds.new_zeros(0, embeds.shape[-1])
    return embeds.masked_scatter(placeholders, taken.to(embeds.dtype))


def forward_with_features(model, input_ids, attention_mask, features: ImageFeatures | None, image_index=None,
                          **kwargs):
    """Forward over rows whose placeholders take the images `image_index` ([B] or [B, K], -1 = empty slot)."""
    return model(inputs_embeds=_embeds(model, input_ids, features, image_index), attention_mask=attention_mask,
                 **kwargs)


def position_ids(model, input_ids, attention_mask, features, image_index, **_) -> torch.Tensor:
    """The positions the model gives rows `[B, T]` of itself: `[B, T]` real tokens counted from 0."""
    return text_positions(attention_mask)


def prefill(model, input_ids, attention_mask, features, image_index, **_):
    """The prompt forward with a KV cache: `(logits [B, V] at the last position, state)`."""
    return prefill_step(forward_with_features, model, input_ids, attention_mask, features, image_index)


def decode(model, state: dict, token: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One KV-cache step for `token [B]`: logits [B, V]; advances the state."""
    return decode_step(model, state, token, attention_mask)


def unsampled_token_ids(config) -> list[int]:
    """The image placeholder (`<image>`), where the output head has a row for it."""
    return placeholder_ids(config)


def vision_modules(model) -> list[torch.nn.Module]:
    return [inner_model(model).vision_tower]


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on every layer (CLIP's and the language model's layers are
    transformers' checkpointing layers)."""
    checkpoint_layers(model)


_TEXT = r"language_model\.layers\.\d+"
_VISION = r"vision_tower\..*(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"
PRESET_PATTERNS = {
    "language": rf".*{_TEXT}\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$",
    # LLaVA has no cross-attention: the projector is where image and text meet.
    "cross_attention": r".*multi_modal_projector\.linear_(1|2)$",
    "vision": rf".*{_VISION}$",
    "multimodal": rf".*(multi_modal_projector\.linear_(1|2)|{_VISION})$",
    "all": (
        rf".*({_TEXT}\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
        rf"|multi_modal_projector\.linear_(1|2)|{_VISION})$"
    ),
}
QUANT_SKIP_MODULES = [r".*vision_tower", r".*multi_modal_projector", "lm_head"]
SUPPORTS_8BIT = True
VISION_PATTERN = r"vision_tower|multi_modal_projector"  # searched in module / parameter names
PROJECTOR_PATTERNS = [r".*multi_modal_projector\.linear_\d+\.(weight|bias)"]

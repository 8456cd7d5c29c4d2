"""Llama 3.2 Vision (transformers' Mllama): the tiny config, and how the family encodes images
and takes them back.

Mllama's text model reads images through cross-attention layers. `encode_images` runs the vision
tower and projector once and returns `cross_attention_states [N_img, tiles*patches, hidden]`; a
forward then takes those states (indexed per row) in place of pixels.
"""

from __future__ import annotations

import torch

from alignment.models.features import (
    ImageFeatures,
    as_slots,
    checkpoint_layers,
    decode_step,
    default_image_index,
    placeholder_ids,
    prefill_step,
    text_positions,
)

MODEL_TYPES = ("mllama",)
TINY_MODELS = {"tiny-mllama": "mllama"}
SHARES_FEATURES = True
SHARES_PREFIX = True  # preference pairs run as one row each (`shared_prefix`)
MAX_IMAGES_PER_ROW = 1  # the cross-attention mask [B, T, 1, tiles] has one image slot
PIXEL_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
TOKEN_KEYS = ("cross_attention_mask",)  # [B, T, 1, tiles], aligned with the tokens
IMAGE_SIZE = 112
PATCH_SIZE = 14


def tiny_config(tokenizer):
    """DESIGN.md's prototype: vision 96 wide, 3+1 layers, 112-px single tile, patch 14;
    text 192 wide, 6 layers with cross-attention at 1 and 4 (about 2.8M parameters)."""
    from transformers import MllamaConfig

    image_token_id = tokenizer.convert_tokens_to_ids("<|image|>")
    vision = dict(
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_global_layers=1,
        attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        max_num_tiles=1,
        supported_aspect_ratios=[[1, 1]],
        intermediate_layers_indices=[1],
        vision_output_dim=96 * 2,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        cross_attention_layers=[1, 4],
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.convert_tokens_to_ids("<|end_of_text|>")],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id)


def open_cross_attention_gates(model, value: float = 1.0) -> None:
    """Mllama initialises its tanh gates at zero, right for a trained language model but it stalls a
    randomly initialised one (DESIGN.md: 57.7% vs 75.0% at the same budget)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(value)


def image_processor():
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=1)


def build_processor(tokenizer):
    from transformers import MllamaProcessor

    return MllamaProcessor(image_processor=image_processor(), tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def build_tiny(name: str, folder) -> None:
    """Write the tiny random build of `name` (tokenizer, processor, config, weights; seed 0) into `folder`."""
    from transformers import MllamaForConditionalGeneration

    from alignment.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    build_processor(tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(tiny_config(tokenizer))
    open_cross_attention_gates(model)
    model.save_pretrained(folder)


def inner_model(model):
    """The `MllamaModel` below the LM head (works through PEFT wrappers)."""
    return model.get_base_model().model if hasattr(model, "get_base_model") else model.model


def encode_images(model, pixel_values, aspect_ratio_ids, aspect_ratio_mask, **_) -> ImageFeatures:
    """pixel_values [N, 1, tiles, 3, H, W] -> features of N images, `embeds [N, tiles*patches, hidden]`
    cross-attention states (patches = 1601 per 560-px tile of Llama 3.2 Vision).

    transformers' own forward reshapes to [N*tiles, patches, hidden] and lets each cross-attention
    layer regroup the rows by batch; rows here are indexed per image (`image_index`), so the tiles of
    one image stay in one row, in the order the cross-attention mask expects (tile-major)."""
    core = inner_model(model)
    states = core.vision_model(
        pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask
    ).last_hidden_state  # [N, 1, tiles, patches, vision_output_dim]
    return ImageFeatures.dense(core.multi_modal_projector(states).reshape(states.shape[0], -1, core.hidden_size))


def select_pixels(pixels: dict, images: torch.Tensor) -> dict:
    """The pixel inputs of images `images` [M], in that order (one entry per image along dim 0)."""
    return {key: value[images.to(value.device)] for key, value in pixels.items()}


def _row_states(features: ImageFeatures | None, image_index: torch.Tensor | None, batch_size: int):
    """Each row's cross-attention states `[B, tiles*patches, hidden]` (one image per row)."""
    if features is None:
        return None
    slots = as_slots(image_index if image_index is not None else default_image_index(batch_size, features.device))
    if slots.shape[1] > 1 or bool((slots < 0).any()):
        raise ValueError("Llama 3.2 Vision takes exactly one image per row (its cross-attention mask has one image slot)")
    return features.rows(slots[:, 0])


def forward_with_features(model, input_ids, attention_mask, features: ImageFeatures | None, image_index=None,
                          cross_attention_mask=None, **kwargs):
    """Forward over rows, row b reading image `image_index[b]` of `features` through cross-attention."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        cross_attention_states=_row_states(features, image_index, input_ids.shape[0]),
        cross_attention_mask=cross_attention_mask,
        **kwargs,
    )


def position_ids(model, input_ids, attention_mask, features, image_index, **_) -> torch.Tensor:
    """The positions the model gives rows `[B, T]` of itself: `[B, T]` real tokens counted from 0."""
    return text_positions(attention_mask)


def prefill(model, input_ids, attention_mask, features, image_index, cross_attention_mask=None, **_):
    """The prompt forward with a KV cache: `(logits [B, V] at the last position, state)`; the state keeps
    the cache, each row's last text position and its cross-attention mask column (images do not grow)."""
    logits, state = prefill_step(forward_with_features, model, input_ids, attention_mask, features, image_index,
                                 cross_attention_mask=cross_attention_mask)
    if cross_attention_mask is not None:
        state["cross_attention_mask"] = cross_attention_mask[:, -1:]
    return logits, state


def decode(model, state: dict, token: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One KV-cache step for `token [B]`: logits [B, V]; advances the state."""
    extra = {"cross_attention_mask": state["cross_attention_mask"]} if "cross_attention_mask" in state else {}
    return decode_step(model, state, token, attention_mask, **extra)


def unsampled_token_ids(config) -> list[int]:
    """The image placeholder, where the output head has a row for it (Llama 3.2 Vision's 128256 lies past it)."""
    return placeholder_ids(config)


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on every layer, the vision tower's included.

    transformers checkpoints only the text layers: Mllama's vision encoder layers are plain modules,
    so with the vision tower trained (the `multimodal` preset) all 40 layers over 4 tiles x 1601 tokens
    kept their activations (15.5 GB of an 11B QLoRA DPO step at batch 1, measured on an H200). Each
    vision layer's forward is wrapped here; it recomputes only when gradients are being recorded."""
    checkpoint_layers(model)
    vision = inner_model(model).vision_model
    for encoder in (vision.transformer, vision.global_transformer):
        for layer in encoder.layers:
            if not getattr(layer.forward, "_vlm_align_checkpointed", False):
                layer.forward = _checkpointed(layer.forward)


def _checkpointed(forward):
    """`forward` under non-reentrant torch.utils.checkpoint while autograd records (training), as is otherwise."""
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    run._vlm_align_checkpointed = True
    return run


def vision_modules(model) -> list[torch.nn.Module]:
    core = inner_model(model)
    return [core.vision_model]


# Module-name patterns (regex over full names) for the LoRA presets.
_TEXT = r"language_model\.layers\.\d+"
PRESET_PATTERNS = {
    "language": rf".*{_TEXT}\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$",
    "cross_attention": rf".*{_TEXT}\.cross_attn\.(q|k|v|o)_proj$",
    "vision": r".*vision_model\..*(self_attn\.(q|k|v|o)_proj|mlp\.fc(1|2))$",
    # seed 000: only the multimodal and vision-related modules
    "multimodal": (
        rf".*({_TEXT}\.cross_attn\.(q|k|v|o)_proj|multi_modal_projector"
        r"|vision_model\..*(self_attn\.(q|k|v|o)_proj|mlp\.fc(1|2)))$"
    ),
    "all": (
        rf".*({_TEXT}\.(self_attn|cross_attn)\.(q|k|v|o)_proj|{_TEXT}\.mlp\.(gate|up|down)_proj"
        r"|multi_modal_projector|vision_model\..*(self_attn\.(q|k|v|o)_proj|mlp\.fc(1|2)))$"
    ),
}
# Never quantised: the vision tower, the projector and the LM head (bitsandbytes' skip list
# replaces its default, so lm_head must be named too).
QUANT_SKIP_MODULES = [r".*vision_model", r".*multi_modal_projector", "lm_head"]
SUPPORTS_8BIT = False
VISION_PATTERN = r"vision_model|multi_modal_projector"  # searched in module / parameter names
PROJECTOR_PATTERNS = [r".*multi_modal_projector\.(weight|bias)", r".*cross_attn_(attn|mlp)_gate"]

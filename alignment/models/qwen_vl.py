"""Qwen2.5-VL and Qwen3-VL: tiny builds, a processor that needs no torchvision, and how the family
encodes images once and takes them back (docs/families.md, section 3).

Both models splice merged-patch features into the token embeddings at the `<|image_pad|>` placeholders,
a different number per image (`grid_thw.prod(-1) // merge**2`), and place every token with M-RoPE:
position ids `[3, B, T]` from `get_rope_index`, which needs each row's image grids. Qwen3-VL also adds
DeepStack features (vision layers' outputs) to the first text layers at the same placeholders.

Encoded images are handed back through `mm_encoder_outputs` with explicit position ids, so the model's
stateful `rope_deltas` attribute is never read. Generation keeps `rope_deltas [B, 1]` per row itself:
a decode step's position is `text_positions + rope_deltas` on all three axes.

Batch layout from the processor: `input_ids [B, T]`, `attention_mask [B, T]`, `mm_token_type_ids [B, T]`
(= `input_ids == image_token_id`; derived here, never read from the batch), `pixel_values [sum_i patches_i,
C*temporal*patch*patch]` (image i's patches are rows `offsets[i]:offsets[i+1]`, `offsets = cumsum(grid
.prod(-1))`), `image_grid_thw [N, 3]`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from alignment.models.features import (
    ImageFeatures,
    checkpoint_layers,
    default_image_index,
    flat_images,
    placeholder_ids,
    text_positions,
)

MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")
TINY_MODELS = {"tiny-qwen25vl": "qwen2_5_vl", "tiny-qwen3vl": "qwen3_vl"}
SHARES_FEATURES = True
SHARES_PREFIX = True  # preference pairs run as one row each (`shared_prefix`), M-RoPE positions carried over
MAX_IMAGES_PER_ROW = None
PIXEL_KEYS = ("pixel_values", "image_grid_thw")
TOKEN_KEYS = ()  # mm_token_type_ids is derived from input_ids

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# Qwen's template, for the parts the tiny builds use (text and image parts, no system default).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_STOCK_PROCESSOR = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
_VIDEO_PROCESSOR = {"qwen2_5_vl": "Qwen2VLVideoProcessor", "qwen3_vl": "Qwen3VLVideoProcessor"}
# Pixel side of one merged token (patch * merge): 28 for Qwen2.5-VL, 32 for Qwen3-VL.
_PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16}
LM_HEAD_STD = 0.1  # the tiny builds' LM head init (see build_tiny)


# --- processor --------------------------------------------------------------------------------------

_VIDEO_FREE: dict[str, type] = {}


def video_free_processor_class(model_type: str) -> type:
    """`VideoFree<Stock>Processor`: the stock Qwen processor without a video processor, which needs
    torchvision. `ProcessorMixin` reads its attributes off `__init__`'s parameter names, so with no
    `video_processor` parameter none is checked, stored or saved. `save_pretrained` writes the hub layout
    (stock `processor_class`, a `video_preprocessor_config.json`) so that `AutoProcessor` loads the
    folder wherever torchvision exists."""
    if model_type not in _VIDEO_FREE:
        import transformers

        stock = getattr(transformers, _STOCK_PROCESSOR[model_type])

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            stock.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def save_pretrained(self, save_directory, **kwargs):
            result = stock.save_pretrained(self, save_directory, **kwargs)
            _write_hub_layout(Path(save_directory), model_type, self.image_processor)
            return result

        name = f"VideoFree{stock.__name__}"
        _VIDEO_FREE[model_type] = type(name, (stock,), {
            "__init__": __init__, "save_pretrained": save_pretrained, "__module__": __name__, "__qualname__": name,
            "__doc__": video_free_processor_class.__doc__})
    return _VIDEO_FREE[model_type]


def __getattr__(name: str):
    """`VideoFreeQwen2_5_VLProcessor` / `VideoFreeQwen3VLProcessor` as module attributes (pickling)."""
    for model_type, stock in _STOCK_PROCESSOR.items():
        if name == f"VideoFree{stock}":
            return video_free_processor_class(model_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _write_hub_layout(folder: Path, model_type: str, image_processor) -> None:
    """Stock `processor_class` in every saved config that names one, and the video processor's config."""
    stock = _STOCK_PROCESSOR[model_type]
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = folder / file
        if path.exists():
            config = json.loads(path.read_text())
            if "processor_class" in config or file == "processor_config.json":
                config["processor_class"] = stock
                path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    video = {"video_processor_type": _VIDEO_PROCESSOR[model_type], "processor_class": stock,
             "patch_size": image_processor.patch_size, "merge_size": image_processor.merge_size,
             "temporal_patch_size": image_processor.temporal_patch_size,
             "image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std)}
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")


def _model_type(path: str) -> str | None:
    """The Qwen model type a local folder's config.json or processor_config.json names, if any."""
    names = {name: t for t, stock in _STOCK_PROCESSOR.items() for name in (t, stock, f"VideoFree{stock}")}
    for file, key in (("config.json", "model_type"), ("processor_config.json", "processor_class")):
        path_ = Path(path) / file
        if path_.is_file():
            found = names.get(json.loads(path_.read_text()).get(key))
            if found:
                return found
    return None


def load_processor(path: str, trust_remote_code: bool = False, min_pixels: int | None = None,
                   max_pixels: int | None = None):
    """`AutoProcessor`, else (no torchvision: ImportError/OSError, or only a tokenizer came back) the
    video-free processor of the folder's model type; `min_pixels`/`max_pixels` bound each image's
    resized area (the number of image tokens is area / (patch * merge)**2); a pad token always."""
    from transformers import AutoConfig, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError):
        processor = None
    if getattr(processor, "image_processor", None) is None:
        model_type = _model_type(path) or AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{path}: model type {model_type!r} is not one of {MODEL_TYPES}")
        processor = video_free_processor_class(model_type).from_pretrained(path)
    if min_pixels is not None or max_pixels is not None:
        size = copy.copy(processor.image_processor.size)  # a SizeDict (or dict): keep its type
        size["shortest_edge"] = min_pixels if min_pixels is not None else size["shortest_edge"]
        size["longest_edge"] = max_pixels if max_pixels is not None else size["longest_edge"]
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(f"min_pixels ({size['shortest_edge']}) must not exceed max_pixels ({size['longest_edge']})")
        processor.image_processor.size = size
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    return processor


# --- tiny builds ------------------------------------------------------------------------------------

def build_tokenizer():
    """The repo's byte-level BPE with Qwen's special tokens and template: no BOS is added (like Qwen's),
    EOS `<|im_end|>`, pad `<|endoftext|>`."""
    from tokenizers import processors

    from alignment.models.tokenizer import build_tokenizer as build_bpe

    tokenizer = build_bpe()
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.bos_token = None
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def image_processor(model_type: str):
    """PIL image processor with a small pixel budget: 4 to 16 merged tokens per image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch = _PATCH[model_type]
    token = (patch * 2) ** 2
    return Qwen2VLImageProcessorPil(min_pixels=4 * token, max_pixels=16 * token, patch_size=patch, merge_size=2,
                                    temporal_patch_size=2)


def tiny_config(model_type: str, tokenizer):
    """Vision 32 wide (2 or 3 blocks, patch 14 / 16, merge 2) -> text 128 wide, 3 layers, 4 heads / 2 KV
    heads of 32 (M-RoPE sections sum to 16); Qwen3-VL adds DeepStack from vision blocks 0 and 1."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_heads=2, patch_size=_PATCH[model_type],
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128)
    if model_type == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}
        vision.update(depth=2, window_size=56, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [6, 5, 5],
                               "mrope_interleaved": True}
    vision.update(depth=3, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)


def build_processor(model_type: str, tokenizer):
    return video_free_processor_class(model_type)(image_processor=image_processor(model_type), tokenizer=tokenizer,
                                                  chat_template=tokenizer.chat_template)


def build_tiny(name: str, folder: Path) -> None:
    """Write the tiny random build of `name` (tokenizer, processor in the hub layout, config, weights,
    generation config stopping at `<|im_end|>` or `<|endoftext|>`; seed 0) into `folder`.

    The LM head is drawn 5x wider than transformers' init (std 0.1, not 0.02): behind the frozen final
    norm, a std-0.02 head caps every logit near 2.6, so LoRA-only SFT on 4 one-colour images stalled at 4.0
    nats/token (argmax already right); with std 0.1 it reaches 0.006 in 80 steps (both families)."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    model_type = TINY_MODELS[name]
    tokenizer = build_tokenizer()
    build_processor(model_type, tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(tiny_config(model_type, tokenizer))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, LM_HEAD_STD)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)


# --- images in, features out -------------------------------------------------------------------------

def inner_model(model):
    """The `Qwen2_5_VLModel` / `Qwen3VLModel` below the LM head (works through PEFT wrappers)."""
    return model.get_base_model().model if hasattr(model, "get_base_model") else model.model


def encode_images(model, pixel_values, image_grid_thw, **_) -> ImageFeatures:
    """pixel_values [sum_i patches_i, D], image_grid_thw [N, 3] -> features of the N images in one vision
    call: embeds [N, S_max, H] (S_i = patches_i // merge**2), grid_thw, Qwen3-VL's deepstack [L, N, S_max, H]."""
    out = inner_model(model).get_image_features(pixel_values, image_grid_thw, return_dict=True)
    return ImageFeatures.from_list(list(out.pooler_output), image_grid_thw,
                                   getattr(out, "deepstack_features", None))


def select_pixels(pixels: dict, images: torch.Tensor) -> dict:
    """The pixel inputs of images `images` [M], in that order: their patch ranges of `pixel_values`
    [sum_i patches_i, D] and their rows of `image_grid_thw` [N, 3]."""
    grid, values = pixels["image_grid_thw"], pixels["pixel_values"]
    images = torch.as_tensor(images, dtype=torch.long)
    ends = grid.prod(-1).cumsum(0).tolist()
    starts = [0] + ends[:-1]
    rows = [torch.arange(starts[i], ends[i]) for i in images.tolist()]
    rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    return {"pixel_values": values[rows.to(values.device)], "image_grid_thw": grid[images.to(grid.device)]}


def _encoder_outputs(features: ImageFeatures, images: torch.Tensor):
    """The model's own vision output type for images `images`, in placeholder order."""
    pooler = tuple(features.unpadded(images))
    if features.deepstack is None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=pooler)
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    lengths = features.lengths.tolist()
    deepstack = [tuple(level[i, : lengths[i]] for i in images.tolist()) for level in features.deepstack]
    return BaseModelOutputWithDeepstackFeatures(pooler_output=pooler, deepstack_features=deepstack)


def _row_images(features: ImageFeatures | None, image_index, input_ids) -> torch.Tensor | None:
    """The images the rows' placeholders take, in placeholder order (None: no image)."""
    if features is None:
        return None
    index = image_index if image_index is not None else default_image_index(input_ids.shape[0], input_ids.device)
    images = flat_images(index).to(features.device)
    return images if len(images) else None


def _rope_index(model, input_ids, attention_mask, features, images):
    """`(position_ids [3, B, T], rope_deltas [B, 1])`: the M-RoPE positions of rows taking images `images`."""
    core = inner_model(model)
    types = (input_ids == core.config.image_token_id).int()
    grid = None if images is None else features.grid_thw[images]
    return core.get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=attention_mask)


def position_ids(model, input_ids, attention_mask, features, image_index, **_) -> torch.Tensor:
    """The M-RoPE positions `[3, B, T]` the model gives rows `[B, T]` taking images `image_index` (as
    `forward_with_features` computes them; pass them back to it for rows laid out differently)."""
    images = _row_images(features, image_index, input_ids)
    return _rope_index(model, input_ids, attention_mask, features, images)[0]


def _forward(model, input_ids, attention_mask, features: ImageFeatures | None, image_index, **kwargs):
    """`(output, rope_deltas [B, 1])` of rows whose placeholders take images `image_index`."""
    position_ids = kwargs.pop("position_ids", None)
    if position_ids is not None and position_ids.dim() != 3:  # 2-D text positions would silently turn M-RoPE off
        raise TypeError("Qwen-VL rows take M-RoPE position_ids [3, B, T] (see `position_ids`), not 2-D ones")
    images = _row_images(features, image_index, input_ids)
    rope_deltas = None
    if position_ids is None:
        position_ids, rope_deltas = _rope_index(model, input_ids, attention_mask, features, images)
    if images is not None:
        kwargs["mm_encoder_outputs"] = {"image": _encoder_outputs(features, images)}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    return out, rope_deltas


def forward_with_features(model, input_ids, attention_mask, features: ImageFeatures | None, image_index=None,
                          **kwargs):
    """Forward over rows [B, T] whose placeholders take the images `image_index` ([B] or [B, K], -1 = empty
    slot) of `features`, with M-RoPE positions `[3, B, T]` from those images' grids (never pass
    `position_ids`); `features=None` for text rows. Other keywords (`labels`, `use_cache`, ...) go to the model."""
    return _forward(model, input_ids, attention_mask, features, image_index, **kwargs)[0]


def prefill(model, input_ids, attention_mask, features, image_index, **_):
    """The prompt forward with a KV cache: `(logits [B, V] at the last position, state)`; the state holds
    the cache, `text_positions [B, 1]` (real tokens - 1) and `rope_deltas [B, 1]`."""
    out, rope_deltas = _forward(model, input_ids, attention_mask, features, image_index, use_cache=True,
                                logits_to_keep=1)
    state = {"cache": out.cache, "text_positions": text_positions(attention_mask)[:, -1:],
             "rope_deltas": rope_deltas.to(input_ids.device)}
    return out.logits[:, -1], state


def decode(model, state: dict, token: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One KV-cache step for `token [B]` (attention_mask [B, T + k]): logits [B, V]; advances the state.
    Every axis of the new token's M-RoPE position is `text_positions + rope_deltas`."""
    state["text_positions"] = state["text_positions"] + 1
    positions = (state["text_positions"] + state["rope_deltas"])[None].expand(3, -1, -1)
    out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=positions,
                cache=state["cache"], use_cache=True)
    state["cache"] = out.cache
    return out.logits[:, -1]


def unsampled_token_ids(config) -> list[int]:
    """The image and video placeholders and the vision start/end markers, where the head has a row."""
    return placeholder_ids(config, ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"))


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on every layer: Qwen's vision blocks and decoder layers are
    transformers' checkpointing layers."""
    checkpoint_layers(model)


def vision_modules(model) -> list[torch.nn.Module]:
    """The vision tower with its merger(s)."""
    return [inner_model(model).visual]


# Module-name patterns (regex over full names) for the LoRA presets.
_TEXT = r"language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
_VISION = r"visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj|linear_fc1|linear_fc2))"
_MERGER = r"visual\.(merger|deepstack_merger_list\.\d+)\.(mlp\.(0|2)|linear_fc1|linear_fc2)"  # mlp.1 is a GELU
PRESET_PATTERNS = {
    "language": rf".*{_TEXT}$",
    # Qwen has no cross-attention: the merger is where image and text meet.
    "cross_attention": rf".*{_MERGER}$",
    "vision": rf".*{_VISION}$",
    "multimodal": rf".*({_MERGER}|{_VISION})$",
    "all": rf".*({_TEXT}|{_MERGER}|{_VISION})$",
}
VISION_PATTERN = r"\.visual\."  # searched in module / parameter names: vision blocks and merger(s)
# What the projector stage trains in full: the merger(s), norms included.
PROJECTOR_PATTERNS = [r".*visual\.(merger|deepstack_merger_list\.\d+)\..*(weight|bias)"]
# bitsandbytes matches a prefix up to a module boundary (or a suffix), never a middle substring:
# "model.visual" keeps the vision tower and its merger(s) unquantised, "visual" alone would not.
QUANT_SKIP_MODULES = ["model.visual", "lm_head"]
SUPPORTS_8BIT = True  # LLM.int8 text layers: loads, matches its own plain forward, trains LoRA (CPU-tested)

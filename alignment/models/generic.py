"""The generic fallback: any `AutoModelForImageTextToText` model without a family file of its own
(docs/families.md, section 4).

Nothing here knows how the model turns pixels into image tokens, so images are never encoded apart
from a forward: `encode_images` runs no vision and returns the pixel inputs themselves (`PixelRows`),
and every forward is the model's own, `model(input_ids, attention_mask, **row_pixels)`. Images are
therefore not shared between rows, roles or samples: in DPO the vision tower runs for chosen and
rejected, for the policy and for the reference.

An "image" entry (what `image_index` points at) is one entry along dim 0 of the processor's pixel
tensors. For processors that batch pixels per text row (Idefics3: `pixel_values [rows, max_images, 3,
H, W]` and `pixel_attention_mask [rows, max_images, H, W]`, zero-padded past a row's sub-images) that
is one row's images, however many. For processors that give one entry per image (LLaVA-like: `[N, 3,
H, W]`, `image_sizes [N, 2]`) it is one image, so such a model must show one image per row here.
Flat layouts (`pixel_values [sum of patches, D]` with `image_grid_thw`, `num_crops`, `num_patches`)
cannot be split per row by position along dim 0 and need a family file.

Generation uses the model's own KV cache with no position ids at prefill nor at decode: left padding
is then counted in both, which is exact for rotary positions up to float rounding (Idefics3: 1.8e-07
against a full recomputation; 1.4e-06 with the tiny build's wider LM head, tests/test_generic.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from alignment.models.features import checkpoint_layers, move_tensor, padded_cat, placeholder_ids

MODEL_TYPES = ()  # serves, through the registry, any image-text-to-text model type without a family file
TINY_MODELS = {"tiny-idefics3": "idefics3"}
SHARES_FEATURES = False
SHARES_PREFIX = False  # positions and masks are the model's own business: pairs stay two rows
MAX_IMAGES_PER_ROW = None
# Pixel inputs indexed per entry along dim 0 (see the module docstring).
PIXEL_KEYS = ("pixel_values", "pixel_attention_mask", "pixel_mask", "image_sizes")
TOKEN_KEYS = ()
LM_HEAD_STD = 0.1  # the tiny build's LM head init (as qwen_vl.build_tiny's: LoRA behind a frozen norm learns)

# Module names of vision towers and projectors across transformers' VLMs.
_VISION = r"(vision_tower|vision_model|visual)"
_PROJECTOR = r"(multi_modal_projector|connector|mm_projector)"
_TEXT = r"(language_model|text_model)\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
PRESET_PATTERNS = {
    "language": rf".*{_TEXT}$",
    # No cross-attention: the projector is where image and text meet (as in LLaVA and Qwen).
    "cross_attention": rf".*{_PROJECTOR}(\..*)?$",
    "vision": rf".*{_VISION}\..*$",
    "multimodal": rf".*({_PROJECTOR}(\..*)?|{_VISION}\..*)$",
    "all": rf".*({_TEXT}|{_PROJECTOR}(\..*)?|{_VISION}\..*)$",
}
VISION_PATTERN = rf"{_VISION}|{_PROJECTOR}"  # searched in module / parameter names
PROJECTOR_PATTERNS = [rf".*{_PROJECTOR}\..*(weight|bias)"]
# Never quantised: vision tower, projector, LM head (Idefics3: 14 Linear4bit left, all under text_model).
GENERIC_SKIP = [r".*(vision_tower|vision_model|visual|multi_modal_projector|connector|mm_projector)", "lm_head"]
QUANT_SKIP_MODULES = GENERIC_SKIP
SUPPORTS_8BIT = True

# Idefics3's special tokens (its processor checks them) and a chat template in its style for the tiny build.
IDEFICS3_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                   *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
# Idefics3-8B-Llama3's own chat template (SmolVLM's alike, with `<|im_start|>` first): a turn opening
# with text is `User: text`, one opening with an image `User:<image>text`; the generation prompt is
# `Assistant:` with no space, and an answer is written `Assistant: answer<end_of_utterance>\n`.
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass
class PixelRows:
    """The pixel inputs of N entries ("images" of the generic family), not encoded: `pixels[key]` holds
    entry i at index i along dim 0. Stands where the other families hand `ImageFeatures` around
    (`select`, `cat`, `len`, `detach`, `to`); the vision tower runs inside each forward."""

    pixels: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.pixels.values())).shape[0] if self.pixels else 0

    @property
    def device(self) -> torch.device:
        return next(iter(self.pixels.values())).device

    def select(self, images) -> PixelRows:
        """Entries `images` ([M] int64 or a slice), in that order."""
        return PixelRows({k: v[images.to(v.device) if torch.is_tensor(images) else images]
                          for k, v in self.pixels.items()})

    __getitem__ = select

    def detach(self) -> PixelRows:
        return PixelRows({k: v.detach() for k, v in self.pixels.items()})

    def to(self, *args, **kwargs) -> PixelRows:
        """Floating tensors moved/cast like `Tensor.to`; integer and boolean ones (masks, sizes) only moved."""
        return PixelRows({k: move_tensor(v, *args, **kwargs) for k, v in self.pixels.items()})

    @staticmethod
    def cat(parts: list[PixelRows]) -> PixelRows:
        """Concatenated along entries; every other dim zero-padded to the largest (the processors' own
        padding: Idefics3 drops all-zero sub-images, and a zero pixel mask marks padded pixels)."""
        return PixelRows({key: padded_cat([p.pixels[key] for p in parts]) for key in parts[0].pixels})


# --- tiny build --------------------------------------------------------------------------------------

def build_tokenizer(split: str = "gpt2", chat_template: str = CHAT_TEMPLATE):
    """The repo's byte-level BPE (pre-tokenizer `split`: "gpt2" or "llama3", alignment/models/tokenizer.py)
    with Idefics3's special tokens and `chat_template` (by default an Idefics3-style one: `User:<image>
    text<end_of_utterance>\\nAssistant:`); EOS `<end_of_utterance>`."""
    from alignment.models.tokenizer import build_tokenizer as build_bpe

    tokenizer = build_bpe(split=split)
    tokenizer.add_special_tokens({"additional_special_tokens": list(IDEFICS3_TOKENS)})
    tokenizer.chat_template = chat_template
    tokenizer.eos_token = "<end_of_utterance>"
    return tokenizer


def build_processor(tokenizer):
    """Idefics3's processor with the PIL image processor: an image up to 112 px is split into 2x2
    sub-images of 56 px plus the global one, 4 `<image>` tokens each (image_seq_len 4)."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 112}, max_image_size={"longest_edge": 56},
                                                do_image_splitting=True)
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                             chat_template=tokenizer.chat_template)


def tiny_config(tokenizer):
    """SigLIP vision 32 wide, 2 layers, 56-px images, patch 14; pixel shuffle by 2 (4 tokens per
    sub-image) -> Llama text 64 wide, 2 layers, 4 heads / 2 KV heads (about 0.2M parameters)."""
    from transformers import Idefics3Config

    eos = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                tie_word_embeddings=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                  patch_size=14)
    return Idefics3Config(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                          scale_factor=2, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def build_tiny(name: str, folder: Path) -> None:
    """Write the tiny random Idefics3 (tokenizer, processor, config, weights, generation config stopping
    at `<end_of_utterance>`; seed 0) into `folder`. The LM head is drawn with std 0.1 (qwen_vl.build_tiny
    says why)."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; the generic family builds {sorted(TINY_MODELS)}")
    write_tiny(build_tokenizer(), folder)


def write_tiny(tokenizer, folder: Path) -> None:
    """The tiny random Idefics3 over `tokenizer` (its chat template the processor's) into `folder` (seed 0)."""
    from transformers import GenerationConfig, Idefics3ForConditionalGeneration

    build_processor(tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(tiny_config(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, LM_HEAD_STD)
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)


# --- pixels in, forwards out -------------------------------------------------------------------------

def inner_model(model):
    """The `*Model` below the LM head (works through PEFT wrappers)."""
    return model.get_base_model().model if hasattr(model, "get_base_model") else model.model


def encode_images(model, **pixels) -> PixelRows:
    """No vision here: the pixel inputs, held until each forward runs the model on its rows' entries."""
    return PixelRows({k: v for k, v in pixels.items() if v is not None})


def select_pixels(pixels: dict, images: torch.Tensor) -> dict:
    """The pixel inputs of entries `images` [M], in that order (one entry per row along dim 0)."""
    return {key: value[images.to(value.device)] for key, value in pixels.items()}


def _row_pixels(features: PixelRows | None, image_index, batch_size: int, device) -> dict:
    """Each row's pixel entry, in row order: `image_index` [B] or [B, K] with only slot 0 used."""
    if features is None or not len(features):
        return {}
    index = torch.arange(batch_size, device=device) if image_index is None else image_index
    if index.dim() == 2:
        if index.shape[1] > 1 and bool((index[:, 1:] >= 0).any()):
            raise ValueError("the generic family takes one pixel entry per row (image_index [B] or [B, 1]); a row's "
                             "several images must sit in its one entry, as the processor batches them")
        index = index[:, 0]
    if bool((index < 0).any()):
        if bool((index < 0).all()):
            return {}
        raise ValueError("the generic family cannot mix rows with and without images in one forward")
    return features.select(index).pixels


def forward_with_features(model, input_ids, attention_mask, features: PixelRows | None, image_index=None,
                          **kwargs):
    """The model's own forward over rows [B, T], row b with pixel entry `image_index[b]` of `features`
    (vision included, under the caller's grad mode); `features=None` for text rows."""
    pixels = _row_pixels(features, image_index, input_ids.shape[0], input_ids.device)
    return model(input_ids=input_ids, attention_mask=attention_mask, **pixels, **kwargs)


def prefill(model, input_ids, attention_mask, features, image_index, **_):
    """The prompt forward with the model's KV cache and no position ids: `(logits [B, V], {"cache"})`."""
    out = forward_with_features(model, input_ids, attention_mask, features, image_index, use_cache=True,
                                logits_to_keep=1)
    return out.logits[:, -1], {"cache": out.cache}


def decode(model, state: dict, token: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One KV-cache step for `token [B]` (attention_mask [B, T + k]), no position ids (as at prefill):
    logits [B, V]; advances the state."""
    out = model(input_ids=token[:, None], attention_mask=attention_mask, cache=state["cache"], use_cache=True)
    state["cache"] = out.cache
    return out.logits[:, -1]


def unsampled_token_ids(config) -> list[int]:
    """The image (and video) placeholders, where the output head has a row: a sampled one would make the
    next forward look for images that are not there."""
    return placeholder_ids(config, ("image_token_id", "image_token_index", "video_token_id", "video_token_index"))


def enable_gradient_checkpointing(model) -> None:
    """transformers' non-reentrant activation checkpointing (whichever layers the model checkpoints)."""
    checkpoint_layers(model)


def vision_modules(model) -> list[torch.nn.Module]:
    """The vision tower (`vision_model`, `vision_tower` or `visual` of the inner model)."""
    core = inner_model(model)
    return [getattr(core, name) for name in ("vision_model", "vision_tower", "visual") if hasattr(core, name)][:1]

"""Real-geometry stand-ins: model folders with the real checkpoints' shapes, token ids and chat
templates, small widths and random weights, built offline in seconds.

A test on `tiny-mllama` (one 112-px tile, a 1,024-token vocabulary) hides the shapes a real
checkpoint has. These folders keep them:

| name                | stands in for                              | geometry kept                                   |
| ------------------- | ------------------------------------------ | ----------------------------------------------- |
| `standin-mllama`    | meta-llama/Llama-3.2-11B-Vision-Instruct   | 560-px tiles, up to 4, the 8 aspect ratios, 1601 vision tokens per tile; vocabulary 128,256 (+8 embedding rows), `<|image|>` = 128256, BOS 128000, `<|eot_id|>` 128009, pad 128004; Llama 3.2 Vision's chat template; generation stops at 128001/128008/128009 |
| `standin-llava`     | a LLaVA-1.5-geometry model with a Llama 3 tokenizer (e.g. llava-hf/llama3-llava-next-8b-hf's text side) | CLIP at 336 px, patch 14: 576 image tokens; the same Llama 3 ids, `<image>` = 128256 as the placeholder; a Llama-3-style template that renders `<image>\\n` before the text |
| `standin-qwen25vl`  | Qwen/Qwen2.5-VL-7B-Instruct                 | patch 14, merge 2, temporal patch 2, 3136..12845056 pixels (a 600x900 cover: 672 `<|image_pad|>`), window 112, full attention every 4th vision block, M-RoPE sections [16, 24, 24] at head_dim 128, rope theta 1e6; vocabulary 151,643 + 22 added tokens at 151643..151664 (`<|im_end|>` 151645, `<|image_pad|>` 151655), 152,064 embedding rows, untied head; pad `<|endoftext|>`; Qwen2.5-VL's chat template (default system turn); generation stops at 151645/151643 |

Widths are small (vision 32, text 64; Qwen's text 128, one head of 128) so a forward runs on a CPU; the
vocabulary, the image processor and the token protocol are the real ones. Build one with::

    python -m alignment.models.standins standin-mllama /tmp/standin-mllama   # or standin-llava, standin-qwen25vl
    vlm-align ... model.name=/tmp/standin-mllama     # or model.name=standin-mllama (built and cached)

and `MultimodalPolicy.from_pretrained("standin-mllama")` builds it on first use under the cache.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VOCAB_SIZE = 128256  # Llama 3's text vocabulary: 128,000 BPE tokens + 256 special tokens
FIRST_SPECIAL = 128000
# Llama 3's 256 special tokens (128000..128255), by id; the rest are <|reserved_special_token_N|>.
NAMED_SPECIALS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
    128010: "<|python_tag|>",
}
STOP_IDS = [128001, 128008, 128009]  # Llama 3.2 Vision Instruct's generation_config eos_token_id
PAD_ID = 128004
IMAGE_ID = 128256  # <|image|> (Mllama) or <image> (LLaVA): the first id past the text vocabulary

# Llama 3.2 Vision Instruct's chat template, as it renders messages without tools: BOS; a system
# turn (knowledge cutoff and date) only when no message has an image; each turn's header, its
# parts (<|image|> for an image part) and <|eot_id|>; the open assistant header.
LLAMA32_VISION_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] %}{%- set system_message = system_message | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = \"\" %}{%- endif %}"
    "{%- set image_ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}"
    "{%- set image_ns.has_images = true %}{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- if image_ns.has_images and not system_message == \"\" %}"
    "{{- raise_exception(\"Prompting with images is incompatible with system messages.\") }}{%- endif %}"
    "{%- if not image_ns.has_images %}"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}"
    "{{- system_message }}{{- \"<|eot_id|>\" }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# A Llama-3-style LLaVA template (as llava-hf's Llama 3 LLaVA models have it): images first, each
# as `<image>\n`, then the text, every turn closed by <|eot_id|>.
LLAMA3_LLAVA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{- '<image>\\n' }}{%- endfor %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{- content['text'] }}{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Meta-Llama-3-8B-Instruct's chat template, a text LM's: it renders string content only (a list of parts
# would come out as its Python repr), as a LLaVA built on that LM may ship it.
LLAMA3_TEXT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

MLLAMA_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
MLLAMA_IMAGE_SIZE = 560
MLLAMA_MAX_TILES = 4
LLAVA_IMAGE_SIZE = 336
PATCH_SIZE = 14


def special_token_names() -> list[str]:
    """The 256 special tokens of Llama 3, in id order (128000..128255)."""
    names, reserved = [], 0
    for token_id in range(FIRST_SPECIAL, VOCAB_SIZE):
        if token_id in NAMED_SPECIALS:
            names.append(NAMED_SPECIALS[token_id])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


def build_llama3_tokenizer(image_token: str, chat_template: str):
    """A byte-level BPE tokenizer with Llama 3's id layout: a small BPE trained on the book-cover
    vocabulary, unreachable filler entries up to id 127,999, Llama 3's 256 special tokens at
    128000..128255 and `image_token` at 128256. Deterministic."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from alignment.models.tokenizer import tokenizer_corpus

    small = Tokenizer(models.BPE())
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    small.train_from_iterator(tokenizer_corpus(), trainers.BpeTrainer(
        vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    trained = json.loads(small.to_str())["model"]
    vocab = dict(trained["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    for token_id in range(len(vocab), FIRST_SPECIAL):  # never produced: no merge leads to them
        vocab[f"<filler_{token_id}>"] = token_id
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_token_names()])
    core.add_special_tokens([AddedToken(image_token, special=True, normalized=False)])
    bos = NAMED_SPECIALS[128000]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, FIRST_SPECIAL)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
        chat_template=chat_template, padding_side="right", model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    assert tokenizer.convert_tokens_to_ids(image_token) == IMAGE_ID, "image token is not at 128256"
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == 128009
    return tokenizer


def _text_ids() -> dict:
    return dict(bos_token_id=FIRST_SPECIAL, eos_token_id=list(STOP_IDS), pad_token_id=PAD_ID)


def mllama_config(full_width: bool = False):
    """Llama-3.2-11B-Vision's geometry at small width: vision 32 wide (2+1 layers), text 64 wide
    (4 layers, cross-attention at 1 and 3), the real vocabulary, rope and image geometry.
    `full_width=True`: the 11B's own sizes too (vision 1280 wide, 32+8 layers; text 4096 wide,
    40 layers, cross-attention every 5th from 3): about 10.7B parameters, for the GPU check."""
    from transformers import MllamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if full_width:  # MllamaConfig's defaults are the 11B's sizes
        vision = dict(image_size=MLLAMA_IMAGE_SIZE, patch_size=PATCH_SIZE, max_num_tiles=MLLAMA_MAX_TILES,
                      supported_aspect_ratios=MLLAMA_ASPECT_RATIOS)
        text = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=131072, rope_parameters=rope,
                    tie_word_embeddings=False, **_text_ids())
        return MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID)
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
        image_size=MLLAMA_IMAGE_SIZE, patch_size=PATCH_SIZE, max_num_tiles=MLLAMA_MAX_TILES,
        supported_aspect_ratios=MLLAMA_ASPECT_RATIOS, intermediate_layers_indices=[0], vision_output_dim=64,
    )
    text = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, cross_attention_layers=[1, 3], max_position_embeddings=131072,
        rope_parameters=rope, tie_word_embeddings=False, **_text_ids(),
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID)


def llava_config():
    """LLaVA-1.5's image geometry (CLIP 336 px, patch 14, 576 tokens, layer -2, CLS dropped) over a
    Llama 3 text model 64 wide, at small width. The embedding covers the placeholder id (128320 rows)."""
    from transformers import LlavaConfig

    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=LLAVA_IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)
    text = dict(model_type="llama", vocab_size=128320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
                **_text_ids())
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                       image_seq_length=(LLAVA_IMAGE_SIZE // PATCH_SIZE) ** 2,
                       vision_feature_select_strategy="default", vision_feature_layer=-2)


def mllama_processor():
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = build_llama3_tokenizer("<|image|>", LLAMA32_VISION_TEMPLATE)
    images = MllamaImageProcessorPil(size={"height": MLLAMA_IMAGE_SIZE, "width": MLLAMA_IMAGE_SIZE},
                                     max_image_tiles=MLLAMA_MAX_TILES)
    return MllamaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=LLAMA32_VISION_TEMPLATE)


def llava_processor():
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_llama3_tokenizer("<image>", LLAMA3_LLAVA_TEMPLATE)
    images = CLIPImageProcessorPil(size={"shortest_edge": LLAVA_IMAGE_SIZE},
                                   crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", chat_template=LLAMA3_LLAVA_TEMPLATE,
                          image_token="<image>", num_additional_image_tokens=1)


# --- Qwen2.5-VL --------------------------------------------------------------------------------------

QWEN_VOCAB_SIZE = 151643  # Qwen2.5's byte-level BPE entries (ids 0..151642)
# Qwen2.5's added tokens at 151643..151664, in id order, with tokenizer_config's `special` flag (the
# last 8 are added but not special: `skip_special_tokens` keeps them).
QWEN_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN25VL_EMBEDDING_ROWS = 152064  # Qwen2.5-VL-7B's config vocab_size (the 3B has 151936)
QWEN_ENDOFTEXT, QWEN_IM_END = 151643, 151645
QWEN_STOP_IDS = [QWEN_IM_END, QWEN_ENDOFTEXT]  # generation_config eos_token_id
QWEN_VISION_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                       vision_end_token_id=151653)
QWEN25VL_MIN_PIXELS, QWEN25VL_MAX_PIXELS = 3136, 12845056  # preprocessor_config: 4 to 16,384 merged tokens
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Qwen2.5-VL-7B-Instruct's chat template (chat_template.json), byte for byte: a default system turn
# when the first message is not a system one; an image part as <|vision_start|><|image_pad|><|vision_end|>
# (`Picture N: ` before it with add_vision_id); each turn closed by <|im_end|>\n.
QWEN25VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_tokenizer(chat_template: str):
    """A `Qwen2Tokenizer` with Qwen2.5's id layout and pipeline (NFC, Qwen's split regex, byte-level; no BOS):
    a small BPE trained on the book-cover vocabulary, unreachable filler entries up to id 151,642, and the 22
    added tokens at 151643..151664. EOS `<|im_end|>`, pad `<|endoftext|>`. Deterministic."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from alignment.models.tokenizer import tokenizer_corpus

    small = Tokenizer(models.BPE())
    small.normalizer = normalizers.NFC()
    small.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    small.train_from_iterator(tokenizer_corpus(), trainers.BpeTrainer(
        vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    trained = json.loads(small.to_str())["model"]
    vocab = dict(trained["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    for token_id in range(len(vocab), QWEN_VOCAB_SIZE):  # never produced: no merge leads to them
        vocab[f"<filler_{token_id}>"] = token_id
    added = {QWEN_VOCAB_SIZE + i: AddedToken(token, special=special, normalized=False)
             for i, (token, special) in enumerate(QWEN_ADDED_TOKENS)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        added_tokens_decoder=added, additional_special_tokens=[t for t, special in QWEN_ADDED_TOKENS[1:] if special],
        chat_template=chat_template, model_max_length=131072, clean_up_tokenization_spaces=False, errors="replace",
        split_special_tokens=False, padding_side="right",
    )
    for token_id, token in added.items():
        assert tokenizer.convert_tokens_to_ids(token.content) == token_id, f"{token.content} is not at {token_id}"
    return tokenizer


def qwen25vl_config():
    """Qwen2.5-VL-7B's geometry at small width: vision 32 wide, 4 blocks (full attention at 1 and 3, as the
    7B's 7/15/23/31 of 32; windows of 112 px), patch 14, merge 2, temporal 2; text 128 wide, 2 layers of one
    head of 128 (the 7B's head_dim, so the real M-RoPE sections [16, 24, 24]), rope theta 1e6, 128,000
    positions, 152,064 embedding rows, untied head; the real vision token ids."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH_SIZE,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3],
                  out_hidden_size=128, tokens_per_second=2)
    text = dict(vocab_size=QWEN25VL_EMBEDDING_ROWS, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=128000, max_window_layers=2,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=QWEN_ENDOFTEXT, eos_token_id=QWEN_IM_END, pad_token_id=QWEN_ENDOFTEXT,
                tie_word_embeddings=False)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **QWEN_VISION_IDS)


def qwen25vl_processor():
    """The video-free Qwen2.5-VL processor (saved in the hub layout, alignment.models.qwen_vl) over the
    real image processor settings: patch 14, merge 2, temporal 2, 3136..12845056 pixels, CLIP mean/std."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from alignment.models.qwen_vl import video_free_processor_class

    tokenizer = build_qwen2_tokenizer(QWEN25VL_TEMPLATE)
    images = Qwen2VLImageProcessorPil(min_pixels=QWEN25VL_MIN_PIXELS, max_pixels=QWEN25VL_MAX_PIXELS,
                                      patch_size=PATCH_SIZE, merge_size=2, temporal_patch_size=2,
                                      image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return video_free_processor_class("qwen2_5_vl")(image_processor=images, tokenizer=tokenizer,
                                                    chat_template=QWEN25VL_TEMPLATE)


STANDINS = {"standin-mllama": "mllama", "standin-llava": "llava", "standin-qwen25vl": "qwen2_5_vl"}


def build_standin(name: str, folder: str | Path, seed: int = 0, full_width: bool = False,
                  device: str = "cpu", dtype=None) -> Path:
    """Write stand-in `name`'s processor, config, generation config and random weights into `folder`
    (`full_width`: Mllama at the 11B's own sizes, initialised on `device` in `dtype`)."""
    import torch
    from transformers import (
        GenerationConfig,
        LlavaForConditionalGeneration,
        MllamaForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
    )

    if name not in STANDINS:
        raise ValueError(f"unknown stand-in {name!r}; known: {sorted(STANDINS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    family = STANDINS[name]
    processor = {"mllama": mllama_processor, "llava": llava_processor, "qwen2_5_vl": qwen25vl_processor}[family]()
    processor.save_pretrained(folder)
    torch.manual_seed(seed)
    ids = dict(bos_token_id=FIRST_SPECIAL, eos_token_id=list(STOP_IDS), pad_token_id=PAD_ID)
    if family == "mllama":
        from alignment.models.mllama import open_cross_attention_gates

        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype or torch.float32)
        try:
            with torch.device(device):
                model = MllamaForConditionalGeneration(mllama_config(full_width))
        finally:
            torch.set_default_dtype(default_dtype)
        open_cross_attention_gates(model)  # a random model's cross-attention must matter to be tested
    elif family == "llava":
        model = LlavaForConditionalGeneration(llava_config())
    else:
        model = Qwen2_5_VLForConditionalGeneration(qwen25vl_config())
        ids = dict(bos_token_id=QWEN_ENDOFTEXT, eos_token_id=list(QWEN_STOP_IDS), pad_token_id=QWEN_ENDOFTEXT)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in STANDINS:
        print(f"usage: python -m alignment.models.standins {{{','.join(STANDINS)}}} OUT_FOLDER", file=sys.stderr)
        return 2
    folder = build_standin(argv[0], argv[1])
    print(f"{argv[0]} written to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

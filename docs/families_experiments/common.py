"""Shared tiny builders for the family experiments (issue #19). Offline, CPU, fp32."""
import torch
from PIL import Image

QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer():
    """The repo's tiny byte-level BPE (1024 + specials) plus Qwen's special tokens and a Qwen-style template."""
    from alignment.models.tokenizer import build_tokenizer
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    tok.chat_template = QWEN_TEMPLATE
    tok.eos_token = "<|im_end|>"
    return tok


def qwen_ids(tok):
    return {k: tok.convert_tokens_to_ids(v) for k, v in dict(
        image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
        vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>").items()}


def image_processor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                    merge_size=2, temporal_patch_size=2)


from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor


class VideoFreeQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """No `video_processor` in the signature: ProcessorMixin.get_attributes() reads the attributes off
    __init__'s parameters, so the video processor is neither checked, stored nor saved."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class VideoFreeQwen3VLProcessor(Qwen3VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def qwen3_processor_subclass(tok, **ip):
    return VideoFreeQwen3VLProcessor(image_processor=image_processor(**ip), tokenizer=tok, chat_template=tok.chat_template)


def qwen25_processor_subclass(tok, **ip):
    """Route A: Qwen2_5_VLProcessor without a video processor."""

    return VideoFreeQwen2_5_VLProcessor(image_processor=image_processor(**ip), tokenizer=tok, chat_template=tok.chat_template)


def tiny_qwen25(tok, seed=0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=64, fullatt_block_indexes=[1])
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **qwen_ids(tok))
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def tiny_qwen3(tok, seed=0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id)
    cfg = Qwen3VLConfig(vision_config=vision, text_config=text, **qwen_ids(tok))
    return Qwen3VLForConditionalGeneration(cfg).eval()


def images():
    """Two images of different sizes (different grid_thw)."""
    torch.manual_seed(1)
    a = Image.fromarray((torch.rand(56, 84, 3) * 255).byte().numpy())
    b = Image.fromarray((torch.rand(112, 56, 3) * 255).byte().numpy())
    return a, b


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()

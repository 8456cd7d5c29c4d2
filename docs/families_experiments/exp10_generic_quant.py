"""Exp 10: a generic skip list for 4-bit (vision tower + projector + lm_head kept) on the tiny Idefics3."""
import sys, tempfile, re
sys.path.insert(0, "/tmp/fam")
import torch, bitsandbytes as bnb
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig, Idefics3Config, Idefics3ForConditionalGeneration

GENERIC_SKIP = [r".*(vision_tower|vision_model|visual|multi_modal_projector|connector|mm_projector)", "lm_head"]
torch.manual_seed(0)
cfg = Idefics3Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=56, patch_size=14),
                     text_config=dict(model_type="llama", vocab_size=700, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), image_token_id=650)
with tempfile.TemporaryDirectory() as d:
    Idefics3ForConditionalGeneration(cfg).save_pretrained(d)
    m = AutoModelForImageTextToText.from_pretrained(d, device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=GENERIC_SKIP))
q = [n for n, x in m.named_modules() if isinstance(x, bnb.nn.Linear4bit)]
lin = [n for n, x in m.named_modules() if isinstance(x, torch.nn.Linear) and n not in q]
print(f"idefics3 4-bit with {GENERIC_SKIP}: {len(q)} Linear4bit, all under text_model: {all('.text_model.' in n for n in q)}; "
      f"kept full precision: {sorted({re.sub(r'.[0-9]+.', '.N.', n) for n in lin})}")

"""Exp 5: bitsandbytes 4-bit skip list for Qwen (vision tower unquantised), and LoRA gradients after an eval
pass vs before, with and without turning off bitsandbytes' CPU repacking (registry.keep_four_bit_weights_unpacked)."""
import sys, tempfile
sys.path.insert(0, "/tmp/fam")
import torch
import bitsandbytes as bnb
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
from common import *
from qwen_family import *

tok = qwen_tokenizer()
a, b = images()
img = "<|vision_start|><|image_pad|><|vision_end|>"
text = lambda q, ans: f"<|im_start|>user\n{img}{q}<|im_end|>\n<|im_start|>assistant\n{ans}<|im_end|>"
LANG = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"


def quant(skip):
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)


for name, build, make_proc in (("qwen2.5-vl", tiny_qwen25, qwen25_processor_subclass), ("qwen3-vl", tiny_qwen3, qwen3_processor_subclass)):
    proc = make_proc(tok)
    with tempfile.TemporaryDirectory() as d:
        build(tok).save_pretrained(d)
        for skip in (["visual", "lm_head"], ["model.visual", "lm_head"], [r".*visual", "lm_head"]):
            m = AutoModelForImageTextToText.from_pretrained(d, quantization_config=quant(skip), device_map={"": "cpu"}, dtype=torch.float32)
            q = [n for n, mod in m.named_modules() if isinstance(mod, bnb.nn.Linear4bit)]
            print(f"[{name}] skip {skip}: {len(q)} Linear4bit, in model.visual: {sum(n.startswith('model.visual') for n in q)}, "
                  f"lm_head 4-bit: {'lm_head' in q}, all under language_model: {all('.language_model.' in n for n in q)}")
        batch = dict(proc(text=[text("title?", "Yes"), text("who wrote it?", "Ann Lee")], images=[[a], [b]], padding=True,
                          padding_side="right", return_tensors="pt"))
        labels = batch["input_ids"].clone(); labels[batch["attention_mask"] == 0] = -100
        for fix in (False, True):
            from peft import LoraConfig, get_peft_model
            from alignment.models.registry import keep_four_bit_weights_unpacked
            m = AutoModelForImageTextToText.from_pretrained(d, quantization_config=quant(["model.visual", "lm_head"]),
                                                            device_map={"": "cpu"}, dtype=torch.float32)
            if fix:
                keep_four_bit_weights_unpacked(m)
            m.requires_grad_(False)
            torch.manual_seed(0)
            m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=LANG, init_lora_weights=False))

            def grads():
                m.train(); m.zero_grad()
                m.model.model.rope_deltas = None if hasattr(m.model.model, "rope_deltas") else None
                m(**batch, labels=labels).loss.backward()
                return torch.cat([p.grad.flatten() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None])
            try:
                g0 = grads()
                m.eval()
                with torch.no_grad():
                    m(**batch)
                g1 = grads()
                rel = ((g1 - g0).norm() / g0.norm()).item()
                print(f"[{name}] 4-bit LoRA grads after an eval no-grad pass vs before (repacking {'off' if fix else 'on'}): "
                      f"relative diff {rel:.3e}, |g| before {g0.norm():.3e} after {g1.norm():.3e}")
            except Exception as e:
                print(f"[{name}] repacking {'off' if fix else 'on'}: {type(e).__name__}: {str(e)[:160]}")

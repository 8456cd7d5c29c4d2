"""Exp 3b: Qwen per-image pixel selection (flat patches) and the features path == plain forward in 4-bit."""
import sys, tempfile
sys.path.insert(0, "/tmp/fam")
import torch
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
from common import *
from qwen_family import *

torch.set_grad_enabled(False)
tok = qwen_tokenizer()
a, b = images()
img = "<|vision_start|><|image_pad|><|vision_end|>"
text = lambda q, ans: f"<|im_start|>user\n{img}{q}<|im_end|>\n<|im_start|>assistant\n{ans}<|im_end|>"
for name, build, make in (("qwen2.5-vl", tiny_qwen25, qwen25_processor_subclass), ("qwen3-vl", tiny_qwen3, qwen3_processor_subclass)):
    proc = make(tok)
    with tempfile.TemporaryDirectory() as d:
        build(tok).save_pretrained(d)
        from alignment.models.registry import keep_four_bit_weights_unpacked
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["model.visual", "lm_head"])
        m = AutoModelForImageTextToText.from_pretrained(d, quantization_config=q, device_map={"": "cpu"}, dtype=torch.float32).eval()
        keep_four_bit_weights_unpacked(m)
    pix = dict(proc.image_processor(images=[a, b, a], return_tensors="pt"))
    full = encode_images(m, pix["pixel_values"], pix["image_grid_thw"])
    sel = select_pixels(pix, torch.tensor([2, 1]))
    part = encode_images(m, sel["pixel_values"], sel["image_grid_thw"])
    print(f"[{name}] select_pixels([2,1]) then encode == encode then select: "
          f"{max(maxdiff(part.embeds[k, :part.lengths[k]], full.embeds[i, :full.lengths[i]]) for k, i in enumerate([2, 1])):.3e}")
    batch = dict(proc(text=[text("title?", "Yes"), text("who wrote it?", "Ann Lee")], images=[[a], [b]], padding=True,
                      padding_side="right", return_tensors="pt"))
    m.model.rope_deltas = None
    plain = m(**batch).logits
    f = encode_images(m, batch["pixel_values"], batch["image_grid_thw"])
    m.model.rope_deltas = None
    shared, _ = forward_with_features(m, batch["input_ids"], batch["attention_mask"], f, torch.arange(2))
    mask = batch["attention_mask"].bool()
    print(f"[{name}] 4-bit (NF4, vision unquantised): features path vs plain forward {maxdiff(shared.logits[mask], plain[mask]):.3e}")

"""Exp 9: LLaVA (the repo's tiny-llava) with multi-image rows: images encoded once, gathered in placeholder
order (flat image_index), scattered == plain forward with each row's own pixels."""
import os, sys
os.environ.setdefault("VLM_ALIGN_CACHE", "/tmp/fam/cache")
sys.path.insert(0, "/tmp/fam")
import torch
from common import images, maxdiff
from alignment.models import load_model, load_processor
from alignment.models import llava

torch.set_grad_enabled(False)
model, proc = load_model("tiny-llava").eval(), load_processor("tiny-llava")
a, b = images()
tokimg = proc.image_token
texts = [f"<|begin_of_text|>{tokimg}{tokimg} same?", f"<|begin_of_text|>{tokimg} title?", f"<|begin_of_text|>{tokimg} no"]
row_images = [[b, a], [a], [b]]
plain_in = dict(proc(text=texts, images=[im for r in row_images for im in r], padding=True, padding_side="right",
                     add_special_tokens=False, return_tensors="pt"))
plain = model(**plain_in).logits
px = dict(proc.image_processor(images=[a, b], return_tensors="pt"))
feats = llava.encode_images(model, px["pixel_values"].float())  # [2, S, H]
index = torch.tensor([[1, 0], [0, -1], [1, -1]])
flat = index[index >= 0]
core = llava.inner_model(model)
embeds = core.get_input_embeddings()(plain_in["input_ids"])
embeds = embeds.masked_scatter((plain_in["input_ids"] == core.config.image_token_id)[..., None], feats[flat].reshape(-1, feats.shape[-1]))
shared = model(inputs_embeds=embeds, attention_mask=plain_in["attention_mask"]).logits
m = plain_in["attention_mask"].bool()
print(f"tiny-llava multi-image rows, features {tuple(feats.shape)} gathered by flat image_index {flat.tolist()}: "
      f"max|shared - plain| = {maxdiff(shared[m], plain[m]):.3e}")

"""Exp 4b: decode steps with no position_ids after a prefill that let the model compute (and store) rope_deltas."""
import sys
sys.path.insert(0, "/tmp/fam")
import torch
from common import *
from qwen_family import *
from transformers.modeling_outputs import BaseModelOutputWithPooling

torch.set_grad_enabled(False)
tok = qwen_tokenizer()
a, b = images()
img = "<|vision_start|><|image_pad|><|vision_end|>"
prompt = lambda q: f"<|im_start|>user\n{img}{q}<|im_end|>\n<|im_start|>assistant\n"
for name, model, proc in (("qwen2.5-vl", tiny_qwen25(tok), qwen25_processor_subclass(tok)),
                          ("qwen3-vl", tiny_qwen3(tok), qwen3_processor_subclass(tok))):
    batch = dict(proc(text=[prompt("title?"), prompt("who wrote the book cover author?")], images=[[a], [b]],
                      padding=True, padding_side="left", return_tensors="pt"))
    feats = encode_images(model, batch["pixel_values"], batch["image_grid_thw"])
    for G in (1, 3):
        for with_mask in (True, False):
            model.model.rope_deltas = None
            out = model(**batch, use_cache=True)  # plain prefill: the model stores rope_deltas itself
            past, logits, mask, ids = out.cache, out.logits[:, -1], batch["attention_mask"], batch["input_ids"]
            if G > 1:
                past.batch_repeat_interleave(G)
                logits, mask, ids = (x.repeat_interleave(G, 0) for x in (logits, mask, ids))
            worst = 0.0
            try:
                for step in range(4):
                    token = torch.randint(0, 600, (ids.shape[0],), generator=torch.Generator().manual_seed(step))
                    ids = torch.cat([ids, token[:, None]], 1); mask = torch.cat([mask, mask.new_ones(ids.shape[0], 1)], 1)
                    out = model(input_ids=token[:, None], attention_mask=mask if with_mask else None, cache=past, use_cache=True)
                    past = out.cache
                    ref = forward_with_features(model, ids, mask, feats, torch.arange(2).repeat_interleave(G))[0].logits[:, -1]
                    worst = max(worst, maxdiff(out.logits[:, -1], ref))
                print(f"[{name}] G={G} no position_ids, model-stored rope_deltas, attention_mask={'full' if with_mask else 'None'}: {worst:.3e}")
            except Exception as e:
                print(f"[{name}] G={G} no position_ids, attention_mask={'full' if with_mask else 'None'}: {type(e).__name__}: {str(e)[:150]}")

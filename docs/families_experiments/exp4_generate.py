"""Exp 4: KV-cache decoding after a features prefill: what Qwen needs per decode step, G samples per prefill
(DynamicCache.batch_repeat_interleave + rope_deltas repeated), == full recomputation (fp32)."""
import sys, warnings
sys.path.insert(0, "/tmp/fam")
import torch
from common import *
from qwen_family import *

torch.set_grad_enabled(False)
tok = qwen_tokenizer()
a, b = images()
img = "<|vision_start|><|image_pad|><|vision_end|>"
prompt = lambda q: f"<|im_start|>user\n{img}{q}<|im_end|>\n<|im_start|>assistant\n"
STEPS = 6


def full(model, ids, mask, feats, index):
    return forward_with_features(model, ids, mask, feats, index)[0].logits[:, -1]


def check(name, model, proc):
    core = model.model
    batch = dict(proc(text=[prompt("title?"), prompt("who wrote the book cover author?")], images=[[a], [b]],
                      padding=True, padding_side="left", return_tensors="pt"))
    feats = encode_images(model, batch["pixel_values"], batch["image_grid_thw"])
    index = torch.arange(2)
    ids0, mask0 = batch["input_ids"], batch["attention_mask"]
    for G in (1, 3):
        for mode in ("explicit [3,B,1] = text_pos + rope_deltas", "2-D [B,1] text positions", "none (model's rope_deltas)"):
            core.rope_deltas = None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out, deltas = forward_with_features(model, ids0, mask0, feats, index, use_cache=True)
            past, logits = out.cache, out.logits[:, -1]
            text_pos = (mask0.long().cumsum(-1) - 1).clamp(min=0)[:, -1:]
            mask, ids, idx = mask0, ids0, index
            if G > 1:
                past.batch_repeat_interleave(G)
                logits, mask, ids, text_pos, deltas = (x.repeat_interleave(G, dim=0) for x in (logits, mask, ids, text_pos, deltas))
                idx = index.repeat_interleave(G)
            gen = torch.Generator().manual_seed(0)
            worst = maxdiff(logits, full(model, ids, mask, feats, idx))
            greedy_same = True
            for step in range(STEPS):
                if G == 1:
                    token = logits.argmax(-1)  # greedy
                else:  # forced distinct tokens per sample (tests every repeated cache row separately)
                    token = torch.randint(0, 600, (ids.shape[0],), generator=gen)
                ids = torch.cat([ids, token[:, None]], 1)
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                text_pos = text_pos + 1
                kw = {}
                if mode.startswith("explicit"):
                    kw["position_ids"] = (text_pos + deltas)[None].expand(3, -1, -1)
                elif mode.startswith("2-D"):
                    kw["position_ids"] = text_pos
                out = model(input_ids=token[:, None], attention_mask=mask, cache=past, use_cache=True, **kw)
                past, logits = out.cache, out.logits[:, -1]
                ref = full(model, ids, mask, feats, idx)
                worst = max(worst, maxdiff(logits, ref))
                greedy_same &= bool(torch.equal(logits.argmax(-1), ref.argmax(-1)))
            print(f"[{name}] G={G} decode positions {mode}: max|cached - full recompute| over {STEPS} steps = {worst:.3e}"
                  f"{'' if G > 1 else f', greedy tokens equal: {greedy_same}'}")
    # model's own generate (pixel path) vs our cached greedy
    core.rope_deltas = None
    hf = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS)[:, ids0.shape[1]:]
    core.rope_deltas = None
    out, deltas = forward_with_features(model, ids0, mask0, feats, index, use_cache=True)
    past, logits, mask, pos = out.cache, out.logits[:, -1], mask0, (mask0.long().cumsum(-1) - 1)[:, -1:]
    mine = []
    for _ in range(STEPS):
        logits[:, tok.convert_tokens_to_ids("<|im_end|>")] = float("-inf")  # as min_new_tokens does
        token = logits.argmax(-1); mine.append(token)
        mask = torch.cat([mask, mask.new_ones(2, 1)], 1); pos = pos + 1
        out = model(input_ids=token[:, None], attention_mask=mask, cache=past, use_cache=True,
                    position_ids=(pos + deltas)[None].expand(3, -1, -1))
        past, logits = out.cache, out.logits[:, -1]
    print(f"[{name}] model.generate (pixels) tokens == features prefill + explicit M-RoPE decode: {torch.equal(hf, torch.stack(mine, 1))}")
    # past_key_values= still accepted in 5.24?
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o = model(input_ids=ids0[:, -1:], attention_mask=torch.cat([mask0, mask0.new_ones(2, 1)], 1),
                  past_key_values=forward_with_features(model, ids0, mask0, feats, index, use_cache=True)[0].cache,
                  position_ids=(pos[:, :1] * 0 + mask0.sum(1, keepdim=True) + deltas)[None].expand(3, -1, -1), use_cache=True)
    print(f"[{name}] past_key_values= kwarg accepted: output .past_key_values is .cache: {o.past_key_values is o.cache}")


check("qwen2.5-vl", tiny_qwen25(tok), qwen25_processor_subclass(tok))
check("qwen3-vl", tiny_qwen3(tok), qwen3_processor_subclass(tok))

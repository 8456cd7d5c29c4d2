"""Exp 2: features computed once and scattered into inputs_embeds vs the plain forward (fp32 max |logit diff|).

Batch: 2 rows, 2 images of different sizes (grid_thw [1,4,6] and [1,8,4]), left-padded and right-padded."""
import sys
sys.path.insert(0, "/tmp/fam")
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from common import *

torch.set_grad_enabled(False)
tok = qwen_tokenizer()
a, b = images()
msgs = lambda q: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
texts = [tok.apply_chat_template(msgs(q), tokenize=False, add_generation_prompt=True) + ans
         for q, ans in (("title?", "Yes<|im_end|>"), ("who wrote the book cover author genre?", "No<|im_end|>"))]


def run(name, model, proc):
    core = model.model
    real = lambda lg, m: lg[m.bool()]  # compare real (non-pad) positions only
    for side in ("left", "right"):
        batch = dict(proc(text=texts, images=[[a], [b]], padding=True, padding_side=side, return_tensors="pt"))
        mask = batch["attention_mask"]
        derived = (batch["input_ids"] == model.config.image_token_id).int()
        print(f"[{name} {side}] mm_token_type_ids == (input_ids == image_token_id): {torch.equal(derived, batch['mm_token_type_ids'].int())}")
        core.rope_deltas = None
        plain = model(**batch).logits
        stale = core.rope_deltas
        # (e) plain forward without mm_token_type_ids
        core.rope_deltas = None
        no_tt = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
        try:
            d = maxdiff(real(model(**no_tt).logits, mask), real(plain, mask))
            print(f"  plain forward without mm_token_type_ids: {d:.3e}")
        except Exception as e:
            print("  plain forward without mm_token_type_ids:", type(e).__name__, str(e)[:120])
        # features once
        enc = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        feats = torch.cat(enc.pooler_output)  # [sum S_i, H]
        embeds = core.get_input_embeddings()(batch["input_ids"])
        embeds = embeds.masked_scatter((batch["input_ids"] == model.config.image_token_id)[..., None], feats)
        # (b) inputs_embeds only, rope_deltas reset / stale
        core.rope_deltas = None
        d_none = maxdiff(real(model(inputs_embeds=embeds, attention_mask=mask).logits, mask), real(plain, mask))
        core.rope_deltas = stale
        d_stale = maxdiff(real(model(inputs_embeds=embeds, attention_mask=mask).logits, mask), real(plain, mask))
        # (c) explicit position_ids from get_rope_index
        pos, deltas = core.get_rope_index(batch["input_ids"], mm_token_type_ids=derived,
                                          image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
        core.rope_deltas = None
        d_pos = maxdiff(real(model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits, mask), real(plain, mask))
        # (c') get_rope_index without attention_mask (padding counted as text)
        pos_nomask, _ = core.get_rope_index(batch["input_ids"], mm_token_type_ids=derived, image_grid_thw=batch["image_grid_thw"])
        d_pos_nomask = maxdiff(real(model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos_nomask).logits, mask), real(plain, mask))
        # (d) encoder outputs passed back (mm_encoder_outputs) with input_ids: the model places features and positions
        core.rope_deltas = None
        enc2 = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        d_enc = maxdiff(real(model(input_ids=batch["input_ids"], attention_mask=mask, image_grid_thw=batch["image_grid_thw"],
                                   mm_token_type_ids=derived, mm_encoder_outputs={"image": enc2}).logits, mask), real(plain, mask))
        # (d') encoder outputs + explicit position ids
        core.rope_deltas = stale
        enc3 = BaseModelOutputWithPooling(pooler_output=enc2.pooler_output)
        if hasattr(enc2, "deepstack_features"):
            enc3 = type(enc2)(pooler_output=enc2.pooler_output, deepstack_features=enc2.deepstack_features)
        d_enc_pos = maxdiff(real(model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos,
                                       mm_encoder_outputs={"image": enc3}).logits, mask), real(plain, mask))
        print(f"  inputs_embeds only, rope_deltas None: {d_none:.3e}; with stale rope_deltas: {d_stale:.3e}")
        print(f"  inputs_embeds + position_ids(get_rope_index, attention_mask): {d_pos:.3e}; without attention_mask: {d_pos_nomask:.3e}")
        print(f"  mm_encoder_outputs + input_ids + grid + mm_token_type_ids (model computes positions): {d_enc:.3e}")
        print(f"  mm_encoder_outputs(rebuilt: pooler_output{' + deepstack_features' if hasattr(enc2, 'deepstack_features') else ''}) + explicit position_ids, stale deltas: {d_enc_pos:.3e}")
        print(f"  rope_deltas {deltas.flatten().tolist()}; features per image {[t.shape[0] for t in enc.pooler_output]}")
        if hasattr(enc, "deepstack_features"):
            print(f"  deepstack_features: {len(enc.deepstack_features)} levels x {[tuple(t.shape) for t in enc.deepstack_features[0]]}")


run("qwen2.5-vl", tiny_qwen25(tok), qwen25_processor_subclass(tok))
run("qwen3-vl", tiny_qwen3(tok), qwen3_processor_subclass(tok))

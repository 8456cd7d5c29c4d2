"""Exp 3: variable-length per-image features shared by rows (DPO chosen/rejected, G samples, a multi-image row):
gather + scatter == plain forward on the same rows with the images repeated per row (fp32)."""
import sys
sys.path.insert(0, "/tmp/fam")
import torch
from common import *
from qwen_family import *

torch.set_grad_enabled(False)
tok = qwen_tokenizer()
a, b = images()
img = "<|vision_start|><|image_pad|><|vision_end|>"
turn = lambda n_img, q, ans: f"<|im_start|>user\n{img * n_img}{q}<|im_end|>\n<|im_start|>assistant\n{ans}<|im_end|>"


def check(name, model, proc):
    core = model.model
    # rows: chosen(img0), chosen(img1), rejected(img0), rejected(img1), one 2-image row [img1, img0], and G=3 copies of row 0
    rows = [(turn(1, "title?", "Yes"), [0]), (turn(1, "who wrote it?", "Ann Lee"), [1]),
            (turn(1, "title?", "No"), [0]), (turn(1, "who wrote it?", "Bob"), [1]),
            (turn(2, "same author?", "Yes"), [1, 0])] + [(turn(1, "title?", "Maybe so"), [0])] * 3
    pil = [a, b]
    for side in ("right", "left"):
        # plain: the processor sees each row's own images (repeated), the model runs the vision tower per row
        plain_in = dict(proc(text=[t for t, _ in rows], images=[[pil[i] for i in ix] for _, ix in rows], padding=True,
                             padding_side=side, return_tensors="pt"))
        core.rope_deltas = None
        plain = model(**plain_in).logits
        # shared: the 2 images encoded once, rows index them
        img_in = proc.image_processor(images=pil, return_tensors="pt")
        calls = {"n": 0}
        h = core.visual.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        feats = encode_images(model, img_in["pixel_values"], img_in["image_grid_thw"])
        h.remove()
        index = torch.full((len(rows), 2), -1)
        for r, (_, ix) in enumerate(rows):
            index[r, : len(ix)] = torch.tensor(ix)
        core.rope_deltas = None
        shared, _ = forward_with_features(model, plain_in["input_ids"], plain_in["attention_mask"], feats, index)
        m = plain_in["attention_mask"].bool()
        d = maxdiff(shared.logits[m], plain[m])
        print(f"[{name} {side}] features {tuple(feats.embeds.shape)} lengths {feats.lengths.tolist()}"
              f"{' deepstack ' + str(tuple(feats.deepstack.shape)) if feats.deepstack is not None else ''}; "
              f"vision calls {calls['n']} for {len(rows)} rows; max|shared - plain| = {d:.3e}")
        # encoding images one by one == all at once
        one = [encode_images(model, *[proc.image_processor(images=[p], return_tensors='pt')[k] for k in ('pixel_values', 'image_grid_thw')]) for p in pil]
        print(f"  per-image encoding == batched encoding: {max(maxdiff(o.embeds[0, :o.lengths[0]], feats.embeds[i, :feats.lengths[i]]) for i, o in enumerate(one)):.3e}")
        # select / cat round trip (rollout micro-batches)
        cat = ImageFeatures.cat([feats.select(torch.tensor([1])), feats.select(torch.tensor([0]))])
        idx2 = torch.where(index >= 0, 1 - index, index)
        core.rope_deltas = None
        again, _ = forward_with_features(model, plain_in["input_ids"], plain_in["attention_mask"], cat, idx2)
        print(f"  after select+cat (images reordered, re-padded): {maxdiff(again.logits[m], plain[m]):.3e}")
        if side == "left":  # an extra all-padding column (Rollout.trimmed's inverse) changes nothing
            ids = torch.cat([torch.full((len(rows), 1), tok.pad_token_id), plain_in["input_ids"]], 1)
            mask = torch.cat([torch.zeros(len(rows), 1, dtype=torch.long), plain_in["attention_mask"]], 1)
            wider, _ = forward_with_features(model, ids, mask, feats, index)
            print(f"  extra left pad column: {maxdiff(wider.logits[:, 1:][m], plain[m]):.3e}")
    # gradients flow into shared features (vision adapted): d(loss)/d(embeds) nonzero only at used rows
    with torch.enable_grad():
        f = ImageFeatures(feats.embeds.clone().requires_grad_(), feats.lengths, feats.grid_thw,
                          None if feats.deepstack is None else feats.deepstack.clone().requires_grad_())
        out, _ = forward_with_features(model, plain_in["input_ids"], plain_in["attention_mask"], f, index)
        out.logits.float().logsumexp(-1).sum().backward()
        g = f.embeds.grad
        print(f"  grad through shared features: |g| valid {g[0, :f.lengths[0]].norm():.3e} / padding {g[0, f.lengths[0]:].norm():.3e}"
              f"{'; deepstack grad ' + format(f.deepstack.grad.norm().item(), '.3e') if f.deepstack is not None else ''}")


check("qwen2.5-vl", tiny_qwen25(tok), qwen25_processor_subclass(tok))
check("qwen3-vl", tiny_qwen3(tok), qwen3_processor_subclass(tok))

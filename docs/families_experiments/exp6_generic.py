"""Exp 6: the generic fallback on a tiny Idefics3 (AutoModelForImageTextToText) with a PIL-only processor:
plain forward with each row's own pixels, generate() by the model, and a hand KV-cache loop (prefill with
pixels, decode without position ids, cache repeated G times) == full recomputation. Also: what a non-VLM
folder gives."""
import sys, tempfile, json
sys.path.insert(0, "/tmp/fam")
import torch
from common import images, maxdiff

torch.set_grad_enabled(False)
from alignment.models.tokenizer import build_tokenizer
from transformers import (AutoModelForImageTextToText, AutoProcessor, Idefics3Config, Idefics3ForConditionalGeneration,
                          Idefics3Processor)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

tok = build_tokenizer()
tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>",
                                                      "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]})
tok.chat_template = ("{% for message in messages %}{{ message['role'] | capitalize }}:"
                     "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
                     "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
ip = Idefics3ImageProcessorPil(size={"longest_edge": 112}, max_image_size={"longest_edge": 56}, do_image_splitting=True)
proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
torch.manual_seed(0)
cfg = Idefics3Config(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14),
    text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<end_of_utterance>")),
    image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2, pad_token_id=tok.pad_token_id)
model = Idefics3ForConditionalGeneration(cfg).eval()
print("tiny idefics3:", f"{sum(p.numel() for p in model.parameters())/1e6:.2f}M params")
with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d); proc.save_pretrained(d)
    m2 = AutoModelForImageTextToText.from_pretrained(d)
    p2 = AutoProcessor.from_pretrained(d)
    print("reload: AutoModelForImageTextToText ->", type(m2).__name__, "; AutoProcessor ->", type(p2).__name__,
          type(getattr(p2, "image_processor", None)).__name__)

a, b = images()
user = lambda q, n=1: [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": q}]}]
prompts = [proc.apply_chat_template(user("title?"), add_generation_prompt=True),
           proc.apply_chat_template(user("same author?", 2), add_generation_prompt=True)]
batch = dict(proc(text=prompts, images=[[a], [b, a]], padding=True, padding_side="left", return_tensors="pt"))
print("batch keys:", {k: tuple(v.shape) for k, v in batch.items()})
plain = model(**batch).logits
# row-wise == batched (each row forwarded alone with its own pixels)
rows = [dict(proc(text=[p], images=[im], return_tensors="pt")) for p, im in zip(prompts, [[a], [b, a]])]
d = max(maxdiff(model(**r).logits[0, -1], plain[i, -1]) for i, r in enumerate(rows))
print(f"row alone vs in the left-padded batch, last-token logits: {d:.3e}")
# generate() by the model
hf = model.generate(**batch, max_new_tokens=5, do_sample=False, min_new_tokens=5)[:, batch["input_ids"].shape[1]:]
# hand loop: prefill with pixels, decode with cache (no position ids), G copies
pix = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
for G in (1, 3):
    out = model(**batch, use_cache=True)
    past, logits = out.cache, out.logits[:, -1]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if G > 1:
        past.batch_repeat_interleave(G)
        logits, ids, mask = (x.repeat_interleave(G, 0) for x in (logits, ids, mask))
    full_pix = {k: v.repeat_interleave(G, 0) for k, v in pix.items()}  # this model's pixel tensors are per row [B, ...]
    worst, toks = 0.0, []
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        logits[:, cfg.text_config.eos_token_id] = float("-inf")
        token = logits.argmax(-1) if G == 1 else torch.randint(0, 600, (ids.shape[0],), generator=gen)
        toks.append(token)
        ids = torch.cat([ids, token[:, None]], 1); mask = torch.cat([mask, mask.new_ones(ids.shape[0], 1)], 1)
        out = model(input_ids=token[:, None], attention_mask=mask, cache=past, use_cache=True)
        past, logits = out.cache, out.logits[:, -1]
        ref = model(input_ids=ids, attention_mask=mask, **full_pix).logits[:, -1]
        worst = max(worst, maxdiff(logits, ref))
    extra = f"; == model.generate: {torch.equal(torch.stack(toks, 1), hf)}" if G == 1 else ""
    print(f"G={G}: hand KV-cache decode (no position_ids) vs full recomputation, max diff {worst:.3e}{extra}")
# a folder that is not image-text-to-text
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
with tempfile.TemporaryDirectory() as d:
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(d)
    try:
        AutoModelForImageTextToText.from_pretrained(d)
    except Exception as e:
        print("non-VLM folder:", type(e).__name__, str(e).splitlines()[0][:160])
print("idefics3 / qwen2_5_vl / qwen3_vl / llama in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:",
      [t in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES for t in ("idefics3", "qwen2_5_vl", "qwen3_vl", "llama")])
# generic row subsets: re-running the image processor alone on the rows' images reproduces the pixel keys
again = dict(proc.image_processor(images=[[a], [b, a]], return_tensors="pt"))
print("image_processor alone on the batch's images == processor's pixel keys:",
      all(torch.equal(again[k], batch[k]) for k in pix))
sub = dict(proc.image_processor(images=[[b, a]], return_tensors="pt"))
n = sub["pixel_values"].shape[1]
print("row 1 alone:", {k: tuple(v.shape) for k, v in sub.items()}, "== batch row 1 (first n sub-images):",
      all(torch.equal(sub[k][0], batch[k][1, :n]) for k in pix))
r1 = {k: v[1:2] for k, v in batch.items()}
print(f"row 1 sliced from the batch (pixels [1:2]) vs batch logits: {maxdiff(model(**r1).logits[0], plain[1]):.3e}")

"""Exp 1c: tiny folder saved with the stock processor_class and no video config: what loads it here."""
import sys, tempfile, json, os
sys.path.insert(0, "/tmp/fam")
from common import *
from transformers import AutoProcessor, PaddleOCRVLProcessor

tok = qwen_tokenizer()
proc = qwen25_processor_subclass(tok)
with tempfile.TemporaryDirectory() as d:
    proc.save_pretrained(d)
    cfg = json.load(open(f"{d}/processor_config.json")); cfg["processor_class"] = "Qwen2_5_VLProcessor"
    json.dump(cfg, open(f"{d}/processor_config.json", "w"))
    json.dump({"model_type": "qwen2_5_vl"}, open(f"{d}/config.json", "w"))
    try:
        r = AutoProcessor.from_pretrained(d); print("stock name, no video cfg: AutoProcessor ->", type(r).__name__)
    except Exception as e:
        print("stock name, no video cfg: AutoProcessor:", type(e).__name__, str(e).strip()[:90])
    r = VideoFreeQwen2_5_VLProcessor.from_pretrained(d)
    print("VideoFree.from_pretrained ->", type(r).__name__, type(r.image_processor).__name__)
tok.image_token = "<|image_pad|>"; tok.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
p = PaddleOCRVLProcessor(image_processor=image_processor(), tokenizer=tok, chat_template=tok.chat_template)
with tempfile.TemporaryDirectory() as d:
    p.save_pretrained(d)
    try:
        r = AutoProcessor.from_pretrained(d); print("PaddleOCRVLProcessor reload ->", type(r).__name__, getattr(r, "image_token", None))
    except Exception as e:
        print("PaddleOCRVLProcessor reload:", type(e).__name__, str(e).strip()[:150])

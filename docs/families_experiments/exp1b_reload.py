"""Exp 1b: what AutoProcessor gives back for a saved video-free processor, and for a hub-layout folder."""
import sys, tempfile, json, os
sys.path.insert(0, "/tmp/fam")
from common import *
from transformers import AutoProcessor, Qwen2_5_VLProcessor

tok = qwen_tokenizer()
a, b = images()
for make, mt in ((qwen25_processor_subclass, "qwen2_5_vl"), (qwen3_processor_subclass, "qwen3_vl")):
    proc = make(tok)
    with tempfile.TemporaryDirectory() as d:
        proc.save_pretrained(d)
        print(make.__name__, json.load(open(f"{d}/processor_config.json")))
        r = AutoProcessor.from_pretrained(d)
        print("  AutoProcessor ->", type(r).__name__, "(a processor:" , hasattr(r, "image_processor"), ")")
        # with a config.json of the model type (as a model folder has)
        json.dump({"model_type": mt}, open(f"{d}/config.json", "w"))
        try:
            r = AutoProcessor.from_pretrained(d); print("  +config.json AutoProcessor ->", type(r).__name__)
        except Exception as e:
            print("  +config.json AutoProcessor:", type(e).__name__, str(e)[:200])
        # hub layout: processor_class of the stock class + a video_preprocessor_config.json
        cfg = json.load(open(f"{d}/processor_config.json"))
        cfg["processor_class"] = "Qwen2_5_VLProcessor" if mt == "qwen2_5_vl" else "Qwen3VLProcessor"
        json.dump(cfg, open(f"{d}/processor_config.json", "w"))
        json.dump({"video_processor_type": "Qwen2VLVideoProcessor" if mt == "qwen2_5_vl" else "Qwen3VLVideoProcessor",
                   "processor_class": cfg["processor_class"]}, open(f"{d}/video_preprocessor_config.json", "w"))
        try:
            r = AutoProcessor.from_pretrained(d); print("  hub layout AutoProcessor ->", type(r).__name__)
        except Exception as e:
            print("  hub layout AutoProcessor:", type(e).__name__, str(e)[:200])
        try:
            r = type(proc).from_pretrained(d); print("  hub layout VideoFree*.from_pretrained ->", type(r).__name__,
                                                     type(r.image_processor).__name__, "image_token", r.image_token)
        except Exception as e:
            print("  hub layout VideoFree*.from_pretrained:", type(e).__name__, str(e)[:200])

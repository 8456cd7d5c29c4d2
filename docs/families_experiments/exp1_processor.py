"""Exp 1: tiny Qwen2.5-VL / Qwen3-VL + a processor without torchvision (two routes)."""
import sys, traceback, tempfile
sys.path.insert(0, "/tmp/fam")
import torch
from common import *

tok = qwen_tokenizer()
a, b = images()
prompt = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "title?"}]}],
                                 tokenize=False, add_generation_prompt=True)
print("prompt:", repr(prompt))

# stock Qwen2_5_VLProcessor with video_processor=None
from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor
for cls in (Qwen2_5_VLProcessor, Qwen3VLProcessor):
    try:
        cls(image_processor=image_processor(), tokenizer=tok, video_processor=None, chat_template=tok.chat_template)
        print(cls.__name__, "video_processor=None: OK")
    except Exception as e:
        print(cls.__name__, "video_processor=None:", type(e).__name__, str(e)[:150])

# Route A: subclass
for make in (qwen3_processor_subclass, qwen25_processor_subclass):
  try:
    proc = make(tok)
    out = proc(text=[prompt, prompt], images=[[a], [b]], padding=True, padding_side="left", return_tensors="pt")
    print("route A (subclass): OK keys", {k: tuple(v.shape) for k, v in out.items()})
    print("  grid_thw", out["image_grid_thw"].tolist(), "image tokens per row", (out["input_ids"] == proc.image_token_id).sum(1).tolist())
    print("  mm_token_type_ids sum per row", out["mm_token_type_ids"].sum(1).tolist())
    with tempfile.TemporaryDirectory() as d:
        proc.save_pretrained(d)
        import os; print("  saved:", sorted(os.listdir(d)))
        try:
            from transformers import AutoProcessor
            AutoProcessor.from_pretrained(d)
            print("  AutoProcessor reload: OK")
        except Exception as e:
            print("  AutoProcessor reload:", type(e).__name__, str(e)[:160])
        try:
            re = type(proc).from_pretrained(d)
            print("  subclass.from_pretrained reload: OK", type(re.image_processor).__name__)
        except Exception as e:
            print("  subclass.from_pretrained reload:", type(e).__name__, str(e)[:200])
  except Exception:
    traceback.print_exc()

# Route B: PaddleOCRVLProcessor
try:
    from transformers import PaddleOCRVLProcessor
    tok.image_token = "<|image_pad|>"  # PaddleOCRVLProcessor reads tokenizer.image_token / image_token_id
    tok.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    procB = PaddleOCRVLProcessor(image_processor=image_processor(), tokenizer=tok, chat_template=tok.chat_template)
    outB = procB(text=[prompt, prompt], images=[[a], [b]], padding=True, padding_side="left", return_tensors="pt")
    print("route B (PaddleOCRVLProcessor): OK keys", {k: tuple(v.shape) for k, v in outB.items()})
    same = all(torch.equal(out[k], outB[k]) for k in out)
    print("  identical tensors to route A:", same)
except Exception:
    traceback.print_exc()

for build in (tiny_qwen25, tiny_qwen3):
    m = build(tok)
    n = sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        o = m(**out)
    print(build.__name__, f"{n/1e6:.2f}M params, logits", tuple(o.logits.shape))

"""Exp 8: pixel budget (min_pixels / max_pixels) set on a loaded processor's image processor changes the grid and
the placeholder count consistently."""
import sys
sys.path.insert(0, "/tmp/fam")
import torch
from PIL import Image
from common import *

tok = qwen_tokenizer()
proc = qwen25_processor_subclass(tok)
big = Image.new("RGB", (448, 336), (200, 30, 30))
img = "<|vision_start|><|image_pad|><|vision_end|>"
for budget in (None, (28 * 28 * 4, 28 * 28 * 16), (28 * 28 * 4, 28 * 28 * 64)):
    if budget:
        proc.image_processor.size = {"shortest_edge": budget[0], "longest_edge": budget[1]}
    out = proc(text=[f"{img}x"], images=[[big]], return_tensors="pt")
    print(f"size {proc.image_processor.size}: grid_thw {out['image_grid_thw'].tolist()}, "
          f"placeholders {(out['input_ids'] == proc.image_token_id).sum().item()}, pixel_values {tuple(out['pixel_values'].shape)}")

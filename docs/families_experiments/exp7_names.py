"""Exp 7: Linear module names of tiny Qwen2.5-VL / Qwen3-VL / Idefics3 (for LoRA presets and vision patterns),
and a check of the proposed PRESET_PATTERNS."""
import re, sys
sys.path.insert(0, "/tmp/fam")
import torch
from common import *

tok = qwen_tokenizer()
_TEXT = r"language_model\.layers\.\d+"
LANG = rf".*{_TEXT}\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
VISION = r".*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj|linear_fc1|linear_fc2))$"
MERGER = r".*visual\.(merger|deepstack_merger_list\.\d+)\.(mlp\.\d+|linear_fc1|linear_fc2)$"
for name, m in (("qwen2.5-vl", tiny_qwen25(tok)), ("qwen3-vl", tiny_qwen3(tok))):
    lin = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    groups = {}
    for n in lin:
        key = re.sub(r"\.\d+\.", ".N.", n)
        groups.setdefault(key, 0); groups[key] += 1
    print(name, "linear modules:", groups)
    hit = {k: [n for n in lin if re.fullmatch(p, n)] for k, p in (("language", LANG), ("vision", VISION), ("projector", MERGER))}
    unmatched = [n for n in lin if not any(n in v for v in hit.values())]
    print("  language/vision/projector counts:", {k: len(v) for k, v in hit.items()}, "unmatched:", unmatched)

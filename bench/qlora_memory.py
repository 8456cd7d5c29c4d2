"""Weight memory of a >= 100M-parameter Mllama in fp32, bf16 and 4-bit (NF4, double quant), on CPU.

    python bench/qlora_memory.py [--out /tmp/vlm-align-bench/qlora_memory.json]

A random Mllama is built from transformers' `MllamaConfig` (a scaled-down Llama-3.2-11B-Vision:
same layout, cross-attention every 5th text layer, the same shares of vision tower, embeddings
and LM head as far as a small model allows), saved once, then loaded three times through our
`alignment.models.load_model` (fp32; bf16; 4-bit with `registry.quantization_config`, i.e. NF4,
double quantisation, bf16 compute, vision tower + projector + lm_head kept unquantised by design).

"Weight memory" is the bytes of every parameter and buffer plus, for 4-bit layers, their
quantisation state (absmax, nested absmax, code tables): `get_memory_footprint()` is printed too,
but it misses the quantisation state. The same accounting is then done analytically for the real
Llama-3.2-11B-Vision shape (built on the meta device, no memory), including what the unquantised
vision tower and lm_head cost. Measuring 11B on a GPU needs a lent GPU; none is used here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, print_table, quiet_offline_env, today, versions, write_json  # noqa: E402

quiet_offline_env()

import torch  # noqa: E402

MB = 2**20
TARGET = 0.30
# NF4 with double quantisation: 4 bits a weight, one uint8 absmax per 64-weight block, one fp32
# absmax per 256 blocks (plus two 1 KiB code tables per layer, negligible).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
COMPONENTS = ("vision tower", "projector", "text linears (quantised)", "embed_tokens", "lm_head", "other (norms, gates)")


def small_config():
    """About 150M parameters, shaped like Llama-3.2-11B-Vision at 1/5 width."""
    from transformers import MllamaConfig

    vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=10, num_global_layers=2,
                  attention_heads=4, image_size=224, patch_size=14, max_num_tiles=4,
                  intermediate_layers_indices=[1, 4, 7, 9], vision_output_dim=256 * 5)
    text = dict(vocab_size=10240, hidden_size=768, intermediate_size=2688, num_hidden_layers=15,
                num_attention_heads=12, num_key_value_heads=3, cross_attention_layers=[3, 8, 13],
                tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return MllamaConfig(vision_config=vision, text_config=text)


def llama32_11b_config():
    """Llama-3.2-11B-Vision(-Instruct)'s shape: transformers' MllamaConfig defaults, 560-px tiles."""
    from transformers import MllamaConfig

    config = MllamaConfig()
    config.vision_config.image_size = 560
    return config


def component(name: str) -> str:
    if "vision_model" in name:
        return "vision tower"
    if "multi_modal_projector" in name:
        return "projector"
    if "embed_tokens" in name:
        return "embed_tokens"
    if name.startswith("lm_head"):
        return "lm_head"
    return "text"


def weight_bytes(model) -> dict[str, dict[str, float]]:
    """{component: {"params": n, "bytes": b}} over every parameter and buffer (and 4-bit state)."""
    out = {c: {"params": 0, "bytes": 0} for c in COMPONENTS}
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    seen = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        part = component(name)
        if part == "text":
            part = "text linears (quantised)" if name in linear_weights else "other (norms, gates)"
        state = getattr(tensor, "quant_state", None)
        nbytes = tensor.numel() * tensor.element_size()
        params = tensor.numel()
        if state is not None:
            params = int(torch.Size(state.shape).numel())
            for extra in (state.absmax, state.code, getattr(state.state2, "absmax", None),
                          getattr(state.state2, "code", None)):
                if extra is not None:
                    nbytes += extra.numel() * extra.element_size()
        out[part]["params"] += params
        out[part]["bytes"] += nbytes
    return out


def count_params(model) -> dict[str, int]:
    out = dict.fromkeys(COMPONENTS, 0)
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, p in model.named_parameters():
        part = component(name)
        if part == "text":
            part = "text linears (quantised)" if name in linear_weights else "other (norms, gates)"
        out[part] += p.numel()
    return out


def analytic(params: dict[str, int]) -> dict[str, dict[str, float]]:
    """Bytes per component: fp32, bf16, and 4-bit as our QLoRA loads it (only the text linears
    quantised), plus the hypothetical where vision tower, projector and lm_head were NF4 too."""
    fp32 = {k: 4 * v for k, v in params.items()}
    bf16 = {k: 2 * v for k, v in params.items()}
    q4 = {k: (NF4_BYTES_PER_PARAM if k == "text linears (quantised)" else 2) * v for k, v in params.items()}
    q4_all = {k: (NF4_BYTES_PER_PARAM if k in ("text linears (quantised)", "vision tower", "projector", "lm_head")
                  else 2) * v for k, v in params.items()}
    return {"fp32": fp32, "bf16": bf16, "4bit": q4, "4bit_if_vision_and_lm_head_quantised": q4_all}


def measure(out_path: str) -> dict:
    from transformers import MllamaForConditionalGeneration

    from alignment.models.registry import load_model

    config = small_config()
    results, footprints, timings = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="qlora-memory-") as tmp:
        tick = time.time()
        torch.manual_seed(0)
        model = MllamaForConditionalGeneration(config)
        total = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        timings["build_and_save_s"] = time.time() - tick
        for label, dtype, quant in (("fp32", torch.float32, "none"), ("bf16", torch.bfloat16, "none"),
                                    ("4bit", torch.bfloat16, "4bit")):
            tick = time.time()
            model = load_model(tmp, quantization=quant, dtype=dtype)
            results[label] = weight_bytes(model)
            footprints[label] = model.get_memory_footprint()
            if label == "4bit":
                kinds = {type(m).__name__ for n, m in model.named_modules() if "vision_model" in n or n == "lm_head"}
                quantised = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
                results["_4bit_check"] = {"Linear4bit_modules": quantised,
                                          "vision_or_lm_head_quantised": any("4bit" in k for k in kinds)}
            del model
            timings[f"load_{label}_s"] = time.time() - tick
    check = results.pop("_4bit_check")
    totals = {k: sum(c["bytes"] for c in v.values()) for k, v in results.items()}
    ratio = totals["4bit"] / totals["bf16"]
    skipped = ("vision tower", "projector", "lm_head")
    skipped_bytes = sum(results["4bit"][c]["bytes"] for c in skipped)
    skipped_if_nf4 = sum(results["4bit"][c]["params"] for c in skipped) * NF4_BYTES_PER_PARAM
    ratio_all = (totals["4bit"] - skipped_bytes + skipped_if_nf4) / totals["bf16"]

    print(f"Mllama, random weights, {total / 1e6:.1f}M parameters (CPU; bytes of parameters, buffers and "
          "4-bit quantisation state)")
    rows = []
    for part in COMPONENTS:
        p = results["fp32"][part]["params"]
        rows.append([part, f"{p / 1e6:.2f}M", f"{100 * p / total:.1f}%"]
                    + [f"{results[k][part]['bytes'] / MB:.1f}" for k in ("fp32", "bf16", "4bit")])
    rows.append(["total", f"{total / 1e6:.2f}M", "100%"] + [f"{totals[k] / MB:.1f}" for k in ("fp32", "bf16", "4bit")])
    rows.append(["get_memory_footprint()", "", ""] + [f"{footprints[k] / MB:.1f}" for k in ("fp32", "bf16", "4bit")])
    print_table(rows, ["component", "params", "share", "fp32 MiB", "bf16 MiB", "4-bit MiB"])
    print(f"4-bit / bf16 = {ratio:.3f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'missed'}); "
          f"4-bit / fp32 = {totals['4bit'] / totals['fp32']:.3f}")
    print(f"kept unquantised by design (vision tower, projector, lm_head): {skipped_bytes / MB:.1f} MiB of the 4-bit "
          f"model's {totals['4bit'] / MB:.1f} MiB ({100 * skipped_bytes / totals['4bit']:.0f}%); NF4 would hold them in "
          f"{skipped_if_nf4 / MB:.1f} MiB, giving 4-bit / bf16 = {ratio_all:.3f}. embed_tokens is never quantised "
          f"(bitsandbytes quantises Linear layers only).")
    print(f"{check['Linear4bit_modules']} Linear4bit modules; vision tower or lm_head quantised: "
          f"{check['vision_or_lm_head_quantised']}")

    print("\nLlama-3.2-11B-Vision shape, analytic (parameter count x bytes; NF4 double quant = "
          f"{NF4_BYTES_PER_PARAM:.4f} bytes/param; built on the meta device)")
    from accelerate import init_empty_weights

    with init_empty_weights():
        big = MllamaForConditionalGeneration(llama32_11b_config())
    big_params = count_params(big)
    big_total = sum(big_params.values())
    big_bytes = analytic(big_params)
    GB = 1e9
    rows = [[part, f"{big_params[part] / 1e9:.3f}B", f"{100 * big_params[part] / big_total:.1f}%"]
            + [f"{big_bytes[k][part] / GB:.2f}" for k in ("fp32", "bf16", "4bit")] for part in COMPONENTS]
    big_totals = {k: sum(v.values()) for k, v in big_bytes.items()}
    rows.append(["total", f"{big_total / 1e9:.3f}B", "100%"] + [f"{big_totals[k] / GB:.2f}" for k in ("fp32", "bf16", "4bit")])
    print_table(rows, ["component", "params", "share", "fp32 GB", "bf16 GB", "4-bit GB"])
    big_ratio = big_totals["4bit"] / big_totals["bf16"]
    big_ratio_all = big_totals["4bit_if_vision_and_lm_head_quantised"] / big_totals["bf16"]
    big_skipped = sum(big_bytes["4bit"][c] for c in skipped)
    print(f"11B: 4-bit / bf16 = {big_ratio:.3f} (weights -{100 * (1 - big_ratio):.1f}%); vision tower, projector "
          f"and lm_head kept in bf16 = {big_skipped / GB:.2f} GB of {big_totals['4bit'] / GB:.2f} GB; quantising "
          f"them too would give {big_ratio_all:.3f}. Measuring this on a GPU (allocated bytes after loading) needs "
          "a lent GPU; none was lent to this session.")

    return {
        "model": {"params": total, "config": config.to_dict()["text_config"] | {"vision": config.vision_config.to_dict()}},
        "components": results,
        "totals_bytes": totals,
        "get_memory_footprint_bytes": footprints,
        "ratio_4bit_over_bf16": ratio,
        "ratio_4bit_over_fp32": totals["4bit"] / totals["fp32"],
        "target_ratio": TARGET,
        "target_met": ratio <= TARGET,
        "unquantised_by_design_bytes_4bit": skipped_bytes,
        "ratio_if_vision_projector_lm_head_nf4": ratio_all,
        "quantisation_check": check,
        "llama32_11b_analytic": {"params": big_params, "total_params": big_total, "bytes": big_bytes,
                                 "totals_bytes": big_totals, "ratio_4bit_over_bf16": big_ratio,
                                 "ratio_if_vision_projector_lm_head_nf4": big_ratio_all,
                                 "gpu_measurement": "not run: needs a lent GPU (none in this session)"},
        "timings_s": timings,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/vlm-align-bench/qlora_memory.json")
    args = parser.parse_args(argv)
    start = time.time()
    torch.set_num_threads(1)
    result = measure(args.out)
    elapsed = time.time() - start
    payload = {**result, "machine": machine(), "date": today(), "seconds": round(elapsed, 1),
               "versions": versions("torch", "transformers", "bitsandbytes", "accelerate"),
               "notes": ["weight bytes = every parameter and buffer, plus the 4-bit layers' quantisation state "
                         "(absmax, nested absmax, code tables); get_memory_footprint() omits the latter.",
                         "4-bit = alignment.models.registry.quantization_config('4bit'): NF4, double quant, bf16 "
                         "compute; vision tower, projector and lm_head unquantised (QUANT_SKIP_MODULES)."]}
    path = write_json(args.out, payload)
    print(f"\nwrote {path} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

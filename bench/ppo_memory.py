"""Peak memory of PPO with one shared 4-bit base vs. four separately loaded models.

    python bench/ppo_memory.py [--out /tmp/vlm-align-bench/ppo_memory.json] [--hidden 1024] [--layers 12]

Builds an Mllama whose text model is big enough for the weights to matter (default: text hidden
2048, 16 self-attention + 2 cross-attention layers, MLP 8192, 1.1B parameters; the tiny 112-px
vision tower and the tiny tokenizer), with random weights, saved once to a temp folder; 4-bit NF4
and gradient checkpointing, as the 11B recipe runs. Then, in one fresh
subprocess per variant (so peaks cannot mix), it loads the model(s), sets up `PPOStage` and runs
one PPO iteration (rollout of 4 prompts x 8 sampled tokens, reference, critic and reward passes,
one clipped policy + value update):

- `shared`: one 4-bit base carrying the actor (`policy`), the reference (frozen copy), the critic
  and the reward model as LoRA adapters + heads (the default, `separate_models: false`);
- `separate`: actor, reference, critic and reward each on a 4-bit base of its own
  (`separate_models: true`).

Measured per variant:
- torch memory = bytes of every tensor the models hold after setup (weights, quantisation
  state, adapters, heads; storage counted once) + the peak of the torch allocator's running
  allocations during the iteration (rollout, activations, gradients, optimizer state), from
  torch.profiler. This is what a GPU would have to hold. (On CPU, bitsandbytes repacks each
  base's 4-bit weights on its first forward, about a base's weight size again; that lands in the
  iteration peak, once per base.)
- peak RSS above the process's RSS after imports (ru_maxrss): the whole process, including
  transient full-precision copies while bitsandbytes quantises on load and allocator slack.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, peak_step_memory_mb, print_table, quiet_offline_env, today, versions, write_json  # noqa: E402

quiet_offline_env()

GOAL = 0.35


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_model(folder: Path, hidden: int, layers: int, intermediate: int) -> int:
    """A random-weight Mllama with a big text model and the tiny vision tower, tokenizer and
    processor, saved to `folder` (bf16 safetensors); returns its parameter count."""
    import torch
    from transformers import MllamaForConditionalGeneration

    from alignment.models import mllama
    from alignment.models.registry import resolve_model_path

    tiny = Path(resolve_model_path("tiny-mllama"))
    folder.mkdir(parents=True, exist_ok=True)
    for file in tiny.iterdir():
        if file.suffix in (".json", ".jinja") and file.name not in ("config.json", "generation_config.json"):
            shutil.copy2(file, folder / file.name)
    from alignment.models import load_processor

    tokenizer = load_processor("tiny-mllama").tokenizer
    config = mllama.tiny_config(tokenizer)
    text = config.text_config
    text.hidden_size, text.intermediate_size = hidden, intermediate
    text.num_attention_heads, text.num_key_value_heads = hidden // 64, hidden // 128
    text.num_hidden_layers = layers + 2
    text.cross_attention_layers = [layers // 3, 2 * layers // 3 + 1]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # half the memory while building
    try:
        model = MllamaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    mllama.open_cross_attention_gates(model)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def prepare_adapters(model_dir: Path, work: Path) -> None:
    """An "SFT" policy adapter and a reward adapter + head for the PPO stage to start from."""
    from alignment.policy import LoraSpec, MultimodalPolicy

    policy = MultimodalPolicy.from_pretrained(str(model_dir), quantization="4bit", gradient_checkpointing=True)
    policy.add_adapter("policy", LoraSpec(r=16))
    policy.add_adapter("reward", LoraSpec(r=16), head=True)
    policy.save_adapter("policy", work / "sft")
    policy.save_adapter("reward", work / "reward")


def tensor_bytes(models) -> int:
    """Bytes of every tensor the models hold (parameters and buffers, bitsandbytes quant state),
    each storage counted once."""
    import torch

    seen, total = set(), 0

    def add(tensor):
        nonlocal total
        if not torch.is_tensor(tensor):
            return
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and storage.nbytes() > 0:
            seen.add(key)
            total += storage.nbytes()

    for model in models:
        for tensor in list(model.parameters()) + list(model.buffers()):
            add(tensor)
            state = getattr(tensor, "quant_state", None)
            if state is not None:
                for value in vars(state).values():
                    add(value)
                    if hasattr(value, "absmax"):  # nested (double) quantisation
                        add(value.absmax)
                        add(getattr(value, "code", None))
    return total


def child(variant: str, model_dir: Path, work: Path, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from alignment.data import build_datasets
    from alignment.policy import MultimodalPolicy
    from alignment.recipe import make_accelerator, recipe_from_dict
    from alignment.stages import PPOStage, RunContext

    train, evaluation, _ = build_datasets(num_covers=20, seed=0, task="sft", max_eval_samples=4)
    baseline = rss_mb()
    start = time.time()
    recipe = recipe_from_dict({
        "output_dir": str(work / variant),
        "stages": [{"type": "ppo", "name": "ppo", "max_steps": 1, "batch_size": 4, "num_minibatches": 1,
                    "ppo_epochs": 1, "max_new_tokens": 8, "temperature": 1.0, "eval_batch_size": 4,
                    "save_every": 1000, "init_adapter": str(work / "sft"), "reward_adapter": str(work / "reward"),
                    "separate_models": variant == "separate", "lora": {"r": 16, "alpha": 32}}],
        "model": {"name": str(model_dir), "quantization": "4bit", "gradient_checkpointing": True},
    })

    def load_policy():
        return MultimodalPolicy.from_pretrained(str(model_dir), quantization="4bit", gradient_checkpointing=True)

    ctx = RunContext(accelerator=make_accelerator(recipe), output_dir=work / variant, load_policy=load_policy)
    stage = PPOStage(recipe.stages[0], load_policy(), ctx, train, evaluation)
    stage.setup(None)
    models = list({id(m): m for m in stage.models.values()}.values())
    static = tensor_bytes(models) / 2**20
    loaded = time.time() - start
    dynamic, _ = peak_step_memory_mb(stage.train)
    result = {
        "variant": variant, "bases": len(models), "static_mb": static, "iteration_peak_mb": dynamic,
        "torch_mb": static + dynamic,
        "peak_rss_above_baseline_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline,
        "baseline_rss_mb": baseline, "load_s": loaded, "iteration_s": time.time() - start - loaded,
        "score": stage.history[-1].get("score"),
    }
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/vlm-align-bench/ppo_memory.json")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16, help="self-attention layers (2 cross-attention added)")
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--child", choices=("shared", "separate"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model_dir, args.work, args.result)
        return

    work = Path(tempfile.mkdtemp(prefix="ppo-memory-"))
    try:
        started = time.time()
        model_dir = work / "model"
        params = build_model(model_dir, args.hidden, args.layers, args.intermediate)
        prepare_adapters(model_dir, work)
        results = {}
        for variant in ("shared", "separate"):
            result_file = work / f"{variant}.json"
            cmd = [sys.executable, __file__, "--child", variant, "--model-dir", str(model_dir), "--work", str(work),
                   "--result", str(result_file)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results[variant] = json.loads(result_file.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shared, separate = results["shared"], results["separate"]
    ratio_torch = shared["torch_mb"] / separate["torch_mb"]
    ratio_rss = shared["peak_rss_above_baseline_mb"] / separate["peak_rss_above_baseline_mb"]
    rows = [[v["variant"], v["bases"], round(v["static_mb"], 1), round(v["iteration_peak_mb"], 1),
             round(v["torch_mb"], 1), round(v["peak_rss_above_baseline_mb"], 1), round(v["load_s"], 1),
             round(v["iteration_s"], 1)] for v in (shared, separate)]
    rows.append(["shared / separate", "", "", "", round(ratio_torch, 3), round(ratio_rss, 3), "", ""])
    print(f"Mllama, text hidden {args.hidden}, {args.layers}+2 layers, MLP {args.intermediate}: "
          f"{params / 1e6:.0f}M parameters; 4-bit NF4; one PPO iteration")
    table = print_table(rows, ["variant", "bases", "weights+adapters MiB", "iteration peak MiB", "torch MiB",
                               "peak RSS MiB", "load s", "iteration s"])
    print(f"goal: shared <= {GOAL}x separate (torch memory): {'met' if ratio_torch <= GOAL else 'NOT met'}")
    write_json(args.out, {
        "benchmark": "ppo_memory", "date": today(), "machine": machine(),
        "versions": versions("torch", "transformers", "peft", "bitsandbytes"),
        "model": {"text_hidden": args.hidden, "text_layers": args.layers + 2, "intermediate": args.intermediate,
                  "parameters": params, "quantization": "4bit"},
        "results": results, "ratio_torch": ratio_torch, "ratio_peak_rss": ratio_rss, "goal": GOAL,
        "seconds": time.time() - started, "table": table,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

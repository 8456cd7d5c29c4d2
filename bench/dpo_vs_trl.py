"""Race our DPO step against TRL's `DPOTrainer` on a tiny LLaVA, side by side in one process.

    python bench/dpo_vs_trl.py [--out /tmp/vlm-align-bench/dpo_vs_trl.json] [--steps 20] [--no-precompute]

Both sides start from the same saved checkpoint (one per shape, written to a temp dir), train the
same LoRA (same target modules, r, alpha, dropout 0; our adapter's initial A/B copied into TRL's),
on the same pre-collated batches of our synthetic preference pairs (converted to TRL's
prompt/chosen/rejected/images format), with AdamW at the same lr, beta 0.1, constant lr, no
gradient clipping, fp32 on CPU. Steps are A/B interleaved (the order flips every step) and timed
after warm-up; collation is done before timing for both sides and reported apart.

Ours: `DPOStage.train_step` (each pair one packed row, its image + prompt prefix through the language
model once (`share_prefix`), each image encoded once and its features shared by policy and reference,
reference = adapter off) + backward + AdamW step.
TRL 1.16: `trainer.training_step(model, inputs)` (policy forward with its fused LM head, reference
forward with the adapter disabled, backward) + the same AdamW step. TRL re-encodes every image in
each of its two forwards, for the chosen and the rejected row: 4 images through the tower per pair.

A third arm, "ours+pre", runs our stage with `precompute_ref_logprobs=True` (a real option of our
library): one reference pass over the training pairs before the race (timed and reported apart),
then no reference forward in the step. TRL refuses this option for vision datasets.

TRL cannot run Mllama (Llama 3.2 Vision) DPO: its vision collator concatenates completions to the
prompt's input_ids but keeps the prompt-only `cross_attention_mask`, so the forward fails on a
shape mismatch; LLaVA (image tokens spliced into the text) is where the two can race.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ImageCounter,
    machine,
    median,
    peak_step_memory_mb,
    print_table,
    quiet_offline_env,
    today,
    versions,
    write_json,
)

quiet_offline_env()

import torch  # noqa: E402

LR = 5e-4
BETA = 0.1
LORA_R, LORA_ALPHA = 16, 32
WARMUP = 3
TRL_MLLAMA_NOTE = ("TRL 1.16 DPOTrainer cannot train Mllama (Llama 3.2 Vision): DataCollatorForVisionPreference "
                   "keeps the prompt-only cross_attention_mask ([B, prompt_len, 1, tiles]) while input_ids grow by "
                   "the completion, so the forward fails ('The size of tensor a (57) must match the size of "
                   "tensor b (33)' on tiny-mllama, checked 2026-11); the race runs on LLaVA.")

# name -> how the tiny LLaVA and the data differ from the built-in tiny-llava.
SHAPES = {
    # 112 px / patch 14 = 64 image tokens; answers lengthened to ~110-135 tokens.
    "text_heavy": dict(image_size=112, vision={}, answer_tokens=110, pairs=4),
    # 336 px / patch 14 = 576 image tokens; the synthetic data's own short answers (1-25 tokens).
    # In Llama 3.2 Vision one image (ViT-H, 40 layers over 4 x 1,601 patches) costs as much as
    # 5.7-10.6 text rows of 128-48 tokens through the 8B text model, 3.3 at 256 tokens
    # (`llama32_11b_image_to_row_cost`). tiny-llava's 3-layer, 96-wide tower costs 0.2 of a row,
    # so this shape widens and deepens the tower to about 4 rows: still less vision-heavy than
    # Llama 3.2 Vision with short answers.
    "vision_heavy": dict(image_size=336, vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                                                     num_attention_heads=4, projection_dim=256),
                         answer_tokens=None, pairs=2),
    # The same 576 image tokens with tiny-llava's own small tower (0.2 of a row): the proportions
    # of a LLaVA with a small CLIP, where the language model dominates every step.
    "vision_heavy_small_tower": dict(image_size=336, vision={}, answer_tokens=None, pairs=2),
    # The repo's real-geometry LLaVA stand-in (CLIP 336 px: 576 image tokens, Llama 3's 128,256-token
    # vocabulary and ids, `<image>`, small widths): not run by default (`--shapes standin_llava`).
    "standin_llava": dict(standin="standin-llava", image_size=336, vision={}, answer_tokens=None, pairs=2),
}
DEFAULT_SHAPES = ("text_heavy", "vision_heavy", "vision_heavy_small_tower")


def image_macs(layers: int, patches: int, hidden: int, intermediate: int) -> float:
    """Multiply-adds of one image through a ViT: q/k/v/o and MLP linears, attention scores and mix."""
    return layers * patches * (4 * hidden**2 + 2 * hidden * intermediate + 2 * patches * hidden)


def row_macs(layers: int, tokens: float, hidden: int, kv_hidden: int, intermediate: int, vocab: int,
             cross_layers: int = 0, states: int = 0) -> float:
    """Multiply-adds of one text row's forward (gated MLP, GQA, LM head on every position), plus
    the K/V projections of `states` image states in each of `cross_layers` cross-attention layers."""
    per_layer = 2 * hidden**2 + 2 * hidden * kv_hidden + 3 * hidden * intermediate + 2 * tokens * hidden
    return layers * tokens * per_layer + tokens * hidden * vocab + cross_layers * states * 2 * hidden * kv_hidden


def llama32_11b_image_to_row_cost(tokens: int) -> float:
    """Llama-3.2-11B-Vision: vision 32+8 layers x 1280 (MLP 5120) over 4 tiles x 1,601 patches;
    text 40 layers x 4096 (MLP 14336, 8 KV heads of 128, 8 of them cross-attention), vocab 128,256."""
    return image_macs(40, 4 * 1601, 1280, 5120) / row_macs(40, tokens, 4096, 1024, 14336, 128256, 8, 4 * 1601)


# ----------------------------------------------------------------------------- models and data
def build_checkpoint(shape: dict, folder: Path):
    """Save a random tiny LLaVA (seed 0) and its processor for this shape (a stand-in: its cached folder);
    returns the folder."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from alignment.models import llava, load_processor, resolve_model_path

    if "standin" in shape:
        return Path(resolve_model_path(shape["standin"]))

    tokenizer = load_processor("tiny-llava").tokenizer
    config = llava.tiny_config(tokenizer)
    size = shape["image_size"]
    config.vision_config.image_size = size
    for key, value in shape["vision"].items():
        setattr(config.vision_config, key, value)
    config.image_seq_length = (size // llava.PATCH_SIZE) ** 2
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=llava.PATCH_SIZE,
                   vision_feature_select_strategy="default", chat_template=tokenizer.chat_template,
                   image_token="<|image|>", num_additional_image_tokens=1).save_pretrained(folder)
    return folder


def lengthen(answer: str, tokens: int, tokenizer) -> str:
    """`answer` followed by explaining sentences until it has at least `tokens` tokens."""
    from alignment.data.catalog import VERBOSE_TEMPLATES

    text, i = answer, 0
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += " " + VERBOSE_TEMPLATES[i % len(VERBOSE_TEMPLATES)].format(answer=answer)
        i += 1
    return text


def make_pairs(n: int, answer_tokens: int | None, tokenizer) -> list[dict]:
    from alignment.data import build_datasets

    train, _, _ = build_datasets("synthetic_bookcover", task="preference", num_covers=60, seed=0)
    if len(train) < n:
        raise RuntimeError(f"need {n} pairs, the synthetic set has {len(train)}")
    pairs = [dict(e) for e in train[:n]]
    if answer_tokens:
        for e in pairs:
            e["chosen"] = lengthen(e["chosen"], answer_tokens, tokenizer)
            e["rejected"] = lengthen(e["rejected"], answer_tokens, tokenizer)
    return pairs


def to_trl(example: dict, processor) -> dict:
    """Our preference example in TRL's standard (non-conversational) vision format, rendered with the
    processor's chat template and image placeholder as our collator renders it (`prompt_format`)."""
    from alignment.data.prompts import prompt_format

    fmt = prompt_format(processor)
    return {"prompt": fmt.prompt(example["question"]), "chosen": fmt.completion(example["chosen"]),
            "rejected": fmt.completion(example["rejected"]), "images": [example["image"]]}


# ----------------------------------------------------------------------------- the two sides
class Ours:
    """Our DPO stage driven one optimizer step at a time (what `Stage._optimizer_step` does, minus
    collation, the lr schedule and clipping, which are off or constant for both sides)."""

    def __init__(self, folder: Path, pool: list[dict], pairs: int, precompute: bool, workdir: Path):
        from alignment.config import DPOConfig, LoraConfig
        from alignment.policy import MultimodalPolicy
        from alignment.stages.base import RunContext
        from alignment.stages.dpo import DPOStage

        self.policy = MultimodalPolicy.from_pretrained(str(folder))
        config = DPOConfig(name="dpo", batch_size=pairs, lr=LR, beta=BETA, max_grad_norm=None, lr_schedule="constant",
                           precompute_ref_logprobs=precompute,
                           lora=LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, preset="language"))
        from accelerate import Accelerator

        ctx = RunContext(accelerator=Accelerator(cpu=True, mixed_precision="no"), output_dir=workdir, seed=0)
        self.stage = DPOStage(config, self.policy, ctx, train_examples=pool, eval_examples=[])
        torch.manual_seed(0)
        self.stage.setup(None)
        self.params = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        self.precompute_s = None
        if precompute:
            tick = time.perf_counter()
            self.stage.before_training()
            self.precompute_s = time.perf_counter() - tick
        self.policy.train()
        self.counter = ImageCounter(self.policy.base_model.model.vision_tower)

    @property
    def targets(self) -> list[str]:
        """The exact module names our `language` preset put LoRA on."""
        from alignment.policy import resolve_preset

        return resolve_preset(self.policy.base_model, "language")

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {n.replace(".policy.", ".default."): p.detach().clone()
                for n, p in self.policy.model.named_parameters() if ".lora_" in n and ".policy." in n}

    def collate(self, examples):
        return self.stage.collate(examples)

    def step(self, batch) -> float:
        loss_sum, _ = self.stage.train_step(batch)
        loss = loss_sum / batch["num_pairs"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def chosen_logps(self, batch) -> float:
        with torch.no_grad():
            logps = self.policy.completion_logprobs(batch)[1]
        return logps[: batch["num_pairs"]].mean().item()

    def breakdown(self, batch) -> dict[str, float]:
        """One step split into our library's calls (untimed in the race; for the profile)."""
        from alignment.losses import dpo_loss

        stage, out = self.stage, {}
        tick = time.perf_counter()
        policy_features, reference_features = stage._encode(batch)
        out["encode_s"] = time.perf_counter() - tick
        t = time.perf_counter()
        logps = self.policy.completion_logprobs(batch, policy_features)[1]
        out["policy_forward_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ref = stage._reference_logps(batch, reference_features)
        out["reference_s"] = time.perf_counter() - t
        n = batch["num_pairs"]
        losses, _, _ = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=BETA)
        t = time.perf_counter()
        (losses.sum() / n).backward()
        out["backward_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out["optimizer_s"] = time.perf_counter() - t
        out["total_s"] = time.perf_counter() - tick
        return out


def adopt_lora(trainer, lora_state: dict, lr: float):
    """Copy our initial LoRA weights into a TRL trainer's PEFT model, check it trains exactly that
    parameter set, and give it our AdamW; returns (model in train mode, optimizer, vision-call counter)."""
    model = trainer.model
    params = dict(model.named_parameters())
    missing = sorted(set(lora_state) - set(params))
    if missing:
        raise RuntimeError(f"TRL's LoRA lacks {len(missing)} of our parameters, e.g. {missing[:2]}")
    with torch.no_grad():
        for name, value in lora_state.items():
            params[name].copy_(value)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if sum(p.numel() for p in trainable) != sum(v.numel() for v in lora_state.values()):
        raise RuntimeError("TRL trains a different parameter set than ours")
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    trainer.optimizer = optimizer
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    return model, optimizer, ImageCounter(model.get_base_model().model.vision_tower)


class TRL:
    """TRL's DPOTrainer, its training step driven by hand with the same AdamW."""

    def __init__(self, folder: Path, pool: list[dict], pairs: int, targets: list[str], lora_state: dict,
                 workdir: Path):
        import datasets
        from peft import LoraConfig
        from transformers import AutoModelForImageTextToText
        from trl import DPOConfig, DPOTrainer

        from alignment.models import load_processor

        model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
        processor = load_processor(str(folder))
        args = DPOConfig(
            output_dir=str(workdir / "trl"), per_device_train_batch_size=pairs, learning_rate=LR, beta=BETA,
            loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False, padding_free=False,
            gradient_checkpointing=False, disable_dropout=True, lr_scheduler_type="constant", weight_decay=0.0,
            max_grad_norm=0.0, report_to="none", push_to_hub=False, save_strategy="no", logging_strategy="no",
            use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, dataloader_pin_memory=False, seed=0,
        )
        peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets,
                                 bias="none", task_type="CAUSAL_LM")
        self.processor = processor
        dataset = datasets.Dataset.from_list([to_trl(e, processor) for e in pool[:8]])
        self.trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                                  peft_config=peft_config)
        self.model, self.optimizer, self.counter = adopt_lora(self.trainer, lora_state, LR)

    def collate(self, examples):
        return self.trainer.data_collator([to_trl(e, self.processor) for e in examples])

    def step(self, inputs) -> float:
        loss = self.trainer.training_step(self.model, inputs)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.trainer._metrics["train"].clear()
        return loss.item()

    def chosen_logps(self, inputs) -> float:
        self.trainer._metrics["train"].clear()
        with torch.no_grad():
            self.trainer.compute_loss(self.model, self.trainer._prepare_inputs(inputs))
        value = self.trainer._metrics["train"]["logps/chosen"][0]
        self.trainer._metrics["train"].clear()
        return value


# ----------------------------------------------------------------------------- the race
def image_to_row_cost(folder: Path, tokens_per_row: float) -> float:
    """Analytic multiply-adds of one image through the checkpoint's vision tower over one text
    row's forward of `tokens_per_row` tokens (image tokens included, as LLaVA splices them in)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    v, t = config.vision_config, config.text_config
    image = image_macs(v.num_hidden_layers, (v.image_size // v.patch_size) ** 2 + 1, v.hidden_size,
                       v.intermediate_size)
    kv = t.hidden_size * t.num_key_value_heads // t.num_attention_heads
    return image / row_macs(t.num_hidden_layers, tokens_per_row, t.hidden_size, kv, t.intermediate_size, t.vocab_size)


def race(name: str, shape: dict, steps: int, precompute: bool, workdir: Path) -> dict:
    from alignment.models import load_processor

    print(f"\n=== {name}: building the checkpoint and data", flush=True)
    folder = build_checkpoint(shape, workdir / name / "model")
    processor = load_processor(str(folder))
    pairs_per_batch = shape["pairs"]
    n_batches = WARMUP + 1 + steps
    pool = make_pairs(pairs_per_batch * n_batches, shape["answer_tokens"], processor.tokenizer)

    ours = Ours(folder, pool, pairs_per_batch, precompute=False, workdir=workdir / name)
    trl = TRL(folder, pool, pairs_per_batch, ours.targets, ours.lora_state(), workdir / name)
    arms = {"ours": ours, "trl": trl}
    if precompute:
        arms["ours+pre"] = Ours(folder, pool, pairs_per_batch, precompute=True, workdir=workdir / name)

    batches = {k: [] for k in arms}
    collate_s = {k: [] for k in arms}
    for b in range(n_batches):
        examples = pool[b * pairs_per_batch : (b + 1) * pairs_per_batch]
        for key, arm in arms.items():
            tick = time.perf_counter()
            batches[key].append(arm.collate(copy.copy(examples)))
            collate_s[key].append(time.perf_counter() - tick)
    first = batches["ours"][0]
    rows, length = first["input_ids"].shape
    image_tokens = int((first["input_ids"][0] == ours.policy.config.image_token_id).sum())
    completion = (first["labels"] != -100).sum(1).float()
    if batches["trl"][0]["input_ids"].shape != first["input_ids"].shape:
        raise RuntimeError(f"padded shapes differ: ours {tuple(first['input_ids'].shape)}, "
                           f"TRL {tuple(batches['trl'][0]['input_ids'].shape)}")
    print(f"{name}: {pairs_per_batch} pairs/step ({rows} rows x {length} tokens; {image_tokens} image tokens, "
          f"completion {int(completion.min())}-{int(completion.max())} tokens); "
          f"LoRA on {len(ours.targets)} modules; {WARMUP} warm-up + 1 memory + {steps} timed steps per arm",
          flush=True)

    logps0 = {"ours": ours.chosen_logps(first), "trl": trl.chosen_logps(batches["trl"][0])}
    losses = {k: [] for k in arms}
    times = {k: [] for k in arms}
    peak_mb = {}
    images = {k: 0 for k in arms}
    order = list(arms)
    for i in range(n_batches):
        timed = i > WARMUP
        for key in order if i % 2 == 0 else order[::-1]:
            arm = arms[key]
            arm.counter.reset()
            batch = batches[key][i]
            if i == WARMUP:  # after warm-up, one untimed step per arm under the memory profiler
                peak_mb[key], loss = peak_step_memory_mb(lambda arm=arm, batch=batch: arm.step(batch))
            else:
                tick = time.perf_counter()
                loss = arm.step(batch)
                elapsed = time.perf_counter() - tick
                if timed:
                    times[key].append(elapsed)
                    images[key] += arm.counter.images
            losses[key].append(loss)
        if i == 0 or timed and (i - WARMUP) % 5 == 0:
            print(f"  step {i}: " + ", ".join(f"{k} {times[k][-1] if times[k] else float('nan'):.3f}s "
                                              f"loss {losses[k][-1]:.6f}" for k in arms), flush=True)
    profile = ours.breakdown(batches["ours"][0])

    tokens_per_row = float(batches["ours"][0]["attention_mask"].sum(1).float().mean())
    result = {
        "name": name,
        "ours_step_s": median(times["ours"]),
        "trl_step_s": median(times["trl"]),
        "ours_loss0": losses["ours"][0],
        "trl_loss0": losses["trl"][0],
        "ours_vision_calls_per_pair": images["ours"] / (steps * pairs_per_batch),
        "trl_vision_calls_per_pair": images["trl"] / (steps * pairs_per_batch),
        "ours_peak_mb": peak_mb["ours"],
        "trl_peak_mb": peak_mb["trl"],
        # extras
        "speedup": median(times["trl"]) / median(times["ours"]),
        "loss0_abs_diff": abs(losses["ours"][0] - losses["trl"][0]),
        "ln2_abs_diff": abs(losses["ours"][0] - math.log(2)),
        "loss_max_abs_diff_all_steps": max(abs(a - b) for a, b in zip(losses["ours"], losses["trl"])),
        "logps_chosen0": logps0,
        "losses": {k: v for k, v in losses.items()},
        "step_s_all": times,
        "collate_s_median": {k: median(v) for k, v in collate_s.items()},
        "pairs_per_step": pairs_per_batch,
        "rows_x_tokens": [rows, length],
        "image_tokens": image_tokens,
        "completion_tokens_min_max": [int(completion.min()), int(completion.max())],
        "image_to_row_cost": image_to_row_cost(folder, tokens_per_row),
        "ours_profile_one_step": profile,
        "config": {"image_size": shape["image_size"], "vision": shape["vision"], "answer_tokens": shape["answer_tokens"]},
    }
    if precompute:
        pre = arms["ours+pre"]
        result.update({
            "ours_pre_step_s": median(times["ours+pre"]),
            "ours_pre_speedup": median(times["trl"]) / median(times["ours+pre"]),
            "ours_pre_vision_calls_per_pair": images["ours+pre"] / (steps * pairs_per_batch),
            "ours_pre_peak_mb": peak_mb["ours+pre"],
            "ours_pre_loss_max_abs_diff_vs_ours": max(abs(a - b) for a, b in zip(losses["ours"], losses["ours+pre"])),
            "ours_pre_precompute_s": pre.precompute_s,
            "ours_pre_precompute_s_per_step": pre.precompute_s / n_batches,
            # every pair seen once: the one-time reference pass is paid in full by that epoch
            "ours_pre_one_epoch_speedup": median(times["trl"]) / (median(times["ours+pre"])
                                                                  + pre.precompute_s / n_batches),
        })
    for arm in arms.values():
        arm.counter.remove()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/vlm-align-bench/dpo_vs_trl.json")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm after warm-up (>= 20 for the record)")
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma-separated subset of {list(SHAPES)}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady figures on a CPU shared with other jobs)")
    parser.add_argument("--no-precompute", action="store_true", help="skip the ours+precompute_ref_logprobs arm")
    args = parser.parse_args(argv)

    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(TRL_MLLAMA_NOTE)
    results = []
    with tempfile.TemporaryDirectory(prefix="dpo-vs-trl-") as tmp:
        for name in args.shapes.split(","):
            results.append(race(name, SHAPES[name], args.steps, not args.no_precompute, Path(tmp)))

    print(f"\nDPO step, ours vs TRL {versions('trl')['trl']} (tiny LLaVA, fp32, CPU; median of {args.steps} "
          "interleaved steps; peak = torch CPU allocations during one step above its start)")
    header = ["shape", "rows x tokens", "img tok", "ours s/step", "TRL s/step", "TRL/ours", "ours loss0",
              "TRL loss0", "vision/pair ours", "vision/pair TRL", "ours peak MB", "TRL peak MB"]
    table = [[r["name"], "x".join(map(str, r["rows_x_tokens"])), r["image_tokens"], r["ours_step_s"],
              r["trl_step_s"], f"{r['speedup']:.2f}x", f"{r['ours_loss0']:.6f}", f"{r['trl_loss0']:.6f}",
              r["ours_vision_calls_per_pair"], r["trl_vision_calls_per_pair"], r["ours_peak_mb"], r["trl_peak_mb"]]
             for r in results]
    print_table(table, header)
    if not args.no_precompute:
        print("\nours with precompute_ref_logprobs=True (reference pass done once before training)")
        print_table([[r["name"], r["ours_pre_step_s"], f"{r['ours_pre_speedup']:.2f}x",
                      r["ours_pre_precompute_s_per_step"], f"{r['ours_pre_one_epoch_speedup']:.2f}x",
                      r["ours_pre_vision_calls_per_pair"], r["ours_pre_peak_mb"],
                      f"{r['ours_pre_loss_max_abs_diff_vs_ours']:.2e}"] for r in results],
                    ["shape", "s/step", "TRL/ours", "one-time ref pass s per batch", "TRL/ours, 1 epoch",
                     "vision/pair", "peak MB", "max |loss - ours|"])
    print("\nchecks and profile")
    print_table([[r["name"], f"{r['loss0_abs_diff']:.2e}", f"{r['ln2_abs_diff']:.2e}",
                  f"{r['loss_max_abs_diff_all_steps']:.2e}",
                  f"{r['logps_chosen0']['ours']:.4f} / {r['logps_chosen0']['trl']:.4f}",
                  f"{r['image_to_row_cost']:.2f}",
                  " ".join(f"{k[:-2]} {v:.3f}" for k, v in r["ours_profile_one_step"].items()),
                  f"{r['collate_s_median']['ours']:.3f} / {r['collate_s_median']['trl']:.3f}"] for r in results],
                ["shape", "|loss0 ours-TRL|", "|loss0-ln2|", "max |loss diff| all steps", "logp chosen0 ours/TRL",
                 "image/row cost", "ours step split (s)", "collate s ours/TRL"])
    llama = {t: round(llama32_11b_image_to_row_cost(t), 2) for t in (48, 64, 128, 256)}
    print("\nimage/row cost = analytic multiply-adds of one image through the vision tower over one text row's "
          f"forward; Llama-3.2-11B-Vision at 48/64/128/256-token rows: {' / '.join(map(str, llama.values()))}")
    elapsed = time.time() - start
    payload = {"shapes": results, "machine": machine(), "date": today(), "seconds": round(elapsed, 1),
               "versions": versions("torch", "transformers", "trl", "peft", "accelerate"),
               "settings": {"lr": LR, "beta": BETA, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0,
                            "optimizer": "torch AdamW, weight_decay 0, constant lr, no clipping", "dtype": "float32",
                            "warmup_steps": WARMUP, "timed_steps": args.steps},
               "llama32_11b_image_to_row_cost": llama,
               "notes": [TRL_MLLAMA_NOTE,
                         "vision calls per pair = images through the vision tower per preference pair per step "
                         "(a forward hook sums the pixel batch of every tower call).",
                         "peak_mb = highest running total of torch CPU allocations minus frees during one "
                         "post-warm-up training step (torch.profiler memory events), above the step's start; "
                         "weights and optimizer state are not counted."]}
    path = write_json(args.out, payload)
    print(f"\nwrote {path} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Race our GRPO step against TRL's `GRPOTrainer` (HF generate, no vLLM) on a tiny LLaVA, side by side
in one process.

    python bench/grpo_vs_trl.py [--out /tmp/vlm-align-bench/grpo_vs_trl.json] [--steps 6] [--warmup 2]
                                [--shapes text_heavy,vision_heavy] [--generations 4] [--prompts N]
                                [--threads 1]

One step = one prompt batch: sample G answers to each of P prompts, score them, group advantages,
one policy-gradient update (one update per rollout, so the importance ratio is exactly 1 and neither
side computes old log-probs; beta / kl_beta 0, so neither runs a reference pass), AdamW step.

Both sides start from the same saved checkpoint (`dpo_vs_trl.build_checkpoint`, one per shape, in a
temp dir), train the same LoRA (our `language` preset's exact module names, r 16, alpha 32, dropout
0; our adapter's initial A/B copied into TRL's PEFT adapter), see the same P prompts and images at
step i (our synthetic book covers; the prompt is our chat-template rendering, given to TRL as the
conversational user turn [image, " {instruction} {question}"], which renders to the same token ids:
checked and reported), with G, max_new_tokens, temperature 1, top_p 1, no top-k, the same reward
(our built-in `exact_match`, given to TRL as a plain function of its `completions` and the
dataset's `answer` column), group z-score advantages (eps 1e-4 on both), token-mean loss
aggregation (ours `token_mean` = TRL `loss_type="dapo"`, one micro-batch), torch AdamW at the same
lr, constant lr, no clipping, fp32 on CPU, the same torch threads. Steps are A/B interleaved (the
order flips every step); the first `--warmup` steps are untimed.

Equal answer lengths. Sampled answers differ between the sides (different RNG use), and the tiny
model's vocabulary is only 636 tokens, so its stop tokens and its `<|image|>` token come up often.
Both sides therefore sample every answer to exactly `max_new_tokens` tokens and never sample the
image token: TRL through its own generation settings (`generation_kwargs={"min_new_tokens":
max_new_tokens}` sets the EOS logits to -inf until the budget is spent; TRL already suppresses the
image token for processors), ours through a bench-only wrapper around `alignment.generation.loop.sample_tokens` that
sets the logits of our stop ids (`policy.stop_token_ids()`) and of the image token to -inf before
sampling (the library itself is unchanged). Without the image-token mask our rollouts can contain
`<|image|>` (see "notes" in the JSON). Answer tokens per step are recorded on both sides and must
match; answer tokens per second are reported too. With one update per rollout (ratio 1), equal
lengths and group-centred advantages, the loss is 0 on both sides by construction, and a random
model never matches an answer, so all advantages and gradients are 0 too: loss0 is a finiteness
check, not a comparison. The work (forwards, backward, AdamW) is done in full all the same.

Ours: `GRPOStage.next_micro_batches(stream)` (collate the P prompts; `make_rollout`: each image
encoded once, each prompt prefilled once and its KV cache repeated for G samples, rewards, group
advantages) + `train_step` on the one micro-batch (policy forward over the P*G rows reusing the
rollout's image features, summed loss) divided by `count(batch)` + backward + AdamW step, under
`accelerator.autocast()` as the stage loop does. 1 vision-tower image per prompt per step.

TRL 1.16: `trainer.training_step(model, inputs, None)` on the P*G dataset rows (each prompt
repeated G times, as its RepeatSampler feeds them; `per_device_train_batch_size = P*G`, which counts
completions, `gradient_accumulation_steps = steps_per_generation = num_iterations = 1`), which
generates inside `_prepare_inputs` (`model.generate` over P*G rows, each prefilled with its own copy
of the prompt and image), scores, and runs the loss forward (fused LM head, completion positions
only; images re-encoded) and backward; + the same AdamW step. 2*G vision-tower images per prompt per
step (G in generation, G in the loss forward).

"rollout s" is ours' `next_micro_batches` and TRL's `_generate_and_score_completions` (timed by a
wrapper), including each side's image preprocessing; the rest of the step is the update.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ImageCounter,
    machine,
    median,
    print_table,
    quiet_offline_env,
    today,
    versions,
    write_json,
)
from dpo_vs_trl import SHAPES, adopt_lora, build_checkpoint, image_to_row_cost  # noqa: E402  (puts the repo root on sys.path)
from dpo_vs_trl import Ours as DPOOurs  # noqa: E402

quiet_offline_env()

import torch  # noqa: E402

LR = 1e-5
LORA_R, LORA_ALPHA = 16, 32
TEMPERATURE = 1.0
# name -> the GRPO work on top of dpo_vs_trl.SHAPES' model and image size: prompts per step and the
# answer budget (every answer is sampled to exactly this many tokens on both sides).
GRPO_SHAPES = {
    # 112 px = 64 image tokens, long answers: generation and the text model dominate.
    "text_heavy": dict(prompts=2, max_new_tokens=128),
    # 336 px = 576 image tokens through a 12-layer, 256-wide tower, short answers.
    "vision_heavy": dict(prompts=2, max_new_tokens=16),
    # 576 image tokens through tiny-llava's own small tower.
    "vision_heavy_small_tower": dict(prompts=2, max_new_tokens=16),
}
TARGETS = {"text_heavy": 1.5, "vision_heavy": 2.0}  # TRL s/step over ours, from the issue
IMAGE_TOKEN_NOTE = ("Our rollout sampler (`MultimodalPolicy.generate` -> `sample_tokens`) can sample the image "
                    "placeholder token: tiny-llava's LM head covers the whole 636-token vocabulary, <|image|> "
                    "(id 5) included, and nothing masks it (TRL passes suppress_tokens=[image_token_id]). An "
                    "answer holding <|image|> gives its row more placeholders than image features, and the "
                    "update's forward fails in llava.forward_with_features (masked_scatter: 'Number of elements "
                    "of source < number of ones in mask'; seen on the 3rd rollout of 2 prompts x 4 answers x 32 "
                    "tokens). The bench masks it on our side (bench-only wrapper); the library does not.")


def _texts(completions) -> list[str]:
    """TRL's completions (strings, or conversational [{'role': 'assistant', 'content': ...}]) as strings."""
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


def exact_match_reward(prompts, completions, answer, **kwargs):
    """Our `exact_match` reward as a TRL reward function of `completions` and the `answer` column."""
    from alignment.rewards import exact_match

    return exact_match([{"answer": a} for a in answer], _texts(completions))


def mask_our_sampler(banned: list[int]):
    """Wrap `alignment.generation.loop.sample_tokens` so that tokens `banned` are never sampled (bench only); returns
    a function that restores the original."""
    import alignment.generation.loop as loop_module

    original = loop_module.sample_tokens
    banned_ids = torch.tensor(sorted(banned))

    def sample(logits, temperature, top_p, generator):
        logits = logits.index_fill(-1, banned_ids.to(logits.device), float("-inf"))
        return original(logits, temperature, top_p, generator)

    loop_module.sample_tokens = sample
    return lambda: setattr(loop_module, "sample_tokens", original)


class PlannedStream:
    """What `make_rollout` reads prompts from: the batches put in `batches`, in order."""

    def __init__(self):
        self.batches: list[list[dict]] = []
        self.drawn = 0

    def next_numbered_batches(self, count: int) -> tuple[list[dict], list[int]]:
        batch = [e for _ in range(count) for e in self.batches.pop(0)]
        self.drawn += len(batch)
        return batch, list(range(self.drawn - len(batch), self.drawn))


# ----------------------------------------------------------------------------- the two sides
class Ours:
    """Our GRPO stage driven one optimizer step at a time (what `Stage._optimizer_step` does, minus
    the lr schedule and clipping, which are constant / off for both sides)."""

    def __init__(self, folder: Path, pool: list[dict], prompts: int, generations: int, max_new_tokens: int,
                 workdir: Path):
        from accelerate import Accelerator

        from alignment.config import GRPOConfig, LoraConfig, RewardSpec
        from alignment.policy import MultimodalPolicy
        from alignment.stages.base import RunContext
        from alignment.stages.grpo import GRPOStage

        self.policy = MultimodalPolicy.from_pretrained(str(folder))
        config = GRPOConfig(
            name="grpo", batch_size=prompts, num_generations=generations, max_new_tokens=max_new_tokens,
            temperature=TEMPERATURE, top_p=1.0, num_iterations=1, num_minibatches=1, grad_accum=1,
            advantage="grpo", loss_agg="token_mean", kl_beta=0.0, lr=LR, lr_schedule="constant",
            max_grad_norm=None, eval_batch_size=prompts * generations, eval_examples=1,
            rewards=[RewardSpec(name="exact_match", weight=1.0)],
            lora=LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, preset="language"))
        ctx = RunContext(accelerator=Accelerator(cpu=True, mixed_precision="no"), output_dir=workdir, seed=0)
        self.ctx = ctx
        self.stage = GRPOStage(config, self.policy, ctx, train_examples=pool, eval_examples=[])
        torch.manual_seed(0)
        self.stage.setup(None)
        self.params = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        self.policy.train()
        self.counter = ImageCounter(self.policy.base_model.model.vision_tower)
        self.stream = PlannedStream()
        self.last: dict = {}

    targets = DPOOurs.targets  # the exact module names our `language` preset put LoRA on
    lora_state = DPOOurs.lora_state  # the `policy` adapter's weights under PEFT's `default` names

    def prompt_ids(self, example: dict) -> list[int]:
        batch = self.stage.collate([example])
        return batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()

    def step(self, examples: list[dict]) -> float:
        stage = self.stage
        self.stream.batches.append(examples)
        tick = time.perf_counter()
        batches = stage.next_micro_batches(self.stream)
        rollout_s = time.perf_counter() - tick
        total = torch.tensor(float(sum(stage.count(b) for b in batches)))
        loss = torch.zeros(())
        for batch in batches:
            with self.ctx.accelerator.autocast():
                loss_sum, _ = stage.train_step(batch)
            loss += stage.backward(loss_sum, total.clamp(min=1))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last = {"rollout_s": rollout_s, "answer_tokens": int(sum(b.response_mask.sum() for b in batches)),
                     "rows_x_tokens": list(batches[0].input_ids.shape)}
        return loss.item()


class TRL:
    """TRL's GRPOTrainer, its training step driven by hand with the same AdamW."""

    def __init__(self, folder: Path, pool: list[dict], prompts: int, generations: int, max_new_tokens: int,
                 targets: list[str], lora_state: dict, workdir: Path):
        import datasets
        from peft import LoraConfig
        from transformers import AutoModelForImageTextToText
        from trl import GRPOConfig, GRPOTrainer

        from alignment.data.prompts import prompt_format
        from alignment.models import load_processor

        model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
        processor = load_processor(str(folder))
        self.format = prompt_format(processor)
        self.generations = generations
        args = GRPOConfig(
            output_dir=str(workdir / "trl"), per_device_train_batch_size=prompts * generations,
            gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=generations,
            max_completion_length=max_new_tokens, temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=0.0,
            epsilon=0.2, loss_type="dapo", scale_rewards="group", mask_truncated_completions=False,
            generation_kwargs={"min_new_tokens": max_new_tokens}, use_vllm=False, learning_rate=LR,
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, gradient_checkpointing=False,
            disable_dropout=True, shuffle_dataset=False, remove_unused_columns=False, log_completions=False,
            report_to="none", push_to_hub=False, save_strategy="no", logging_strategy="no", use_cpu=True,
            bf16=False, fp16=False, dataloader_num_workers=0, dataloader_pin_memory=False, seed=0,
        )
        peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets,
                                 bias="none", task_type="CAUSAL_LM")
        dataset = datasets.Dataset.from_list([self.row(e) for e in pool[: prompts * 2]])
        self.trainer = GRPOTrainer(model=model, reward_funcs=exact_match_reward, args=args, train_dataset=dataset,
                                   processing_class=processor, peft_config=peft_config)
        self.model, self.optimizer, self.counter = adopt_lora(self.trainer, lora_state, LR)
        self.last: dict = {}
        generate = self.trainer._generate_and_score_completions

        def timed_generate(inputs):
            tick = time.perf_counter()
            out = generate(inputs)
            prompt, completion = out["prompt_ids"], out["completion_ids"]
            self.last = {"rollout_s": time.perf_counter() - tick, "answer_tokens": int(out["completion_mask"].sum()),
                         "rows_x_tokens": [prompt.shape[0], prompt.shape[1] + completion.shape[1]]}
            return out

        self.trainer._generate_and_score_completions = timed_generate

    def row(self, example: dict) -> dict:
        """Our prompt example as a TRL conversational row: the user turn [image, text] renders to our prompt."""
        from alignment.data import DEFAULT_INSTRUCTION

        text = " ".join(part for part in (DEFAULT_INSTRUCTION, example["question"]) if part)
        return {"prompt": [{"role": "user", "content": self.format.separator + text}], "image": example["image"],
                "answer": example["answer"], "id": example["id"]}

    def prompt_ids(self, example: dict) -> list[int]:
        from trl.data_utils import prepare_multimodal_messages

        row = self.row(example)
        prompt_ids, _, _ = self.trainer._tokenize_prompts([prepare_multimodal_messages(row["prompt"], [row["image"]])])
        return list(prompt_ids[0])

    def eos_ids(self) -> list[int]:
        return sorted(self.trainer.eos_token_ids)

    def step(self, examples: list[dict]) -> float:
        inputs = [self.row(e) for e in examples for _ in range(self.generations)]  # as its RepeatSampler feeds them
        loss = self.trainer.training_step(self.model, inputs, None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.trainer._metrics["train"].clear()
        return loss.item()


# ----------------------------------------------------------------------------- the race
def race(name: str, steps: int, warmup: int, generations: int, prompts: int | None, workdir: Path) -> dict:
    from alignment.data import build_datasets

    shape, work = SHAPES[name], GRPO_SHAPES[name]
    prompts = prompts or work["prompts"]
    max_new_tokens = work["max_new_tokens"]
    print(f"\n=== {name}: building the checkpoint and data", flush=True)
    folder = build_checkpoint(shape, workdir / name / "model")
    train, _, _ = build_datasets("synthetic_bookcover", task="sft", num_covers=60, seed=0)
    n_steps = warmup + steps
    pool = [dict(train[i % len(train)]) for i in range(prompts * n_steps)]
    plan = [pool[i * prompts:(i + 1) * prompts] for i in range(n_steps)]

    ours = Ours(folder, pool, prompts, generations, max_new_tokens, workdir / name)
    trl = TRL(folder, pool, prompts, generations, max_new_tokens, ours.targets, ours.lora_state(), workdir / name)
    arms = {"ours": ours, "trl": trl}

    ours_ids, trl_ids = ours.prompt_ids(pool[0]), trl.prompt_ids(pool[0])
    if ours_ids != trl_ids:
        print(f"WARNING {name}: prompt token ids differ (ours {len(ours_ids)}, TRL {len(trl_ids)} tokens)", flush=True)
    image_token_id = ours.policy.config.image_token_id
    stop_ids = sorted(ours.policy.stop_token_ids())
    restore = mask_our_sampler(stop_ids + [image_token_id])
    image_tokens = ours_ids.count(image_token_id)
    print(f"{name}: {prompts} prompts x G={generations} answers x {max_new_tokens} tokens per step; prompt "
          f"{len(ours_ids)} tokens ({image_tokens} image tokens); LoRA on {len(ours.targets)} modules; "
          f"{warmup} warm-up + {steps} timed steps per arm", flush=True)

    losses = {k: [] for k in arms}
    times = {k: [] for k in arms}
    rollout_s = {k: [] for k in arms}
    answer_tokens = {k: [] for k in arms}
    rows_x_tokens = {}
    images = {k: 0 for k in arms}
    order = list(arms)
    try:
        for i, examples in enumerate(plan):
            timed = i >= warmup
            for key in order if i % 2 == 0 else order[::-1]:
                arm = arms[key]
                arm.counter.reset()
                tick = time.perf_counter()
                loss = arm.step(examples)
                elapsed = time.perf_counter() - tick
                losses[key].append(loss)
                answer_tokens[key].append(arm.last["answer_tokens"])
                rows_x_tokens.setdefault(key, arm.last["rows_x_tokens"])
                if timed:
                    times[key].append(elapsed)
                    rollout_s[key].append(arm.last["rollout_s"])
                    images[key] += arm.counter.images
            seconds = {k: f"{times[k][-1]:.3f}s" if timed else "warm-up" for k in arms}
            print(f"  step {i}: " + ", ".join(
                f"{k} {seconds[k]} loss {losses[k][-1]:.6f} answer tokens {answer_tokens[k][-1]}" for k in arms),
                flush=True)
    finally:
        restore()
        for arm in arms.values():
            arm.counter.remove()

    expected = prompts * generations * max_new_tokens
    unequal = [(k, i, n) for k in arms for i, n in enumerate(answer_tokens[k]) if n != expected]
    if unequal:
        print(f"WARNING {name}: answer tokens differ from {expected} at (side, step, tokens) {unequal[:4]}", flush=True)
    step_s = {k: median(times[k]) for k in arms}
    roll_s = {k: median(rollout_s[k]) for k in arms}
    speedup = step_s["trl"] / step_s["ours"]
    target = TARGETS.get(name)
    return {
        "name": name,
        "ours_step_s": step_s["ours"],
        "trl_step_s": step_s["trl"],
        "ours_loss0": losses["ours"][0],
        "trl_loss0": losses["trl"][0],
        "ours_vision_calls_per_prompt": images["ours"] / (steps * prompts) if steps else float("nan"),
        "trl_vision_calls_per_prompt": images["trl"] / (steps * prompts) if steps else float("nan"),
        # extras
        "speedup": speedup,
        "target_speedup": target,
        "meets_target": None if target is None else bool(speedup >= target),
        "ours_rollout_s": roll_s["ours"],
        "trl_rollout_s": roll_s["trl"],
        "ours_update_s": step_s["ours"] - roll_s["ours"],
        "trl_update_s": step_s["trl"] - roll_s["trl"],
        "answer_tokens_per_s": {k: expected / step_s[k] for k in arms},
        "prompts_per_step": prompts,
        "num_generations": generations,
        "max_new_tokens": max_new_tokens,
        "answer_tokens_per_step": answer_tokens,
        "answer_tokens_equal": not unequal,
        "rows_x_tokens": rows_x_tokens,
        "prompt_tokens": {"ours": len(ours_ids), "trl": len(trl_ids)},
        "prompt_ids_equal": ours_ids == trl_ids,
        "image_tokens": image_tokens,
        "masked_token_ids": {"ours_stop_and_image": stop_ids + [image_token_id], "trl_eos": trl.eos_ids(),
                             "trl_suppressed": [image_token_id]},
        "losses": losses,
        "step_s_all": times,
        "rollout_s_all": rollout_s,
        "image_to_row_cost": image_to_row_cost(folder, float(len(ours_ids) + max_new_tokens)),
        "config": {"image_size": shape["image_size"], "vision": shape["vision"], **work, "prompts": prompts},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/vlm-align-bench/grpo_vs_trl.json")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per arm after warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first")
    parser.add_argument("--shapes", default="text_heavy,vision_heavy", help=f"comma-separated subset of {list(GRPO_SHAPES)}")
    parser.add_argument("--generations", type=int, default=4, help="G: answers per prompt (>= 2: TRL's minimum)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step (default: the shape's, 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady figures on a CPU shared with other jobs)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.generations < 2:
        parser.error("need --steps >= 1, --warmup >= 0 and --generations >= 2")

    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory(prefix="grpo-vs-trl-") as tmp:
        for name in args.shapes.split(","):
            results.append(race(name, args.steps, args.warmup, args.generations, args.prompts, Path(tmp)))

    print(f"\nGRPO step (one prompt batch: sample, score, one update), ours vs TRL {versions('trl')['trl']} "
          f"(HF generate; tiny LLaVA, fp32, CPU, {args.threads} thread(s); median of {args.steps} interleaved steps "
          f"after {args.warmup} warm-up; every answer exactly max_new_tokens long)")
    header = ["shape", "P x G", "new tok", "prompt tok", "ours s/step", "TRL s/step", "TRL/ours", "target",
              "ours rollout s", "TRL rollout s", "ours loss0", "TRL loss0", "vision/prompt ours", "vision/prompt TRL"]
    table = [[r["name"], f"{r['prompts_per_step']}x{r['num_generations']}", r["max_new_tokens"],
              r["prompt_tokens"]["ours"], r["ours_step_s"], r["trl_step_s"], f"{r['speedup']:.2f}x",
              "-" if r["target_speedup"] is None else f">= {r['target_speedup']}x "
              f"({'met' if r['meets_target'] else 'not met'})",
              r["ours_rollout_s"], r["trl_rollout_s"], f"{r['ours_loss0']:.6f}", f"{r['trl_loss0']:.6f}",
              r["ours_vision_calls_per_prompt"], r["trl_vision_calls_per_prompt"]] for r in results]
    print_table(table, header)
    print("\nchecks")
    print_table([[r["name"], "yes" if r["prompt_ids_equal"] else "NO", "yes" if r["answer_tokens_equal"] else "NO",
                  f"{r['answer_tokens_per_s']['ours']:.1f} / {r['answer_tokens_per_s']['trl']:.1f}",
                  f"{r['ours_update_s']:.3f} / {r['trl_update_s']:.3f}",
                  "x".join(map(str, r["rows_x_tokens"]["ours"])) + " / " + "x".join(map(str, r["rows_x_tokens"]["trl"])),
                  f"{r['image_to_row_cost']:.2f}"] for r in results],
                ["shape", "same prompt ids", "equal answer tokens", "answer tok/s ours/TRL", "update s ours/TRL",
                 "rows x tokens ours/TRL", "image/row cost"])
    elapsed = time.time() - start
    payload = {"shapes": results, "machine": machine(), "date": today(), "seconds": round(elapsed, 1),
               "versions": versions("torch", "transformers", "trl", "peft", "accelerate"),
               "settings": {"lr": LR, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0,
                            "temperature": TEMPERATURE, "top_p": 1.0, "num_generations": args.generations,
                            "reward": "exact_match", "advantage": "group z-score (ours grpo, TRL scale_rewards=group)",
                            "loss": "token mean (ours token_mean, TRL dapo), one update per rollout, beta 0",
                            "optimizer": "torch AdamW, weight_decay 0, constant lr, no clipping", "dtype": "float32",
                            "threads": args.threads, "warmup_steps": args.warmup, "timed_steps": args.steps,
                            "generation": "TRL: model.generate (no vLLM), generation_kwargs min_new_tokens = "
                                          "max_new_tokens; ours: MultimodalPolicy.generate with stop ids and the "
                                          "image token masked by a bench-only wrapper of alignment.generation.loop.sample_tokens"},
               "targets": TARGETS,
               "notes": [IMAGE_TOKEN_NOTE,
                         "vision calls per prompt = images through the vision tower per prompt per step (a forward "
                         "hook sums the pixel batch of every tower call), over the timed steps.",
                         "rollout s: ours GRPOStage.next_micro_batches, TRL _generate_and_score_completions (each "
                         "includes its image preprocessing); update s = step s - rollout s (medians).",
                         "loss0: the first (warm-up) step's loss. With one update per rollout the ratio is 1, so "
                         "the token-mean loss is minus the token-weighted mean advantage: 0 on both sides here "
                         "(every answer has max_new_tokens tokens and group z-scores sum to 0; besides, a random "
                         "model never matches an answer, so every advantage is 0). Only its finiteness is a check."]}
    path = write_json(args.out, payload)
    print(f"\nwrote {path} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`Stage`: the one training loop every stage shares.

A stage says how to set up its adapters, collate a micro-batch, count what its loss averages over,
compute one micro-batch's summed loss (`train_step`) and evaluate. The loop here does the rest:
gradient accumulation with losses averaged by count over all micro-batches and processes (exact
under accumulation and across ranks), the learning-rate schedule, gradient clipping, a non-finite
guard, a progress bar, TensorBoard scalars, atomic checkpoints and resume, and a clean stop on Ctrl-C
or SIGTERM (`interrupt.py`: the step under way, its checkpoint, exit 130 / 143). Backward, gradient
synchronisation, clipping and the update go through a `StepEngine` (`engine.py`): one process, DDP,
or a DeepSpeed ZeRO engine, as the accelerate launch config says.

The stage's `optimizer:` picks the update (`alignment/optimizers.py`): AdamW; LOMO, which updates
each parameter in backward once the step's gradient is known finite (with clipping, in a second pass
that measured the norm first; without, in a second backward of the last micro-batch's graph); or MeZO,
which needs no backward at all: `_zeroth_order_step` evaluates the step's loss twice under no_grad
through the same `train_step`. LOMO and MeZO run in one process without DeepSpeed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignment.config import StageConfig
from alignment.errors import ConfigError
from alignment.optimizers import LOMO, MeZO, build_optimizer, set_torch_rng_state, step_seed, torch_rng_state
from alignment.samples import write_stage_samples
from alignment.stages import checkpoint as ckpt
from alignment.stages.engine import (
    StepEngine,
    all_sum,
    distributed_facts,
    engine_kind,
    mean_over_processes,
    zero3_gathered,
)
from alignment.stages.interrupt import (
    EXIT_CODES,
    Interrupted,
    StopRequest,
    handling,
    interrupted_line,
    resume_command,
)
from alignment.stages.schedule import lr_at
from alignment.stages.stream import ExampleStream
from alignment.stages.trackers import log_eval_scalars, open_trackers

# Stages whose loss compares against `policy.reference()`: under full fine-tuning without a frozen
# `reference` set, that is the weights the stage starts from, which the loop then keeps a copy of.
REFERENCE_STAGES = ("dpo", "ppo", "grpo")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class RunContext:
    """What every stage of one run shares."""

    accelerator: object
    output_dir: Path
    seed: int = 0
    resume: bool = False
    recipe_name: str = "recipe"
    data_config: object = None
    fingerprint: dict = field(default_factory=dict)  # settings a checkpoint must match to be resumed
    collate_kwargs: dict = field(default_factory=dict)  # instruction, max_length for training collators
    prompt_kwargs: dict = field(default_factory=dict)  # instruction for generation prompts
    stage_types: dict = field(default_factory=dict)  # name -> type of the recipe's earlier stages, in order
    load_policy: object = None  # () -> a fresh MultimodalPolicy of the recipe's base (for separate models)
    report_to: tuple = ("tensorboard",)  # where scalars go: tensorboard, wandb (none: nowhere)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


class Stage:
    """Subclasses set `type` and `adapter_name` and implement the hooks below."""

    type = ""
    adapter_name = "policy"

    def __init__(self, config: StageConfig, policy, ctx: RunContext, train_examples: list, eval_examples: list,
                 test_examples: list | None = None):
        self.config = config
        self.policy = policy
        self.ctx = ctx
        self.train_examples = train_examples
        self.eval_examples = eval_examples  # the `val` split: what recipes are tuned on
        self.test_examples = test_examples or []  # the `test` split: reported beside val, never tuned on
        self.dir = ctx.output_dir / config.name
        self.history: list[dict] = []
        self.nonfinite_steps = 0
        self._stop = StopRequest(f"[{config.name}] ")  # SIGINT / SIGTERM in the loop: stop after this step
        self.engine: StepEngine | None = None  # set by `train`: DDP / DeepSpeed / one process
        self.writer = None  # scalars (TensorBoard, ...) on the main process, open while `run` runs

    # ---- hooks -----------------------------------------------------------------
    def setup(self, previous_adapter: Path | None) -> None:
        """Create or load the adapters this stage trains (the previous stage's adapter, if any)."""
        raise NotImplementedError

    def collate(self, examples: list) -> dict:
        raise NotImplementedError

    def count(self, batch: dict) -> int:
        """What the loss averages over in this micro-batch (tokens, pairs...)."""
        raise NotImplementedError

    def train_step(self, batch: dict) -> tuple[torch.Tensor | dict[str, torch.Tensor], dict[str, float]]:
        """Summed loss of one micro-batch (a scalar with grad) and metrics to log (floats).

        A stage whose roles run under different adapters of one base (PPO's actor and critic) returns
        `{role: summed loss}`: the loop runs each part's backward inside `backward_context(role)`, so
        that gradient checkpointing recomputes each role's layers with that role's adapter active."""
        raise NotImplementedError

    def backward(self, loss_sum: torch.Tensor | dict[str, torch.Tensor], count,
                 retain_graph: bool = False) -> torch.Tensor:
        """Backpropagate `train_step`'s loss divided by `count` (what the step averages over, all
        processes): one backward per role, each inside `backward_context(role)`; `retain_graph` keeps
        the graph for another backward (LOMO's check, then update). Returns the summed loss (detached,
        float32, on the CPU)."""
        parts = loss_sum if isinstance(loss_sum, dict) else {"": loss_sum}
        total = torch.zeros(())
        for role, part in parts.items():
            with self.backward_context(role):
                if self.engine is not None:
                    self.engine.backward(part / count, retain_graph=retain_graph)
                else:
                    (part / count).backward(retain_graph=retain_graph)
            total += part.detach().float().cpu()
        return total

    def backward_context(self, role: str):
        """The context a loss part's backward runs in (PPO: the role's adapter active)."""
        return nullcontext()

    def models_in_use(self) -> list:
        """Every `MultimodalPolicy` this stage runs (trained or not): dropout is switched off in all of
        them for the stage's life when the config says `disable_dropout`."""
        return self.trained_models()

    def evaluate(self) -> dict:
        raise NotImplementedError

    def evaluate_on(self, examples: list) -> dict:
        """`evaluate` on other held-out examples (the `test` split): the same metrics, the same keys."""
        saved, self.eval_examples = self.eval_examples, examples
        try:
            return self.evaluate()
        finally:
            self.eval_examples = saved

    def before_training(self) -> None:
        """Optional work after setup and resume, before the first step (e.g. reference passes)."""

    def next_micro_batches(self, stream: ExampleStream) -> list:
        """The micro-batches of the next optimizer step, as `count` and `train_step` take them
        (PPO serves minibatches of its rollout here, sampling a new rollout when one is used up)."""
        return [self.collate(stream.next_batch()) for _ in range(self.config.grad_accum)]

    def trained_models(self) -> list:
        """The `MultimodalPolicy` objects whose trainable adapters (and heads) this stage optimises
        and checkpoints: the shared policy, plus e.g. a separately loaded critic."""
        return [self.policy]

    # ---- the loop --------------------------------------------------------------
    def run(self, previous_adapter: Path | None = None) -> dict:
        """Set up, train (resuming if asked), save the adapter, evaluate; returns the report entry.
        One scalar writer (TensorBoard, ...) serves the training steps and the evaluation's metrics."""
        self.writer = open_trackers(self.ctx.output_dir / "runs" / self.config.name, self.ctx.report_to,
                              self.ctx.recipe_name) if self.ctx.is_main else None
        try:
            return self._run(previous_adapter)
        finally:
            if self.writer is not None:
                self.writer.close()
            self.writer = None

    def _run(self, previous_adapter: Path | None) -> dict:
        start = time.time()
        with zero3_gathered(getattr(self.policy, "adapter_parameters", list)(), modifier_rank=0):
            self.setup(previous_adapter)  # ZeRO-3 (a later stage): the adapters it copies or loads whole
        no_dropout = getattr(self.config, "disable_dropout", False)
        with dropout_disabled(self.models_in_use()) if no_dropout else nullcontext():
            steps = self.train()
            held = self._held_by_rank()  # after the last step: gradients and optimizer state still held
            with zero3_gathered(self.engine.params):  # ZeRO-3: the adapter whole, not this rank's part
                if self.ctx.is_main:
                    self.policy.save_adapter(self.adapter_name, self.dir)
            self.ctx.accelerator.wait_for_everyone()
            self.policy.eval()
            measured = getattr(self.config, "eval_examples", 1) > 0  # eval_examples: 0 measures nothing
            with torch.no_grad():  # no held-out examples: no metrics (absent, never 0.0)
                metrics = self.evaluate() if self.eval_examples and measured else None
                test = self.evaluate_on(self.test_examples) if self.test_examples and measured else None
            if self.ctx.is_main:  # the first answers with their images, for the run page (no generation)
                write_stage_samples(self.dir, self.config.name, self.type, metrics, test,
                                    self.eval_examples, self.test_examples)
                log_eval_scalars(self.writer, self.config.name, steps, metrics, test)
        for model in self.trained_models():  # full fine-tuning: the next stage starts from these weights
            if _full_sets(model) is not None:
                _full_sets(model).drop_start()
        losses = [h["loss"] for h in self.history if "loss" in h]
        train = {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                 "skipped_nonfinite_steps": sum(h.get("skipped", 0) for h in self.history)}
        last = self.history[-1] if self.history else {}
        train.update({k: v for k, v in last.items() if k not in ("step", "loss", "skipped")})
        entry = {"name": self.config.name, "type": self.type, "steps": steps,
                 "seconds": round(time.time() - start, 1), "train": train}
        if metrics is not None:
            entry["eval"] = metrics
        if test is not None:
            entry["test"] = test
        entry["distributed"] = {**distributed_facts(self.ctx.accelerator), "per_rank": held}
        return {**entry, "history": self.history}

    def _held_by_rank(self) -> list[dict]:
        """Bytes of parameters, gradients and optimizer state each rank holds (`StepEngine.memory`)."""
        mine = self.engine.memory()
        if self.ctx.world_size == 1:
            return [mine]
        from accelerate.utils import gather_object

        return gather_object([mine])

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.config
        return build_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay, cfg.mezo_eps)

    def _check_trainable(self) -> None:
        """Refuse what the loop cannot run: LOMO / MeZO beside DDP or DeepSpeed, and two sets of full
        fine-tuning weights trained at once in one model (they would share its parameters)."""
        cfg, ctx = self.config, self.ctx
        kind = engine_kind(ctx.accelerator)
        if cfg.optimizer != "adamw" and kind != "none":
            raise ConfigError(f"stages.{cfg.name}.optimizer: {cfg.optimizer} runs in one process without DeepSpeed "
                              f"(this launch: {kind}, {ctx.world_size} processes); use adamw, or launch one process")
        for model in self.trained_models():
            full = _full_sets(model)
            trained = [n for n in full.names if n in model.trainable_adapters] if full is not None else []
            if len(trained) > 1:
                raise ConfigError(f"stages.{cfg.name}.lora.method: full fine-tuning trains one set of weights per "
                                  f"model, and {trained} would all train; use a LoRA-family method (or "
                                  "separate_models: true) for the second")

    def _keep_start_weights(self) -> None:
        """Full fine-tuning in a stage of `REFERENCE_STAGES` with no frozen `reference` set: its reference
        is the bare base, the weights the stage starts from; copy them before a resume loads later ones
        and before any update (`FullAdapters.keep_start`)."""
        if self.type not in REFERENCE_STAGES:
            return
        for model in self.trained_models():
            full = _full_sets(model)
            if full is not None and model.reference_adapter() is None:
                full.keep_start()

    def train(self) -> int:
        cfg, ctx = self.config, self.ctx
        torch.manual_seed(rank_seed(ctx.seed, ctx.rank))
        params = [p for model in self.trained_models() for p in model.trainable_parameters()]
        if not params:
            raise RuntimeError(f"stage {cfg.name!r} has no trainable parameters")
        self._check_trainable()
        self._keep_start_weights()
        stream = ExampleStream(self.train_examples, cfg.batch_size, ctx.seed, ctx.rank, ctx.world_size)
        folder = self._resume_models(stream) if ctx.resume else None  # before an engine partitions them
        bf16 = getattr(ctx.accelerator, "mixed_precision", "no") == "bf16"
        optimizer = self._optimizer(params)
        writer = bar = None
        own_writer = False
        signals = ExitStack()
        try:
            self.engine = StepEngine(ctx.accelerator, self.trained_models(), params, optimizer,
                                     cfg.batch_size, cfg.max_grad_norm, bf16)
            optimizer = self.engine.optimizer
            step = self._resume_optimizer(folder, optimizer) if folder is not None else 0
            self.stream = stream  # before_training may replay the batches to come (DPO's reference pass)
            self.before_training()
            own_writer = self.writer is None  # `run` opens one for training and evaluation; `train` alone, its own
            writer = self.writer if not own_writer else (
                open_trackers(ctx.output_dir / "runs" / cfg.name, ctx.report_to, ctx.recipe_name) if ctx.is_main else None)
            bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.name, disable=not ctx.is_main, dynamic_ncols=True)
            signals.enter_context(handling(self._stop))  # Ctrl-C / SIGTERM: stop after the step under way
            for model in self.trained_models():
                model.train()
            while step < cfg.max_steps:
                tick = time.time()
                record = self._optimizer_step(optimizer, params, stream, step)
                step += 1
                _append_ledger(cfg.name, step, ctx.rank, record.pop("ids", []))
                record["samples_per_s"] = cfg.batch_size * cfg.grad_accum * ctx.world_size / (time.time() - tick)
                self.history.append({"step": step, **record})
                bar.update(1)
                if "loss" in record:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
                if writer is not None and (step % cfg.log_every == 0 or step == cfg.max_steps):
                    for key, value in record.items():
                        writer.add_scalar(f"{cfg.name}/{key}", value, step)
                    writer.flush()
                stop = self._stop_signal()  # every rank stops together
                if step % cfg.save_every == 0 or step == cfg.max_steps or stop:
                    self._save(step, optimizer, stream)
                if stop:
                    if ctx.is_main:
                        command = resume_command(ctx.output_dir, ctx.world_size)
                        tqdm.write(f"[{cfg.name}] " + interrupted_line(stop, step, self.dir / "checkpoints", command))
                    raise Interrupted(EXIT_CODES[stop])
        finally:
            if isinstance(optimizer, LOMO):
                optimizer.close()  # the parameters outlive the stage: they must stop updating in backward
            if bar is not None:
                bar.close()
            if writer is not None and own_writer:
                writer.close()
            signals.close()
        return step

    def stop_deferred(self) -> bool:
        """True inside a unit a checkpoint cannot split (PPO's, GRPO's rollout iteration): a stop waits."""
        return False

    def _stop_signal(self) -> int:
        """The stop signal any rank received in this stage's loop (0: none, or deferred: `stop_deferred`, which
        every rank answers alike). SIGINT wins over SIGTERM (a launcher relays a Ctrl-C to its workers as SIGTERM)."""
        if self.stop_deferred():
            return 0
        seen = self._stop.signum
        flags = torch.tensor([float(seen == signal.SIGINT), float(seen == signal.SIGTERM)])
        interrupt, terminate = all_sum(flags, self.ctx).tolist()
        return int(signal.SIGINT) if interrupt else int(signal.SIGTERM) if terminate else 0

    def _optimizer_step(self, optimizer, params, stream: ExampleStream, step: int) -> dict:
        cfg, ctx = self.config, self.ctx
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio)
        lr = optimizer.param_groups[0]["lr"]
        batches = self.next_micro_batches(stream)
        ids = [i for b in batches for i in (b.get("ids", []) if isinstance(b, dict) else getattr(b, "ids", []))]
        total = all_sum(torch.tensor(float(sum(self.count(b) for b in batches))), ctx)
        if total.item() == 0:  # e.g. every label masked: nothing to learn from, and Adam's momentum must not move
            tqdm.write(f"[{cfg.name}] step {step + 1}: no counted tokens or pairs in the batch; step skipped")
            return {"skipped_empty": 1, "lr": lr, "ids": ids}
        if isinstance(optimizer, MeZO):
            return {**self._zeroth_order_step(optimizer, batches, total, step), "lr": lr, "ids": ids}
        engine = self.engine
        two_pass = isinstance(optimizer, LOMO) and cfg.max_grad_norm is not None
        if two_pass:  # LOMO's clipping: this pass only measures the norm, freeing each gradient as it goes
            rng = torch_rng_state()
            with optimizer.measuring():
                loss_total, sums = self._forward_backward(batches, total)
            grad_norm = optimizer.take_grad_norm()
        else:  # (LOMO without clipping checks the step's gradient, then updates the parameters, in here)
            loss_total, sums = self._forward_backward(batches, total)
            grad_norm = engine.grad_norm_and_clip()  # None under DeepSpeed: it clips inside its step
        loss = (all_sum(loss_total, ctx) / total.clamp(min=1)).item()
        if not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))):
            engine.discard_gradients()
            return {**self._skip_nonfinite(step, loss, grad_norm), "lr": lr, "ids": ids}
        if two_pass:  # the same micro-batches and randomness again, now updating with the clipped scale
            set_torch_rng_state(rng)
            with optimizer.updating(scale=min(1.0, cfg.max_grad_norm / (grad_norm + 1e-6)), check_finite=False):
                self._forward_backward(batches, total)
        engine_norm = engine.step()
        grad_norm = engine_norm if grad_norm is None else grad_norm
        self.nonfinite_steps = 0
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, **mean_over_processes(sums, ctx), "ids": ids}

    def _forward_backward(self, batches: list, total: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Forward and backward of one step's micro-batches, each loss divided by the step's `total`
        count; returns the summed loss (CPU) and the metrics averaged over micro-batches.

        Under LOMO's in-backward update (an update cannot be undone) a non-finite loss is not
        backpropagated (the summed loss is then NaN), and where the gradient is not yet known finite
        (no clipping pass measured it) the last micro-batch's backward runs first under
        `LOMO.checking()`, on a retained graph: if any gradient of the step is not finite, nothing is
        updated and the loop, reading LOMO's non-finite norm, skips the step."""
        loss_total, sums, engine = torch.zeros(()), {}, self.engine
        fused = isinstance(engine.optimizer, LOMO) and engine.optimizer.mode == "update"
        check_first = fused and engine.optimizer.check_finite
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            with engine.micro_batch(last=last):
                with self.ctx.accelerator.autocast():
                    loss_sum, metrics = engine.forward(self.train_step, batch)
                if fused and not all(torch.isfinite(part).all() for part in _parts(loss_sum)):
                    return torch.tensor(float("nan")), sums
                if check_first and last:
                    with engine.optimizer.checking():
                        checked_loss = self.backward(loss_sum, total.clamp(min=1), retain_graph=True)
                    if not engine.optimizer.checked_finite:
                        return loss_total + checked_loss, sums
                loss_total += self.backward(loss_sum, total.clamp(min=1))
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value / len(batches)
        if isinstance(engine.optimizer, LOMO):
            engine.optimizer.flush()  # parameters the last micro-batch did not reach
        return loss_total, sums

    def _zeroth_order_step(self, optimizer: MeZO, batches: list, total: torch.Tensor, step: int) -> dict:
        """MeZO: the step's loss (its micro-batches' summed `train_step` losses / `total`) at theta + eps z
        and theta - eps z, forward passes only (under no_grad: no activations kept for a backward), then
        theta -= lr * g * z with g = (L+ - L-) / (2 eps) (`alignment.optimizers.MeZO`); z is drawn from
        a seed of (run seed, step), so a resumed run repeats it. `loss` logs (L+ + L-) / 2, the loss at
        theta up to O(eps^2); `max_grad_norm` does not apply."""
        ctx, metrics = self.ctx, []

        def loss_at() -> float:
            loss, sums = torch.zeros(()), {}
            for batch in batches:
                with ctx.accelerator.autocast():
                    loss_sum, values = self.train_step(batch)
                loss += sum(part.detach().float().cpu() for part in _parts(loss_sum))
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value / len(batches)
            metrics.append(sums)
            return (loss / total.clamp(min=1)).item()

        result = optimizer.step(loss_at, seed=step_seed(ctx.seed, step))
        self.engine.gradient_bytes = 0
        loss = (result["loss_plus"] + result["loss_minus"]) / 2
        if not result["applied"]:
            return self._skip_nonfinite(step, loss, None)
        self.nonfinite_steps = 0
        return {"loss": loss, "projected_grad": result["projected_grad"], **metrics[0]}

    def _skip_nonfinite(self, step: int, loss: float, grad_norm: float | None) -> dict:
        """Count a step skipped for a non-finite loss or gradient norm; stop the run after too many."""
        cfg = self.config
        self.nonfinite_steps += 1
        tqdm.write(f"[{cfg.name}] step {step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                   f"step skipped ({self.nonfinite_steps} in a row)")
        if self.nonfinite_steps >= cfg.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"stage {cfg.name!r}: {self.nonfinite_steps} consecutive non-finite steps at step {step + 1}; "
                f"the last good checkpoint is kept in {self.dir / 'checkpoints'} (lower lr or check the data)"
            )
        return {"skipped": 1}

    # ---- checkpoints -----------------------------------------------------------
    def _trained_adapters(self) -> list[tuple[object, str]]:
        """(model, adapter name) of every adapter a checkpoint keeps."""
        return [(model, name) for model in self.trained_models() for name in sorted(model.trainable_adapters)]

    def _save(self, step: int, optimizer, stream: ExampleStream) -> None:
        ctx, root = self.ctx, self.dir / "checkpoints"
        staged = ckpt.staging_dir(root, step)
        if ctx.is_main:
            if staged.exists():
                import shutil

                shutil.rmtree(staged)
            staged.mkdir(parents=True)
        with zero3_gathered(self.engine.params):  # ZeRO-3: adapters whole for the main rank to write
            if ctx.is_main:
                for model, name in self._trained_adapters():
                    model.save_adapter(name, staged / "adapters" / name)
        if ctx.is_main:
            state = {"step": step, "stream": stream.state_dict(), "fingerprint": ctx.fingerprint,
                     "history": self.history, "nonfinite_steps": self.nonfinite_steps, "extra": self.extra_state()}
            (staged / "state.json").write_text(json.dumps(state))
        ctx.accelerator.wait_for_everyone()
        if ctx.is_main or self.engine.kind == "deepspeed":  # ZeRO: each rank's optimizer partition
            torch.save(self.engine.optimizer_state(), staged / _optimizer_file(self.engine, ctx.rank))
        torch.save(ckpt.rng_state(), staged / f"rng-rank{ctx.rank}.pt")
        ctx.accelerator.wait_for_everyone()
        if ctx.is_main:
            ckpt.write_manifest(staged)
            ckpt.publish(root, step, self.config.keep_checkpoints)
        ctx.accelerator.wait_for_everyone()

    def extra_state(self) -> dict:
        """JSON-able stage state a checkpoint keeps (e.g. an adaptive KL coefficient)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def _resume_models(self, stream: ExampleStream) -> Path | None:
        """Resume's first half, before the engine exists: the latest complete checkpoint's adapters,
        stream position, history and stage state. Returns its folder (None: start at step 0)."""
        root = self.dir / "checkpoints"
        folder = ckpt.latest_checkpoint(root)
        ignored = [p.name for p in sorted(root.glob("step-*")) if folder is None or p.name > folder.name]
        if ignored and self.ctx.is_main:
            tqdm.write(f"[{self.config.name}] ignoring incomplete checkpoint(s) {ignored} in {root} "
                       "(files missing or of the wrong size)")
        if folder is None:
            if self.ctx.is_main:
                tqdm.write(f"[{self.config.name}] resume=true but no complete checkpoint in {root}; starting at step 0")
            return None
        state = ckpt.read_state(folder)
        longer = ckpt.check_fingerprint(folder, state["fingerprint"], self.ctx.fingerprint)
        if longer and self.ctx.is_main:  # a larger max_steps: train on from the checkpoint
            tqdm.write(ckpt.extension_notice(self.config.name, longer, state["step"]))
        stream.load_state_dict(state["stream"])
        for model, name in self._trained_adapters():
            model.load_adapter(name, folder / "adapters" / name)
        self.history = state["history"]
        self.nonfinite_steps = state["nonfinite_steps"]
        self.load_extra_state(state["extra"])
        return folder

    def _resume_optimizer(self, folder: Path, optimizer) -> int:
        """Resume's second half, once the engine exists: optimizer state (each rank's own partition
        under DeepSpeed) and RNG state; returns the step to go on from."""
        self.engine.load_optimizer_state(ckpt.safe_load(folder / _optimizer_file(self.engine, self.ctx.rank)))
        ckpt.set_rng_state(ckpt.safe_load(folder / f"rng-rank{self.ctx.rank}.pt"))
        step = ckpt.read_state(folder)["step"]
        if self.ctx.is_main:
            tqdm.write(f"[{self.config.name}] resumed from {folder} at step {step}")
        return step


@contextmanager
def dropout_disabled(models: list):
    """Every dropout (LoRA's included) of `models` at p = 0 inside, restored after. RL and preference
    stages run with it (TRL's `disable_dropout`): rollouts, reference passes and updates then see
    one function, so PPO's first ratio is exactly 1 and DPO's first log-ratio exactly 0."""
    changed = [(m, m.p) for model in {id(x): x for x in models}.values() for m in model.modules()
               if isinstance(m, torch.nn.Dropout) and m.p > 0]
    for module, _ in changed:
        module.p = 0.0
    try:
        yield
    finally:
        for module, p in changed:
            module.p = p


def _parts(loss_sum) -> list[torch.Tensor]:
    """A `train_step` loss as a list of scalars (one per role when it returns a dict)."""
    return list(loss_sum.values()) if isinstance(loss_sum, dict) else [loss_sum]


def _full_sets(model):
    """The `FullAdapters` of a model (full fine-tuning), or None."""
    own = getattr(model, "own", None)
    return own["full"] if own is not None and "full" in own else None


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of process `rank` in training (distinct per rank; dropout and sampling differ)."""
    return seed * 1000 + rank


def _append_ledger(stage: str, step: int, rank: int, ids: list) -> None:
    """With `VLM_ALIGN_LEDGER=path`, append one JSON line of the sample ids a step trained on (tests
    use it to check that a resumed run sees every sample as often as an uninterrupted one)."""
    path = os.environ.get("VLM_ALIGN_LEDGER")
    if not path:
        return
    line = json.dumps({"stage": stage, "step": step, "rank": rank, "ids": ids}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write: a kill leaves whole lines only
    finally:
        os.close(fd)


def config_fingerprint(config: StageConfig) -> dict:
    """The settings a checkpoint must match to be resumed. Keys added after checkpoints were written count only
    when they are not at their defaults (`LATER_KEYS`, and the optimizer keys), so those checkpoints still resume."""
    skip = {"eval_examples", "eval_batch_size", "log_every"}
    if config.optimizer != "mezo":
        skip.add("mezo_eps")
    if config.optimizer == "adamw":
        skip.add("optimizer")
    values = asdict(config)
    skip |= {k for k, default in LATER_KEYS.items() if k in values and values[k] == default}
    return {k: v for k, v in values.items() if k not in skip}


LATER_KEYS = {"simpo_gamma": 0.5, "loss_weights": None}  # DPO keys of the preference family, at their defaults


def _optimizer_file(engine: StepEngine, rank: int) -> str:
    """A checkpoint's optimizer state: one file, or one per rank when DeepSpeed partitions it."""
    return f"optimizer-rank{rank}.pt" if engine.kind == "deepspeed" else "optimizer.pt"

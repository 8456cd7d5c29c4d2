"""`StepEngine`: how one optimizer step's gradients are synchronised, clipped and applied, through
accelerate: one process, DDP (accelerate's MULTI_CPU / MULTI_GPU), or a DeepSpeed ZeRO engine
(DEEPSPEED).

The stage loop divides every micro-batch's summed loss by what the whole step averages over (all of
its micro-batches on all processes), so the gradient it wants is the *sum* over processes. DDP and
DeepSpeed average over processes: `backward` multiplies by the world size first, and the optimizer
step sees exactly the gradient a single process with the whole batch would.

- DDP wraps a module holding only the trained parameters (adapters and heads): it broadcasts and
  buckets those, not the frozen (4-bit) base; micro-batch forwards run through it (`forward`) so its
  reducer sees them, and all but a step's last micro-batch run under `no_sync`.
- DeepSpeed wraps the models themselves (ZeRO-3 partitions the base too); the DeepSpeed JSON gives the
  ZeRO stage and bucket sizes, and the recipe's stage fills batch size, clipping and precision
  (`fill_deepspeed_config`). Gradient accumulation is left to the loop
  (`managed_gradient_accumulation: false`): `backward` may run any number of times (micro-batches,
  and PPO's roles), and `step` is the boundary.
- LOMO (`alignment.optimizers`, one process only) updates in backward: a step's micro-batches before
  its last only accumulate gradients (`micro_batch`), the gradient norm is what its hooks measured,
  and `step` has nothing left to do. MeZO has no backward; the loop calls it directly.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from alignment.optimizers import LOMO


def engine_kind(accelerator) -> str:
    """none (one process, no engine) | ddp | deepspeed, from the accelerator's distributed type and
    process count (report.json's `distributed.engine`, shared/DESIGN.md)."""
    from accelerate.utils import DistributedType

    if getattr(accelerator, "distributed_type", None) == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "none"


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage of `accelerator`'s config, 0 without DeepSpeed."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is None:
        return 0
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def fill_deepspeed_config(config: dict, batch_size: int, world_size: int, max_grad_norm: float | None,
                          bf16: bool) -> dict:
    """The DeepSpeed JSON with what the recipe decides filled in (its `auto`s and any stale values):
    micro-batch = the stage's batch size, accumulation 1 with the loop as the boundary, clipping,
    bf16 from the model dtype. Returns `config`, changed in place (accelerate reads this dict)."""
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = batch_size * world_size
    config["gradient_clipping"] = float(max_grad_norm) if max_grad_norm is not None else 0.0
    config["managed_gradient_accumulation"] = False
    config["bf16"] = {"enabled": bool(bf16)}
    config.pop("fp16", None)
    zero = config.setdefault("zero_optimization", {})
    zero["overlap_comm"] = False  # with the loop owning accumulation DeepSpeed allows overlap at stage 2 only
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            zero.pop(key)  # DeepSpeed's own defaults
    return config


class _TrainedParameters(nn.Module):
    """What DDP wraps: the trained parameters alone, and a forward that runs a stage's step function
    (so DDP's reducer is prepared for exactly the parameters that step used)."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.trained = nn.ParameterList(params)

    def forward(self, step_fn, batch):
        return step_fn(batch)


class _Models(nn.Module):
    """Several `MultimodalPolicy` objects as one module (PPO with a separately loaded critic)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)


class StepEngine:
    """One stage's optimizer and its engine. `optimizer` is what the loop sets learning rates on and
    checkpoints (under DeepSpeed: each rank's ZeRO partition of it)."""

    def __init__(self, accelerator, models: list[nn.Module], params: list[nn.Parameter],
                 optimizer: torch.optim.Optimizer, batch_size: int, max_grad_norm: float | None, bf16: bool):
        self.accelerator = accelerator
        self.models = models
        self.params = params
        self.max_grad_norm = max_grad_norm
        self.kind = engine_kind(accelerator)
        self.world_size = accelerator.num_processes
        self.zero_stage = zero_stage(accelerator)
        self.ddp = self.deepspeed = None
        self.optimizer = optimizer
        self.gradient_bytes: int | None = None
        if self.kind == "deepspeed":
            fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, batch_size,
                                  self.world_size, max_grad_norm, bf16)
            module = models[0] if len(models) == 1 else _Models(models)
            self.deepspeed, self.optimizer = accelerator.prepare(module, optimizer)
            if self.zero_stage == 3 and self.world_size > 1:
                for model in models:  # every forward gathers with all processes: generate in step
                    model.synced_generation = True
        elif self.kind == "ddp":
            self.ddp = accelerator.prepare(_TrainedParameters(params))

    @contextmanager
    def micro_batch(self, last: bool):
        """Around one micro-batch's forward and backward: DDP synchronises gradients on the last only,
        and LOMO updates in the last one's backward only (before it, gradients accumulate)."""
        with ExitStack() as stack:
            if self.ddp is not None and not last:
                stack.enter_context(self.ddp.no_sync())
            if isinstance(self.optimizer, LOMO) and not last:
                stack.enter_context(self.optimizer.accumulating())
            yield

    def forward(self, step_fn, batch):
        """`step_fn(batch)` (a stage's `train_step`), through DDP's forward when there is one."""
        return step_fn(batch) if self.ddp is None else self.ddp(step_fn, batch)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Backpropagate `loss` (already divided by the step's global count) so that the gradient is
        the sum over processes; `retain_graph` (one process: LOMO's check) keeps the graph."""
        if self.kind == "deepspeed":
            self.deepspeed.backward(loss * self.world_size, scale_wrt_gas=False, **({"retain_graph": True} if retain_graph else {}))
        elif self.kind == "ddp":
            (loss * self.world_size).backward(retain_graph=retain_graph)
        else:
            loss.backward(retain_graph=retain_graph)

    def grad_norm_and_clip(self) -> float | None:
        """Total gradient norm before clipping, clipping to `max_grad_norm` (DDP / one process). Under
        DeepSpeed the engine clips inside `step` and the norm is known only after it: None here. Under
        LOMO the norm its hooks measured (the loop clips in a second pass)."""
        if self.kind == "deepspeed":
            return None
        if isinstance(self.optimizer, LOMO):  # the gradients are gone: LOMO's hooks measured them
            return self.optimizer.take_grad_norm()
        grads = [p for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        if self.max_grad_norm is None:
            return torch.nn.utils.get_total_norm([p.grad for p in grads]).item()
        return torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm).item()

    def step(self) -> float | None:
        """Apply the update and clear gradients; returns DeepSpeed's gradient norm (None otherwise)."""
        if self.kind == "deepspeed":
            self.deepspeed.step()
            norm = self.deepspeed.get_global_grad_norm()
            return None if norm is None else float(norm)
        self.gradient_bytes = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None

    def discard_gradients(self) -> None:
        """Drop this step's gradients without an update (a non-finite step)."""
        if self.kind == "deepspeed":
            self.deepspeed.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict:
        """What a checkpoint keeps of the optimizer (this rank's): the torch optimizer's state dict;
        under ZeRO, that of the torch optimizer over this rank's flat partition (Adam's moments: plain
        tensors and numbers, loadable with weights_only). The fp32 master weights are not kept: the
        engine rebuilds them from the adapters, which a resume loads before the engine exists."""
        if self.deepspeed is not None:
            inner = _inner_optimizer(self.deepspeed)
            return {"partitions": [dict(inner.state.get(master, {})) for master in _masters(self.deepspeed)]}
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        if self.deepspeed is not None:
            inner, masters = _inner_optimizer(self.deepspeed), _masters(self.deepspeed)
            if len(state["partitions"]) != len(masters):
                raise ValueError(f"checkpoint has {len(state['partitions'])} optimizer partitions, this engine "
                                 f"{len(masters)}: resume with the engine and process count it was saved with")
            for master, saved in zip(masters, state["partitions"]):
                if saved:
                    inner.state[master] = {k: v.to(master.device) if torch.is_tensor(v) and v.dim() else v
                                           for k, v in saved.items()}
        else:
            self.optimizer.load_state_dict(state)

    def memory(self) -> dict:
        """Bytes this rank holds after a step: `parameter_bytes` (every element it stores: the whole
        model, or its ZeRO-3 partition), `gradient_bytes` of the trained parameters at the last update
        (under ZeRO-2/3: this rank's partition of the reduced gradients, which DeepSpeed frees after the
        step, so it is counted as the partition's elements x the trained dtype), `optimizer_state_bytes` (Adam's
        moments; under ZeRO this rank's partition of them), `master_weight_bytes` (ZeRO's fp32 copy of
        this rank's partition of the trained weights; 0 otherwise)."""
        gradient_bytes = self.gradient_bytes
        if self.deepspeed is not None:
            params = list(self.deepspeed.module.parameters())
            state, masters = _zero_state(self.deepspeed)
            gradient_bytes = sum(m.numel() for m in masters) * self.params[0].element_size()
        else:
            unique = {id(p): p for m in self.models if isinstance(m, nn.Module) for p in m.parameters()}
            params, state, masters = list(unique.values()) or self.params, self.optimizer.state_dict(), []
        param_bytes = sum(_held(p).numel() * _held(p).element_size() for p in params)
        return {"parameter_bytes": int(param_bytes), "gradient_bytes": gradient_bytes,
                "optimizer_state_bytes": int(_tensor_bytes(state)), "master_weight_bytes": int(_tensor_bytes(masters))}


@contextmanager
def zero3_gathered(params: list[nn.Parameter], modifier_rank: int | None = None):
    """Inside: those of `params` that ZeRO-3 partitioned are whole on every rank (all ranks must
    enter); a no-op for any other parameter. With `modifier_rank`, what that rank writes to them is
    partitioned back on exit (stages set up their adapters so: copies and loads write whole tensors)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def distributed_facts(accelerator) -> dict:
    """report.json's `distributed` block: engine (none | ddp | deepspeed), ZeRO stage (0 without
    DeepSpeed), world size."""
    return {"engine": engine_kind(accelerator), "zero_stage": zero_stage(accelerator),
            "world_size": accelerator.num_processes}


def per_rank_bytes(stages: list[dict]) -> dict | None:
    """report.json's `distributed.per_rank_bytes`: the most any rank held in any stage, in bytes, of
    `parameters`, `gradients` and `optimizer` (Adam's state plus ZeRO's fp32 master partition), from
    each stage entry's `distributed.per_rank` (`StepEngine.memory`). None when no stage trained."""
    held = [rank for s in stages for rank in s.get("distributed", {}).get("per_rank", [])]
    if not held:
        return None
    return {"parameters": max(r["parameter_bytes"] for r in held),
            "gradients": max(r["gradient_bytes"] or 0 for r in held),
            "optimizer": max(r["optimizer_state_bytes"] + r["master_weight_bytes"] for r in held)}


def _held(param: nn.Parameter) -> torch.Tensor:
    """The tensor this rank stores for `param` (its ZeRO-3 partition when partitioned)."""
    return getattr(param, "ds_tensor", param)


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer a ZeRO optimizer runs over this rank's flat fp32 partitions."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _masters(engine) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions (one per parameter group) that a ZeRO optimizer updates."""
    zero = engine.optimizer
    return list(getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat)


def _zero_state(engine) -> tuple[list, list]:
    """This rank's share of a ZeRO optimizer: its torch optimizer's state (Adam's moments) over the
    rank's flat fp32 partitions, and those partitions (the fp32 master weights)."""
    return list(_inner_optimizer(engine).state.values()), _masters(engine)


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def all_sum(value: torch.Tensor, ctx) -> torch.Tensor:
    """`value` summed over the run's processes (`ctx`: a `RunContext`), float32, on the CPU."""
    if ctx.world_size == 1:
        return value
    return ctx.accelerator.reduce(value.to(ctx.accelerator.device).float().clone(), reduction="sum").cpu()


def mean_over_processes(metrics: dict, ctx) -> dict:
    """A step's logged metrics (each process's means over its micro-batches) averaged over processes,
    so the log is not rank 0's share alone. Every process has the same keys (the same `train_step`)."""
    keys = [k for k in sorted(metrics) if isinstance(metrics[k], (int, float))]
    if ctx.world_size == 1 or not keys:
        return metrics
    totals = all_sum(torch.tensor([float(metrics[k]) for k in keys]), ctx)
    return {**metrics, **{k: v / ctx.world_size for k, v in zip(keys, totals.tolist())}}

"""Memory-lean optimizers for full-parameter fine-tuning (seed 001): LOMO and MeZO.

Both are `torch.optim.Optimizer`s with no per-parameter state, so the shared loop sets their
learning rate and checkpoints them like AdamW (`state_dict()` holds only the parameter groups).
With P trained parameters of b bytes each, what training holds beyond the weights and activations:

| optimizer | gradients                      | optimizer state | backward activations |
| --------- | ------------------------------ | --------------- | -------------------- |
| AdamW     | P*b (all at once)              | 2*P*4 (fp32)    | yes                  |
| LOMO      | one parameter's at a time (**) | 0               | yes                  |
| MeZO      | none (one z [param shape] temp)| 0               | no (no_grad)         |

(**) With gradient accumulation (> 1 micro-batch per step) gradients are summed in `p.grad`
across the micro-batches, as for AdamW, and freed one parameter at a time in the last backward
(`flush` then treats any parameter only the earlier micro-batches reached).

LOMO (Lv et al. 2023, "Full Parameter Fine-tuning for Large Language Models with Limited
Resources"): SGD fused into backward. A post-accumulate-grad hook on every parameter applies

    p <- p * (1 - lr * weight_decay) - lr * scale * g        g: p's gradient, summed over the step

as soon as g is complete, then frees g. `scale` is 1, or the clipping factor
min(1, max_norm / (||g_all|| + 1e-6)) of LOMO's two-pass clipping: a first backward only measures
||g_all|| (each gradient freed as measured), a second, with the same randomness, updates
(`Stage._optimizer_step` runs the passes; the cost is one more forward and backward a step).

An update made in backward cannot be undone, so without clipping the step's last backward runs twice
on one graph (`retain_graph=True`): first under `checking()`, which measures every parameter's whole
gradient for the step (what earlier micro-batches accumulated plus this backward's part) and keeps
none of it, then, only if every gradient is finite, in update mode. A finite loss with a non-finite
gradient thus changes no parameter, and the step is skipped whole (one more backward a step, no more
forwards; the graph's activations live until the second backward ends, as long as they did before
the first one began).

MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes"): per step, a
seed s; z ~ N(0, I) [every trained parameter's shape] is drawn from s whenever needed, never stored:

    L+ = L(theta + eps z),  L- = L(theta - eps z)     (same batch, same randomness, no_grad)
    g  = (L+ - L-) / (2 eps)                           the projected gradient (a scalar)
    theta <- theta * (1 - lr * weight_decay) - lr * g * z

After the two passes theta is restored (theta + eps z - 2 eps z + eps z, equal up to rounding).
The seeds come from (run seed, step) (`step_seed`), so a resumed run draws the same z's.

Shapes and units: lr is per unit of the loss the closure / backward sees (the loop's loss is a
mean over counted tokens or pairs); eps is in the parameters' units.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

OPTIMIZERS = ("adamw", "lomo", "mezo")


class LOMO(torch.optim.Optimizer):
    """SGD fused into backward; see the module docstring. Hooks are registered on construction and
    removed by `close()` (the loop calls it when a stage ends: the parameters outlive the stage)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        # update | accumulate (gradients kept in p.grad) | measure (norm only, freed) | check (`checking`)
        self.mode = "update"
        self.scale = 1.0  # multiplies every update (LOMO's clipping factor)
        self.check_finite = True  # skip (and count) a parameter whose gradient is not finite
        self.skipped = 0  # parameters not updated since the last `take_grad_norm` (non-finite gradient)
        self._grad_sq = torch.zeros((), dtype=torch.float64)  # sum of squared gradient entries
        self.checked_finite = True  # whether the last `checking()` found every gradient finite
        self._held: dict[torch.Tensor, torch.Tensor] = {}  # under `checking()`: gradients set aside
        self._checked: set[torch.Tensor] = set()  # under `checking()`: parameters measured
        self._group = {}
        self._handles = []
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                self._group[param] = index
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook))

    @torch.no_grad()
    def _hook(self, param: torch.Tensor) -> None:
        if self.mode == "accumulate":
            return
        grad = param.grad
        if self.mode == "check":  # the step's whole gradient: set-aside accumulation + this backward's part
            held = self._held.get(param)
            grad = grad if held is None else held + grad
            self._checked.add(param)
        square = torch.linalg.vector_norm(grad, dtype=torch.float32).double() ** 2
        self._grad_sq = self._grad_sq.to(square.device) + square
        if self.mode == "update":
            if self.check_finite and not bool(torch.isfinite(square)):
                self.skipped += 1
            else:
                group = self.param_groups[self._group[param]]
                if group["weight_decay"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(grad, alpha=-group["lr"] * self.scale)
        param.grad = None

    @contextmanager
    def _mode(self, mode: str, scale: float = 1.0, check_finite: bool = True):
        saved = self.mode, self.scale, self.check_finite
        self.mode, self.scale, self.check_finite = mode, scale, check_finite
        try:
            yield self
        finally:
            self.mode, self.scale, self.check_finite = saved

    def accumulating(self):
        """Inside: backward sums gradients into p.grad (a step's micro-batches before its last)."""
        return self._mode("accumulate")

    def measuring(self):
        """Inside: backward only adds each gradient's squared norm (from 0 on entry), then frees it (no
        update)."""
        self._grad_sq = torch.zeros((), dtype=torch.float64)
        return self._mode("measure")

    @contextmanager
    def checking(self):
        """Inside: backward measures each parameter's whole gradient for the step (what earlier
        micro-batches accumulated in p.grad, set aside on entry, plus this backward's part) and frees
        this backward's part: nothing is updated and, on exit, p.grad holds exactly what it held on
        entry. Run the step's last backward inside with `retain_graph=True`, then again outside to
        update. On exit `checked_finite` says whether every gradient was finite; a finite measurement
        is then dropped (the update backward measures the same gradient again), a non-finite one is
        kept for `take_grad_norm`, which the loop reads to skip the step. Parameters that only the
        earlier micro-batches reached count too (as `flush` would apply them). A parameter reached by
        several backward calls inside (PPO's roles) is measured per call: finiteness stays exact."""
        self._grad_sq = torch.zeros((), dtype=torch.float64)
        self._held, self._checked = {}, set()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._held[param], param.grad = param.grad, None
        try:
            with self._mode("check"):
                yield self
            with torch.no_grad():
                for param, grad in self._held.items():
                    if param not in self._checked:
                        square = torch.linalg.vector_norm(grad, dtype=torch.float32).double() ** 2
                        self._grad_sq = self._grad_sq.to(square.device) + square
            self.checked_finite = bool(torch.isfinite(self._grad_sq))
            if self.checked_finite:
                self._grad_sq = torch.zeros((), dtype=torch.float64)
        finally:
            for param, grad in self._held.items():
                param.grad = grad
            self._held, self._checked = {}, set()

    def updating(self, scale: float = 1.0, check_finite: bool = True):
        """Inside: backward updates each parameter with `scale` x its gradient (the default mode)."""
        return self._mode("update", scale, check_finite)

    def flush(self) -> None:
        """Treat, in the current mode, every parameter still holding a gradient: one whose hook did not
        run in the last backward because only earlier micro-batches reached it (e.g. cross-attention
        weights when the step's last micro-batch shows no image)."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._hook(param)

    def take_grad_norm(self) -> float:
        """The L2 norm of every gradient measured or applied since the last call (then reset)."""
        norm = math.sqrt(float(self._grad_sq))
        self._grad_sq = torch.zeros((), dtype=torch.float64)
        return norm

    def step(self, closure=None):
        """Nothing: the update happened in backward."""
        return None

    def close(self) -> None:
        """Remove the hooks: the parameters stop updating themselves in backward."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class MeZO(torch.optim.Optimizer):
    """Zeroth-order SGD from two forward passes; see the module docstring. `step(closure, seed)`."""

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0):
        if eps <= 0:
            raise ValueError(f"MeZO eps must be > 0, got {eps}")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

    def _directions(self, seed: int):
        """(group, parameter, z) for every trained parameter in a fixed order; z [parameter shape], in the
        parameter's dtype, drawn afresh from `seed` (one generator per device), so every call for one
        seed yields the same z's and only one is alive at a time."""
        generators: dict[torch.device, torch.Generator] = {}
        for group in self.param_groups:
            for param in group["params"]:
                if param.device not in generators:
                    generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
                yield group, param, torch.randn(param.shape, generator=generators[param.device], device=param.device,
                                                dtype=param.dtype)

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """theta <- theta + scale * eps * z(seed), per group's eps."""
        for group, param, z in self._directions(seed):
            param.add_(z, alpha=scale * group["eps"])

    @torch.no_grad()
    def step(self, closure, seed: int) -> dict:
        """One MeZO step. `closure()` returns the loss (a float) at the current weights, under no_grad;
        it is called twice, with the same RNG state. Returns {loss_plus, loss_minus, projected_grad,
        applied}; nothing is applied when either loss is not finite (the weights are restored)."""
        rng = torch_rng_state()
        self.perturb(seed, 1.0)
        loss_plus = float(closure())
        set_torch_rng_state(rng)
        self.perturb(seed, -2.0)
        loss_minus = float(closure())
        self.perturb(seed, 1.0)
        eps = self.param_groups[0]["eps"]
        if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
            return {"loss_plus": loss_plus, "loss_minus": loss_minus, "projected_grad": float("nan"), "applied": False}
        projected = (loss_plus - loss_minus) / (2 * eps)
        for group, param, z in self._directions(seed):
            if group["weight_decay"]:
                param.mul_(1 - group["lr"] * group["weight_decay"])
            param.add_(z, alpha=-group["lr"] * projected)
        return {"loss_plus": loss_plus, "loss_minus": loss_minus, "projected_grad": projected, "applied": True}


def step_seed(run_seed: int, step: int) -> int:
    """MeZO's seed of optimizer step `step` (0-based) of a run seeded `run_seed`: a pure function, so
    a resumed run perturbs exactly as the uninterrupted one did. Distinct for distinct pairs
    (run_seed < 2**31, step < 2**32)."""
    return (run_seed % 2**31) * 2**32 + step


def build_optimizer(name: str, params: list, lr: float, weight_decay: float = 0.0, mezo_eps: float = 1e-3):
    """The optimizer a stage's `optimizer:` names, over `params`."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "lomo":
        return LOMO(params, lr=lr, weight_decay=weight_decay)
    if name == "mezo":
        return MeZO(params, lr=lr, eps=mezo_eps, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def torch_rng_state() -> tuple:
    """torch's CPU RNG state and every visible GPU's (dropout in the two MeZO / LOMO passes matches)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def set_torch_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)

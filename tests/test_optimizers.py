"""LOMO and MeZO (`alignment/optimizers.py`): their updates against hand-worked numbers, their place in
the shared loop (accumulation, LOMO's clipping pass, refusals, resume), and a few steps of full
fine-tuning on tiny-mllama that lower the loss."""

import copy
import math

import pytest
import torch

from alignment.config import ConfigError, StageConfig
from alignment.losses import sft_loss_sum
from alignment.optimizers import LOMO, MeZO, build_optimizer, step_seed
from alignment.policy import LoraSpec, MultimodalPolicy
from alignment.stages.base import Stage, config_fingerprint
from tests._policy import make_batch
from tests._toy_stage import ToyAccelerator, ToyPolicy, toy_stage

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def _linear():
    """y = w.x + b with w = [1, 2], b = 0.5; at x = [1, 1] the loss y^2 is 3.5^2 = 12.25, and its
    gradients are dL/dw = 2 * 3.5 * x = [7, 7], dL/db = 7."""
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.bias.fill_(0.5)
    return layer, lambda: layer(torch.ones(1, 2)).pow(2).sum()


def test_lomo_update_is_the_hand_computed_sgd_step_made_in_backward():
    """lr 0.1: w = [1, 2] - 0.1 * [7, 7] = [0.3, 1.3], b = 0.5 - 0.7 = -0.2; no gradient is left and
    no state is kept. With weight decay 0.5, w is first scaled by 1 - 0.1 * 0.5 = 0.95: [0.25, 1.2]."""
    layer, loss = _linear()
    optimizer = LOMO(layer.parameters(), lr=0.1)
    loss().backward()
    torch.testing.assert_close(layer.weight, torch.tensor([[0.3, 1.3]]))
    torch.testing.assert_close(layer.bias, torch.tensor([-0.2]))
    assert layer.weight.grad is None and layer.bias.grad is None
    assert optimizer.state_dict()["state"] == {}
    assert optimizer.take_grad_norm() == pytest.approx(7 * math.sqrt(3))
    optimizer.close()

    layer, loss = _linear()
    optimizer = LOMO(layer.parameters(), lr=0.1, weight_decay=0.5)
    loss().backward()
    torch.testing.assert_close(layer.weight, torch.tensor([[0.25, 1.2]]))
    optimizer.close()
    loss().backward()  # hooks removed: no more updates, the gradient stays
    torch.testing.assert_close(layer.weight, torch.tensor([[0.25, 1.2]]))
    assert layer.weight.grad is not None


def test_lomo_modes_accumulate_measure_and_scale():
    """Two micro-batches, the first under `accumulating()`: the update uses the summed gradient,
    w = [1, 2] - 0.1 * [14, 14] = [-0.4, 0.6]. `measuring()` only measures (norm 7 sqrt 3) and frees.
    `updating(scale=0.5)` halves the step: w = [1, 2] - 0.05 * [7, 7] = [0.65, 1.65]. A non-finite
    gradient is not applied."""
    layer, loss = _linear()
    optimizer = LOMO(layer.parameters(), lr=0.1)
    with optimizer.accumulating():
        loss().backward()
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[7.0, 7.0]]))
    loss().backward()
    torch.testing.assert_close(layer.weight, torch.tensor([[-0.4, 0.6]]))
    optimizer.close()

    layer, loss = _linear()
    optimizer = LOMO(layer.parameters(), lr=0.1)
    with optimizer.measuring():
        loss().backward()
    torch.testing.assert_close(layer.weight, torch.tensor([[1.0, 2.0]]))
    assert layer.weight.grad is None and optimizer.take_grad_norm() == pytest.approx(7 * math.sqrt(3))
    with optimizer.updating(scale=0.5):
        loss().backward()
    torch.testing.assert_close(layer.weight, torch.tensor([[0.65, 1.65]]))
    (layer(torch.ones(1, 2)).sum() * float("nan")).backward()
    torch.testing.assert_close(layer.weight, torch.tensor([[0.65, 1.65]]))
    assert optimizer.skipped == 2 and math.isnan(optimizer.take_grad_norm())
    optimizer.close()


def test_lomo_flush_applies_what_only_an_earlier_micro_batch_reached():
    """Micro-batch 1 (accumulating) reaches w and b, micro-batch 2 only b (loss 3 b, gradient 3):
    b's hook updates it with 7 + 3 = 10 (b = 0.5 - 1 = -0.5); w's never runs, so `flush` applies
    its held [7, 7]: w = [0.3, 1.3]."""
    layer, loss = _linear()
    optimizer = LOMO(layer.parameters(), lr=0.1)
    with optimizer.accumulating():
        loss().backward()
    (3 * layer.bias).sum().backward()
    torch.testing.assert_close(layer.bias, torch.tensor([-0.5]))
    torch.testing.assert_close(layer.weight, torch.tensor([[1.0, 2.0]]))
    optimizer.flush()
    torch.testing.assert_close(layer.weight, torch.tensor([[0.3, 1.3]]))
    assert layer.weight.grad is None
    optimizer.close()


def test_mezo_step_is_the_hand_computed_two_point_estimate():
    """L(theta) = |a|^2 + |b|^2 with a [2], b [3] (float64). z = (z_a, z_b) is drawn from one generator
    seeded with the step's seed, a's first. For this quadratic the two-point estimate is exact:
    L+ - L- = |theta + eps z|^2 - |theta - eps z|^2 = 4 eps theta.z, so g = 2 theta.z, and the update
    is theta - lr g z. L+ is reported as |theta + eps z|^2."""
    a = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.5, 2.0, -3.0], dtype=torch.float64))
    theta = torch.cat([a.detach(), b.detach()])
    generator = torch.Generator().manual_seed(7)
    z = torch.cat([torch.randn(2, generator=generator, dtype=torch.float64),
                   torch.randn(3, generator=generator, dtype=torch.float64)])
    lr, eps = 0.01, 1e-3
    optimizer = MeZO([a, b], lr=lr, eps=eps)
    draws = []

    def closure():
        draws.append(torch.rand(()).item())  # the same randomness in both passes
        return float(a.pow(2).sum() + b.pow(2).sum())

    result = optimizer.step(closure, seed=7)
    g = 2 * float(theta @ z)
    assert result["projected_grad"] == pytest.approx(g, rel=1e-6)
    assert result["loss_plus"] == pytest.approx(float((theta + eps * z).pow(2).sum()), rel=1e-12)
    torch.testing.assert_close(torch.cat([a.detach(), b.detach()]), theta - lr * g * z)
    assert draws[0] == draws[1] and optimizer.state_dict()["state"] == {}

    before = torch.cat([a.detach(), b.detach()])
    result = optimizer.step(lambda: float("nan"), seed=8)  # nothing applied, theta restored (up to rounding)
    assert not result["applied"]
    torch.testing.assert_close(torch.cat([a.detach(), b.detach()]), before)


def test_step_seeds_are_pure_and_distinct():
    seeds = {step_seed(run, step) for run in range(3) for step in range(100)}
    assert len(seeds) == 300 and step_seed(2, 5) == step_seed(2, 5)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def test_optimizer_config_checks_and_fingerprint():
    assert StageConfig(name="s").optimizer == "adamw"
    with pytest.raises(ConfigError, match=r"stages\.s\.optimizer: must be one of \('adamw', 'lomo', 'mezo'\)"):
        StageConfig(name="s", optimizer="sgd")
    with pytest.raises(ConfigError, match=r"stages\.s\.mezo_eps: must be > 0"):
        StageConfig(name="s", optimizer="mezo", mezo_eps=0.0)
    assert "optimizer" not in config_fingerprint(StageConfig(name="s"))  # checkpoints of before still resume
    assert {"optimizer", "mezo_eps"} <= set(config_fingerprint(StageConfig(name="s", optimizer="mezo")))


# ---- in the shared loop (the toy stage: loss = sum over rows of |w - x|^2, 4-vector w) -----------------
def _recorded(stage):
    """Record the x of every train_step call (mean loss per step is over its counted rows)."""
    calls, original = [], stage.train_step

    def train_step(batch):
        calls.append(batch["x"].clone())
        return original(batch)

    stage.train_step = train_step
    return calls


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_lomo_in_the_loop_is_sgd_on_the_step_mean_and_clips_in_a_second_pass(tmp_path, max_grad_norm):
    """One step, 2 micro-batches of 2 rows, w = 0: the step's loss is the mean over its 4 rows of
    |w - x|^2, its gradient g = 2 (w - mean x) = -2 mean x, and w = -lr * s * g with s = 1 (no
    clipping) or min(1, 0.5 / (|g| + 1e-6)). Clipping runs every micro-batch twice (measure, then
    update)."""
    stage = toy_stage(tmp_path, optimizer="lomo", max_steps=1, grad_accum=2, max_grad_norm=max_grad_norm)
    calls = _recorded(stage)
    stage.train()
    x = torch.cat(calls[:2])
    g = -2 * x.mean(0)
    scale = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (g.norm().item() + 1e-6))
    torch.testing.assert_close(stage.policy.w.detach(), -0.1 * scale * g)
    assert len(calls) == (2 if max_grad_norm is None else 4)
    assert stage.history[0]["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-5)
    assert stage.policy.w.grad is None


def test_mezo_in_the_loop_uses_the_step_seed(tmp_path):
    """One MeZO step: w = 0 - lr * g * z, z drawn from step_seed(0, 0); g from L+- of the step's batches."""
    stage = toy_stage(tmp_path, optimizer="mezo", max_steps=1, grad_accum=2, lr=0.01)
    calls = _recorded(stage)
    stage.train()
    x = torch.cat(calls[:2])
    z = torch.randn(4, generator=torch.Generator().manual_seed(step_seed(0, 0)))
    loss = lambda w: ((w - x) ** 2).sum(-1).mean().item()  # noqa: E731
    g = (loss(1e-3 * z) - loss(-1e-3 * z)) / 2e-3
    torch.testing.assert_close(stage.policy.w.detach(), -0.01 * g * z)
    assert len(calls) == 4 and stage.history[0]["projected_grad"] == pytest.approx(g, rel=1e-4)


@pytest.mark.parametrize("optimizer", ["lomo", "mezo"])
def test_toy_loss_falls_and_a_resumed_run_reproduces_the_uninterrupted_one(tmp_path, monkeypatch, optimizer):
    options = dict(optimizer=optimizer, grad_accum=2, lr=0.05, max_steps=6)
    straight = toy_stage(tmp_path / "straight", **options)
    straight.train()
    losses = [h["loss"] for h in straight.history]
    assert sum(losses[-2:]) < sum(losses[:2])

    original = Stage._optimizer_step

    def crash_at_step_4(self, optimizer, params, stream, step):
        if step == 3:
            raise KeyboardInterrupt("simulated crash")
        return original(self, optimizer, params, stream, step)

    monkeypatch.setattr(Stage, "_optimizer_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        toy_stage(tmp_path / "crashed", **options).train()
    monkeypatch.setattr(Stage, "_optimizer_step", original)
    resumed = toy_stage(tmp_path / "crashed", resume=True, **options)
    resumed.train()
    torch.testing.assert_close(resumed.policy.w, straight.policy.w, atol=0, rtol=0)
    assert [h["loss"] for h in resumed.history] == losses


@pytest.mark.parametrize("optimizer,max_grad_norm", [("lomo", None), ("lomo", 1.0), ("mezo", 1.0)])
def test_a_non_finite_loss_updates_nothing(tmp_path, optimizer, max_grad_norm):
    """The first train_step's loss is NaN: the step is skipped and w stays 0 (MeZO: restored, up to
    rounding); LOMO without clipping does not backpropagate it, with clipping stops after measuring."""
    stage = toy_stage(tmp_path, optimizer=optimizer, max_grad_norm=max_grad_norm, max_steps=1, nan_calls=(1,))
    stage.train()
    assert stage.history[0].get("skipped") == 1 and stage.nonfinite_steps == 1
    torch.testing.assert_close(stage.policy.w.detach(), torch.zeros(4))
    assert stage.policy.w.grad is None


class _TwoParameterPolicy(ToyPolicy):
    """The toy policy with a second trained 4-vector `v` (initialised to ones) beside `w`."""

    def __init__(self):
        super().__init__()
        self.v = torch.nn.Parameter(torch.ones(4))

    def trainable_parameters(self):
        return [self.w, self.v]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_lomo_without_clipping_skips_a_finite_loss_with_a_non_finite_gradient_whole(tmp_path, grad_accum):
    """Loss sum |w - x|^2 + v.x (finite); a tensor hook makes w's gradient from the step's first
    micro-batch +inf (under accumulation: a part the last backward's check must see). LOMO updates in
    backward, so the step must be measured before any update: w and v stay as they were (v's gradient
    is finite: the old single pass updated it and still logged the step skipped), the step is reported
    skipped, no gradient is left; the next step updates both."""
    policy = _TwoParameterPolicy()
    stage = toy_stage(tmp_path, optimizer="lomo", max_grad_norm=None, max_steps=2, grad_accum=grad_accum, policy=policy)
    toy_step = stage.train_step

    def train_step(batch):
        loss, metrics = toy_step(batch)
        return loss + (policy.v * batch["x"]).sum(), metrics

    stage.train_step = train_step
    policy.w.register_hook(lambda grad: grad + float("inf") if stage.calls == 1 else grad)
    real_step = Stage._optimizer_step
    after_first = {}

    def optimizer_step(self, optimizer, params, stream, step):
        record = real_step(self, optimizer, params, stream, step)
        if step == 0:
            after_first.update(w=policy.w.detach().clone(), v=policy.v.detach().clone(),
                               grads=[p.grad for p in params])
        return record

    stage._optimizer_step = optimizer_step.__get__(stage)
    stage.train()
    assert torch.equal(after_first["w"], torch.zeros(4)) and torch.equal(after_first["v"], torch.ones(4))
    assert after_first["grads"] == [None, None]
    assert stage.history[0].get("skipped") == 1 and "loss" not in stage.history[0]
    assert "skipped" not in stage.history[1] and math.isfinite(stage.history[1]["grad_norm"])
    assert not torch.equal(policy.w.detach(), torch.zeros(4)) and not torch.equal(policy.v.detach(), torch.ones(4))
    assert torch.isfinite(policy.w).all() and policy.w.grad is None and policy.v.grad is None


def test_lomo_checking_measures_the_whole_step_gradient_and_leaves_what_it_found():
    """Micro-batch 1 accumulates [7, 7] into w's gradient (and 7 into b's); the last backward, run
    under `checking()` on a retained graph, measures w's and b's whole gradient (14 each entry:
    norm 14 sqrt 3) without updating and leaves p.grad as it was; the same graph's update backward
    then applies the summed gradient: w = [1, 2] - 0.1 [14, 14] = [-0.4, 0.6]. A planted +inf part
    makes `checked_finite` False and keeps the non-finite norm for `take_grad_norm`."""
    layer, loss = _linear()
    optimizer = LOMO(layer.parameters(), lr=0.1)
    with optimizer.accumulating():
        loss().backward()
    last = loss()
    with optimizer.checking():
        last.backward(retain_graph=True)
    torch.testing.assert_close(layer.weight, torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[7.0, 7.0]]))
    assert optimizer.checked_finite and optimizer.take_grad_norm() == 0.0  # dropped: the update measures again
    last.backward()
    torch.testing.assert_close(layer.weight, torch.tensor([[-0.4, 0.6]]))
    assert optimizer.take_grad_norm() == pytest.approx(14 * math.sqrt(3))

    with optimizer.accumulating():
        loss().backward()
    held = layer.weight.grad.clone()
    handle = layer.bias.register_hook(lambda grad: grad + float("inf"))
    with optimizer.checking():
        loss().backward()
    handle.remove()
    assert not optimizer.checked_finite and math.isinf(optimizer.take_grad_norm())
    torch.testing.assert_close(layer.weight, torch.tensor([[-0.4, 0.6]]))
    assert torch.equal(layer.weight.grad, held) and layer.bias.grad is not None
    optimizer.close()


@pytest.mark.parametrize("optimizer", ["lomo", "mezo"])
def test_refused_beside_ddp_or_deepspeed(tmp_path, optimizer):
    class TwoProcesses(ToyAccelerator):
        num_processes = 2

    stage = toy_stage(tmp_path, optimizer=optimizer)
    stage.ctx.accelerator = TwoProcesses()
    with pytest.raises(ConfigError, match=rf"stages\.toy\.optimizer: {optimizer} runs in one process without "
                                          r"DeepSpeed \(this launch: ddp, 2 processes\)"):
        stage.train()


# ---- on tiny-mllama -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    return MultimodalPolicy.from_pretrained("tiny-mllama")


def _fresh(base, spec):
    policy = MultimodalPolicy(copy.deepcopy(base.model), base.processor)
    policy.add_adapter("policy", spec)
    return policy, make_batch(policy)


def _loss(policy, batch) -> torch.Tensor:
    nll, count = sft_loss_sum(policy.forward(batch).logits.float(), batch["labels"])
    return nll / count


def test_lomo_and_mezo_lower_the_loss_of_full_fine_tuning_on_covers(base):
    """Full fine-tuning of the text decoder on two covers: 3 LOMO steps (lr 3e-2) and 10 MeZO steps
    (lr 1e-4, eps 1e-3) each lower the loss; LOMO leaves no gradient behind."""
    policy, batch = _fresh(base, LoraSpec(method="full"))
    optimizer = LOMO(policy.trainable_parameters(), lr=3e-2)
    losses = []
    for _ in range(3):
        loss = _loss(policy, batch)
        loss.backward()
        losses.append(loss.item())
    optimizer.close()
    with torch.no_grad():
        losses.append(_loss(policy, batch).item())
    assert losses[-1] < losses[0] - 2.0, losses
    assert all(p.grad is None for p in policy.trainable_parameters())

    policy, batch = _fresh(base, LoraSpec(method="full"))
    optimizer = MeZO(policy.trainable_parameters(), lr=1e-4, eps=1e-3)
    with torch.no_grad():
        first = _loss(policy, batch).item()
        for step in range(10):
            optimizer.step(lambda: _loss(policy, batch).item(), seed=step_seed(0, step))
        last = _loss(policy, batch).item()
    assert last < first - 1.0, (first, last)


@pytest.mark.parametrize("name", ["lomo", "mezo"])
def test_on_a_lora_adapter_only_the_adapter_changes(base, name):
    policy, batch = _fresh(base, LoraSpec(r=4))
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(name, policy.trainable_parameters(), lr=1e-3)
    if name == "lomo":
        _loss(policy, batch).backward()
        optimizer.close()
    else:
        with torch.no_grad():
            optimizer.step(lambda: _loss(policy, batch).item(), seed=0)
    params = dict(policy.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in trained.items())

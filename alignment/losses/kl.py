"""KL-coefficient controllers for PPO's reward penalty (Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences", section 2.2).

Both expose ``value`` (the current coefficient, passed as ``kl_coef`` to
``kl_penalized_rewards``), ``update(current_kl, n_steps)`` after each rollout batch, and
``state_dict`` / ``load_state_dict`` so a resumed run continues with the same coefficient.
"""


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept so both controllers are interchangeable)."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Steers the measured KL (nats per sequence) toward ``target`` over ``horizon`` samples.

    ``update``: ``e = clip(current_kl / target - 1, -0.2, 0.2)``, then
    ``value *= 1 + e * n_steps / horizon``, with ``n_steps`` the samples (sequences) in the batch.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust ``value`` from the KL measured on the last batch of ``n_steps`` samples."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])

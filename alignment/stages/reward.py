"""`RewardModelStage`: a scalar head on the last token of a `reward` adapter, trained with the
Bradley-Terry loss on image preference pairs (seed 004).

The reward model shares the base with the policy: its own LoRA adapter plus a linear head on the
last hidden state of each sequence's last real token (the answer's <|eot_id|>). Chosen and rejected
rows go through one forward and share their pair's image, encoded once per step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from alignment.data import collate_preference
from alignment.evaluate import preference_metrics
from alignment.losses import bradley_terry_loss, reward_centering_loss
from alignment.stages.base import Stage
from alignment.stages.common import lora_spec, pair_reward_stats, to_device

ADAPTER = "reward"


def new_head(policy, name: str, seed: int) -> None:
    """A fresh scalar head `name` (seeded, so a run is reproducible), as `MultimodalPolicy.add_adapter` makes."""
    head = nn.Linear(policy.hidden_size, 1, dtype=torch.float32, device=policy.device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / (policy.hidden_size + 1) ** 0.5)
        head.bias.zero_()
    policy.heads[name] = head


def only_train(policy, names: set[str]) -> None:
    """Make exactly the adapters (and heads) in `names` trainable."""
    policy.trainable_adapters.clear()
    policy.trainable_adapters.update(names)
    for name, head in policy.heads.items():
        head.requires_grad_(name in names)
    if policy.active_adapter is not None:
        policy.set_adapter(policy.active_adapter)  # refreshes requires_grad of every LoRA weight


def load_or_add_adapter(policy, name: str, source: Path | None, config, seed: int, trainable: bool) -> None:
    """Adapter `name` with a head: loaded from `source` (a head is added when the folder has none),
    else fresh (LoRA from `config.lora`)."""
    if source is not None:
        policy.load_adapter(name, source, trainable=trainable)
        if not (Path(source) / "head.safetensors").exists():
            new_head(policy, name, seed)
    elif name in policy.adapters:
        raise ValueError(f"adapter {name!r} exists already; give a folder to load it from")
    else:
        policy.add_adapter(name, lora_spec(config), trainable=trainable)
        new_head(policy, name, seed)


class RewardModelStage(Stage):
    type = "reward"
    adapter_name = ADAPTER

    def setup(self, previous_adapter):
        cfg = self.config
        source = Path(cfg.init_adapter) if cfg.init_adapter else (
            previous_adapter if cfg.init_from_previous else None)
        load_or_add_adapter(self.policy, ADAPTER, source, cfg, self.ctx.seed, trainable=True)
        only_train(self.policy, {ADAPTER})
        self.policy.set_adapter(ADAPTER)

    def run(self, previous_adapter=None):
        entry = super().run(previous_adapter)
        only_train(self.policy, set())  # later stages start with nothing of ours trainable
        return entry

    def collate(self, examples):
        return to_device(collate_preference(examples, self.policy.processor, **self.ctx.collate_kwargs),
                         self.policy.device)

    def count(self, batch):
        return batch["num_pairs"]

    def pair_rewards(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [P], rejected [P]) rewards; each pair's image is encoded once for both rows, and with
        `share_prefix` its image + prompt prefix runs through the language model once."""
        with self.policy.use_adapter(ADAPTER):
            if self.policy.vision_adapted_by(ADAPTER):
                features = self.policy.encode_images(batch)
            else:
                with torch.no_grad():
                    features = self.policy.encode_images(batch)
            rewards = self.policy.pair_sequence_scores(batch, ADAPTER, features, self.config.share_prefix)
        n = batch["num_pairs"]
        return rewards[:n], rewards[n:]

    def train_step(self, batch):
        chosen, rejected = self.pair_rewards(batch)
        n = batch["num_pairs"]
        loss = bradley_terry_loss(chosen, rejected, self.config.margin)
        if self.config.center_rewards:
            loss = loss + self.config.center_rewards * reward_centering_loss(chosen, rejected)
        loss_sum = loss * n
        return loss_sum, pair_reward_stats(chosen, rejected)

    def evaluate(self):
        pairs = self.eval_examples[: self.config.eval_examples]
        chosen, rejected = [], []
        for start in range(0, len(pairs), self.config.eval_batch_size):
            c, r = self.pair_rewards(self.collate(pairs[start : start + self.config.eval_batch_size]))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        if not pairs:
            return {"pairwise_accuracy": 0.0, "reward_std": 0.0}
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        every = torch.cat([chosen, rejected])
        return {
            **preference_metrics(pairs, chosen.tolist(), rejected.tolist(), name="pairwise_accuracy"),
            "reward_std": every.std().item() if every.numel() > 1 else 0.0,
            "reward_mean": every.mean().item(),
            "reward_mean_chosen": chosen.mean().item(),
            "reward_mean_rejected": rejected.mean().item(),
            "reward_std_chosen": chosen.std().item() if chosen.numel() > 1 else 0.0,
            "loss": bradley_terry_loss(chosen, rejected, self.config.margin).item(),
            "pairs": len(pairs),
        }

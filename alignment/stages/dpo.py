"""`DPOStage`: direct preference optimisation on image preference pairs.

Policy and reference share one base: the reference is a frozen copy of the adapter DPO starts
from (SFT's), or the bare base when there is none. Chosen and rejected rows go through one
forward, and each pair's image is encoded once and shared by policy and reference whenever no
adapter touches the vision tower (its features are then identical for both).
"""

from __future__ import annotations

from functools import partial

import torch

from alignment.data import collate_preference, collate_prompts
from alignment.evaluate import answer_metrics, generate_answers, preference_metrics
from alignment.losses import dpo_loss, rpo_nll
from alignment.stages.base import Stage
from alignment.stages.common import ensure_policy_adapter, pair_reward_stats, to_device


class DPOStage(Stage):
    type = "dpo"
    adapter_name = "policy"

    def setup(self, previous_adapter):
        ensure_policy_adapter(self.policy, self.config, previous_adapter)
        if previous_adapter is not None or self.config.init_adapter:
            self.policy.freeze_reference("policy")
        self.reference_logps: dict[str, tuple[float, float]] | None = None

    def collate(self, examples):
        return to_device(collate_preference(examples, self.policy.processor, **self.ctx.collate_kwargs),
                         self.policy.device)

    def count(self, batch):
        return batch["num_pairs"]

    def _encode(self, batch):
        """Image features for the policy and for the reference: one encoding when they agree."""
        if self.policy.vision_is_adapted:
            policy_features = self.policy.encode_images(batch)
            with torch.no_grad(), self.policy.reference():
                return policy_features, self.policy.encode_images(batch)
        with torch.no_grad():
            features = self.policy.encode_images(batch)
        return features, features

    def _reference_logps(self, batch, features) -> torch.Tensor:
        if self.reference_logps is not None:
            pairs = [self.reference_logps[i] for i in batch["ids"]]
            chosen, rejected = zip(*pairs)
            return torch.tensor(chosen + rejected, device=self.policy.device)
        with torch.no_grad(), self.policy.reference():
            return self.policy.completion_logprobs(batch, features)[1]

    def before_training(self):
        if not self.config.precompute_ref_logprobs:
            return
        self.reference_logps = {}
        with torch.no_grad():
            for start in range(0, len(self.train_examples), self.config.eval_batch_size):
                batch = self.collate(self.train_examples[start : start + self.config.eval_batch_size])
                _, ref_features = self._encode(batch)
                with self.policy.reference():
                    logps = self.policy.completion_logprobs(batch, ref_features)[1].tolist()
                n = batch["num_pairs"]
                self.reference_logps.update({i: (logps[k], logps[n + k]) for k, i in enumerate(batch["ids"])})

    def _pair_rewards(self, batch):
        """Per-pair DPO losses [P], chosen and rejected rewards [P], chosen per-token NLL [P]."""
        policy_features, reference_features = self._encode(batch)
        _, logps, mask = self.policy.completion_logprobs(batch, policy_features)
        ref = self._reference_logps(batch, reference_features)
        n = batch["num_pairs"]
        losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=self.config.beta,
                                            loss_type=self.config.loss_type,
                                            label_smoothing=self.config.label_smoothing)
        return losses, chosen, rejected, rpo_nll(logps[:n], mask[:n].sum(-1))

    def train_step(self, batch):
        losses, chosen, rejected, nll = self._pair_rewards(batch)
        if self.config.rpo_alpha:
            losses = losses + self.config.rpo_alpha * nll
        return losses.sum(), {"nll/chosen": nll.mean().item(), **pair_reward_stats(chosen, rejected)}

    def evaluate(self):
        pairs = self.eval_examples[: self.config.eval_examples]
        self.reference_logps = None
        chosen_rewards, rejected_rewards, losses = [], [], []
        for start in range(0, len(pairs), self.config.eval_batch_size):
            batch = self.collate(pairs[start : start + self.config.eval_batch_size])
            loss, chosen, rejected, _ = self._pair_rewards(batch)
            chosen_rewards += chosen.tolist()
            rejected_rewards += rejected.tolist()
            losses.append(loss.sum().item())
        metrics = preference_metrics(pairs, chosen_rewards, rejected_rewards)
        metrics["loss"] = sum(losses) / max(1, len(pairs))
        predictions, references, kinds = generate_answers(
            self.policy, pairs,
            partial(collate_prompts, processor=self.policy.processor, **self.ctx.prompt_kwargs),
            batch_size=self.config.eval_batch_size, max_new_tokens=self.config.max_new_tokens)
        metrics.update(answer_metrics(predictions, references, kinds))
        metrics["samples"] = [{"question": e["question"], "answer": r, "prediction": p}
                              for e, r, p in list(zip(pairs, references, predictions))[:8]]
        return metrics

"""`DPOStage`: direct preference optimisation on image preference pairs.

Policy and reference share one base: the reference is a frozen copy of the adapter DPO starts
from (SFT's), or the bare base when there is none. Chosen and rejected rows go through one
forward, and each pair's image is encoded once and shared by policy and reference whenever no
adapter touches the vision tower (its features are then identical for both). With `share_prefix`
(the default) each pair is one packed row, its image + prompt prefix through the language model
once (`alignment.models.shared_prefix`).
"""

from __future__ import annotations

from functools import partial

import torch

from alignment.data import collate_preference, collate_prompts
from alignment.evaluate import answer_metrics, generate_answers, preference_metrics
from alignment.losses import dpo_loss, rpo_nll
from alignment.stages.base import Stage
from alignment.stages.common import ensure_policy_adapter, pair_reward_stats, to_device
from alignment.stages.stream import ExampleStream


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
        """Image features for the policy and for the reference: one encoding when neither adapter
        touches the vision tower (the features are then the base's for both)."""
        policy = self.policy
        if policy.vision_adapted_by("policy") or policy.vision_adapted_by(policy.reference_adapter()):
            policy_features = policy.encode_images(batch)
            with torch.no_grad(), policy.reference():
                return policy_features, policy.encode_images(batch)
        with torch.no_grad():
            features = policy.encode_images(batch)
        return features, features

    def _reference_logps(self, batch, features) -> torch.Tensor:
        if self.reference_logps is not None:
            pairs = [self.reference_logps[i] for i in batch["ids"]]
            chosen, rejected = zip(*pairs)
            return torch.tensor(chosen + rejected, device=self.policy.device)
        with torch.no_grad(), self.policy.reference():
            return self.policy.pair_logprobs(batch, features, self.config.share_prefix)[1]

    def before_training(self):
        """With `precompute_ref_logprobs`, the reference's log-probs of every training pair, computed
        once: over the very micro-batches the next epoch of training will collate (same rows, same
        padding, under the same autocast), so the first epoch's log-ratios are exactly the live ones'
        (0 at step 0); pairs that epoch leaves out in `eval_batch_size` chunks."""
        if not self.config.precompute_ref_logprobs:
            return
        self.reference_logps = {}
        ctx = self.ctx
        replay = ExampleStream(self.train_examples, self.config.batch_size, ctx.seed, ctx.rank, ctx.world_size)
        replay.position = getattr(self, "stream", replay).position  # the loop's stream, at its resume point
        chunks = [replay.next_batch() for _ in range(replay.batches_per_epoch)]
        seen = {e["id"] for chunk in chunks for e in chunk}
        rest = [e for e in self.train_examples if e["id"] not in seen]
        chunks += [rest[i : i + self.config.eval_batch_size] for i in range(0, len(rest), self.config.eval_batch_size)]
        with torch.no_grad(), self.ctx.accelerator.autocast():
            for chunk in chunks:
                batch = self.collate(chunk)
                _, ref_features = self._encode(batch)
                with self.policy.reference():
                    logps = self.policy.pair_logprobs(batch, ref_features, self.config.share_prefix)[1].tolist()
                n = batch["num_pairs"]
                self.reference_logps.update({i: (logps[k], logps[n + k]) for k, i in enumerate(batch["ids"])})

    def _pair_rewards(self, batch):
        """Per-pair DPO losses [P], chosen and rejected rewards [P], chosen per-token NLL [P]."""
        policy_features, reference_features = self._encode(batch)
        _, logps, mask = self.policy.pair_logprobs(batch, policy_features, self.config.share_prefix)
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

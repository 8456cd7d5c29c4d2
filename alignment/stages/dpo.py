"""`DPOStage`: direct preference optimisation on image preference pairs.

Policy and reference share one base: the reference is a frozen copy of the adapter DPO starts
from (SFT's), or the bare base when there is none. Chosen and rejected rows go through one
forward, and each pair's image is encoded once and shared by policy and reference whenever no
adapter touches the vision tower (its features are then identical for both). With `share_prefix`
(the default) each pair is one packed row, its image + prompt prefix through the language model
once (`alignment.models.shared_prefix`).

`loss_type` picks the per-pair loss from `LOSSES` (the pairwise losses of `alignment.losses`; the names, and
which need a reference, are `alignment.presets.PAIR_LOSSES`);
a list of them with `loss_weights` is their weighted sum (MPO: `[sigmoid, bco_pair, sft]`). The
reference-free ones (orpo, simpo, cpo, and `sft`, the chosen answers' NLL) need no reference: a stage
made only of them loads none and runs no reference pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from alignment.data import collate_preference, collate_prompts
from alignment.evaluate import answer_metrics, generate_answers, preference_metrics
from alignment.losses import DPO_LOSS_TYPES, bco_pair_loss, cpo_loss, dpo_loss, orpo_loss, rpo_nll, simpo_loss
from alignment.presets import loss_names, needs_reference
from alignment.stages.base import Stage
from alignment.stages.common import ensure_policy_adapter, pair_reward_stats, to_device
from alignment.stages.engine import all_sum
from alignment.stages.stream import ExampleStream


@dataclass
class PairLogps:
    """One micro-batch's log-probs of its P pairs' answers (natural log), each ``[P]``: the policy's
    per-sequence sums, the counted tokens of each answer, and the reference's sums (None when the
    losses are reference-free)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    @property
    def chosen_mean(self) -> torch.Tensor:
        """Per-token mean log-prob of each chosen answer ``[P]`` (ORPO, SimPO)."""
        return self.chosen / self.chosen_lengths.clamp(min=1)

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_lengths.clamp(min=1)

    @property
    def chosen_logratios(self) -> torch.Tensor:
        """Δc = policy − reference sums ``[P]``."""
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    @property
    def nll(self) -> torch.Tensor:
        """Each chosen answer's mean per-token NLL ``[P]``: RPO's term, `sft`, ORPO's and CPO's NLL."""
        return rpo_nll(self.chosen, self.chosen_lengths)


@dataclass(frozen=True)
class PairLoss:
    """One `loss_type` of the DPO stage: ``per_pair(logps, config, delta) -> losses [P]`` (`delta`:
    BCO's running reward mean), and which log-probs its implicit rewards β·x use when the stage has no
    reference (`mean` or `sum`). Whether it needs the reference: `alignment.presets.needs_reference`."""

    per_pair: Callable[[PairLogps, object, float], torch.Tensor]
    reward_logps: str = "ratio"


def _dpo_type(name: str) -> PairLoss:
    """A `dpo_loss` loss type (label smoothing goes to `sigmoid` only: the others refuse it)."""

    def per_pair(logps: PairLogps, config, delta: float) -> torch.Tensor:
        return dpo_loss(logps.chosen, logps.rejected, logps.ref_chosen, logps.ref_rejected, beta=config.beta,
                        loss_type=name, label_smoothing=config.label_smoothing if name == "sigmoid" else 0.0)[0]

    return PairLoss(per_pair)


LOSSES: dict[str, PairLoss] = {  # alignment.presets.PAIR_LOSSES, each to its loss
    **{name: _dpo_type(name) for name in DPO_LOSS_TYPES},
    "bco_pair": PairLoss(lambda lp, c, delta: bco_pair_loss(lp.chosen_logratios, lp.rejected_logratios, c.beta, delta)),
    "orpo": PairLoss(lambda lp, c, _: orpo_loss(lp.chosen_mean, lp.rejected_mean, c.beta)[0] + lp.nll,
                     reward_logps="mean"),
    "simpo": PairLoss(lambda lp, c, _: simpo_loss(lp.chosen_mean, lp.rejected_mean, c.beta, c.simpo_gamma),
                      reward_logps="mean"),
    "cpo": PairLoss(lambda lp, c, _: cpo_loss(lp.chosen, lp.rejected, c.beta) + lp.nll,
                    reward_logps="sum"),
    "sft": PairLoss(lambda lp, c, _: lp.nll, reward_logps="mean"),
}


class DPOStage(Stage):
    type = "dpo"
    adapter_name = "policy"

    def setup(self, previous_adapter):
        ensure_policy_adapter(self.policy, self.config, previous_adapter)
        self.uses_reference = needs_reference(self.config.loss_type)
        if not self.uses_reference:
            if self.ctx.is_main:
                tqdm.write(f"[{self.config.name}] loss_type {self.config.loss_type} is reference-free: no reference "
                           "model loaded (no frozen copy, no reference pass)")
        elif previous_adapter is not None or self.config.init_adapter:
            self.policy.freeze_reference("policy")
        self.reference_logps: dict[str, tuple[float, float]] | None = None
        self.bco_reward_sum, self.bco_reward_count = 0.0, 0  # BCO's δ: running mean of the rewards seen

    def extra_state(self):
        return {"bco_reward_sum": self.bco_reward_sum, "bco_reward_count": self.bco_reward_count}

    def load_extra_state(self, state):
        self.bco_reward_sum = state.get("bco_reward_sum", 0.0)
        self.bco_reward_count = state.get("bco_reward_count", 0)

    @property
    def bco_delta(self) -> float:
        """BCO's shift δ: the mean of the rewards β·Δ of every chosen and rejected row trained on so far."""
        return self.bco_reward_sum / self.bco_reward_count if self.bco_reward_count else 0.0

    def collate(self, examples):
        return to_device(collate_preference(examples, self.policy.processor, **self.ctx.collate_kwargs),
                         self.policy.device)

    def count(self, batch):
        return batch["num_pairs"]

    def _encode(self, batch):
        """Image features for the policy and for the reference: one encoding when neither adapter
        touches the vision tower (the features are then the base's for both); reference-free: the
        policy's only (None for the reference)."""
        policy = self.policy
        if not self.uses_reference:
            if policy.vision_adapted_by("policy"):
                return policy.encode_images(batch), None
            with torch.no_grad():
                return policy.encode_images(batch), None
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
        if not self.config.precompute_ref_logprobs or not self.uses_reference:
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

    def _pair_logps(self, batch) -> PairLogps:
        """The policy's (and, when a loss needs it, the reference's) log-probs of the batch's pairs."""
        policy_features, reference_features = self._encode(batch)
        _, logps, mask = self.policy.pair_logprobs(batch, policy_features, self.config.share_prefix)
        n = batch["num_pairs"]
        lengths = mask.sum(-1)
        pair = PairLogps(logps[:n], logps[n:], lengths[:n], lengths[n:])
        if self.uses_reference:
            ref = self._reference_logps(batch, reference_features)
            pair.ref_chosen, pair.ref_rejected = ref[:n], ref[n:]
        return pair

    def _rewards(self, logps: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
        """Implicit rewards of chosen and rejected answers [P], detached: β·Δ with a reference, else
        β × the log-probs the first listed loss uses (per-token means for orpo, simpo, sft; sums for cpo)."""
        beta = self.config.beta
        if self.uses_reference:
            return beta * logps.chosen_logratios.detach(), beta * logps.rejected_logratios.detach()
        if LOSSES[loss_names(self.config.loss_type)[0]].reward_logps == "sum":
            return beta * logps.chosen.detach(), beta * logps.rejected.detach()
        return beta * logps.chosen_mean.detach(), beta * logps.rejected_mean.detach()

    def _update_bco_delta(self, logps: PairLogps) -> None:
        """Add this micro-batch's rewards β·Δ (chosen and rejected rows, every process) to BCO's running mean."""
        chosen, rejected = self._rewards(logps)
        seen = all_sum(torch.tensor([float(chosen.sum() + rejected.sum()), float(2 * chosen.numel())]), self.ctx)
        self.bco_reward_sum += seen[0].item()
        self.bco_reward_count += int(seen[1].item())

    def _losses(self, logps: PairLogps) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-pair losses [P]: the `loss_type`'s, or the `loss_weights`-weighted sum of a list's (with
        each term's batch mean, for the log)."""
        config, delta = self.config, self.bco_delta
        if isinstance(config.loss_type, str):
            return LOSSES[config.loss_type].per_pair(logps, config, delta), {}
        weights = config.loss_weights or [1.0] * len(config.loss_type)
        terms = {name: LOSSES[name].per_pair(logps, config, delta) for name in config.loss_type}
        losses = sum(weight * terms[name] for name, weight in zip(config.loss_type, weights))
        return losses, {f"loss/{name}": term.detach().mean().item() for name, term in terms.items()}

    def _pair_rewards(self, batch, logps: PairLogps | None = None):
        """Per-pair losses [P], chosen and rejected rewards [P], chosen per-token NLL [P], logged terms."""
        logps = self._pair_logps(batch) if logps is None else logps
        losses, terms = self._losses(logps)
        chosen, rejected = self._rewards(logps)
        return losses, chosen, rejected, logps.nll, terms

    def train_step(self, batch):
        logps = self._pair_logps(batch)
        uses_bco = "bco_pair" in loss_names(self.config.loss_type)
        if uses_bco:
            self._update_bco_delta(logps)
        losses, chosen, rejected, nll, terms = self._pair_rewards(batch, logps)
        if self.config.rpo_alpha:
            losses = losses + self.config.rpo_alpha * nll
        metrics = {"nll/chosen": nll.mean().item(), **pair_reward_stats(chosen, rejected), **terms}
        if uses_bco:
            metrics["bco/delta"] = self.bco_delta
        return losses.sum(), metrics

    def evaluate(self):
        pairs = self.eval_examples[: self.config.eval_examples]
        self.reference_logps = None
        chosen_rewards, rejected_rewards, losses = [], [], []
        for start in range(0, len(pairs), self.config.eval_batch_size):
            batch = self.collate(pairs[start : start + self.config.eval_batch_size])
            loss, chosen, rejected, _, _ = self._pair_rewards(batch)
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

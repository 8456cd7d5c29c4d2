"""`GRPOStage`: critic-free online RL with verifiable rewards (GRPO, Dr. GRPO, RLOO, DAPO, GSPO).

Roles on one (4-bit) base: the actor (`policy` adapter, trained, from the previous policy stage's),
the reference (a frozen copy of that adapter: the KL term and the "before" evaluation), and, when a
`reward_model` reward is named, the reward model (`reward` adapter + head, frozen).

One iteration, per process:
1. `batch_size * grad_accum * num_minibatches` prompts; each prompt's image is encoded once and its
   prompt prefilled once, and the KV cache serves its G = `num_generations` sampled answers;
2. every answer is scored by the recipe's weighted reward functions (`alignment/rewards.py`), less
   `overlong_penalty` when it was cut off; advantages are relative to the prompt's group
   (`group_advantages`); with `dynamic_sampling`, groups whose rewards are all equal are replaced by
   groups of further prompts (up to `max_sampling_rounds` rounds);
3. old log-probs (only when a rollout serves more than one update) and reference log-probs (only
   with `kl_beta > 0`) come from no-grad passes over the shared image features;
4. `num_iterations x num_minibatches` optimizer steps of `grpo_loss`, each micro-batch holding whole
   groups, its summed loss divided by the aggregation's normaliser over all micro-batches and processes.
"""

from __future__ import annotations

import torch

from alignment.evaluate import answer_metrics
from alignment.losses import group_advantages, grpo_loss_sum, masked_sum
from alignment.rewards import REWARD_MODEL, call_reward, resolve
from alignment.stages.common import lora_spec
from alignment.stages.engine import all_sum
from alignment.stages.online import OnlineStage, rows_of, shown_samples
from alignment.stages.reward import load_or_add_adapter, only_train
from alignment.stages.rollout import Rollout, cat_rollouts


class GRPOStage(OnlineStage):
    type = "grpo"

    # ---- setup -----------------------------------------------------------------
    def setup(self, previous_adapter):
        cfg, ctx = self.config, self.ctx
        policy_source = self._policy_source(previous_adapter)
        self.models = dict.fromkeys(("actor", "reference"), self.policy)
        if policy_source is not None:
            self.policy.load_adapter("policy", policy_source, trainable=True)
        elif "policy" not in self.policy.adapters:
            self.policy.add_adapter("policy", lora_spec(cfg))
        if cfg.uses_reward_model:
            self.models["reward"] = self.policy
            load_or_add_adapter(self.policy, "reward", self._reward_source(), cfg, ctx.seed, trainable=False)
        self.policy.freeze_reference("policy")
        only_train(self.policy, {"policy"})
        self.policy.set_adapter("policy")
        self.reward_functions = [(spec.name, spec.weight, resolve(spec.name)) for spec in cfg.rewards]
        self.iteration = 0
        self._start_rollouts()

    # ---- rewards ---------------------------------------------------------------
    def score(self, examples: list[dict], completions: list[str], finished: list[bool], batch: dict | None = None,
              prompts: dict | None = None, features: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Each answer's reward `[B]` (weighted sum of the terms, less `overlong_penalty` where cut off)
        and each term's values `{name: [B]}`. The answers as a model batch, their prompts (pixels) and
        the prompts' shared image features are needed only for the `reward_model` term."""
        total = torch.zeros(len(completions), dtype=torch.float64)
        terms = {}
        for name, weight, function in self.reward_functions:
            if name == REWARD_MODEL:
                with self.role("reward") as reward:
                    values = reward.sequence_scores(batch, "reward", self._features("reward", prompts, features))
                values = values.double().cpu()
            else:
                values = torch.tensor(call_reward(name, function, examples, completions, finished), dtype=torch.float64)
            terms[name] = values
            total += weight * values
        if self.config.overlong_penalty is not None:
            total -= self.config.overlong_penalty * (~torch.tensor(finished, dtype=torch.bool)).double()
        return total, terms

    # ---- rollouts --------------------------------------------------------------
    @torch.no_grad()
    def _sample_groups(self, examples: list[dict], prompts: dict,
                       generator: list[torch.Generator]) -> tuple[Rollout, dict]:
        """G answers to each of `prompts` (P rows) from one prefill per prompt; returns the rollout
        (P*G rows, row p*G + g answers prompt p, `image_index` p) and each reward term's values."""
        cfg = self.config
        groups = cfg.num_generations
        features = self._shared_features(prompts)  # [P, ...]: once per prompt for every role that shares it
        actor_features = self._features("actor", prompts, features)
        with self.role("actor") as actor:
            tokens = actor.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    top_p=cfg.top_p, image_features=actor_features, generator=generator,
                                    num_samples=groups)
        batch = self._answer_batch(repeat_rows(prompts, groups, self.policy.family.PIXEL_KEYS), tokens)
        targets = batch["labels"][:, 1:]
        mask = (targets != -100).float()
        old_logprobs = ref_logprobs = None
        if cfg.steps_per_iteration > 1:  # later updates are off-policy: the sampling policy's log-probs
            with self.role("actor") as actor:
                old_logprobs, _ = self._sampling_logprobs(actor, batch, actor_features)
        if cfg.kl_beta > 0:
            with self.role("reference") as reference:
                ref_logprobs, _ = self._sampling_logprobs(reference, batch, self._features("reference", prompts, features))
        finished = (~batch["truncated"]).tolist()
        rows = [e for e in examples for _ in range(groups)]
        scores, terms = self.score(rows, self.policy.decode(tokens), finished, batch, prompts, features)
        rollout = Rollout(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            cross_attention_mask=batch.get("cross_attention_mask"),
            image_features=features if features is not None else actor_features,
            response_mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, values=None, rewards=None,
            advantages=None, returns=None, scores=scores.float().to(mask.device), ids=[e["id"] for e in rows],
            pixel_inputs=self.policy.pixel_inputs(prompts) if any(self.vision_adapted.values()) else None,
            select_pixels=self.policy.family.select_pixels,
            image_index=batch["image_index"],
        )
        return rollout, terms

    def make_rollout(self, stream) -> Rollout:
        """Sample, score and compute the group advantages of one rollout (this process's prompts);
        with `dynamic_sampling`, groups whose rewards are all equal give way to groups of new prompts."""
        cfg, ctx = self.config, self.ctx
        wanted = cfg.batch_size * cfg.grad_accum * cfg.num_minibatches
        chunk = max(1, cfg.eval_batch_size // cfg.num_generations)
        informative, flat, all_terms, sampled_groups, varied_groups, rounds = [], [], [], 0, 0, 0
        with self._eval_mode(), ctx.accelerator.autocast():
            while True:
                rounds += 1
                examples, draws = stream.next_numbered_batches(cfg.grad_accum * cfg.num_minibatches)
                prompts = self.collate(examples)
                for start in range(0, len(examples), chunk):
                    generators = self.sampling_generators(draws[start:start + chunk], cfg.num_generations)
                    part, terms = self._sample_groups(examples[start:start + chunk],
                                                      rows_of(prompts, start, start + chunk, self.policy.family), generators)
                    rewards = part.scores.view(-1, cfg.num_generations)
                    part.group_advantages = group_advantages(rewards.double(), cfg.advantage).flatten().float()
                    varied = rewards.std(dim=1, unbiased=False) > 0 if cfg.num_generations > 1 else \
                        torch.ones(rewards.shape[0], dtype=torch.bool)
                    all_terms.append(terms)
                    sampled_groups += rewards.shape[0]
                    varied_groups += int(varied.sum())
                    for group, keep in enumerate(varied.tolist()):
                        (informative if keep or not cfg.dynamic_sampling else flat).append((part, group))
                if not cfg.dynamic_sampling or rounds >= cfg.max_sampling_rounds:
                    break
                # Every process samples as many rounds as the one that needs most: under ZeRO-3 each
                # generation step gathers parameters with all processes.
                short = torch.tensor(float(len(informative) < wanted))
                if all_sum(short, ctx).item() == 0:
                    break
        chosen = (informative + flat)[:wanted]  # flat groups only fill what the rounds could not
        rollout = cat_rollouts([part.select(_group_rows(group, cfg.num_generations)) for part, group in chosen],
                               self.policy.processor.tokenizer.pad_token_id)
        self.rollout_stats = {**self._rollout_stats(rollout, all_terms, varied_groups, sampled_groups),
                              "sampling_rounds": float(rounds)}
        return rollout

    def _rollout_stats(self, rollout: Rollout, terms: list[dict], informative: int, sampled: int) -> dict[str, float]:
        """Means over all processes: reward (`score`, `score_std`), each term's mean and std over every
        sampled answer, answer length (tokens), the share of sampled groups whose rewards differ
        (`informative_groups`), and the KL to the reference when both log-probs were computed."""
        mask = rollout.response_mask
        names = list(terms[0])
        term_sums = [torch.cat([t[name] for t in terms]) for name in names]
        answers = sum(t[names[0]].numel() for t in terms)
        kl = (masked_sum(rollout.old_logprobs - rollout.ref_logprobs, mask, dim=1).sum()
              if rollout.old_logprobs is not None and rollout.ref_logprobs is not None else torch.zeros(()))
        sums = torch.stack([
            rollout.scores.double().sum().cpu(), (rollout.scores.double() ** 2).sum().cpu(),
            mask.sum().double().cpu(), torch.tensor(float(rollout.size)), torch.tensor(float(informative)),
            torch.tensor(float(sampled)), kl.double().cpu(), torch.tensor(float(answers)),
            *[v.sum() for v in term_sums], *[(v ** 2).sum() for v in term_sums],
        ]).double()
        totals = all_sum(sums, self.ctx).double().tolist()
        score_sum, score_sq, length_sum, rows, informative_sum, sampled_sum, kl_sum, answer_sum = totals[:8]
        stats = {
            "score": score_sum / rows,
            "score_std": max(0.0, score_sq / rows - (score_sum / rows) ** 2) ** 0.5,
            "response_length": length_sum / rows,
            "informative_groups": informative_sum / max(1.0, sampled_sum),
        }
        if rollout.ref_logprobs is not None and rollout.old_logprobs is not None:
            stats["kl"] = kl_sum / rows
        for i, name in enumerate(names):
            mean = totals[8 + i] / answer_sum
            stats[f"reward/{name}"] = mean
            stats[f"reward/{name}_std"] = max(0.0, totals[8 + len(names) + i] / answer_sum - mean ** 2) ** 0.5
        return stats

    # ---- the shared loop's hooks ----------------------------------------------
    def next_micro_batches(self, stream):
        """One update's micro-batches (whole groups each); a new rollout when the last one is used up."""
        cfg = self.config
        if self.remaining == 0:
            self.remaining = cfg.steps_per_iteration
            rollout = self.make_rollout(stream)
            order = torch.Generator().manual_seed(self.ctx.seed * 7919 + self.iteration)
            self.iteration += 1
            prompts = rollout.size // cfg.num_generations
            for _ in range(cfg.num_iterations):
                permutation = torch.randperm(prompts, generator=order)
                for minibatch in torch.tensor_split(permutation, cfg.num_minibatches):
                    self.buffer.append([
                        rollout.select(torch.cat([_group_rows(int(g), cfg.num_generations) for g in part]))
                        for part in torch.tensor_split(minibatch, cfg.grad_accum) if len(part)])
        self.remaining -= 1
        return self.buffer.pop(0)

    def count(self, batch: Rollout):
        """The loss aggregation's normaliser of this micro-batch: answer tokens (`token_mean`), answers
        with at least one token (`seq_mean_token_mean`), answers x max_new_tokens (`..._sum_norm`)."""
        cfg, mask = self.config, batch.response_mask
        if cfg.loss_agg == "token_mean":
            return int(mask.sum())
        if cfg.loss_agg == "seq_mean_token_mean":
            return int((mask.sum(1) > 0).sum())
        return batch.size * cfg.max_new_tokens

    def train_step(self, batch: Rollout):
        cfg = self.config
        mask = batch.response_mask
        _, _, logprobs, _ = self._update_logprobs(batch)
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        loss_sum, normaliser, stats = grpo_loss_sum(
            logprobs, old, batch.group_advantages, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
            importance_sampling=cfg.importance_sampling, loss_agg=cfg.loss_agg, max_tokens=cfg.max_new_tokens,
            ref_logprobs=batch.ref_logprobs, kl_beta=cfg.kl_beta)
        tokens = max(1, int(mask.sum()))
        return {"actor": loss_sum}, {
            "policy_loss": loss_sum.item() / max(1.0, float(normaliser)),
            "clipfrac": float(stats["clipped_count"]) / tokens,
            "ratio_mean": float(stats["ratio_sum"]) / tokens,
            **({"kl_penalty": float(stats["kl_sum"]) / tokens} if batch.ref_logprobs is not None else {}),
            **self.rollout_stats,
        }

    def extra_state(self):
        return {"before": self.before, "iteration": self.iteration}

    def load_extra_state(self, state):
        self.before = state.get("before")
        self.iteration = state.get("iteration", 0)

    # ---- evaluation ------------------------------------------------------------
    @torch.no_grad()
    def answer_eval(self, name: str) -> dict:
        """Greedy answers of role `name` (actor or reference) to the held-out prompts: exact match,
        length, the reward (`mean_reward`) and each reward term's mean (`mean_reward/<term>`)."""
        cfg = self.config
        examples = self.eval_examples[: cfg.eval_examples]
        predictions, references, kinds, rewards, terms = [], [], [], [], {}
        for start, prompts in zip(range(0, len(examples), cfg.eval_batch_size), self._prompt_batches(examples)):
            features = self._shared_features(prompts)
            with self.role(name) as model:
                tokens = model.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                                        image_features=self._features(name, prompts, features))
            batch = self._answer_batch(prompts, tokens)
            answers = self.policy.decode(tokens)
            total, values = self.score(examples[start:start + cfg.eval_batch_size], answers,
                                       (~batch["truncated"]).tolist(), batch, prompts, features)
            rewards += total.tolist()
            for term, v in values.items():
                terms.setdefault(term, []).extend(v.tolist())
            predictions += answers
            references += prompts["answers"]
            kinds += prompts["kinds"]
        metrics = answer_metrics(predictions, references, kinds)
        metrics["mean_reward"] = sum(rewards) / max(1, len(rewards))
        metrics.update({f"mean_reward/{t}": sum(v) / max(1, len(v)) for t, v in terms.items()})
        metrics["samples"] = shown_samples(examples, references, predictions, rewards)
        return metrics

    def _more_metrics(self, after: dict) -> dict:
        """Each reward term's mean over the greedy answers, before and after."""
        metrics = {}
        for key in (k for k in after if k.startswith("mean_reward/")):
            term = key.split("/", 1)[1]
            metrics[f"mean_reward_before/{term}"] = self.before.get(key)
            metrics[f"mean_reward_after/{term}"] = after[key]
        return metrics

    def run(self, previous_adapter=None):
        entry = super().run(previous_adapter)
        only_train(self.policy, {"policy"})  # as after SFT and DPO: the policy adapter stays trainable
        return entry


def repeat_rows(prompts: dict, times: int, pixel_keys: tuple[str, ...]) -> dict:
    """A collated prompt batch with each row repeated `times` times in place (row p -> rows p*times ..
    p*times + times-1), every row keeping its prompt's images (`image_index` row p's); images (the
    family's `pixel_keys`) are not copied."""
    out = {}
    for key, value in prompts.items():
        if key in pixel_keys:
            out[key] = value
        elif key == "image_index":
            out[key] = value.repeat_interleave(times, dim=0)
        elif torch.is_tensor(value):
            out[key] = value.repeat_interleave(times, dim=0)
        elif isinstance(value, list):
            out[key] = [v for v in value for _ in range(times)]
        else:
            out[key] = value
    return out


def _group_rows(group: int, size: int) -> torch.Tensor:
    return torch.arange(group * size, (group + 1) * size)

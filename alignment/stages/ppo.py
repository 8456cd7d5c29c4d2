"""`PPOStage`: PPO with a critic and GAE against a KL-penalised reward model score (seed 004).

Four roles, by default on one (4-bit) base: the actor (`policy` adapter, trained, starting from
SFT's), the reference (a frozen copy of the adapter the actor started from), the critic (`critic`
adapter + value head, trained, starting from the reward model) and the reward model (`reward`
adapter + head, frozen). `separate_models: true` loads reference, critic and reward on bases of
their own instead (what the memory benchmark compares against).

One iteration, per process:
1. prompts (`batch_size * grad_accum * num_minibatches`) are sampled with a KV cache; each image
   is encoded once and reused by every later forward of the rollout;
2. no-grad passes give old and reference log-probs, values, and the reward model's score;
3. rewards = score on the last answer token - kl_coef * (log pi - log ref) on every answer token;
   GAE gives advantages and returns; advantages are whitened over the rollout (all processes);
4. `ppo_epochs x num_minibatches` optimizer steps of clipped policy loss + vf_coef * value loss,
   each summed over the micro-batches' answer tokens and divided by their count over all processes.
An optimizer step of the shared loop is one minibatch update (`next_micro_batches` serves them from
the rollout); checkpoints land only on iteration boundaries, so a resumed run is an uninterrupted one.
"""

from __future__ import annotations

import torch

from alignment.errors import ConfigError
from alignment.evaluate import answer_metrics
from alignment.losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae_advantages,
    kl_penalized_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_policy_loss_sum,
    ppo_value_loss_sum,
)
from alignment.stages.common import lora_spec
from alignment.stages.engine import all_sum
from alignment.stages.online import OnlineStage, rows_of, shown_samples
from alignment.stages.reward import load_or_add_adapter, only_train
from alignment.stages.rollout import Rollout, cat_rollouts


class PPOStage(OnlineStage):
    type = "ppo"
    adapter_name = "policy"

    # ---- setup -----------------------------------------------------------------
    def setup(self, previous_adapter):
        cfg, ctx = self.config, self.ctx
        policy_source = self._policy_source(previous_adapter)
        reward_source = self._reward_source()
        if cfg.separate_models:
            if ctx.load_policy is None:
                raise ConfigError(f"stages.{cfg.name}.separate_models needs a way to load the base (run it from a recipe)")
            self.models = {"actor": self.policy, "reference": ctx.load_policy(), "critic": ctx.load_policy(),
                           "reward": ctx.load_policy()}
        else:
            self.models = dict.fromkeys(("actor", "reference", "critic", "reward"), self.policy)
        actor, critic = self.models["actor"], self.models["critic"]
        # Fixed creation order (policy, reward, critic, reference): parameter order, hence the
        # optimizer state's, is the same in a fresh process resuming as in the uninterrupted run.
        if policy_source is not None:
            actor.load_adapter("policy", policy_source, trainable=True)
        elif "policy" not in actor.adapters:
            actor.add_adapter("policy", lora_spec(cfg))
        load_or_add_adapter(self.models["reward"], "reward", reward_source, cfg, ctx.seed, trainable=False)
        critic_source = reward_source if cfg.critic_init == "reward" else None
        if "critic" in critic.adapters and critic_source is None:
            raise ConfigError(f"stages.{cfg.name}: a critic adapter exists already; use critic_init: reward")
        load_or_add_adapter(critic, "critic", critic_source, cfg, ctx.seed + 1, trainable=True)
        if cfg.separate_models:
            if policy_source is not None:
                self.models["reference"].load_adapter("reference", policy_source, trainable=False)
            only_train(self.models["reference"], set())
            only_train(self.models["reward"], set())
            only_train(actor, {"policy"})
            only_train(critic, {"critic"})
        else:
            actor.freeze_reference("policy")
            only_train(actor, {"policy", "critic"})
        actor.set_adapter("policy")
        self.kl_controller = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                              else FixedKLController(cfg.kl_coef))
        self._start_rollouts()

    def trained_models(self):
        return list({id(m): m for m in (self.models["actor"], self.models["critic"])}.values())

    def run(self, previous_adapter=None):
        entry = super().run(previous_adapter)
        if self.ctx.is_main:
            self.models["critic"].save_adapter("critic", self.dir / "critic")
        only_train(self.policy, {"policy"})  # as after SFT and DPO: the policy adapter stays trainable
        return entry

    # ---- rollouts --------------------------------------------------------------
    @torch.no_grad()
    def _sample_chunk(self, prompts: dict, generator: list[torch.Generator]) -> Rollout:
        """Sample answers for one chunk of prompts and score them (no rewards or advantages yet)."""
        cfg = self.config
        batch, features, actor_features, old_logprobs, ref_logprobs, mask = self._sample_answers(prompts, generator)
        with self.role("critic") as critic:
            values = critic.head_values(batch, "critic", self._features("critic", prompts, features))[:, :-1]
        with self.role("reward") as reward:
            scores = reward.sequence_scores(batch, "reward", self._features("reward", prompts, features)).float()
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * batch["truncated"].float()
        zeros = torch.zeros_like(old_logprobs)
        return Rollout(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            cross_attention_mask=batch.get("cross_attention_mask"),
            image_features=features if features is not None else actor_features,
            response_mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, values=values.float() * mask,
            rewards=zeros, advantages=zeros, returns=zeros, scores=scores, ids=list(prompts["ids"]),
            pixel_inputs=self.policy.pixel_inputs(prompts) if any(self.vision_adapted.values()) else None,
            select_pixels=self.policy.family.select_pixels,
        )

    def make_rollout(self, examples: list[dict], iteration: int, draws: list[int] | None = None) -> Rollout:
        """Sample, score, reward and GAE one rollout of `examples` (this process's share). `draws`: the
        examples' draw numbers (`ExampleStream.next_numbered_batch`), which seed each answer's sampling;
        default: numbered from iteration * len(examples)."""
        cfg, ctx = self.config, self.ctx
        if draws is None:
            draws = [iteration * len(examples) + i for i in range(len(examples))]
        generators = self.sampling_generators(draws)
        prompts = self.collate(examples)
        chunk = cfg.eval_batch_size
        with self._eval_mode(), ctx.accelerator.autocast():  # as in the updates, so the first ratio is 1
            parts = [self._sample_chunk(rows_of(prompts, start, start + chunk, self.policy.family), generators[start : start + chunk])
                     for start in range(0, len(examples), chunk)]
        rollout = cat_rollouts(parts, self.policy.processor.tokenizer.pad_token_id)
        mask = rollout.response_mask
        rollout.rewards = kl_penalized_rewards(rollout.scores, rollout.old_logprobs, rollout.ref_logprobs, mask,
                                               self.kl_controller.value)
        advantages, rollout.returns = gae_advantages(rollout.rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        rollout.advantages = _whiten(advantages, mask, ctx) if cfg.whiten_advantages else advantages
        self.rollout_stats = self._rollout_stats(rollout)
        self.kl_controller.update(self.rollout_stats["kl"], rollout.size * ctx.world_size)
        return rollout

    def _rollout_stats(self, rollout: Rollout) -> dict[str, float]:
        """Rollout means over all processes: score, KL per answer (nats), answer length, explained variance."""
        mask = rollout.response_mask
        kl_rows = masked_sum(rollout.old_logprobs - rollout.ref_logprobs, mask, dim=1)
        lengths = mask.sum(1)
        residual_var = masked_var(rollout.returns - rollout.values, mask)
        sums = torch.stack([
            rollout.scores.sum(), (rollout.scores ** 2).sum(), kl_rows.sum(), lengths.sum(),
            rollout.rewards.sum(), torch.tensor(float(rollout.size), device=mask.device),
        ]).double().cpu()
        score_sum, score_sq, kl_sum, length_sum, reward_sum, rows = all_sum(sums, self.ctx).tolist()
        returns_var = masked_var(rollout.returns, mask)
        return {
            "score": score_sum / rows,
            "score_std": max(0.0, score_sq / rows - (score_sum / rows) ** 2) ** 0.5,
            "kl": kl_sum / rows,
            "kl_coef": self.kl_controller.value,
            "response_length": length_sum / rows,
            "reward_total": reward_sum / rows,
            "explained_variance": (1 - residual_var / returns_var.clamp(min=1e-8)).item(),
        }

    # ---- the shared loop's hooks ----------------------------------------------
    def next_micro_batches(self, stream):
        """One minibatch update's micro-batches; a new rollout when the last one is used up."""
        cfg = self.config
        if self.remaining == 0:
            self.remaining = cfg.steps_per_iteration
            prompt_batches = cfg.grad_accum * cfg.num_minibatches
            iteration = stream.position // prompt_batches
            examples, draws = stream.next_numbered_batches(prompt_batches)
            rollout = self.make_rollout(examples, iteration, draws)
            order = torch.Generator().manual_seed(self.ctx.seed * 7919 + iteration)
            rows_per_minibatch = cfg.batch_size * cfg.grad_accum
            for _ in range(cfg.ppo_epochs):
                permutation = torch.randperm(rollout.size, generator=order)
                for start in range(0, rollout.size, rows_per_minibatch):
                    rows = permutation[start : start + rows_per_minibatch]
                    self.buffer.append([rollout.select(rows[i : i + cfg.batch_size])
                                        for i in range(0, len(rows), cfg.batch_size)])
        self.remaining -= 1
        return self.buffer.pop(0)

    def count(self, batch: Rollout):
        return int(batch.response_mask.sum())

    def train_step(self, batch: Rollout):
        cfg = self.config
        mask = batch.response_mask
        inputs, logits, logprobs, window = self._update_logprobs(batch)
        policy_sum, clipped, approx_kl_sum, tokens = ppo_policy_loss_sum(
            logprobs, batch.old_logprobs, batch.advantages, mask, cfg.clip_range)
        with self.role("critic") as critic:
            values = critic.head_values(inputs, "critic", self._features("critic", inputs, batch.image_features,
                                                                         grad=True))[:, :-1]
        value_sum, value_clipped, _ = ppo_value_loss_sum(values, batch.values, batch.returns, mask, cfg.clip_range_value)
        n = max(1, int(tokens))
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), mask[:, window]).item()
        return {"actor": policy_sum, "critic": cfg.vf_coef * value_sum}, {
            "policy_loss": policy_sum.item() / n,
            "value_loss": value_sum.item() / n,
            "clipfrac": int(clipped) / n,
            "value_clipfrac": int(value_clipped) / n,
            "approx_kl": approx_kl_sum.item() / n,
            "entropy": entropy,
            **self.rollout_stats,
        }

    def extra_state(self):
        return {"kl_controller": self.kl_controller.state_dict(), "before": self.before}

    def load_extra_state(self, state):
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.before = state.get("before")

    # ---- evaluation ------------------------------------------------------------
    @torch.no_grad()
    def answer_eval(self, name: str) -> dict:
        """Greedy answers of role `name` (actor or reference) to the held-out prompts: reward model
        score, log-ratio to the reference of each greedy answer (nats, summed over its tokens; not a KL:
        `sampled_kl` is), exact match, length."""
        cfg = self.config
        examples = self.eval_examples[: cfg.eval_examples]
        predictions, references, kinds, scores, kls = [], [], [], [], []
        for prompts in self._prompt_batches(examples):
            features = self._shared_features(prompts)
            own_features = self._features(name, prompts, features)
            with self.role(name) as model:
                tokens = model.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                                        image_features=own_features)
                batch = self._answer_batch(prompts, tokens)
                logps = model.completion_logprobs(batch, own_features)[1]
            with self.role("reference") as reference:
                ref_logps = reference.completion_logprobs(batch, self._features("reference", prompts, features))[1]
            with self.role("reward") as reward:
                scores += reward.sequence_scores(batch, "reward", self._features("reward", prompts, features)).tolist()
            kls += (logps - ref_logps).tolist()
            predictions += self.models["actor"].decode(tokens)
            references += prompts["answers"]
            kinds += prompts["kinds"]
        metrics = answer_metrics(predictions, references, kinds)
        metrics["mean_reward"] = sum(scores) / max(1, len(scores))
        metrics["kl"] = sum(kls) / max(1, len(kls))
        metrics["samples"] = shown_samples(examples, references, predictions, scores)
        return metrics

    def _more_metrics(self, after: dict) -> dict:
        return {"kl_greedy_answer": after["kl"]}

def _whiten(x: torch.Tensor, mask: torch.Tensor, ctx) -> torch.Tensor:
    """`masked_whiten` over the counted tokens of every process's rollout."""
    if ctx.world_size == 1:
        return masked_whiten(x, mask)
    kept = torch.where(mask.bool(), x, torch.zeros_like(x)).double()
    stats = all_sum(torch.stack([kept.sum(), (kept ** 2).sum(), mask.double().sum()]).cpu(), ctx).double()
    total, squares, count = stats.tolist()
    mean = total / max(count, 1.0)
    var = max(0.0, squares / max(count, 1.0) - mean ** 2) * count / max(count - 1, 1.0)
    return torch.where(mask.bool(), (x - mean) * (var + 1e-8) ** -0.5, torch.zeros_like(x))

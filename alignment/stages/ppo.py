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

from contextlib import contextmanager
from pathlib import Path

import torch

from alignment.config import ConfigError
from alignment.data import collate_prompts
from alignment.evaluate import answer_metrics
from alignment.losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae_advantages,
    gather_logprobs,
    kl_penalized_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_policy_loss_sum,
    ppo_value_loss_sum,
)
from alignment.policy import PIXEL_KEYS
from alignment.stages.base import Stage, _all_sum
from alignment.stages.common import lora_spec, to_device
from alignment.stages.reward import load_or_add_adapter, only_train
from alignment.stages.rollout import Rollout, cat_rollouts

ADAPTERS = {"actor": "policy", "critic": "critic", "reward": "reward"}
POLICY_STAGE_TYPES = ("sft", "dpo", "ppo")


class PPOStage(Stage):
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
        self.buffer: list[list[Rollout]] = []
        self.remaining = 0  # minibatch updates left in the current iteration
        self.rollout_stats: dict[str, float] = {}
        self.before: dict | None = None
        self._stop_at_boundary = False
        # Which roles see other image features than the bare base's: only those whose own adapter
        # touches the vision tower (an `all`-preset reward adapter makes the reward role re-encode, not
        # every role).
        self.vision_adapted = {
            name: (model.vision_adapted_by(model.reference_adapter()) if name == "reference"
                   else model.vision_adapted_by(ADAPTERS[name]))
            for name, model in self.models.items()}

    def _policy_source(self, previous_adapter: Path | None) -> Path | None:
        """`init_adapter`, else the output of the last sft/dpo/ppo stage before this one."""
        if self.config.init_adapter:
            return Path(self.config.init_adapter)
        if not self.ctx.stage_types:  # used outside a recipe: the previous adapter is the policy's
            return previous_adapter
        names = [n for n, kind in self.ctx.stage_types.items() if kind in POLICY_STAGE_TYPES]
        return self.ctx.output_dir / names[-1] if names else None

    def _reward_source(self) -> Path:
        if self.config.reward_adapter:
            return Path(self.config.reward_adapter)
        names = [n for n, kind in self.ctx.stage_types.items() if kind == "reward"]
        if not names:
            raise ConfigError(f"stages.{self.config.name}: ppo needs a reward stage before it, or reward_adapter")
        return self.ctx.output_dir / names[-1]

    def trained_models(self):
        return list({id(m): m for m in (self.models["actor"], self.models["critic"])}.values())

    def models_in_use(self):
        return list({id(m): m for m in self.models.values()}.values())

    def backward_context(self, role: str):
        """Each role's loss is backpropagated with its adapter active: gradient checkpointing recomputes
        the role's layers during backward, under whatever adapter is active then."""
        return self.role(role)

    def run(self, previous_adapter=None):
        entry = super().run(previous_adapter)
        if self.ctx.is_main:
            self.models["critic"].save_adapter("critic", self.dir / "critic")
        only_train(self.policy, {"policy"})  # as after SFT and DPO: the policy adapter stays trainable
        return entry

    # ---- roles -----------------------------------------------------------------
    @contextmanager
    def role(self, name: str):
        """The model of role `name` with its adapter active (the reference: its frozen adapter, or none)."""
        model = self.models[name]
        if name == "reference":
            with model.reference():
                yield model
        else:
            with model.use_adapter(ADAPTERS[name]):
                yield model

    def _shared_features(self, batch: dict) -> torch.Tensor | None:
        """The batch's images encoded once, for every role whose adapters leave the vision tower alone
        (all bases hold the same vision weights, never quantised); None when every role adapts it."""
        for name, adapted in self.vision_adapted.items():
            if not adapted:
                with self.role(name) as model:
                    return model.encode_images(batch)
        return None

    def _features(self, name: str, batch: dict, shared: torch.Tensor | None, grad: bool = False) -> torch.Tensor:
        """Role `name`'s image features: the shared encoding unless its adapter touches the vision tower."""
        if shared is not None and not self.vision_adapted[name]:
            return shared
        with self.role(name) as model, torch.set_grad_enabled(grad):
            return model.encode_images(batch)

    @contextmanager
    def _eval_mode(self):
        """Every model in eval mode (no dropout; KV cache with gradient checkpointing), then back."""
        models = list({id(m): m for m in self.models.values()}.values())
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)

    # ---- rollouts --------------------------------------------------------------
    def _sampling_logprobs(self, model, batch: dict, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer-token log-probs `[B, T-1]` under the distribution rollouts sample from (logits /
        temperature, as in the updates), and the answer mask `[B, T-1]`."""
        logits = model.forward(batch, features).logits[:, :-1].float() / self.config.temperature
        targets = batch["labels"][:, 1:]
        mask = (targets != -100).float()
        # gathered at the answer tokens only: prompt ids may lie past the output head (<|image|> = 128256)
        logprobs = gather_logprobs(logits, targets.clamp(min=0))
        return torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs)), mask

    def _answer_batch(self, prompts: dict, tokens: torch.Tensor) -> dict:
        """Prompt batch (left-padded) + generated tokens [B, L] -> a model batch over prompt + answer,
        labels on the answer up to and including its stop token; `truncated [B]` marks rows without one."""
        policy = self.models["actor"]
        stops = torch.tensor(sorted(policy._stop_token_ids()), device=tokens.device)
        is_stop = torch.isin(tokens, stops)
        before_stop = (is_stop.long().cumsum(1) - is_stop.long()) == 0  # up to and including the first stop
        pad = policy.processor.tokenizer.pad_token_id
        answer = torch.where(before_stop, tokens, torch.full_like(tokens, pad))
        attention = torch.cat([prompts["attention_mask"], before_stop.long()], dim=1)
        batch = {"input_ids": torch.cat([prompts["input_ids"], answer], dim=1), "attention_mask": attention,
                 "image_index": torch.arange(tokens.shape[0], device=tokens.device)}
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, prompts["input_ids"].shape[1]:] = torch.where(before_stop, answer, torch.full_like(answer, -100))
        batch["labels"] = labels
        if "cross_attention_mask" in prompts:
            cross = prompts["cross_attention_mask"]
            cross = torch.cat([cross, cross[:, -1:].expand(-1, tokens.shape[1], *cross.shape[2:])], dim=1)
            batch["cross_attention_mask"] = cross * attention[:, :, None, None].to(cross.dtype)
        batch["truncated"] = ~is_stop.any(dim=1)
        return batch

    @torch.no_grad()
    def _sample_answers(self, prompts: dict, generator: torch.Generator):
        """The actor's sampled answers to `prompts` (temperature, top_p): (answer batch, shared image
        features or None, the actor's features, actor and reference log-probs `[B, T-1]`, answer mask)."""
        cfg = self.config
        features = self._shared_features(prompts)
        actor_features = self._features("actor", prompts, features)
        with self.role("actor") as actor:
            tokens = actor.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    top_p=cfg.top_p, image_features=actor_features, generator=generator)
            batch = self._answer_batch(prompts, tokens)
            logprobs, mask = self._sampling_logprobs(actor, batch, actor_features)
        with self.role("reference") as reference:
            ref_logprobs, _ = self._sampling_logprobs(reference, batch, self._features("reference", prompts, features))
        return batch, features, actor_features, logprobs, ref_logprobs, mask

    @torch.no_grad()
    def _sample_chunk(self, prompts: dict, generator: torch.Generator) -> Rollout:
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
            pixel_inputs={k: prompts[k] for k in PIXEL_KEYS if k in prompts} if any(self.vision_adapted.values())
            else None,
        )

    def make_rollout(self, examples: list[dict], iteration: int) -> Rollout:
        """Sample, score, reward and GAE one rollout of `examples` (this process's share)."""
        cfg, ctx = self.config, self.ctx
        device = self.models["actor"].device
        generator = torch.Generator(device=device).manual_seed((ctx.seed * 1_000_003 + iteration) * 1009 + ctx.rank)
        prompts = self.collate(examples)
        chunk = cfg.eval_batch_size
        with self._eval_mode(), ctx.accelerator.autocast():  # as in the updates, so the first ratio is 1
            parts = [self._sample_chunk(_rows(prompts, start, start + chunk), generator)
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
        score_sum, score_sq, kl_sum, length_sum, reward_sum, rows = _all_sum(sums, self.ctx).tolist()
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
            examples = [e for _ in range(prompt_batches) for e in stream.next_batch()]
            rollout = self.make_rollout(examples, iteration)
            order = torch.Generator().manual_seed(self.ctx.seed * 7919 + iteration)
            rows_per_minibatch = cfg.batch_size * cfg.grad_accum
            for _ in range(cfg.ppo_epochs):
                permutation = torch.randperm(rollout.size, generator=order)
                for start in range(0, rollout.size, rows_per_minibatch):
                    rows = permutation[start : start + rows_per_minibatch]
                    self.buffer.append([rollout.select(rows[i : i + cfg.batch_size])
                                        for i in range(0, len(rows), cfg.batch_size)])
        self.remaining -= 1
        if self.remaining == 0 and self._stop_at_boundary:
            self._sigterm = True  # the base loop checkpoints after this step, at the boundary
        return self.buffer.pop(0)

    def _on_sigterm(self, signum, frame):
        """Stop at the end of the current iteration: a checkpoint mid-iteration could not be resumed exactly."""
        if self.remaining == 0:
            self._sigterm = True
        else:
            self._stop_at_boundary = True

    def collate(self, examples):
        return to_device(collate_prompts(examples, self.policy.processor, **self.ctx.prompt_kwargs), self.policy.device)

    def _prompt_batches(self, examples: list[dict]):
        """`examples` collated as prompts, `eval_batch_size` at a time (held-out evaluation)."""
        for start in range(0, len(examples), self.config.eval_batch_size):
            yield self.collate(examples[start : start + self.config.eval_batch_size])

    def count(self, batch: Rollout):
        return int(batch.response_mask.sum())

    def train_step(self, batch: Rollout):
        cfg = self.config
        inputs, mask = batch.model_batch(), batch.response_mask
        with self.role("actor") as actor:
            logits = actor.forward(inputs, self._features("actor", inputs, batch.image_features, grad=True)).logits
        logits = logits[:, :-1].float() / cfg.temperature
        logprobs = gather_logprobs(logits, inputs["labels"][:, 1:].clamp(min=0))  # answer tokens only (see above)
        policy_sum, clipped, approx_kl_sum, tokens = ppo_policy_loss_sum(
            logprobs, batch.old_logprobs, batch.advantages, mask, cfg.clip_range)
        with self.role("critic") as critic:
            values = critic.head_values(inputs, "critic", self._features("critic", inputs, batch.image_features,
                                                                         grad=True))[:, :-1]
        value_sum, value_clipped, _ = ppo_value_loss_sum(values, batch.values, batch.returns, mask, cfg.clip_range_value)
        n = max(1, int(tokens))
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), mask).item()
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
    def before_training(self):
        """The starting policy's greedy answers on held-out prompts, scored by the reward model (once)."""
        if self.before is None:
            with self._eval_mode(), self.ctx.accelerator.autocast():
                self.before = self.answer_eval("reference")

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
        metrics["samples"] = [{"question": e["question"], "answer": r, "prediction": p, "reward": round(s, 4)}
                              for e, r, p, s in list(zip(examples, references, predictions, scores))[:8]]
        return metrics

    @torch.no_grad()
    def sampled_kl(self) -> float:
        """KL(actor || reference) per answer (nats): `eval_kl_samples` answers per held-out prompt,
        sampled as rollouts are (temperature, top_p), each scored by the log-ratio of the two
        distributions it was sampled from (logits / temperature) summed over its tokens; the mean."""
        cfg = self.config
        examples = self.eval_examples[: cfg.eval_examples]
        device = self.models["actor"].device
        generator = torch.Generator(device=device).manual_seed(self.ctx.seed * 1_000_003 + 271_828)
        log_ratios = []
        with self._eval_mode():
            for _ in range(cfg.eval_kl_samples):
                log_ratios += self._sampled_log_ratios(examples, generator)
        return sum(log_ratios) / max(1, len(log_ratios))

    def _sampled_log_ratios(self, examples: list[dict], generator: torch.Generator) -> list[float]:
        """One sampled answer per example: log pi(answer) - log ref(answer) under the sampling distributions."""
        log_ratios = []
        for prompts in self._prompt_batches(examples):
            *_, logprobs, ref_logprobs, mask = self._sample_answers(prompts, generator)
            log_ratios += masked_sum(logprobs - ref_logprobs, mask, dim=1).tolist()
        return log_ratios

    def evaluate_on(self, examples):
        """The same evaluation on other held-out prompts; the starting policy (the frozen reference)
        is scored on them too."""
        saved, self.before = self.before, None
        try:
            return super().evaluate_on(examples)
        finally:
            self.before = saved

    def evaluate(self):
        with self.ctx.accelerator.autocast():
            if self.before is None:  # evaluated without training (max_steps reached before a resume)
                self.before = self.answer_eval("reference")
            after = self.answer_eval("actor")
            kl = self.sampled_kl()
        metrics = {
            "mean_reward_before": self.before["mean_reward"],
            "mean_reward_after": after["mean_reward"],
            "kl": kl,
            "kl_greedy_answer": after["kl"],
            "exact_match": after["exact_match"],
            "exact_match_before": self.before["exact_match"],
            "mean_answer_words": after["mean_answer_words"],
            "mean_answer_words_before": self.before["mean_answer_words"],
        }
        metrics.update({k: v for k, v in after.items() if k.startswith("exact_match/")})
        metrics["samples"] = after["samples"]
        metrics["samples_before"] = self.before["samples"]
        return metrics


def _rows(batch: dict, start: int, end: int) -> dict:
    """Rows start..end of a collated prompt batch (one image per row)."""
    out = {k: v[start:end] for k, v in batch.items() if k != "image_index"}
    out["image_index"] = torch.arange(out["input_ids"].shape[0], device=batch["input_ids"].device)
    return out


def _whiten(x: torch.Tensor, mask: torch.Tensor, ctx) -> torch.Tensor:
    """`masked_whiten` over the counted tokens of every process's rollout."""
    if ctx.world_size == 1:
        return masked_whiten(x, mask)
    kept = torch.where(mask.bool(), x, torch.zeros_like(x)).double()
    stats = _all_sum(torch.stack([kept.sum(), (kept ** 2).sum(), mask.double().sum()]).cpu(), ctx).double()
    total, squares, count = stats.tolist()
    mean = total / max(count, 1.0)
    var = max(0.0, squares / max(count, 1.0) - mean ** 2) * count / max(count - 1, 1.0)
    return torch.where(mask.bool(), (x - mean) * (var + 1e-8) ** -0.5, torch.zeros_like(x))

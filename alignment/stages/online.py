"""`OnlineStage`: what the online RL stages (PPO, GRPO) share: roles on one base, rollouts sampled
with a KV cache and images encoded once, log-probs of sampled answers, held-out answering.

Roles are names for (model, adapter) pairs: `actor` (the trained `policy` adapter), `reference`
(a frozen copy of the adapter the actor started from, or the bare base), and where a stage has them
`critic` and `reward` (their own adapters + scalar heads). By default every role lives on one
(4-bit) base and switching roles switches adapters. A rollout's checkpoints land only on iteration
boundaries (SIGTERM waits for one), so a resumed run is an uninterrupted one.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from alignment.data import collate_prompts
from alignment.errors import ConfigError
from alignment.losses import gather_logprobs, masked_sum
from alignment.models.features import compact_images
from alignment.stages.base import Stage
from alignment.stages.common import to_device

ADAPTERS = {"actor": "policy", "critic": "critic", "reward": "reward"}
POLICY_STAGE_TYPES = ("sft", "dpo", "ppo", "grpo")


class OnlineStage(Stage):
    """Subclasses set `self.models` (role -> `MultimodalPolicy`), `self.vision_adapted` (role -> bool)
    and `self.remaining` (updates left in the current rollout) in `setup`."""

    adapter_name = "policy"
    remaining = 0

    def _reward_source(self) -> Path:
        if self.config.reward_adapter:
            return Path(self.config.reward_adapter)
        names = [n for n, kind in self.ctx.stage_types.items() if kind == "reward"]
        if not names:
            raise ConfigError(f"stages.{self.config.name}: {self.type} needs a reward stage before it, or reward_adapter")
        return self.ctx.output_dir / names[-1]

    def _policy_source(self, previous_adapter: Path | None) -> Path | None:
        """`init_adapter`, else the output of the last sft/dpo/ppo stage before this one."""
        if self.config.init_adapter:
            return Path(self.config.init_adapter)
        if not self.ctx.stage_types:  # used outside a recipe: the previous adapter is the policy's
            return previous_adapter
        names = [n for n, kind in self.ctx.stage_types.items() if kind in POLICY_STAGE_TYPES]
        return self.ctx.output_dir / names[-1] if names else None

    def models_in_use(self):
        return list({id(m): m for m in self.models.values()}.values())

    def backward_context(self, role: str):
        """Each role's loss is backpropagated with its adapter active: gradient checkpointing recomputes
        the role's layers during backward, under whatever adapter is active then."""
        return self.role(role)

    def _start_rollouts(self) -> None:
        """Rollout bookkeeping, once `self.models` holds every role (end of `setup`)."""
        self.buffer: list[list] = []  # micro-batches of the updates left in the current rollout
        self.remaining = 0  # updates left in the current rollout
        self.rollout_stats: dict[str, float] = {}
        self.before: dict | None = None  # the starting policy's held-out answers (`answer_eval`)
        # Which roles see other image features than the bare base's: only those whose own adapter
        # touches the vision tower (an `all`-preset reward adapter makes the reward role re-encode, not
        # every role).
        self.vision_adapted = {
            name: (model.vision_adapted_by(model.reference_adapter()) if name == "reference"
                   else model.vision_adapted_by(ADAPTERS[name]))
            for name, model in self.models.items()}

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

    def _answer_logprobs(self, model, batch: dict, features) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """`(logits [B, W, V] / temperature (float32), log-probs [B, T-1] of the answer tokens, window)`: the
        LM head runs over the answer window only (`windowed_logits`); `window` is the columns of `[B, T-1]`
        the logits cover; log-probs are 0 off the answers."""
        logits, labels, start = model.windowed_logits(batch, features)
        logits = logits[:, :-1].float() / self.config.temperature
        targets = labels[:, 1:]
        # gathered at the answer tokens only: prompt ids may lie past the output head (<|image|> = 128256)
        logprobs = gather_logprobs(logits, targets.clamp(min=0))
        logprobs = torch.where(targets != -100, logprobs, torch.zeros_like(logprobs))
        columns = batch["labels"].shape[1] - 1
        end = start + logprobs.shape[1]
        return logits, torch.nn.functional.pad(logprobs, (start, columns - end)), slice(start, end)

    def _sampling_logprobs(self, model, batch: dict, features) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer-token log-probs `[B, T-1]` under the distribution rollouts sample from (logits /
        temperature, as in the updates), and the answer mask `[B, T-1]`."""
        _, logprobs, _ = self._answer_logprobs(model, batch, features)
        return logprobs, (batch["labels"][:, 1:] != -100).float()

    def _update_logprobs(self, batch) -> tuple[dict, torch.Tensor, torch.Tensor, slice]:
        """An update's actor forward over a rollout micro-batch, with gradient: `(model batch, logits
        [B, W, V] / temperature (float32) over the answer window, log-probs [B, T-1] of the next tokens,
        the window's columns)`; the image features are the rollout's unless the actor's adapter touches
        the vision tower."""
        inputs = batch.model_batch()
        with self.role("actor") as actor:
            logits, logprobs, window = self._answer_logprobs(
                actor, inputs, self._features("actor", inputs, batch.image_features, grad=True))
        return inputs, logits, logprobs, window

    def _answer_batch(self, prompts: dict, tokens: torch.Tensor) -> dict:
        """Prompt batch (left-padded) + generated tokens [B, L] -> a model batch over prompt + answer,
        labels on the answer up to and including its stop token; `truncated [B]` marks rows without one."""
        policy = self.models["actor"]
        stops = torch.tensor(sorted(policy.stop_token_ids()), device=tokens.device)
        is_stop = torch.isin(tokens, stops)
        before_stop = (is_stop.long().cumsum(1) - is_stop.long()) == 0  # up to and including the first stop
        pad = policy.processor.tokenizer.pad_token_id
        answer = torch.where(before_stop, tokens, torch.full_like(tokens, pad))
        attention = torch.cat([prompts["attention_mask"], before_stop.long()], dim=1)
        batch = {"input_ids": torch.cat([prompts["input_ids"], answer], dim=1), "attention_mask": attention,
                 "image_index": prompts.get("image_index", torch.arange(tokens.shape[0], device=tokens.device))}
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, prompts["input_ids"].shape[1]:] = torch.where(before_stop, answer, torch.full_like(answer, -100))
        batch["labels"] = labels
        if "cross_attention_mask" in prompts:
            cross = prompts["cross_attention_mask"]
            cross = torch.cat([cross, cross[:, -1:].expand(-1, tokens.shape[1], *cross.shape[2:])], dim=1)
            batch["cross_attention_mask"] = cross * attention[:, :, None, None].to(cross.dtype)
        batch["truncated"] = ~is_stop.any(dim=1)
        return batch

    # ---- rollouts --------------------------------------------------------------
    def sampling_generators(self, draws: list[int], per_draw: int = 1) -> list[torch.Generator]:
        """One generator per answer row, row d * per_draw + g answering the example of draw number
        draws[d] (`ExampleStream`): seeded by the run's seed, the draw number and g only, so an answer
        is the same whichever process samples it and whatever else shares its batch."""
        device, seed = self.policy.device, self.ctx.seed
        return [torch.Generator(device=device).manual_seed((seed * 1_000_003 + draw) * 1009 + g)
                for draw in draws for g in range(per_draw)]

    @torch.no_grad()
    def _sample_answers(self, prompts: dict, generator: torch.Generator | list[torch.Generator]):
        """The actor's sampled answers to `prompts` (temperature, top_p): (answer batch, shared image
        features or None, the actor's features, actor and reference log-probs `[B, T-1]`, answer mask).
        `generator`: one for the batch or one per row (`sampling_generators`)."""
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

    def stop_deferred(self) -> bool:
        """A stop signal waits for the end of the current rollout iteration: a checkpoint mid-iteration could not
        be resumed exactly (the rollout's remaining updates are not saved)."""
        return self.remaining != 0

    def collate(self, examples):
        return to_device(collate_prompts(examples, self.policy.processor, **self.ctx.prompt_kwargs), self.policy.device)

    def _prompt_batches(self, examples: list[dict]):
        """`examples` collated as prompts, `eval_batch_size` at a time (held-out evaluation), with a progress bar
        of the answers on the main process when stderr is a terminal."""
        from tqdm.auto import tqdm

        size = self.config.eval_batch_size
        with tqdm(total=len(examples), desc=f"{self.config.name} answering", unit="answer", leave=False,
                  dynamic_ncols=True, disable=None if self.ctx.is_main else True) as bar:
            for start in range(0, len(examples), size):
                yield self.collate(examples[start : start + size])
                bar.update(min(size, len(examples) - start))

    # ---- evaluation ------------------------------------------------------------
    def answer_eval(self, name: str) -> dict:
        """Greedy answers of role `name` (actor or reference) to the held-out prompts: `answer_metrics`
        plus `mean_reward` and `samples` (the stage's reward)."""
        raise NotImplementedError

    def _more_metrics(self, after: dict) -> dict:
        """Stage-specific evaluation metrics from the trained actor's `answer_eval` (and `self.before`)."""
        return {}

    def before_training(self):
        """The starting policy's greedy answers on held-out prompts and their reward (once)."""
        if self.before is None:
            with self._eval_mode(), self.ctx.accelerator.autocast():
                self.before = self.answer_eval("reference")

    def evaluate(self):
        """Reward, exact match and length of greedy answers before (the reference) and after (the actor),
        and the sampled KL to the reference."""
        with self.ctx.accelerator.autocast():
            if self.before is None:  # evaluated without training (max_steps reached before a resume)
                self.before = self.answer_eval("reference")
            after = self.answer_eval("actor")
            kl = self.sampled_kl()
        metrics = {
            "mean_reward_before": self.before["mean_reward"],
            "mean_reward_after": after["mean_reward"],
            "kl": kl,
            "exact_match": after["exact_match"],
            "exact_match_before": self.before["exact_match"],
            "mean_answer_words": after["mean_answer_words"],
            "mean_answer_words_before": self.before["mean_answer_words"],
            **self._more_metrics(after),
        }
        metrics.update({k: v for k, v in after.items() if k.startswith("exact_match/")})
        metrics["samples"] = after["samples"]
        metrics["samples_before"] = self.before["samples"]
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


def rows_of(batch: dict, start: int, end: int, family) -> dict:
    """Rows start..end of a collated prompt batch with only the images they show (the `family`'s pixel
    keys picked by its `select_pixels`), renumbered from 0."""
    index = batch.get("image_index", torch.arange(batch["input_ids"].shape[0]))
    images, image_index = compact_images(index[start:end])
    pixels = family.select_pixels({k: batch[k] for k in family.PIXEL_KEYS if k in batch}, images)
    out = {k: v[start:end] for k, v in batch.items() if k != "image_index" and k not in pixels}
    out.update(pixels, image_index=image_index.to(batch["input_ids"].device))
    return out


def shown_samples(examples: list[dict], references: list[str], predictions: list[str], rewards: list[float],
                  count: int = 8) -> list[dict]:
    """The first `count` held-out answers as the report shows them."""
    return [{"question": e["question"], "answer": r, "prediction": p, "reward": round(s, 4)}
            for e, r, p, s in list(zip(examples, references, predictions, rewards))[:count]]

"""`SFTStage`: completion-only NLL on (image, question, answer) examples (seed 000)."""

from __future__ import annotations

from functools import partial

from alignment.data import collate_prompts, collate_sft, image_blind
from alignment.evaluate import answer_metrics, generate_answers
from alignment.losses import sft_loss_sum
from alignment.stages.base import Stage
from alignment.stages.common import ensure_policy_adapter, to_device


class SFTStage(Stage):
    type = "sft"
    adapter_name = "policy"

    def setup(self, previous_adapter):
        ensure_policy_adapter(self.policy, self.config, previous_adapter)

    def collate(self, examples):
        batch = collate_sft(examples, self.policy.processor, **self.ctx.collate_kwargs)
        return to_device(batch, self.policy.device)

    def count(self, batch):
        return int((batch["labels"][:, 1:] != -100).sum())

    def train_step(self, batch):
        logits, labels, _ = self.policy.windowed_logits(batch)  # the LM head over the answers only
        nll_sum, tokens = sft_loss_sum(logits, labels)
        return nll_sum, {"tokens": float(tokens)}

    def evaluate(self):
        examples = self.eval_examples[: self.config.eval_examples]
        answer = partial(generate_answers, self.policy,
                         collate_prompts=partial(collate_prompts, processor=self.policy.processor,
                                                 **self.ctx.prompt_kwargs),
                         batch_size=self.config.eval_batch_size, max_new_tokens=self.config.max_new_tokens)
        predictions, references, kinds = answer(examples)
        metrics = answer_metrics(predictions, references, kinds)
        if examples and all("answer_index" in e for e in examples):  # ScienceQA: seed 003's table
            from alignment.scienceqa import format_table, scienceqa_metrics, scienceqa_scores

            metrics.update(scienceqa_metrics(examples, predictions))
            print(f"[{self.config.name}] ScienceQA accuracy (%), {len(examples)} questions:\n"
                  f"{format_table(scienceqa_scores(examples, predictions), self.config.name)}")
        if self.config.blind_control:
            blind, _, _ = answer(image_blind(examples))
            metrics.update(answer_metrics(blind, references, prefix="blind_"))
            metrics["exact_match_blind"] = metrics.pop("blind_exact_match")
            metrics["mean_answer_words_blind"] = metrics.pop("blind_mean_answer_words")
        metrics["samples"] = [{"question": e["question"], "answer": r, "prediction": p}
                              for e, r, p in list(zip(examples, references, predictions))[:8]]
        return metrics

"""Preference pairs as one packed row each: the layout by hand, and the same log-probs, rewards and
gradients as two rows on every family that shares (Mllama, LLaVA, Qwen2.5-VL), SDPA and eager."""

import pytest
import torch

from alignment.data import build_datasets, collate_preference
from alignment.models.shared_prefix import attention_mask_for, saved_fraction, share_prefix
from alignment.policy import LoraSpec, MultimodalPolicy


def test_layout_by_hand():
    """Pair 0: chosen [5 6 7 1], rejected [5 6 8] share [5 6] -> packed [5 6 7 1 8]; pair 1: chosen [5 9],
    rejected [5 9 2 3] (chosen is a prefix of rejected) share [5 9] -> packed [5 9 2 3], one pad."""
    ids = torch.tensor([[5, 6, 7, 1], [5, 9, 0, 0], [5, 6, 8, 0], [5, 9, 2, 3]])
    mask = (torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]))
    packed = share_prefix(ids, mask, num_pairs=2)
    assert packed.input_ids.tolist() == [[5, 6, 7, 1, 8], [5, 9, 2, 3, 5]]
    assert packed.prefix_lengths.tolist() == [2, 2]
    assert packed.packed_pos.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0], [0, 1, 4, 0], [0, 1, 2, 3]]
    # rejected's 8 (position 4) sees the prefix and itself, not chosen's 7 1
    assert packed.allowed[0, 4].tolist() == [True, True, False, False, True]
    assert packed.allowed[0, 3].tolist() == [True, True, True, True, False]
    # pair 1's pad (position 4) sees only itself; no real token sees it
    assert packed.allowed[1, 4].tolist() == [False, False, False, False, True]
    assert not packed.allowed[1, :4, 4].any()
    assert packed.gather(torch.arange(16).view(4, 4) * 10).tolist() == [[0, 10, 20, 30, 100], [40, 50, 140, 150, 40]]
    assert saved_fraction(packed, mask) == 4 / 13
    additive = attention_mask_for(packed.allowed, "eager", torch.float32)
    assert additive.shape == (2, 1, 5, 5) and additive[0, 0, 4, 2] == torch.finfo(torch.float32).min
    with pytest.raises(ValueError, match="right-padded"):
        share_prefix(ids.flip(-1), mask.flip(-1), num_pairs=2)


@pytest.fixture(scope="module")
def pairs():
    train, _, _ = build_datasets(num_covers=60, seed=0, task="preference", max_eval_samples=8)
    return train[:3]


def _policy(name, attention="sdpa"):
    torch.manual_seed(0)
    policy = MultimodalPolicy.from_pretrained(name)
    if attention != "sdpa":
        policy.model.set_attn_implementation(attention)
    policy.add_adapter("policy", LoraSpec(r=4), head=True)
    with torch.no_grad():  # a LoRA that is not zero, so gradients reach A
        for param_name, param in policy.model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(std=0.05)
    return policy


def _run(policy, batch, share):
    policy.model.zero_grad()
    policy.heads.zero_grad()
    tokens, seq, mask = policy.pair_logprobs(batch, share_prefix=share)
    scores = policy.pair_sequence_scores(batch, "policy", share_prefix=share)
    weights = torch.arange(1, seq.shape[0] + 1, dtype=seq.dtype)
    ((seq * weights).sum() + (scores * weights).sum()).backward()
    grads = {n: p.grad.clone() for n, p in [*policy.model.named_parameters(), *policy.heads.named_parameters()]
             if p.grad is not None}
    return tokens, seq, mask, scores, grads


@pytest.mark.parametrize("name,attention", [("tiny-llava", "sdpa"), ("tiny-mllama", "sdpa"),
                                            ("tiny-qwen25vl", "sdpa"), ("tiny-llava", "eager")])
def test_same_logprobs_scores_and_gradients_as_two_rows(pairs, name, attention):
    policy = _policy(name, attention)
    assert policy.shares_prefix()
    batch = collate_preference(pairs, policy.processor)
    plain, shared = _run(policy, batch, False), _run(policy, batch, True)
    packed = policy._pairs_packed(batch, True)
    assert packed.input_ids.shape[0] == 3 and packed.input_ids.numel() < batch["input_ids"].numel()
    for a, b in zip(plain[:4], shared[:4]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert plain[4].keys() == shared[4].keys() and len(plain[4]) > 10
    for key, grad in plain[4].items():  # float rounding only: within 1e-4 of each tensor's largest entry
        assert (shared[4][key] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-7, key


def test_a_family_that_cannot_share_runs_two_rows(pairs):
    policy = _policy("tiny-idefics3")
    assert not policy.shares_prefix()
    batch = collate_preference(pairs, policy.processor)
    torch.testing.assert_close(policy.pair_logprobs(batch)[1], policy.completion_logprobs(batch)[1])


def test_prompt_tuning_runs_pairs_as_two_rows(pairs):
    """Prompt tuning's virtual tokens widen 2-D masks only: with it on, pairs stay two rows."""
    policy = MultimodalPolicy.from_pretrained("tiny-mllama")
    policy.add_adapter("policy", LoraSpec(method="prompt_tuning"))
    assert not policy.shares_prefix()
    batch = collate_preference(pairs, policy.processor)
    torch.testing.assert_close(policy.pair_logprobs(batch)[1], policy.completion_logprobs(batch)[1])

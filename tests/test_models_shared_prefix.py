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


def _row_alone(batch: dict, row: int) -> dict:
    """Row `row` of a preference batch as a batch of its own: its tokens up to its length (no padding),
    its token-aligned tensors (Mllama's cross-attention mask) likewise, and its pair's image alone
    (tensors with one entry per image, `[N, ...]`, N = the pairs' images, fewer than the 2P rows)."""
    rows, columns = batch["input_ids"].shape
    length, image = int(batch["attention_mask"][row].sum()), int(batch["image_index"][row])
    alone = {}
    for key, value in batch.items():
        if not torch.is_tensor(value) or key == "image_index":
            continue
        if value.shape[0] == rows:
            value = value[row : row + 1]
            alone[key] = value[:, :length] if value.dim() > 1 and value.shape[1] == columns else value
        else:
            alone[key] = value[image : image + 1]
    alone["image_index"] = torch.zeros(1, dtype=torch.long)
    return alone


def _completion_logprobs_by_hand(policy, batch: dict, row: int) -> torch.Tensor:
    """`[C]`: log p(token t+1 | tokens <= t) of row `row`'s C labelled tokens, from `policy.forward` on
    that row alone: log_softmax over the full logits (float32), gathered at the labels."""
    alone = _row_alone(batch, row)
    logits = policy.forward(alone).logits[0, :-1].float()
    targets = alone["labels"][0, 1:]
    counted = targets != -100
    return torch.log_softmax(logits[counted], dim=-1).gather(-1, targets[counted, None]).squeeze(-1)


def _assert_two_row_fallback(policy, batch: dict) -> None:
    """`pair_logprobs` ran the pairs as two rows (the model saw 2P rows, not P packed ones) and gave each
    row's completion log-probs (per token and summed) as that row alone does, computed by hand."""
    seen = []
    hook = policy.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True)
    try:
        with torch.no_grad():
            tokens, seq, mask = policy.pair_logprobs(batch)
    finally:
        hook.remove()
    rows = batch["input_ids"].shape[0]
    assert seen == [rows] == [2 * batch["num_pairs"]]
    for row in range(rows):
        with torch.no_grad():
            expected = _completion_logprobs_by_hand(policy, batch, row)
        assert expected.numel() > 0 and int(mask[row].sum()) == expected.numel()
        torch.testing.assert_close(tokens[row][mask[row].bool()], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seq[row], expected.sum(), atol=1e-5, rtol=1e-5)


def test_a_family_that_cannot_share_runs_two_rows(pairs):
    policy = _policy("tiny-idefics3")
    assert not policy.shares_prefix()
    _assert_two_row_fallback(policy, collate_preference(pairs, policy.processor))


def test_prompt_tuning_runs_pairs_as_two_rows(pairs):
    """Prompt tuning's virtual tokens widen 2-D masks only: with it on, pairs stay two rows."""
    policy = MultimodalPolicy.from_pretrained("tiny-mllama")
    policy.add_adapter("policy", LoraSpec(method="prompt_tuning"))
    assert not policy.shares_prefix()
    _assert_two_row_fallback(policy, collate_preference(pairs, policy.processor))

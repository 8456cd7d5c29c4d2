"""Sampling the next token: the per-row generators follow the nucleus distribution."""

import torch


def test_row_generator_sampling_follows_the_nucleus_distribution():
    from alignment.generation import sample_tokens

    probs = torch.tensor([0.2, 0.5, 0.3, 0.0])
    logits = probs.log().expand(6000, 4)
    rows = [torch.Generator().manual_seed(i) for i in range(6000)]
    counts = torch.bincount(sample_tokens(logits, 1.0, 1.0, rows), minlength=4) / 6000
    torch.testing.assert_close(counts, probs, atol=0.025, rtol=0)
    rows = [torch.Generator().manual_seed(i) for i in range(6000)]
    counts = torch.bincount(sample_tokens(logits, 1.0, 0.6, rows), minlength=4) / 6000  # nucleus: 0.5 and 0.3
    torch.testing.assert_close(counts, torch.tensor([0.0, 0.625, 0.375, 0.0]), atol=0.025, rtol=0)

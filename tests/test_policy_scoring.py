"""Scoring with MultimodalPolicy: the features path, one encoded image for several rows, answer-window log-probs."""

import pytest
import torch
from PIL import Image

from alignment.policy import LoraSpec
from tests._policy import FAMILIES, load, make_batch


@pytest.fixture(scope="module", params=FAMILIES)
def name(request):
    return request.param


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_features_path_equals_plain_forward(name, quantization):
    policy = load(name, quantization)
    batch = make_batch(policy)
    pixels = {k: v for k, v in batch.items() if k not in ("labels", "image_index")}
    with torch.no_grad():
        plain = policy.model(**pixels).logits
        features = policy.encode_images(batch)
        via_features = policy.forward(batch, image_features=features).logits
    tol = 1e-5 if quantization == "none" else 1e-4
    torch.testing.assert_close(via_features, plain, atol=tol, rtol=0)

def test_one_encoded_image_serves_several_rows(name):
    policy = load(name)
    batch = make_batch(policy, answers=("Maria Lopez", "Travel"))
    with torch.no_grad():
        features = policy.encode_images(batch)
        one = {k: v[:1] if torch.is_tensor(v) else v for k, v in batch.items()}
        # Row 1 re-uses image 0: the same as row 1's text shown with image 0 alone.
        shared = dict(batch, image_index=torch.tensor([0, 0]))
        logp_shared = policy.completion_logprobs(shared, image_features=features)[1]
        logp_first = policy.completion_logprobs(one, image_features=features[:1])[1]
    torch.testing.assert_close(logp_shared[0], logp_first[0], atol=1e-5, rtol=0)

def test_llava_rows_show_several_images_and_share_them():
    """image_index [B, K] (-1: empty slot): row 0 shows images [0, 1], row 1 image 1 alone; the features
    path equals transformers' forward on the same rows with the images repeated per placeholder."""
    policy = load("tiny-llava")
    images = [Image.new("RGB", (112, 112), c) for c in [(200, 60, 40), (40, 120, 200)]]
    texts = ["<|image|><|image|> Which cover is red?", "<|image|> What colour is this?"]
    plain = dict(policy.processor(images=[images[0], images[1], images[1]], text=texts, return_tensors="pt",
                                  padding=True, add_special_tokens=False))
    with torch.no_grad():
        want = policy.model(**plain).logits
        features = policy.encode_images({"pixel_values": plain["pixel_values"][:2]})  # each image once
        batch = {**plain, "image_index": torch.tensor([[0, 1], [1, -1]])}
        got = policy.forward(batch, features).logits
    mask = plain["attention_mask"].bool()
    assert (got - want)[mask].abs().max() < 1e-5

@pytest.mark.parametrize("model", ["tiny-mllama", "tiny-llava", "tiny-qwen25vl", "tiny-idefics3"])
def test_log_probs_over_the_answer_window_equal_the_full_logits(model):
    """`windowed_logits` runs the LM head over the answer span only; log-probs, the SFT loss and the
    gradients equal those computed from every position's logits (fp32)."""
    from alignment.data import build_datasets, collate_sft
    from alignment.losses import sequence_logprobs, sft_loss_sum

    policy = load(model)
    policy.add_adapter("policy", LoraSpec(r=4))
    examples = build_datasets(num_covers=8, seed=0, task="sft", max_eval_samples=2)[0][:3]
    batch = collate_sft(examples, policy.processor)
    logits, labels, start = policy.windowed_logits(batch)
    assert 0 < logits.shape[1] < batch["input_ids"].shape[1] - 10  # the prompt (image tokens included) is skipped
    full = policy.forward(batch).logits
    mask = (batch["labels"] != -100).float()
    want_tokens, want_seq = sequence_logprobs(full, batch["labels"].clamp(min=0), mask)
    got_tokens, got_seq, got_mask = policy.completion_logprobs(batch)
    torch.testing.assert_close(got_tokens, want_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_seq, want_seq, atol=1e-5, rtol=1e-6)  # sums of ~100 nats
    assert torch.equal(got_mask, mask[:, 1:])
    want_nll, want_count = sft_loss_sum(full, batch["labels"])
    got_nll, got_count = sft_loss_sum(logits, labels)
    torch.testing.assert_close(got_nll, want_nll, atol=1e-4, rtol=0)
    assert int(got_count) == int(want_count) > 0

    def gradients(loss):
        policy.model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in policy.trainable_parameters()]

    for got, want in zip(gradients(-policy.completion_logprobs(batch)[1].sum()),
                         gradients(-sequence_logprobs(policy.forward(batch).logits, batch["labels"].clamp(min=0),
                                                      mask)[1].sum()), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

"""MultimodalPolicy on both tiny families: image features, reference, adapters, presets, 4-bit, generation."""

import pytest
import torch
from PIL import Image

from alignment.policy import LoraSpec, MultimodalPolicy, resolve_preset

FAMILIES = ["tiny-mllama", "tiny-llava"]
PROMPT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|> Answer question based on the image,"
    " do not explain {q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)


def make_batch(policy, answers=("Maria Lopez", "Travel"), padding_side="right", with_answer=True):
    """Two rows, each with its own image; labels on the answer tokens only."""
    colours = [(200, 60, 40), (40, 120, 200)]
    images = [Image.new("RGB", (112, 112), c) for c in colours[: len(answers)]]
    prompts = [PROMPT.format(q="Who wrote this book?") for _ in answers]
    texts = [p + (a + "<|eot_id|>" if with_answer else "") for p, a in zip(prompts, answers)]
    tok = policy.processor.tokenizer
    tok.padding_side = padding_side
    batch = dict(policy.processor(images=[[im] for im in images] if policy.family.__name__.endswith("mllama") else images,
                                  text=texts, return_tensors="pt", padding=True, add_special_tokens=False))
    tok.padding_side = "right"
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for i, p in enumerate(prompts):
        n_prompt = len(policy.processor(images=[images[i]] if not policy.family.__name__.endswith("mllama") else [[images[i]]],
                                        text=[p], add_special_tokens=False)["input_ids"][0])
        labels[i, :n_prompt] = -100
    batch["labels"] = labels
    batch["image_index"] = torch.arange(len(answers))
    return batch


@pytest.fixture(scope="module", params=FAMILIES)
def name(request):
    return request.param


def load(name, quantization="none"):
    return MultimodalPolicy.from_pretrained(name, quantization=quantization)


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


def test_fresh_lora_leaves_logprobs_unchanged_and_reference_is_base(name):
    policy = load(name)
    batch = make_batch(policy)
    with torch.no_grad():
        base = policy.completion_logprobs(batch)[1]
    policy.add_adapter("policy", LoraSpec(r=4, preset="language"))
    with torch.no_grad():
        fresh = policy.completion_logprobs(batch)[1]
    torch.testing.assert_close(fresh, base, atol=1e-6, rtol=0)
    with torch.no_grad():  # perturb the adapter: policy moves, reference stays the base
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
        moved = policy.completion_logprobs(batch)[1]
        with policy.reference():
            ref = policy.completion_logprobs(batch)[1]
    assert (moved - base).abs().max() > 1e-3
    torch.testing.assert_close(ref, base, atol=1e-6, rtol=0)


EXPECTED_PRESET_SUFFIXES = {
    # 4 self-attention layers x (4 attention + 3 MLP) + the MLPs of the 2 cross-attention layers
    ("tiny-mllama", "language"): ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, 4 * 7 + 2 * 3),
    ("tiny-mllama", "cross_attention"): ({"q_proj", "k_proj", "v_proj", "o_proj"}, 2 * 4),
    ("tiny-mllama", "vision"): ({"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}, 4 * 6),
    ("tiny-mllama", "multimodal"): ({"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "multi_modal_projector"}, 2 * 4 + 4 * 6 + 1),
    ("tiny-llava", "language"): ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, 4 * 7),
    ("tiny-llava", "vision"): ({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}, 3 * 6),
    ("tiny-llava", "multimodal"): ({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "linear_1", "linear_2"}, 3 * 6 + 2),
}


@pytest.mark.parametrize("preset", ["language", "cross_attention", "vision", "multimodal", "all"])
def test_presets_select_exactly_the_intended_modules(name, preset):
    policy = load(name)
    names = resolve_preset(policy.model, preset)
    suffixes = {n.split(".")[-1] for n in names}
    if (name, preset) in EXPECTED_PRESET_SUFFIXES:
        want_suffixes, want_count = EXPECTED_PRESET_SUFFIXES[(name, preset)]
        assert suffixes == want_suffixes
        assert len(names) == want_count
    if preset == "language":
        assert all(".language_model.layers." in n and "cross_attn" not in n for n in names)
    if preset == "cross_attention" and name == "tiny-mllama":
        assert all(".cross_attn." in n for n in names)
        assert {int(n.split(".layers.")[1].split(".")[0]) for n in names} == {1, 4}
    if preset == "vision":
        assert all("vision" in n for n in names)
    if preset == "all":
        everything = set()
        for other in ("language", "cross_attention", "vision", "multimodal"):
            everything |= set(resolve_preset(policy.model, other))
        assert set(names) == everything
    assert "lm_head" not in names


def test_four_bit_quantizes_text_only(name):
    import bitsandbytes as bnb

    policy = load(name, "4bit")
    quantized = [n for n, m in policy.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(".language_model." in n for n in quantized)
    assert not any("vision" in n or "multi_modal_projector" in n or "lm_head" in n for n in quantized)
    assert isinstance(policy.model.lm_head, torch.nn.Linear) and not isinstance(policy.model.lm_head, bnb.nn.Linear4bit)
    assert policy.model.lm_head.weight.dtype == torch.float32


def test_four_bit_keeps_the_unquantised_weights_in_the_checkpoint_dtype(name):
    """bf16 vision tower, embeddings and lm_head stay bf16 (PEFT's kbit preparation would make them fp32:
    +3.9 GB on the 11B); LoRA weights added on top are fp32."""
    policy = MultimodalPolicy.from_pretrained(name, quantization="4bit", dtype=torch.bfloat16,
                                              gradient_checkpointing=True)
    unquantised = {p.dtype for n, p in policy.model.named_parameters() if p.__class__.__name__ != "Params4bit"}
    assert unquantised == {torch.bfloat16}
    policy.add_adapter("policy", LoraSpec(r=4, preset="all"))
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}


def test_four_bit_gradients_after_an_eval_pass_equal_those_before(name):
    """bitsandbytes repacks 4-bit weights for an inference kernel on the first eval-mode forward without
    gradients (on CPUs with AVX512-BF16) and never undoes it; LoRA gradients backpropagated through the
    repacked weights differed by 114% (relative norm). Every stage that evaluates or rolls out before
    it trains (DPO after SFT's evaluation, PPO, GRPO) depends on this equality."""
    from tests._adapters import check_lora_gradients_survive_an_eval_pass

    torch.manual_seed(0)
    policy = load(name, "4bit")
    check_lora_gradients_survive_an_eval_pass(
        policy, make_batch(policy), make_batch(policy, with_answer=False, padding_side="left"))


def test_eight_bit_refused_for_mllama():
    with pytest.raises(ValueError, match="8-bit"):
        load("tiny-mllama", "8bit")


def test_adapter_round_trip_is_exact(name, tmp_path):
    policy = load(name)
    policy.add_adapter("reward", LoraSpec(r=4, preset="language"), head=True)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    batch = make_batch(policy)
    with torch.no_grad():
        before = policy.sequence_scores(batch, "reward")
    policy.save_adapter("reward", tmp_path / "reward")
    assert (tmp_path / "reward" / "adapter_model.safetensors").exists()
    assert (tmp_path / "reward" / "adapter_config.json").exists()
    fresh = load(name)
    fresh.load_adapter("reward", tmp_path / "reward")
    with torch.no_grad():
        after = fresh.sequence_scores(batch, "reward")
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_lm_head_lora_adapts_the_output_head_and_round_trips(name, tmp_path):
    """`lm_head: true` adds a LoRA on the vocabulary projection (only there beyond the preset); it
    trains, changes the logits, saves and loads exactly, and the reference (adapters off) ignores it."""
    policy = load(name, "4bit")
    policy.add_adapter("policy", LoraSpec(r=4, preset="language", lm_head=True))
    lora_modules = {n.split(".lora_A")[0] for n, _ in policy.base_model.named_parameters() if ".lora_A." in n}
    head = [n for n in lora_modules if n.endswith("lm_head")]
    assert len(head) == 1 and lora_modules - set(head) == set(resolve_preset(policy.base_model, "language"))
    assert all(p.requires_grad for n, p in policy.model.named_parameters() if "lm_head.lora_" in n)
    batch = make_batch(policy)
    with torch.no_grad():
        reference = policy.completion_logprobs(batch)[1]
        for n, p in policy.model.named_parameters():
            if "lm_head.lora_B" in n:
                p.add_(0.5 * torch.randn_like(p))
        moved = policy.completion_logprobs(batch)[1]
        with policy.reference():
            torch.testing.assert_close(policy.completion_logprobs(batch)[1], reference, atol=1e-6, rtol=0)
    assert (moved - reference).abs().max() > 1e-3
    policy.save_adapter("policy", tmp_path / "policy")
    fresh = load(name, "4bit")
    fresh.load_adapter("policy", tmp_path / "policy")
    with torch.no_grad():
        torch.testing.assert_close(fresh.completion_logprobs(batch)[1], moved, atol=0, rtol=0)


def test_adapters_switch_and_stay_trainable(name):
    policy = load(name)
    policy.add_adapter("policy", LoraSpec(r=4))
    policy.add_adapter("critic", LoraSpec(r=4), head=True)
    trainable = {n.split(".lora_")[1].split(".")[1] for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable == {"policy", "critic"}
    batch = make_batch(policy)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n and ".critic." in n:
                p.add_(0.1)
        with policy.use_adapter("policy"):
            a = policy.completion_logprobs(batch)[1]
        with policy.use_adapter("critic"):
            b = policy.completion_logprobs(batch)[1]
        with policy.reference():
            ref = policy.completion_logprobs(batch)[1]
    torch.testing.assert_close(a, ref, atol=1e-6, rtol=0)  # policy adapter still fresh
    assert (a - b).abs().max() > 1e-3


def test_generation_stops_at_eot(name):
    """Train the answer in, then greedy generation ends at <|eot_id|> and decodes the answer."""
    policy = load(name)
    policy.add_adapter("policy", LoraSpec(r=8, alpha=16, preset="all"))
    batch = make_batch(policy, answers=("Maria Lopez", "Travel"))
    # A random base's frozen norm and LM head cap the logit scale; let the head train too.
    policy.base_model.lm_head.requires_grad_(True)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=3e-3)
    for _ in range(60):
        _, seq, mask = policy.completion_logprobs(batch)
        loss = -(seq / mask.sum(-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prompts = make_batch(policy, answers=("Maria Lopez", "Travel"), with_answer=False, padding_side="left")
    tokens = policy.generate(prompts, max_new_tokens=12)
    eot = policy.processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokens.shape[1] < 12  # stopped early
    for row in tokens.tolist():
        assert eot in row
    assert policy.decode(tokens) == ["Maria Lopez", "Travel"]


def test_generation_never_emits_the_image_placeholder():
    """tiny LLaVA's output head has a row for `<|image|>`: even when it is the likeliest token, neither
    greedy nor sampled answers hold it (the next forward would look for image features to splice in)."""
    policy = load("tiny-llava")
    image_id = policy.config.image_token_id
    def favour_placeholder(module, args, logits):
        logits[..., image_id] += 100.0
        return logits

    policy.base_model.lm_head.register_forward_hook(favour_placeholder)
    prompts = make_batch(policy, with_answer=False, padding_side="left")
    greedy = policy.generate(prompts, max_new_tokens=4)
    sampled = policy.generate(prompts, max_new_tokens=4, temperature=1.0, num_samples=3,
                              generator=torch.Generator().manual_seed(0))
    assert image_id not in greedy.tolist()[0] + greedy.tolist()[1]
    assert image_id not in sum(sampled.tolist(), [])
    with torch.no_grad():
        logits = policy.forward(prompts).logits[:, -1]
    assert (logits.argmax(-1) == image_id).all()  # the unmasked head would have said <|image|>


def test_synced_generation_steps_on_until_every_process_has_stopped(monkeypatch):
    """Under ZeRO-3 every forward gathers parameters with all processes: a process whose rows have all
    stopped must keep stepping (pad tokens) while another has not, or the others wait forever."""
    import torch.distributed as dist

    policy = load("tiny-mllama")
    prompts = make_batch(policy, answers=("Maria Lopez", "Travel"), with_answer=False, padding_side="left")
    first = policy.generate(prompts, max_new_tokens=1)[:, 0]
    monkeypatch.setattr(policy, "_stop_token_ids", lambda: set(first.tolist()))  # every row stops at once
    assert policy.generate(prompts, max_new_tokens=8).shape[1] == 1
    others_running = iter([1.0, 1.0, 1.0])  # another process still generating for 3 more steps

    def all_reduce(flag, op=None):
        flag += next(others_running, 0.0)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    policy.synced_generation = True
    tokens = policy.generate(prompts, max_new_tokens=8)
    assert tokens.shape[1] == 4
    assert (tokens[:, 1:] == policy.processor.tokenizer.pad_token_id).all()


def test_row_generators_make_each_answer_independent_of_its_batch(name):
    """With one generator per row, a prompt's sampled answer is the same alone or beside another prompt
    (what lets 2 processes sample what 1 process with twice the batch samples)."""
    policy = load(name)  # temperature 4: the random tiny heads are peaked (top token 0.62 / 0.99)
    both = make_batch(policy, with_answer=False, padding_side="left")
    alone = make_batch(policy, answers=("Maria Lopez",), with_answer=False, padding_side="left")

    def generators(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    together = policy.generate(both, max_new_tokens=6, temperature=4.0, generator=generators(5, 9))
    first = policy.generate(alone, max_new_tokens=6, temperature=4.0, generator=generators(5))
    length = first.shape[1]
    assert together[0, :length].tolist() == first[0].tolist()
    assert (together[0, length:] == policy.processor.tokenizer.pad_token_id).all()
    other = policy.generate(alone, max_new_tokens=6, temperature=4.0, generator=generators(6))
    assert other[0].tolist() != first[0].tolist()  # the seed, not the batch, decides
    with pytest.raises(ValueError, match="3 row generators for 2 answer rows"):
        policy.generate(both, max_new_tokens=2, temperature=1.0, generator=generators(1, 2, 3))


def test_row_generator_sampling_follows_the_nucleus_distribution():
    from alignment.policy import _sample

    probs = torch.tensor([0.2, 0.5, 0.3, 0.0])
    logits = probs.log().expand(6000, 4)
    rows = [torch.Generator().manual_seed(i) for i in range(6000)]
    counts = torch.bincount(_sample(logits, 1.0, 1.0, rows), minlength=4) / 6000
    torch.testing.assert_close(counts, probs, atol=0.025, rtol=0)
    rows = [torch.Generator().manual_seed(i) for i in range(6000)]
    counts = torch.bincount(_sample(logits, 1.0, 0.6, rows), minlength=4) / 6000  # nucleus: 0.5 and 0.3
    torch.testing.assert_close(counts, torch.tensor([0.0, 0.625, 0.375, 0.0]), atol=0.025, rtol=0)


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

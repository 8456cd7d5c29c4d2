"""The loop engine through MultimodalPolicy.generate on both tiny families: stop tokens, placeholders, ZeRO-3 sync, per-row generators."""

import pytest
import torch

from alignment.policy import LoraSpec
from tests._policy import FAMILIES, load, make_batch


@pytest.fixture(scope="module", params=FAMILIES)
def name(request):
    return request.param


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
    monkeypatch.setattr(policy, "stop_token_ids", lambda: set(first.tolist()))  # every row stops at once
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

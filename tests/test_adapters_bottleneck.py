"""Seed 003's Bottleneck Adapter: the maths of eq. 1-2, its parameter count, placement, training
alone, save/load; the SwiGLU visual adapter (eq. 3) on tiny-llava."""

import pytest
import torch

from alignment.adapters.bottleneck import (
    BottleneckAdapter,
    VisualAdapter,
    bottleneck_parameter_count,
    visual_adapter_parameter_count,
)
from alignment.losses import sft_loss_sum
from alignment.policy import LoraSpec, MultimodalPolicy
from tests._policy import make_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def test_group_wise_up_projection_matches_eq_2_by_hand():
    """c=4, d=2, k=2: psi_d(Z) = Z W_d + b_d gives Z' = [z'_1 | z'_2] (one column per group);
    psi_u(Z') = [z'_1 W_1, z'_2 W_2] + b_u with W_i [1, 2]. With Z = [1, 2, 3, 4],
    W_d = [[1,0,0,0],[0,0,0,1]] (torch layout [d, c]), b_d = 0: Z' = [1, 4].
    W_1 = [[1, 2]], W_2 = [[3, 4]], b_u = [0.5]*4: psi_u = [1, 2, 12, 16] + 0.5, and
    g(Z) = Z + psi_u = [2.5, 4.5, 15.5, 20.5]."""
    adapter = BottleneckAdapter(width=4, dim=2, groups=2)
    with torch.no_grad():
        adapter.down.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]]))
        adapter.down.bias.zero_()
        adapter.up_weight.copy_(torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]]))
        adapter.up_bias.fill_(0.5)
    out = adapter(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    torch.testing.assert_close(out, torch.tensor([[2.5, 4.5, 15.5, 20.5]]))


def test_equals_a_dense_block_diagonal_reference_in_float64():
    """psi_u is a dense [d, c] matrix that is block-diagonal over the k groups."""
    torch.manual_seed(1)
    c, d, k = 12, 6, 3
    adapter = BottleneckAdapter(c, d, k, scale=0.5).double()
    with torch.no_grad():
        adapter.up_weight.normal_()
        adapter.up_bias.normal_()
    dense = torch.block_diag(*adapter.up_weight)  # [d, c]
    z = torch.randn(2, 5, c, dtype=torch.float64)
    expected = z + 0.5 * ((z @ adapter.down.weight.T + adapter.down.bias) @ dense + adapter.up_bias)
    torch.testing.assert_close(adapter(z), expected)
    assert dense.count_nonzero() <= d * c // k  # off-block entries are structurally zero


def test_fresh_adapter_is_identity_and_groups_must_divide():
    z = torch.randn(3, 8)
    torch.testing.assert_close(BottleneckAdapter(8, 4, 2)(z), z)
    with pytest.raises(ValueError, match="divisible by groups"):
        BottleneckAdapter(8, 6, 4)


def fresh(policy):
    """A copy of an adapter-free policy (faster than loading it again)."""
    import copy

    return MultimodalPolicy(copy.deepcopy(policy.model), policy.processor)


@pytest.fixture(scope="module")
def mllama():
    return MultimodalPolicy.from_pretrained("tiny-mllama")


def test_trainable_count_equals_the_formula_and_only_adapters_train(mllama):
    """tiny-mllama, preset all: 12 text sites of width 192 (6 layers x attention/cross-attention + MLP)
    and 2*(3+1) vision sites of width 96. dim 16, groups 2: 192*16 + 16 + 192*16/2 + 192 = 4816 per
    text site, 96*16 + 16 + 96*16/2 + 96 = 2416 per vision site: 12*4816 + 8*2416 = 77120."""
    policy = fresh(mllama)
    targets = policy.add_adapter("policy", LoraSpec(method="bottleneck", dim=16, groups=2, preset="all"))
    text = [t for t in targets if "language_model" in t]
    vision = [t for t in targets if "vision_model" in t]
    assert len(text) == 12 and len(vision) == 8 and len(targets) == 20
    assert any(t.endswith("cross_attn") for t in text) and any(t.endswith("mlp") for t in text)
    expected = 12 * bottleneck_parameter_count(192, 16, 2) + 8 * bottleneck_parameter_count(96, 16, 2)
    assert expected == 12 * 4816 + 8 * 2416 == 77120
    trainable = policy.trainable_parameters()
    assert sum(p.numel() for p in trainable) == expected
    adapter_ids = {id(p) for p in policy.own["bottleneck"].parameters()}
    assert all(id(p) in adapter_ids for p in trainable)
    assert not any(p.requires_grad for p in policy.model.parameters())


def test_trains_alone_saves_and_loads(mllama, tmp_path):
    policy = fresh(mllama)
    batch = make_batch(policy)
    with torch.no_grad():
        base = policy.completion_logprobs(batch)[1]
    policy.add_adapter("policy", LoraSpec(method="bottleneck", dim=16, groups=2, preset="language"))
    with torch.no_grad():
        torch.testing.assert_close(policy.completion_logprobs(batch)[1], base)  # identity at init
    frozen = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        nll, count = sft_loss_sum(policy.forward(batch).logits.float(), batch["labels"])
        (nll / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((nll / count).item())
    assert losses[-1] < losses[0] - 0.5
    assert all(torch.equal(p, frozen[n]) for n, p in policy.model.named_parameters())  # base untouched
    with torch.no_grad():
        trained = policy.completion_logprobs(batch)[1]
        with policy.reference():
            torch.testing.assert_close(policy.completion_logprobs(batch)[1], base)
    policy.save_adapter("policy", tmp_path / "ba")
    config = (tmp_path / "ba" / "adapter_config.json").read_text()
    assert '"peft_type": "BOTTLENECK"' in config and '"groups": 2' in config
    loaded = fresh(mllama)
    loaded.load_adapter("policy", tmp_path / "ba", trainable=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded.completion_logprobs(batch)[1], trained)
    assert loaded.trainable_parameters() == []


def test_dpo_reference_copy_is_frozen(mllama):
    policy = fresh(mllama)
    policy.add_adapter("policy", LoraSpec(method="bottleneck", preset="language"))
    with torch.no_grad():
        for p in policy.own["bottleneck"].adapters["policy"].parameters():
            p.add_(0.01)
    policy.freeze_reference("policy")
    batch = make_batch(policy)
    with torch.no_grad():
        now = policy.completion_logprobs(batch)[1]
        with policy.reference():
            ref = policy.completion_logprobs(batch)[1]
    torch.testing.assert_close(ref, now)
    assert all(not p.requires_grad for p in policy.own["bottleneck"].adapters["reference"].parameters())
    assert all(p.requires_grad for p in policy.own["bottleneck"].adapters["policy"].parameters())


def test_visual_adapter_on_llava_replaces_the_projector():
    """tiny-llava: vision features 96 wide, text 192 wide; d_v = 8: 96*16 + 16 + 8*192 + 192 = 3280."""
    policy = MultimodalPolicy.from_pretrained("tiny-llava")
    batch = make_batch(policy)
    with torch.no_grad():
        before = policy.encode_images(batch).embeds
    targets = policy.add_adapter("policy", LoraSpec(method="bottleneck", preset="language", visual_dim=8))
    assert targets[-1].endswith("multi_modal_projector")
    visual = policy.own["bottleneck"].adapters["policy"]["model__multi_modal_projector"]
    assert isinstance(visual, VisualAdapter)
    assert sum(p.numel() for p in visual.parameters()) == visual_adapter_parameter_count(96, 192, 8) == 3280
    with torch.no_grad():
        after = policy.encode_images(batch).embeds
        vision = policy.base_model.model.get_image_features(
            pixel_values=batch["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default")
    assert after.shape == before.shape
    assert policy.vision_is_adapted
    with torch.no_grad():
        raw = policy.base_model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(after, visual(raw))
        with policy.reference():
            torch.testing.assert_close(policy.encode_images(batch).embeds, before)
    del vision
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        nll, count = sft_loss_sum(policy.forward(batch).logits.float(), batch["labels"])
        (nll / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((nll / count).item())
    assert losses[-1] < losses[0]

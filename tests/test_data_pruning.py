"""Seed 002's pruning: greedy k-center on the policy's own embeddings, images first, every category
covered, deterministic, and more spread out than a random set of the same size."""

import random

import pytest
import torch

from alignment.data import build_datasets
from alignment.data.pruning import (
    covering_radius,
    k_center_select,
    min_pairwise_distance,
    policy_embeddings,
    select_examples,
)
from alignment.policy import MultimodalPolicy

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def test_k_center_by_hand():
    """Points 0, 1, 10, 11, 5 on a line, no categories: start at the point farthest from the mean 5.4,
    11 (5.6 away; 0 is 5.4); then farthest from {11}: 0; then farthest from {11, 0}: 5 (min(5, 6) = 5,
    while 1 and 10 are 1 away)."""
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0], [5.0]])
    assert k_center_select(x, 3) == [3, 0, 4]


def test_categories_first_then_images_first():
    """a = rows 0-2 (mean 1: seed 1); b's only image row is 3 (its mean 35.4 is nearer 5, a text
    row): seed 3. Then image rows 0 and 2 (both 1 from the chosen; the tie goes to 0) before text
    row 5, though 5 is 97 away from everything."""
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [3.1], [100.0]])
    categories = ["a", "a", "a", "b", "b", "b"]
    has_image = [True, True, True, True, False, False]
    chosen = k_center_select(x, 5, categories, has_image)
    assert chosen == [1, 3, 0, 2, 5]
    with pytest.raises(ValueError, match="cannot cover all 6 categories"):
        k_center_select(x, 2, list("abcdef"))


@pytest.fixture(scope="module")
def embedded():
    """60 covers' SFT examples and the tiny policy's pooled embeddings of them."""
    policy = MultimodalPolicy.from_pretrained("tiny-mllama")
    train, _, _ = build_datasets(num_covers=60, seed=0, task="sft", eval_fraction=0.1,
                                 tokenizer=policy.processor, max_length=256)
    train = train[:120]
    return train, policy_embeddings(policy, train, batch_size=40)


def test_policy_embeddings_shape_and_determinism(embedded):
    train, e = embedded
    assert e.shape == (len(train), 192 + 192)  # text hidden + image feature width (tiny-mllama)
    torch.testing.assert_close(e[:, :192].norm(dim=1), torch.ones(len(train)))


def test_chosen_set_covers_every_category_and_is_more_spread_than_random(embedded):
    train, e = embedded
    k = 20
    kept = select_examples(train, k, "diversity", e)
    assert kept == select_examples(train, k, "diversity", e)  # deterministic
    assert {x["kind"] for x in kept} == {x["kind"] for x in train}
    index = {x["id"]: i for i, x in enumerate(train)}
    chosen = [index[x["id"]] for x in kept]
    radius, spread = covering_radius(e, chosen), min_pairwise_distance(e, chosen)
    for seed in range(10):
        rows = random.Random(seed).sample(range(len(train)), k)
        assert radius < covering_radius(e, rows)
        assert spread > min_pairwise_distance(e, rows)


def test_random_control_and_text_only_examples_come_last():
    examples = [{"id": str(i), "kind": "k", "has_image": i % 2 == 0} for i in range(10)]
    e = torch.arange(10.0)[:, None]
    kept = select_examples(examples, 5, "diversity", e)
    assert all(x["has_image"] for x in kept)
    assert len(select_examples(examples, 5, "random", seed=1)) == 5
    assert select_examples(examples, 5, "random", seed=1) == select_examples(examples, 5, "random", seed=1)

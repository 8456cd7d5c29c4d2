"""alignment.models.features: ImageFeatures of different lengths per image, image_index [B, K] with
empty slots, and the rollout record selecting and concatenating rows over them."""

import torch

from alignment.models.features import (
    ImageFeatures,
    cat_image_indices,
    compact_images,
    flat_images,
    repeat_state,
)
from alignment.stages.rollout import Rollout, cat_rollouts


def features(lengths, hidden=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return ImageFeatures.from_list([torch.randn(n, hidden, generator=generator) for n in lengths],
                                   grid_thw=torch.tensor([[1, 2, n * 2] for n in lengths]))


def test_select_and_cat_keep_each_images_unpadded_features():
    a, b = features([3, 5]), features([6], seed=1)
    joined = ImageFeatures.cat([a, b])
    assert joined.embeds.shape == (3, 6, 4) and joined.lengths.tolist() == [3, 5, 6]
    originals = a.unpadded(torch.tensor([0, 1])) + b.unpadded(torch.tensor([0]))
    for got, want in zip(joined.unpadded(torch.tensor([0, 1, 2])), originals):
        assert torch.equal(got, want)
    picked = joined.select(torch.tensor([2, 0]))
    assert picked.lengths.tolist() == [6, 3] and picked.grid_thw.tolist() == [[1, 2, 12], [1, 2, 6]]
    assert torch.equal(picked.unpadded(torch.tensor([1]))[0], originals[0])
    assert not bool(joined.embeds[0, 3:].any())  # padding stays zero


def test_dense_features_have_equal_lengths_and_move_like_tensors():
    dense = ImageFeatures.dense(torch.randn(2, 7, 4))
    assert dense.lengths.tolist() == [7, 7] and len(dense) == 2
    half = dense.to(torch.bfloat16)
    assert half.embeds.dtype == torch.bfloat16 and half.lengths.dtype == torch.long


def test_image_index_slots_compact_and_concatenate():
    index = torch.tensor([[3, -1], [1, 3], [-1, -1]])
    assert flat_images(index).tolist() == [3, 1, 3]
    images, compact = compact_images(index)
    assert images.tolist() == [1, 3] and compact.tolist() == [[1, -1], [0, 1], [-1, -1]]
    joined = cat_image_indices([torch.tensor([0, 1]), torch.tensor([[0, 1], [1, -1]])], counts=[2, 2])
    assert joined.tolist() == [[0, -1], [1, -1], [2, 3], [3, -1]]
    assert cat_image_indices([torch.tensor([0, 0]), torch.tensor([0])], counts=[1, 1]).tolist() == [0, 0, 1]


def test_repeat_state_repeats_every_row_tensor_and_the_cache():
    class Cache:
        def batch_repeat_interleave(self, times):
            self.times = times

    state = repeat_state({"cache": Cache(), "text_positions": torch.tensor([[4], [6]])}, 3)
    assert state["cache"].times == 3 and state["text_positions"].flatten().tolist() == [4, 4, 4, 6, 6, 6]


def rollout(image_index, lengths, rows, seed=0):
    T = 5
    zeros = torch.zeros(rows, T - 1)
    return Rollout(
        input_ids=torch.arange(rows * T).view(rows, T), attention_mask=torch.ones(rows, T, dtype=torch.long),
        cross_attention_mask=None, image_features=features(lengths, seed=seed), response_mask=zeros + 1,
        old_logprobs=zeros, ref_logprobs=zeros, values=zeros, rewards=zeros, advantages=zeros, returns=zeros,
        scores=torch.arange(rows, dtype=torch.float), ids=[f"r{i}" for i in range(rows)],
        pixel_inputs={"pixel_values": torch.arange(sum(lengths) * 4.0).view(-1, 1),
                      "image_grid_thw": torch.tensor([[1, 1, n * 4] for n in lengths])},
        image_index=image_index, select_pixels=_select_patches,
    )


def _select_patches(pixels, images):
    """Qwen's layout: image i's patches are rows offsets[i] .. offsets[i+1] of a flat pixel_values."""
    grid = pixels["image_grid_thw"]
    offsets = torch.cat([grid.new_zeros(1), grid.prod(-1).cumsum(0)]).tolist()
    rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in images.tolist()])
    return {"pixel_values": pixels["pixel_values"][rows], "image_grid_thw": grid[images]}


def test_rollout_rows_keep_their_images_through_select_and_cat():
    """Two-image rows and empty slots: a selected row shows the same features and pixels as before."""
    full = rollout(torch.tensor([[2, 0], [1, -1], [2, -1]]), lengths=[3, 5, 2], rows=3)
    part = full.select([2, 0])
    assert part.ids == ["r2", "r0"] and part.image_index.tolist() == [[1, -1], [1, 0]]
    assert part.image_features.lengths.tolist() == [3, 2]  # images 0 and 2, each once
    for row_new, row_old in ((0, 2), (1, 0)):
        new = [i for i in part.image_index[row_new].tolist() if i >= 0]
        old = [i for i in full.image_index[row_old].tolist() if i >= 0]
        for i, j in zip(new, old):
            assert torch.equal(part.image_features.unpadded(torch.tensor([i]))[0],
                               full.image_features.unpadded(torch.tensor([j]))[0])
            assert torch.equal(_select_patches(part.pixel_inputs, torch.tensor([i]))["pixel_values"],
                               _select_patches(full.pixel_inputs, torch.tensor([j]))["pixel_values"])
    other = rollout(torch.tensor([0, 0]), lengths=[4], rows=2, seed=1)
    joined = cat_rollouts([part, other], pad_id=0)
    assert joined.image_index.tolist() == [[1, -1], [1, 0], [2, -1], [2, -1]]
    assert joined.image_features.lengths.tolist() == [3, 2, 4]
    assert joined.pixel_inputs["pixel_values"].shape[0] == (3 + 2 + 4) * 4
    assert torch.equal(joined.image_features.unpadded(torch.tensor([2]))[0],
                       other.image_features.unpadded(torch.tensor([0]))[0])

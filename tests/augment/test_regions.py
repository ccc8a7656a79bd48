import math

import pytest
import torch

from glare.augment.regions import region_queries, sample_regions

# Four heads over a 4 x 4 grid, each peaking on its own three patches (descending, so the arg-max is known).
PEAKS = [[0, 1, 4], [3, 2, 7], [15, 14, 11], [9, 10, 5]]


def synthetic_attention(b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    attn = 0.01 * torch.rand(b, len(PEAKS), 16, generator=g)
    for h, cells in enumerate(PEAKS):
        for rank, cell in enumerate(cells):
            attn[:, h, cell] = 1.0 - 0.1 * rank
    return attn


def as_sets(regions: torch.Tensor) -> list[list[frozenset[int]]]:
    return [[frozenset(r.nonzero().flatten().tolist()) for r in img] for img in regions]


def test_regions_are_the_heads_peaks_and_heads_are_distinct():
    regions = sample_regions(synthetic_attention(8), 3, 3 / 16, generator=torch.Generator().manual_seed(1))
    assert regions.shape == (8, 3, 16) and regions.dtype == torch.bool
    peaks = {frozenset(c) for c in PEAKS}
    for img in as_sets(regions):
        assert len(set(img)) == 3 and set(img) <= peaks
    all_heads = as_sets(sample_regions(synthetic_attention(2), 4, 3 / 16))
    assert all(set(img) == peaks for img in all_heads)


def test_heads_vary_across_images():
    regions = sample_regions(synthetic_attention(64), 1, 3 / 16, generator=torch.Generator().manual_seed(2))
    seen = {s[0] for s in as_sets(regions)}
    assert len(seen) == 4


def test_region_size_is_ceil_q_n_and_contains_argmax():
    attn = synthetic_attention(4)
    for q, size in [(0.15, math.ceil(0.15 * 16)), (0.01, 1), (1.0, 16)]:
        regions = sample_regions(attn, 4, q)
        assert (regions.sum(-1) == size).all()
    # With one patch per region, each region is exactly its head's arg-max patch.
    singletons = as_sets(sample_regions(attn, 4, 0.01))
    assert all(set(img) == {frozenset([c[0]]) for c in PEAKS} for img in singletons)


def test_too_many_regions_raise_naming_both_numbers():
    with pytest.raises(ValueError, match=r"num_regions \(5\).*heads \(4\)"):
        sample_regions(synthetic_attention(1), 5, 0.15)
    with pytest.raises(ValueError, match="top_q"):
        sample_regions(synthetic_attention(1), 2, 0.0)


def test_region_queries_masked_mean():
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [0.0, 8.0]]])
    masks = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 1, 1], [0, 0, 0, 0]]], dtype=torch.bool)
    q = region_queries(tokens, masks)
    assert q.shape == (1, 4, 2)
    assert torch.allclose(q, torch.tensor([[[2.0, 1.0], [0.0, 8.0], [2.0, 4.0], [0.0, 0.0]]]))
    with pytest.raises(ValueError, match="matching B and N"):
        region_queries(tokens, masks[:, :, :3])

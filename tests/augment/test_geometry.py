import pytest
import torch
import torch.nn.functional as F

from glare.augment.geometry import image_to_view, map_patch_mask, match_patches, patch_centres, view_to_image
from glare.augment.views import ViewPair

S, P, G = 64, 16, 4  # view side, patch, grid: 4 x 4 tokens
BOX = torch.tensor([[10.0, 20.0, 138.0, 148.0]])  # 128 px square: 2 source px per view px, 32 per patch
NO, YES = torch.tensor([False]), torch.tensor([True])


def cols_rows() -> tuple[torch.Tensor, torch.Tensor]:
    n = torch.arange(G * G)
    return n % G, n // G


def test_view_to_image_hand_arithmetic():
    box = torch.tensor([[10.0, 20.0, 74.0, 148.0]])  # sx = 2, sy = 4 for a 32 px view
    pts = torch.tensor([[[0.0, 0.0], [16.0, 8.0], [32.0, 32.0]]])
    assert torch.allclose(view_to_image(pts, box, NO, 32), torch.tensor([[[10.0, 20.0], [42.0, 52.0], [74.0, 148.0]]]))
    # Flipped: view x = 0 is the box's right edge, x = 8 is 24 view px from the left.
    flipped = view_to_image(torch.tensor([[[0.0, 0.0], [8.0, 4.0]]]), box, YES, 32)
    assert torch.allclose(flipped, torch.tensor([[[74.0, 20.0], [58.0, 36.0]]]))


def test_image_to_view_inverts_view_to_image():
    g = torch.Generator().manual_seed(0)
    xy0 = torch.rand(5, 2, generator=g) * 100
    box = torch.cat([xy0, xy0 + 20 + torch.rand(5, 2, generator=g) * 100], dim=1)
    flip = torch.tensor([True, False, True, False, False])
    pts = torch.rand(5, 7, 2, generator=g) * 224
    back = image_to_view(view_to_image(pts, box, flip, 224), box, flip, 224)
    assert torch.allclose(back, pts, atol=1e-4)


def test_patch_centres_row_major():
    c = patch_centres(3, 16)
    assert c.shape == (9, 2)
    assert c[:4].tolist() == [[8.0, 8.0], [24.0, 8.0], [40.0, 8.0], [8.0, 24.0]]
    assert c[-1].tolist() == [40.0, 40.0]


def test_shift_by_two_patches_shifts_token_coords_by_two_cells():
    box2 = BOX + torch.tensor([64.0, 0.0, 64.0, 0.0])  # 64 source px = 2 patches of the view
    coords, inside = match_patches(BOX, NO, box2, NO, S, P)
    col, row = cols_rows()
    # Token cell c has its centre at normalised 2 * (c + 0.5) / G - 1.
    assert torch.allclose(coords[0, :, 0], 2 * (col - 2 + 0.5) / G - 1)
    assert torch.allclose(coords[0, :, 1], 2 * (row + 0.5) / G - 1)
    assert inside[0].tolist() == (col >= 2).tolist()  # the two left columns are outside the overlap

    # grid_sample over a token map holding each token's index reads back index - 2 for inside patches.
    tokens = torch.arange(G * G, dtype=torch.float32).view(1, 1, G, G)
    read = F.grid_sample(tokens, coords[:, :, None], align_corners=False)[0, 0, :, 0]
    n = torch.arange(G * G, dtype=torch.float32)
    assert torch.allclose(read[inside[0]], (n - 2)[inside[0]])


def test_flip_mirrors_x():
    coords, inside = match_patches(BOX, NO, BOX, YES, S, P)
    col, row = cols_rows()
    assert torch.allclose(coords[0, :, 0], 2 * (G - 1 - col + 0.5) / G - 1)
    assert torch.allclose(coords[0, :, 1], 2 * (row + 0.5) / G - 1)
    assert inside.all()
    both, _ = match_patches(BOX, YES, BOX, YES, S, P)  # flipping both views cancels out
    assert torch.allclose(both[0, :, 0], 2 * (col + 0.5) / G - 1)


def test_zoomed_destination_spreads_patches():
    half = torch.tensor([[10.0, 20.0, 74.0, 84.0]])  # same top-left, half the side: 2x zoom
    coords, inside = match_patches(BOX, NO, half, NO, S, P)
    col, row = cols_rows()
    # Source patch centre (c + 0.5) * 16 view px lands at (c + 0.5) * 32 in the zoomed view: cell 2c + 0.5.
    assert torch.allclose(coords[0, :, 0], (col + 0.5) - 1)
    assert torch.allclose(coords[0, :, 1], (row + 0.5) - 1)
    assert inside[0].tolist() == ((col < 2) & (row < 2)).tolist()


def _mask(*cells: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(1, G * G, dtype=torch.bool)
    for r, c in cells:
        m[0, r * G + c] = True
    return m


def test_map_patch_mask_shift_flip_and_outside():
    box2 = BOX + torch.tensor([64.0, 0.0, 64.0, 0.0])
    assert torch.equal(map_patch_mask(_mask((1, 3)), BOX, NO, box2, NO, S, P), _mask((1, 1)))
    assert not map_patch_mask(_mask((2, 0), (0, 1)), BOX, NO, box2, NO, S, P).any()  # outside the overlap
    assert torch.equal(map_patch_mask(_mask((0, 0), (2, 1)), BOX, NO, BOX, YES, S, P), _mask((0, 3), (2, 2)))


def test_map_patch_mask_zoom_in_and_out():
    half = torch.tensor([[10.0, 20.0, 74.0, 84.0]])
    # Zoom in: one source patch covers 2 x 2 destination patches.
    assert torch.equal(map_patch_mask(_mask((0, 0)), BOX, NO, half, NO, S, P), _mask((0, 0), (0, 1), (1, 0), (1, 1)))
    # Zoom out: a source patch is a quarter of a destination patch and still maps to the one under it.
    assert torch.equal(map_patch_mask(_mask((0, 0)), half, NO, BOX, NO, S, P), _mask((0, 0)))
    assert torch.equal(map_patch_mask(_mask((3, 3)), half, NO, BOX, NO, S, P), _mask((1, 1)))


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        match_patches(BOX, NO, BOX, NO, 60, 16)
    with pytest.raises(ValueError, match="mask_src must be"):
        map_patch_mask(torch.zeros(1, 9, dtype=torch.bool), BOX, NO, BOX, NO, S, P)


def test_view_pair_maps_regions_from_a_to_b_and_back():
    quarter = torch.tensor([[10.0, 20.0, 74.0, 84.0]])  # the top-left quarter of BOX: 1 source px per view px
    pair = ViewPair(BOX, NO, quarter, NO, S, P)
    masks = torch.zeros(1, 2, G * G, dtype=torch.bool)
    masks[0, 0, 0] = True  # a's top-left patch covers b's top-left 2 x 2 patches
    masks[0, 1, 15] = True  # a's bottom-right patch lies outside b
    mapped = pair.map_regions(masks)
    assert mapped[0, 0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert not mapped[0, 1].any()
    back = pair.reverse().map_regions(mapped[:, :1])
    assert back[0, 0].nonzero().flatten().tolist() == [0]
    _, inside = pair.match_patches()
    assert inside[0].nonzero().flatten().tolist() == [0, 1, 4, 5]  # a's patches whose centre lies in b
    _, inside = pair.reverse().match_patches()
    assert inside.all()  # all of b lies in a
    twice = pair.reverse().reverse()
    assert twice.box_a is BOX and twice.box_b is quarter

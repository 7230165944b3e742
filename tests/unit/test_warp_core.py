"""SynCD eq. 2 feature warping core (attention/warp.py): exact moves, α, erosion, grids, and agreement with the
loop reference and with a port of upstream's ``warpcorrespondence``."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from comfyui_syncd.attention.warp import (build_plan, pack_2x2, token_write_masks, unpack_2x2, warp_latent_batch,
                                          warp_views, warp_views_reference)
from comfyui_syncd.core.correspondence_format import Correspondences

pytestmark = pytest.mark.unit


def centre(index, size):
    """Normalized coordinate (align_corners=False) of pixel ``index`` on a ``size`` grid."""
    return (2 * index + 1) / size - 1


def rows_for(matches, fine):
    """[(ya, xa, yb, xb) pixel indices on the fine grid] → (M, 4) normalized rows."""
    hc, wc = fine
    return torch.tensor([[centre(ya, hc), centre(xa, wc), centre(yb, hc), centre(xb, wc)]
                         for ya, xa, yb, xb in matches], dtype=torch.float32).view(-1, 4)


def random_corr(fine, views=3, m=40, seed=0, unique=True):
    """Random pixel-centre matches for every pair, each target pixel at most once per pair (unique)."""
    g = torch.Generator().manual_seed(seed)
    hc, wc = fine
    pairs = {}
    for a, b in itertools.combinations(range(views), 2):
        pa = torch.randperm(hc * wc, generator=g)[:m] if unique else torch.randint(0, hc * wc, (m,), generator=g)
        pb = torch.randint(0, hc * wc, (m,), generator=g)
        pairs[(a, b)] = rows_for([(int(i) // wc, int(i) % wc, int(j) // wc, int(j) % wc) for i, j in zip(pa, pb)],
                                 fine)
    return Correspondences(views, fine, pairs)


def dense_block_corr(fine, top, left, size, shift=(0, 0)):
    """View 0's pixels [top, top+size)² ← the anchor (view 2)'s pixels shifted by ``shift``; nothing for view 1."""
    matches = [(y, x, y + shift[0], x + shift[1]) for y in range(top, top + size) for x in range(left, left + size)]
    return Correspondences(3, fine, {(0, 2): rows_for(matches, fine)})


# --- Exact moves -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_a_feature_at_an_anchor_point_lands_exactly_at_its_correspondence(interpolation):
    """Token grid 8×8, correspondences on 16×16 (upstream's 64 ↔ 128): a match written at an even fine pixel lands
    on the token it belongs to with exactly the anchor token's features; odd fine pixels do not survive the nearest
    downsampling (upstream); nothing else changes; the anchor never changes."""
    fine, grid = (16, 16), (8, 8)
    matches0 = [(2, 4, 10, 6), (6, 0, 0, 14), (14, 12, 4, 2), (3, 5, 8, 8)]   # last one: odd fine pixel (3, 5)
    matches1 = [(8, 8, 2, 2), (0, 14, 12, 10)]
    corr = Correspondences(3, fine, {(0, 2): rows_for(matches0, fine), (1, 2): rows_for(matches1, fine)})
    x = torch.randn(1, 3, 5, *grid, generator=torch.Generator().manual_seed(1))
    out = warp_views(x, build_plan(corr, grid), interpolation=interpolation)
    expected = x.clone()
    for view, matches in ((0, matches0), (1, matches1)):
        for ya, xa, yb, xb in matches:
            if ya % 2 == 0 and xa % 2 == 0:
                expected[0, view, :, ya // 2, xa // 2] = x[0, 2, :, yb // 2, xb // 2]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    changed = (out != x).any(2)[0]
    assert changed[0].sum() == 3 and changed[1].sum() == 2 and not changed[2].any()


def test_same_grid_every_match_moves_and_last_row_wins():
    """Token grid = correspondence grid (SDXL 1024 px: 128 ↔ 128): every match moves exactly; two rows on one
    target pixel: the later row wins."""
    fine = grid = (6, 9)
    matches = [(0, 0, 5, 8), (5, 8, 0, 0), (2, 3, 4, 1), (2, 3, 1, 7)]
    corr = Correspondences(3, fine, {(0, 2): rows_for(matches, fine)})
    x = torch.randn(1, 3, 4, *grid, generator=torch.Generator().manual_seed(2))
    out = warp_views(x, build_plan(corr, grid), interpolation="bilinear")
    for ya, xa, yb, xb in [matches[0], matches[1], matches[3]]:
        torch.testing.assert_close(out[0, 0, :, ya, xa], x[0, 2, :, yb, xb], atol=1e-6, rtol=0)
    assert (out[0, 0] != x[0, 0]).any(0).sum() == 3


def test_view_zero_also_takes_view_one_where_the_anchor_gave_nothing():
    """Upstream's second pass: view 0 ← view 1's already warped features via pair (0, 1), only at pixels the anchor
    did not write into view 0."""
    fine = grid = (8, 8)
    corr = Correspondences(3, fine, {
        (1, 2): rows_for([(3, 3, 6, 6)], fine),          # view 1 (3,3) ← anchor (6,6)
        (0, 2): rows_for([(1, 1, 7, 7)], fine),          # view 0 (1,1) ← anchor (7,7)
        (0, 1): rows_for([(5, 5, 3, 3), (1, 1, 0, 0)], fine)})  # (5,5) ← view 1 (3,3); (1,1) already written
    x = torch.randn(1, 3, 2, *grid, generator=torch.Generator().manual_seed(3))
    out = warp_views(x, build_plan(corr, grid), interpolation="bilinear")
    torch.testing.assert_close(out[0, 1, :, 3, 3], x[0, 2, :, 6, 6])
    torch.testing.assert_close(out[0, 0, :, 5, 5], x[0, 2, :, 6, 6])   # through view 1's warped value
    torch.testing.assert_close(out[0, 0, :, 1, 1], x[0, 2, :, 7, 7])   # the anchor's write is kept
    off = build_plan(corr, grid, fill_from_second_view=False)
    torch.testing.assert_close(warp_views(x, off, interpolation="bilinear")[0, 0, :, 5, 5], x[0, 0, :, 5, 5])


def test_anchor_view_is_a_parameter():
    fine = grid = (4, 4)
    corr = Correspondences(3, fine, {(0, 1): rows_for([(0, 0, 3, 3)], fine)})
    x = torch.randn(1, 3, 2, *grid, generator=torch.Generator().manual_seed(4))
    out = warp_views(x, build_plan(corr, grid, anchor=0), interpolation="bilinear")
    torch.testing.assert_close(out[0, 1, :, 3, 3], x[0, 0, :, 0, 0])
    torch.testing.assert_close(out[0, 0], x[0, 0])


# --- α, erosion, out of range -----------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_alpha_blends_the_written_tokens(alpha):
    fine = grid = (6, 6)
    corr = dense_block_corr(fine, 1, 1, 3, shift=(2, 2))
    x = torch.randn(1, 3, 3, *grid, generator=torch.Generator().manual_seed(5))
    out = warp_views(x, build_plan(corr, grid), alpha=alpha, interpolation="bilinear")
    full = warp_views(x, build_plan(corr, grid), alpha=1.0, interpolation="bilinear")
    torch.testing.assert_close(out, x + alpha * (full - x), atol=1e-6, rtol=0)
    assert not torch.equal(full[0, 0], x[0, 0])


def test_erosion_keeps_only_pixels_whose_3x3_neighbourhood_is_written():
    """A 5×5 written block erodes to its 3×3 interior (3×3 mean ≥ 0.9 means all nine neighbours)."""
    fine = grid = (10, 10)
    corr = dense_block_corr(fine, 2, 3, 5)
    plan = build_plan(corr, grid)
    plain, eroded = token_write_masks(plan, erosion=False)[0], token_write_masks(plan, erosion=True)[0]
    assert plain.sum() == 25 and plain[2:7, 3:8].all()
    assert eroded.sum() == 9 and eroded[3:6, 4:7].all()
    x = torch.randn(1, 3, 2, *grid, generator=torch.Generator().manual_seed(6))
    out = warp_views(x, plan, interpolation="bilinear", erosion=True)
    assert torch.equal((out != x).any(2)[0, 0], eroded)


def test_a_coordinate_on_the_border_disables_warping_as_upstream():
    fine = grid = (4, 4)
    rows = torch.tensor([[centre(0, 4), centre(0, 4), 1.0, centre(2, 4)]])
    corr = Correspondences(3, fine, {(0, 2): rows})
    plan = build_plan(corr, grid)
    assert not plan.valid and "outside" in plan.problem
    x = torch.randn(1, 3, 2, *grid)
    assert torch.equal(warp_views(x, plan), x)
    assert torch.equal(warp_views_reference(x[0], corr), x[0])


# --- Grids: non-square, Flux's packed 2×2 grid, several objects ----------------------------------------------------

def test_non_square_grids_move_exactly():
    fine, grid = (12, 20), (6, 10)
    matches = [(0, 18, 10, 2), (4, 2, 6, 16), (10, 10, 0, 0)]
    corr = Correspondences(3, fine, {(1, 2): rows_for(matches, fine)})
    x = torch.randn(1, 3, 3, *grid, generator=torch.Generator().manual_seed(7))
    out = warp_views(x, build_plan(corr, grid))
    for ya, xa, yb, xb in matches:
        torch.testing.assert_close(out[0, 1, :, ya // 2, xa // 2], x[0, 2, :, yb // 2, xb // 2], atol=1e-5, rtol=0)
    assert (out != x).any(2)[0, 1].sum() == 3 and torch.equal(out[0, 0], x[0, 0])


@pytest.mark.parametrize("latent", [(16, 24), (15, 23)])
def test_flux_packed_grid_moves_whole_2x2_patches(latent):
    """Flux (upstream): the warp acts on packed tokens, so a 2×2 latent patch (16 ch) moves as one unit; odd latent
    sizes are padded like ComfyUI's Flux and cropped back."""
    h, w = latent
    grid = ((h + 1) // 2, (w + 1) // 2)
    fine = (2 * grid[0], 2 * grid[1])                                 # upstream: 64² tokens ↔ 128² correspondences
    ty, tx, sy, sx = 3, 5, 6, 1                                         # token (3, 5) of view 0 ← anchor token (6, 1)
    corr = Correspondences(3, fine, {(0, 2): rows_for([(2 * ty, 2 * tx, 2 * sy, 2 * sx)], fine)})
    x = torch.randn(3, 16, h, w, generator=torch.Generator().manual_seed(8))
    out = warp_latent_batch(x, [build_plan(corr, grid)], 3, packed=True)
    assert out.shape == x.shape
    torch.testing.assert_close(out[0, :, 2 * ty:2 * ty + 2, 2 * tx:2 * tx + 2],
                               x[2, :, 2 * sy:2 * sy + 2, 2 * sx:2 * sx + 2], atol=1e-5, rtol=0)
    changed = (out != x).any(1)
    assert changed[0].sum() == 4 and not changed[1:].any()
    torch.testing.assert_close(unpack_2x2(pack_2x2(x), (h, w)), x)


def test_objects_in_one_batch_are_independent():
    """Two objects of 3 views in one latent batch: each object's anchor writes only into its own views; an object
    without a plan is left alone; per-object plans differ."""
    fine = grid = (8, 8)
    a = Correspondences(3, fine, {(0, 2): rows_for([(1, 1, 6, 6)], fine)})
    b = Correspondences(3, fine, {(1, 2): rows_for([(4, 4, 0, 7)], fine)})
    x = torch.randn(6, 4, *grid, generator=torch.Generator().manual_seed(9))
    out = warp_latent_batch(x, [build_plan(a, grid), build_plan(b, grid)], 3, packed=False,
                            interpolation="bilinear")
    torch.testing.assert_close(out[0, :, 1, 1], x[2, :, 6, 6])
    torch.testing.assert_close(out[4, :, 4, 4], x[5, :, 0, 7])
    assert (out != x).any(1).sum() == 2
    only_b = warp_latent_batch(x, [None, build_plan(b, grid)], 3, packed=False, interpolation="bilinear")
    assert torch.equal(only_b[:3], x[:3]) and torch.equal(only_b[3:], out[3:])


# --- Efficient == reference == upstream ---------------------------------------------------------------------------

CASES = [((8, 8), (16, 16)), ((6, 10), (12, 20)), ((7, 5), (7, 5)), ((6, 9), (8, 8)), ((5, 7), (16, 12))]


@pytest.mark.parametrize("grid,fine", CASES)
@pytest.mark.parametrize("interpolation,alpha,erosion,anchor", [("bicubic", 1.0, False, -1),
                                                                ("bilinear", 0.6, True, -1),
                                                                ("bicubic", 1.0, True, 0), ("bilinear", 1.0, False, 1)])
def test_efficient_equals_reference(grid, fine, interpolation, alpha, erosion, anchor):
    corr = random_corr(fine, m=fine[0] * fine[1] // 2, seed=grid[0] * 10 + fine[1], unique=False)
    # a dense block as well, so erosion keeps something
    extra = dense_block_corr(fine, 0, 0, min(fine) // 2 + 1, shift=(1, 1)).pairs[(0, 2)]
    corr = Correspondences(3, fine, {**corr.pairs, (0, 2): torch.cat([corr.pairs[(0, 2)], extra])})
    x = torch.randn(2, 3, 3, *grid, generator=torch.Generator().manual_seed(11), dtype=torch.float64).float()
    plan = build_plan(corr, grid, anchor=anchor)
    out = warp_views(x, plan, alpha, interpolation, erosion)
    for g in range(2):
        ref = warp_views_reference(x[g], corr, anchor, alpha, interpolation, erosion)
        torch.testing.assert_close(out[g], ref, atol=1e-5, rtol=1e-5)
    assert not torch.equal(out, x)


def upstream_warpcorrespondence(correspondence, counter_cc, feats, timestep, numref=3, orig_res=128):
    """Port of upstream ``warpcorrespondence`` (dataset/src/flux_depth_syncd.py L30-80, num_heads=1), einops
    replaced by reshapes, ``orig_res`` a parameter (upstream 128)."""
    num_heads = 1
    res = int(feats.shape[1] ** 0.5)
    dtype = feats.dtype
    kernel_tensor = torch.ones((1, 1, 3, 3)).to(feats.device).to(dtype) / (3 * 3)
    feats = feats.reshape(feats.shape[0], res, res, -1).permute(0, 3, 1, 2)
    feats = F.interpolate(feats, (orig_res, orig_res))
    mask = torch.zeros((feats.shape[0], 1, orig_res, orig_res), device=feats.device, dtype=feats.dtype)
    feats_copy = torch.zeros_like(feats)
    prev_counter = counter_cc[0].clone()
    counter_ = 1
    for j in range(numref - 1):
        corresp = correspondence[prev_counter:prev_counter + counter_cc[counter_]].clone().to(feats.dtype)
        temp2 = torch.nan_to_num(F.grid_sample(feats[-num_heads:], -1. * corresp[:, [3, 2]].unsqueeze(0).unsqueeze(2)
                                               .expand(num_heads, -1, -1, -1), align_corners=False, mode='bicubic'))
        corresp_orig = (orig_res * (0.5 - corresp.clone() * 0.5)).floor().long()
        if corresp_orig.min() < 0 or corresp_orig.max() >= orig_res:
            return None
        feats_copy[j * num_heads:(j + 1) * num_heads, :, corresp_orig[:, 0], corresp_orig[:, 1]] = temp2.squeeze(3)
        mask[j * num_heads:(j + 1) * num_heads, :, corresp_orig[:, 0], corresp_orig[:, 1]] = 1.
        prev_counter += counter_cc[counter_]
        counter_ += 1
    if timestep < 0.9:
        mask = (torch.clamp(F.conv2d(mask, kernel_tensor, padding='same'), 0, 1) >= 0.9).to(feats.dtype)
    feats = mask * feats_copy + (1 - mask) * feats
    mask_copy = torch.zeros((feats.shape[0], 1, orig_res, orig_res), device=feats.device, dtype=feats.dtype)
    corresp = correspondence[0:counter_cc[0]].clone().to(feats.dtype)
    temp2 = torch.nan_to_num(F.grid_sample(feats[num_heads:2 * num_heads], -1. * corresp[:, [3, 2]].unsqueeze(0)
                                           .unsqueeze(2).expand(num_heads, -1, -1, -1), align_corners=False,
                                           mode='bicubic'))
    corresp_orig = (orig_res * (0.5 - corresp.clone() * 0.5)).floor().long()
    if corresp_orig.min() < 0 or corresp_orig.max() >= orig_res:
        return None
    feats_copy[:num_heads, :, corresp_orig[:, 0], corresp_orig[:, 1]] = temp2.squeeze(3)
    mask_copy[:num_heads, :, corresp_orig[:, 0], corresp_orig[:, 1]] = 1. * (
        1 - mask[:num_heads, :, corresp_orig[:, 0], corresp_orig[:, 1]])
    if timestep < 0.9:
        mask_copy = (torch.clamp(F.conv2d(mask_copy, kernel_tensor, padding='same'), 0, 1) >= 0.9) * 1.
    feats[:num_heads] = mask_copy[:num_heads] * feats_copy[:num_heads] + (1 - mask_copy[:num_heads]) * feats[:num_heads]
    feats = F.interpolate(feats, (res, res), mode='nearest')
    return feats.permute(0, 2, 3, 1).reshape(feats.shape[0], res * res, -1).to(dtype)


@pytest.mark.parametrize("sigma", [0.95, 0.85])   # without and with erosion
def test_matches_upstream_warpcorrespondence(sigma):
    """The efficient warp on a 16² token grid with 32² correspondences (upstream's 64 ↔ 128 ratio) equals the
    port of upstream's function fed the same data in its own layout (PyTorch3D NDC = −ours; pairs (0,1), (0,2),
    (1,2) concatenated with their counts)."""
    res, orig = 16, 32
    corr = random_corr((orig, orig), m=500, seed=12)
    # dense overlapping blocks so erosion and the second pass matter
    for (a, b), (top, shift) in {(0, 2): (4, (3, 2)), (1, 2): (10, (-4, 5)), (0, 1): (12, (1, -3))}.items():
        block = [(y, x, y + shift[0], x + shift[1]) for y in range(top, top + 12) for x in range(top, top + 12)]
        rows = rows_for(block, (orig, orig))
        keep = ~torch.isin(pixel_key(corr.pairs[(a, b)], orig), pixel_key(rows, orig))
        corr.pairs[(a, b)] = torch.cat([corr.pairs[(a, b)][keep], rows])
    x = torch.randn(3, 4, res, res, generator=torch.Generator().manual_seed(13))
    pairs = [corr.pairs[(0, 1)], corr.pairs[(0, 2)], corr.pairs[(1, 2)]]
    upstream = upstream_warpcorrespondence(-torch.cat(pairs), torch.tensor([len(p) for p in pairs]),
                                           x.flatten(2).transpose(1, 2), sigma, orig_res=orig)
    upstream = upstream.transpose(1, 2).reshape(3, 4, res, res)
    ours = warp_views(x[None], build_plan(corr, (res, res)), erosion=sigma < 0.9)[0]
    torch.testing.assert_close(ours, upstream, atol=1e-5, rtol=1e-5)
    assert (ours != x).any(1)[0].sum() > 20 and (ours != x).any(1)[1].sum() > 20


def pixel_key(rows, size):
    """Target-pixel id of every row (to keep matches unique per target pixel: upstream's duplicate writes are
    unspecified)."""
    return ((rows[:, 0] + 1) * size / 2).floor().long() * size + ((rows[:, 1] + 1) * size / 2).floor().long()

"""The pure parts of the upstream-faithful defaults, each against an independent computation of upstream's rule
(nupurkmr9/syncd): mask dilation, the unmasked first step, the Flux negative branch, norms over the whole canvas."""

import pytest
import torch
import torch.nn.functional as F

from comfyui_syncd.attention.guidance import normalized_guidance
from comfyui_syncd.attention.masks import foreground_grid, layer_foreground
from comfyui_syncd.attention.shared import reference_attention, shared_attention, shared_attention_reference

pytestmark = pytest.mark.unit


def random_masks(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(n, size, size, generator=g) > 0.97).float() * torch.rand(n, size, size, generator=g)
    masks[:, 20:30, 10:50] = 1.0
    return masks


def test_rigid_mask_rule_area_dilate_9_binarize():
    """dataset/gen_rigid.py: interpolate((mask > 0), token grid, 'area'), conv2d with a 9×9 ones box (padding
    'same'), clamp to [0, 1], > 0."""
    masks = random_masks()
    area = F.interpolate((masks[:, None] > 0).float(), (16, 16), mode="area")
    want = (F.conv2d(area, torch.ones(1, 1, 9, 9), padding="same").clamp(0, 1) > 0).float()[:, 0]
    torch.testing.assert_close(foreground_grid(masks, 16, 16, 9), want)


def test_inference_mask_rule_binarize_dilate_3_nearest():
    """method/data/data.py + the SDXL processor: mask > 0 at the latent grid, conv2d 3×3 clamped, then nearest to
    every layer's grid; a token is a key where the value is non-zero."""
    masks = random_masks(seed=1)
    binary = (masks[:, None] > 0).float()
    cells = (F.avg_pool2d(binary, 8) > 0).float()                          # 64 px → 8×8 latent grid
    grown = F.conv2d(cells, torch.ones(1, 1, 3, 3), padding="same").clamp(0, 1)
    for layer in [(8, 8), (4, 4), (2, 2), (4, 8)]:
        want = (F.interpolate(grown, layer, mode="nearest") > 0).flatten(1)
        torch.testing.assert_close(layer_foreground(masks, (8, 8), 3, layer), want)


def test_dilation_one_keeps_the_binarized_grid_and_even_sizes_are_refused():
    masks = random_masks(seed=2)
    assert torch.equal(foreground_grid(masks, 8, 8, 1), (F.avg_pool2d((masks[:, None] > 0).float(), 8) > 0)
                       .float()[:, 0])
    with pytest.raises(ValueError, match="odd"):
        foreground_grid(masks, 8, 8, 4)


def test_unmasked_first_step_shares_everything_text_included():
    """Upstream's step 0 applies no mask: every query (text included) attends to [own text | own image | the other
    images' image tokens]; other images' text is never a key (dataset/src/editor.py, flux_syncd.py)."""
    g = torch.Generator().manual_seed(0)
    n, heads, n_text, p, d = 3, 2, 4, 6, 8
    q, k, v = (torch.randn(n, heads, n_text + p, d, generator=g) for _ in range(3))
    got = shared_attention(q, k, v, None, n_text, text_shares=True)
    for i in range(n):
        keys = torch.cat([k[i]] + [k[j, :, n_text:] for j in range(n) if j != i], 1)
        values = torch.cat([v[i]] + [v[j, :, n_text:] for j in range(n) if j != i], 1)
        torch.testing.assert_close(got[i], F.scaled_dot_product_attention(q[i], keys, values))
    torch.testing.assert_close(shared_attention_reference(q, k, v, None, n_text, text_shares=True), got)
    private = shared_attention(q, k, v, None, n_text, text_shares=False)
    assert (private[:, :, :n_text] - got[:, :, :n_text]).abs().max() > 1e-4   # text differs, image tokens do not
    torch.testing.assert_close(private[:, :, n_text:], got[:, :, n_text:])


def test_flux_negative_branch_image_tokens_keep_to_themselves_text_sees_the_references():
    """The block-diagonal negative branch (method/pipelines/flux_pipeline/transformer.py): image queries see their
    own sequence, text queries see the whole canvas."""
    g = torch.Generator().manual_seed(1)
    b, heads, n_text, own, refs, d = 2, 2, 3, 10, 5, 8
    q = torch.randn(b, heads, n_text + own - n_text, d, generator=g)
    k, v = (torch.randn(b, heads, own + refs, d, generator=g) for _ in range(2))
    access = torch.tensor([False, False])
    text_access = torch.tensor([True, False])
    got = reference_attention(q, k, v, own, access, n_text, text_access)
    # row 0: text queries over everything, image queries over the own tokens; row 1: own tokens only
    torch.testing.assert_close(got[0, :, :n_text], F.scaled_dot_product_attention(q[0, :, :n_text], k[0], v[0]))
    torch.testing.assert_close(got[0, :, n_text:], F.scaled_dot_product_attention(q[0, :, n_text:], k[0, :, :own],
                                                                                  v[0, :, :own]))
    torch.testing.assert_close(got[1], F.scaled_dot_product_attention(q[1], k[1, :, :own], v[1, :, :own]))


def test_flux_norms_are_taken_over_the_whole_packed_canvas():
    """method/pipelines/flux_pipeline/pipeline.py: the norms of Δ_img and Δ_txt run over the packed (L, 64) tensor of
    [target | references], then only the target is kept: equal to eq. 4 on the concatenated canvas, cropped."""
    g = torch.Generator().manual_seed(2)
    target = [torch.randn(1, 16, 4, 4, generator=g) for _ in range(3)]
    refs = [torch.randn(2, 16, 4, 4, generator=g) * 3 for _ in range(3)]
    got = normalized_guidance(*target, 5.0, 2.0, canvas=refs)
    canvas = [torch.cat([t, r.reshape(1, 2 * 16, 4, 4)], 1) for t, r in zip(target, refs)]
    want = normalized_guidance(*canvas, 5.0, 2.0)[:, :16]
    torch.testing.assert_close(got, want)
    assert (got - normalized_guidance(*target, 5.0, 2.0)).abs().max() > 1e-4

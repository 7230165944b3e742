"""Token-grid masks, Otsu, dilation and the automatic mask estimator (SynCD §3.2)."""

import pytest
import torch

from comfyui_syncd.attention.masks import (AutomaticMaskEstimator, dilate, otsu_binarize, resize_to_grid,
                                           subject_attention)

pytestmark = pytest.mark.unit


def test_resize_to_grid_any_ratio_nearest_and_nonzero_rule():
    """Upstream resizes per layer with F.interpolate(mode="nearest") and keys every non-zero value."""
    mask = torch.zeros(1, 64, 96)
    mask[:, :32, :48] = 1  # top-left quarter
    grid = resize_to_grid(mask, 4, 6).reshape(4, 6)
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[:2, :3] = True
    assert torch.equal(grid, expected)
    # nearest sampling: the sampled pixel decides, any non-zero value is foreground
    m = torch.zeros(1, 8, 8)
    m[:, :, 0] = 0.05  # the pixel nearest sampling takes for the left token
    assert resize_to_grid(m, 1, 2).tolist() == [[True, False]]
    m[:, :, 1:4] = 1   # other pixels of the left token do not matter
    m[:, :, 0] = 0
    assert resize_to_grid(m, 1, 2).tolist() == [[False, False]]


def test_otsu_separates_bimodal_maps_per_image():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 100, generator=g) * 0.1
    maps[0, :30] += 1.0
    maps[1, 50:] += 5.0
    out = otsu_binarize(maps)
    assert out[0, :30].eq(1).all() and out[0, 30:].eq(0).all()
    assert out[1, 50:].eq(1).all() and out[1, :50].eq(0).all()


def test_dilate_grows_by_one_token():
    m = torch.zeros(1, 5, 5)
    m[0, 2, 2] = 1
    d = dilate(m)
    assert d[0, 1:4, 1:4].eq(1).all() and d.sum() == 9


def test_subject_attention_softmax_over_text_and_token_sum():
    img = torch.randn(2, 3, 6, 4)
    txt = torch.randn(2, 3, 5, 4)
    probs = (torch.einsum("bhpd,bhtd->bhpt", img, txt) / 2).softmax(-1)
    expected = probs[..., [1, 2]].sum(-1).mean(1)
    torch.testing.assert_close(subject_attention(img, txt, [1, 2]), expected)


def test_estimator_running_mean_over_steps_and_layers():
    est = AutomaticMaskEstimator((4, 4))
    assert est.masks is None
    step0 = torch.zeros(1, 16)
    step0[0, 0] = 1.0  # top-left corner hot
    est.add(step0, (4, 4))
    est.add(torch.zeros(1, 4), (2, 2))  # a coarser layer is resized to the canonical grid
    est.finish_step()
    first = est.masks
    assert first.shape == (1, 4, 4)
    assert first[0, 0, 0] == 1 and first[0, 3, 3] == 0  # otsu + dilation around the hot corner
    hot = torch.zeros(1, 16)
    hot[0, 15] = 10.0  # bottom-right hot in the next step
    est.add(hot, (4, 4))
    est.finish_step()
    # running mean of both steps: the later, stronger corner dominates, the first still counted
    assert est.masks[0, 3, 3] == 1
    est.finish_step()  # a step with no recorded layers changes nothing
    assert est.masks[0, 3, 3] == 1


def _otsu_loop(maps, levels=10):
    """The official per-image loop (with values at the threshold set to 1)."""
    norm = (maps - maps.min(-1, keepdim=True).values) / (maps.max(-1, keepdim=True).values
                                                          - maps.min(-1, keepdim=True).values)
    out = torch.zeros_like(norm)
    for b in range(norm.shape[0]):
        best_g, best_t = 0.0, 0.0
        for t in range(levels):
            low, high = norm[b][norm[b] < t / levels], norm[b][norm[b] >= t / levels]
            if len(low) and len(high):
                g = len(low) / norm.shape[1] * len(high) / norm.shape[1] * float(low.mean() - high.mean()) ** 2
                if g > best_g:
                    best_g, best_t = g, t / levels
        out[b] = (norm[b] >= best_t).float()
    return out


def test_vectorized_otsu_equals_the_official_loop():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        maps = torch.rand(3, 64, generator=g, dtype=torch.float64) ** 3
        assert torch.equal(otsu_binarize(maps), _otsu_loop(maps))

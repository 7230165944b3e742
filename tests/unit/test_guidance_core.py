"""SynCD eq. 4, Brooks et al., guidance rescale, JeDi eq. 3 and the image-scale schedule, against hand computation."""

import math

import pytest
import torch

from comfyui_syncd.attention.guidance import (brooks_guidance, guidance_rescale, jedi_image_guidance,
                                              linear_image_scale, normalized_guidance)

pytestmark = pytest.mark.unit


def branches(seed=0, shape=(3, 4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


def by_hand(unc, img, full, s_img, s_txt):
    """Per sample with Python floats: the official normalized_guidance_image, written out."""
    out = []
    for u, i, f in zip(unc, img, full):
        d_img, d_txt = i - u, f - i
        n_img = math.sqrt(sum(x * x for x in d_img.flatten().tolist()))
        n_txt = math.sqrt(sum(x * x for x in d_txt.flatten().tolist()))
        m = min(n_img, n_txt)
        out.append(i + s_img * d_img * min(1.0, m / n_img) + s_txt * d_txt * min(1.0, m / n_txt))
    return torch.stack(out)


def test_normalized_guidance_matches_hand_computation():
    unc, img, full = branches()
    full[1] = img[1] + 10 * (full[1] - img[1])   # sample 1: the text vector is the larger one
    got = normalized_guidance(unc, img, full, 9.5, 7.5)
    torch.testing.assert_close(got, by_hand(unc, img, full, 9.5, 7.5))


def test_normalization_shrinks_the_larger_vector_to_the_smaller_norm():
    unc, img, full = branches(1)
    img = unc + 5 * (img - unc)  # image vector much larger
    got = normalized_guidance(unc, img, full, 1.0, 0.0) - img
    d_txt = full - img
    for b in range(unc.shape[0]):
        assert math.isclose(got[b].norm().item(), d_txt[b].norm().item(), rel_tol=1e-9)
    # the smaller (text) vector is left as is
    torch.testing.assert_close(normalized_guidance(unc, img, full, 0.0, 1.0) - img, d_txt)


def test_base_term_is_the_image_branch():
    unc, img, full = branches(2)
    torch.testing.assert_close(normalized_guidance(unc, img, full, 0.0, 0.0), img)
    torch.testing.assert_close(brooks_guidance(unc, img, full, 0.0, 0.0), unc)


def test_brooks_is_unnormalized():
    unc, img, full = branches(3)
    torch.testing.assert_close(brooks_guidance(unc, img, full, 2.0, 3.0), unc + 2 * (img - unc) + 3 * (full - img))
    assert not torch.allclose(brooks_guidance(unc, img, full, 2.0, 3.0), normalized_guidance(unc, img, full, 2.0, 3.0))


def test_guidance_rescale_matches_the_full_branch_std():
    unc, img, full = branches(4)
    guided = brooks_guidance(unc, img, full, 5.0, 7.0)
    rescaled = guidance_rescale(guided, full, 1.0)
    for b in range(full.shape[0]):
        assert math.isclose(rescaled[b].std().item(), full[b].std().item(), rel_tol=1e-9)
    torch.testing.assert_close(guidance_rescale(guided, full, 0.0), guided)
    torch.testing.assert_close(guidance_rescale(guided, full, 0.5), 0.5 * rescaled + 0.5 * guided)


def test_jedi_image_guidance():
    null, _, full = branches(5)
    torch.testing.assert_close(jedi_image_guidance(null, full, 1.0), full)
    torch.testing.assert_close(jedi_image_guidance(null, full, 3.0), null + 3 * (full - null))


def test_linear_image_scale_schedule():
    assert [linear_image_scale(8, 13, i, 6) for i in range(6)] == [8, 9, 10, 11, 12, 13]
    assert [linear_image_scale(5, 3, i, 3) for i in range(3)] == [5, 4, 3]  # end below start is allowed
    assert linear_image_scale(8, 13, 0, 1) == 8

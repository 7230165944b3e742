"""Identity scores (MDINOv2-I, CLIP-I, DINO), with transformers' real classes at tiny
random-weight sizes."""

import pytest
import torch

from comfyui_syncd.core.identity import crop_object, features, identity_scores, square_box

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=224, patch_size=14)).eval()


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=2, image_size=224, patch_size=32,
                                                          projection_dim=16)).eval()


def scene(seed, background=None, box=(20, 60, 30, 60)):
    """A 96×96 image with a textured square object at ``box`` (y0, y1, x0, x1) and its mask."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(96, 96, 3, generator=gen) if background is None else background.clone()
    y0, y1, x0, x1 = box
    obj = torch.Generator().manual_seed(123)
    image[y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0, 3, generator=obj)
    mask = torch.zeros(96, 96)
    mask[y0:y1, x0:x1] = 1
    return image, mask


def test_square_box_follows_upstream():
    mask = torch.zeros(100, 80)
    mask[5:25, 20:60] = 1
    assert square_box(mask) == (-5, 20, 40, 40)      # 20×40 box → a 40 square centred on it, leaving the image
    full = torch.ones(50, 50)
    full[20:30, 20:30] = 0                            # the box covers the image: taken from the inverted mask
    assert square_box(full) == (20, 20, 10, 10)
    assert square_box(torch.zeros(40, 60)) == (0, 10, 40, 40)
    crop = crop_object(torch.ones(100, 80, 3), mask, mask_background=False)
    assert crop.shape == (40, 40, 3) and crop[:5].sum() == 0 and crop[5:].min() == 1  # zero-padded above


@pytest.mark.parametrize("kind", ["dinov2", "clip", "dino"])
def test_masked_scores_see_the_object_not_the_background(kind, dinov2, clip):
    model = clip if kind == "clip" else dinov2  # "dino" reads the ViT CLS token (last_hidden_state[:, 0])
    a, mask = scene(0)
    b, _ = scene(1)                                   # same object, other background
    c, _ = scene(1, box=(10, 50, 40, 70))            # same object elsewhere
    images, masks = torch.stack([a, b, c]), torch.stack([mask, mask, scene(1, box=(10, 50, 40, 70))[1]])
    f = features(model, images, masks, kind, mask_background=True)
    assert torch.allclose(f[0], f[1], atol=1e-5) and torch.allclose(f[0], f[2], atol=1e-5)
    assert torch.allclose(f.norm(dim=-1), torch.ones(3))
    unmasked = features(model, images, masks, kind, mask_background=False)
    assert not torch.allclose(unmasked[0], unmasked[1], atol=1e-4)  # the filter crop keeps the background
    other = scene(0)[0]
    other[20:60, 30:60] = torch.rand(40, 30, 3, generator=torch.Generator().manual_seed(7))  # another object
    g = features(model, torch.stack([other]), mask.unsqueeze(0), kind)
    scores = identity_scores(torch.cat([f[:1], g]), f[1:])
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[1] < scores[0]

"""SynCD's dataset filter (core/filtering.py) and the LAION aesthetic score (core/aesthetic.py): the keep rule on
hand-made score matrices (upstream data.py), the 0.98 near-duplicate cut, the two-image rule, upstream's stored
DINOv2 triangle; the aesthetic head on a tiny random CLIP against a hand computation; the preprocessing against
torchvision's Resize/CenterCrop as upstream applies them."""

import pytest
import torch

from comfyui_syncd.core import aesthetic, filtering
from comfyui_syncd.core.identity import CLIP, IMAGENET, to_model_input

pytestmark = pytest.mark.unit


def upstream_rule(aesthetics, dino, filter_aesthetics, filter_dino):
    """method/data/data.py setup_metadata, transcribed (numpy, the stored matrix as is)."""
    import numpy as np

    dino_score = np.array(dino)
    valid_clique = [a >= filter_aesthetics for a in aesthetics]
    valid_indices = [list(set(x).union(set(y))) for (x, y) in
                     [((dino_score >= filter_dino) * (dino_score <= 0.98)).nonzero()]][0]
    return [bool(x * (i in valid_indices)) for i, x in enumerate(valid_clique)]


def test_keep_rule_on_hand_made_scores():
    sim = torch.tensor([[1.0, 0.80, 0.99, 0.50],
                        [0.80, 1.0, 0.75, 0.60],
                        [0.99, 0.75, 1.0, 0.65],
                        [0.50, 0.60, 0.65, 1.0]])
    stored = filtering.pairwise_dino(torch.eye(4))  # layout check: strict upper triangle
    assert stored.abs().sum() == 0
    tri = torch.triu(sim, diagonal=1)
    # 0-1 0.80 and 1-2 0.75 count at 0.7; 0-2 0.99 is a near-duplicate; 3 pairs only below 0.7
    assert filtering.keep_images(None, tri, 0.0, 0.7) == [True, True, True, False]
    assert filtering.keep_images(None, sim, 0.0, 0.7) == [True, True, True, False]  # full matrix: same pairs
    # the near-duplicate cut alone: 0 and 2 are each other's only pair above 0.78
    assert filtering.keep_images(None, tri, 0.0, 0.78) == [True, True, False, False]
    assert filtering.keep_images(None, tri, 0.0, 0.81) == [False, False, False, False]  # 0.99 never counts
    aes = [6.5, 5.0, 7.0, 9.0]
    assert filtering.keep_images(aes, tri, 6.0, 0.7) == [True, False, True, False]
    assert filtering.keep_images(aes, None, 6.0, 0.7) == [True, False, True, True]
    assert filtering.keep_images(aes, tri, 6.0, 0.0) == [True, False, True, True]  # DINOv2 threshold off
    for a_min, d_min in ((6.0, 0.7), (0.0, 0.78), (6.0, 0.6), (8.0, 0.5), (6.0, 0.0)):
        assert filtering.keep_images(aes, tri, a_min, d_min) == upstream_rule(aes, tri.tolist(), a_min, d_min)


def test_an_object_needs_two_kept_images():
    assert filtering.object_kept([True, True, False])
    assert not filtering.object_kept([True, False, False])
    near_duplicates = torch.tensor([[0.0, 0.99], [0.0, 0.0]])  # two copies of one image
    assert not filtering.object_kept(filtering.keep_images(None, near_duplicates, 0.0, 0.7))
    assert filtering.mean_pair_score(torch.tensor([[0, 0.8, 0.6], [0, 0, 0.7], [0, 0, 0]])) == pytest.approx(0.7)


def test_subset_keeps_upstreams_layout():
    tri = torch.tensor([[0.0, 0.8, 0.9], [0.0, 0.0, 0.7], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert filtering.subset_dino(tri, [0, 2]) == [[0.0, 0.9], [0.0, 0.0]]
    assert filtering.subset_dino(tri, [2, 1]) == [[0.0, 0.7], [0.0, 0.0]]


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="N x N matrix for the 3 images"):
        filtering.keep_images([1, 2, 3], torch.zeros(2, 2), 0, 0.5)


@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=2, image_size=224, patch_size=32,
                                                          projection_dim=16)).eval()


def test_aesthetic_head_matches_a_hand_computation(tiny_clip, tmp_path):
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 1)
    with torch.no_grad():
        head.weight.normal_(0, 3.0)
    torch.save(head.state_dict(), tmp_path / "sa_0_4_test_linear.pth")
    loaded = aesthetic.load_head(tmp_path / "sa_0_4_test_linear.pth")
    images = torch.rand(2, 224, 320, 3, generator=torch.Generator().manual_seed(2))  # 224 high: no resize needed
    scores = aesthetic.aesthetic_scores(tiny_clip, loaded, images)
    # by hand: centre crop 224 of 320 columns (48..272), CLIP normalisation, image_embeds, L2, w·x + b
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in CLIP)
    pixels = (images[:, :, 48:272].permute(0, 3, 1, 2) - mean) / std
    with torch.no_grad():
        emb = tiny_clip(pixel_values=pixels).image_embeds
    emb = emb / emb.norm(dim=-1, keepdim=True)
    expected = emb @ head.weight[0].detach() + head.bias.detach()
    assert torch.allclose(scores, expected, atol=1e-5)
    assert (scores[0] - scores[1]).abs() > 1e-3  # the images are told apart
    # the same head as .safetensors
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "head.safetensors"))
    again = aesthetic.aesthetic_scores(tiny_clip, aesthetic.load_head(tmp_path / "head.safetensors"), images)
    assert torch.allclose(again, scores)


def test_bad_heads_are_refused(tiny_clip, tmp_path):
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "bad.pth")
    with pytest.raises(aesthetic.AestheticHeadError, match="keys 'weight', 'bias'"):
        aesthetic.load_head(tmp_path / "bad.pth")
    torch.save(torch.nn.Linear(768, 1).state_dict(), tmp_path / "l14.pth")
    with pytest.raises(aesthetic.AestheticHeadError, match="768-dim embeddings but the CLIP model gives 16"):
        aesthetic.aesthetic_scores(tiny_clip, aesthetic.load_head(tmp_path / "l14.pth"), torch.rand(1, 32, 32, 3))
    torch.save({"weight": torch.zeros(1, 4), "bias": torch.zeros(1), "extra": object()}, tmp_path / "pickle.pth")
    with pytest.raises(aesthetic.AestheticHeadError, match="weights_only"):
        aesthetic.load_head(tmp_path / "pickle.pth")


@pytest.mark.parametrize("resize, crop, stats", [(224, 224, CLIP), (256, 224, IMAGENET)])
def test_preprocessing_matches_torchvision_on_pil(resize, crop, stats):
    """Upstream scores PIL images with torchvision's Resize(bicubic) + CenterCrop (cal_scores.py)."""
    import numpy as np
    from PIL import Image

    transforms = pytest.importorskip("torchvision.transforms")  # installed with ComfyUI's requirements

    gen = torch.Generator().manual_seed(3)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 60, 90, generator=gen), size=(600, 900),
                                            mode="bilinear")[0].permute(1, 2, 0)  # smooth: JPEG-like content
    pil = Image.fromarray((image.numpy() * 255).round().astype(np.uint8))
    reference = transforms.Compose([transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(crop), transforms.ToTensor(),
                                    transforms.Normalize(*stats)])(pil)
    ours = to_model_input([torch.from_numpy(np.array(pil)).float() / 255], resize, crop, stats)[0]
    assert ours.shape == reference.shape
    assert (ours - reference).abs().mean() < 0.01  # PIL rounds to uint8 between the steps

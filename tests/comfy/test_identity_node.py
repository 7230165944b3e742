"""SynCD Identity Model Loader, Identity Score and Aesthetic Score in ComfyUI: tiny random-weight transformers models
(DINOv2, CLIP vision with a LAION-style head) saved as folders/files in the node's model folder; per-image scores,
their mean and a table shown on the node."""

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture
def identity_folder(comfy_imports, tmp_path, monkeypatch):
    import folder_paths
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    from comfyui_syncd.nodes import identity_score

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=224, patch_size=14)).save_pretrained(tmp_path / "tiny-dinov2")
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=224, patch_size=32,
                                                   projection_dim=16)).save_pretrained(tmp_path / "tiny-clip")
    head = torch.nn.Linear(16, 1)
    torch.save(head.state_dict(), tmp_path / "sa_0_4_tiny_linear.pth")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, identity_score.FOLDER, ([str(tmp_path)], set()))
    identity_score.load_model.cache_clear()
    return tmp_path


def load(model, head="none"):
    from comfyui_syncd.nodes.identity_score import SynCDIdentityModelLoader

    return SynCDIdentityModelLoader.execute(model, head).args[0]


def test_scores_follow_the_object_under_the_mask(identity_folder):
    from comfyui_syncd.nodes.identity_score import SynCDIdentityModelLoader, SynCDIdentityScore

    options = {i.id: i.options for i in SynCDIdentityModelLoader.define_schema().inputs if hasattr(i, "options")}
    assert options == {"model": ["tiny-clip", "tiny-dinov2"], "aesthetic_head": ["none", "sa_0_4_tiny_linear.pth"]}
    dinov2 = load("tiny-dinov2")
    assert dinov2.kind == "dinov2" and type(dinov2.net).__name__ == "Dinov2Model"
    gen = torch.Generator().manual_seed(0)
    obj = torch.rand(30, 20, 3, generator=gen)
    images = torch.rand(3, 64, 64, 3, generator=gen)
    masks = torch.zeros(3, 64, 64)
    for i, (y, x) in enumerate(((5, 5), (30, 40), (10, 30))):
        images[i, y:y + 30, x:x + 20] = obj if i < 2 else torch.rand(30, 20, 3, generator=gen)  # 2: another object
        masks[i, y:y + 30, x:x + 20] = 1
    out = SynCDIdentityScore.execute(images[1:], images[:1], dinov2, "mdinov2_i", image_masks=masks[1:],
                                     reference_masks=masks[:1])
    scores, mean, table = out.args
    assert scores[0] == pytest.approx(1.0, abs=1e-4) and scores[1] < scores[0]
    assert mean == pytest.approx(sum(scores) / 2, abs=1e-4)
    assert table.splitlines()[0] == "mdinov2_i (tiny-dinov2) against 1 reference(s); masks: images, references"
    assert "image 1:" in table
    assert out.ui.as_dict() == {"text": (table,)}
    # the background counts without masks: the same object elsewhere is no longer a perfect match
    unmasked = SynCDIdentityScore.execute(images[1:2], images[:1], dinov2, "dinov2_i").args[0]
    assert unmasked[0] < 0.9999
    clip = load("tiny-clip")
    clip_scores = SynCDIdentityScore.execute(images[1:], images[:1], clip, "clip_i").args[0]
    assert len(clip_scores) == 2 and clip_scores != scores


def test_aesthetic_score_node(identity_folder):
    from comfyui_syncd.core.aesthetic import aesthetic_scores, load_head
    from comfyui_syncd.nodes.identity_score import SynCDAestheticScore

    clip = load("tiny-clip", "sa_0_4_tiny_linear.pth")
    images = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(1))
    scores, mean, table = SynCDAestheticScore.execute(images, clip).args
    expected = aesthetic_scores(clip.net, load_head(identity_folder / "sa_0_4_tiny_linear.pth"), images)
    assert scores == pytest.approx(expected.tolist(), abs=1e-4) and table.startswith("aesthetic (tiny-clip)")
    with pytest.raises(ValueError, match="loaded without an aesthetic head"):
        SynCDAestheticScore.execute(images, load("tiny-clip"))
    # local paths instead of the model folder
    from comfyui_syncd.nodes.identity_score import SynCDIdentityModelLoader

    by_path = SynCDIdentityModelLoader.execute("(none installed)", "none", str(identity_folder / "tiny-clip"),
                                               str(identity_folder / "sa_0_4_tiny_linear.pth")).args[0]
    assert SynCDAestheticScore.execute(images, by_path).args[0] == scores


def test_missing_models_wrong_kinds_and_mismatched_masks_are_named(identity_folder):
    from comfyui_syncd.nodes.identity_score import SynCDAestheticScore, SynCDIdentityScore

    images = torch.rand(2, 32, 32, 3)
    with pytest.raises(ValueError, match="no model 'absent'"):
        load("absent")
    with pytest.raises(ValueError, match="the aesthetic head needs a CLIP vision model; tiny-dinov2 is a DINOv2"):
        load("tiny-dinov2", "sa_0_4_tiny_linear.pth")
    dinov2 = load("tiny-dinov2")
    with pytest.raises(ValueError, match="metric clip_i needs a CLIP vision model; tiny-dinov2 is a DINOv2 model"):
        SynCDIdentityScore.execute(images, images, dinov2, "clip_i")
    with pytest.raises(ValueError, match="the aesthetic score needs a CLIP vision model"):
        SynCDAestheticScore.execute(images, dinov2)
    with pytest.raises(ValueError, match="image_masks holds 1 masks for 2 images"):
        SynCDIdentityScore.execute(images, images, dinov2, "dinov2_i", image_masks=torch.ones(1, 32, 32))


def test_tiny_demo_score_models(comfy_imports):
    """The --tiny stand-ins are real transformers classes and score like the loaded ones."""
    from comfyui_syncd.demo.identity_models import SynCDTinyDemoScoreModel
    from comfyui_syncd.nodes.identity_score import SynCDAestheticScore, SynCDIdentityScore

    images = torch.rand(2, 40, 40, 3, generator=torch.Generator().manual_seed(2))
    for kind, metric in (("dinov2", "mdinov2_i"), ("clip", "clip_i"), ("dino", "dino")):
        model = SynCDTinyDemoScoreModel.execute(kind, kind == "clip", 0).args[0]
        scores = SynCDIdentityScore.execute(images, images[:1], model, metric).args[0]
        assert scores[0] == pytest.approx(1.0, abs=1e-4) and scores[1] < 0.9999
    aesthetic = SynCDAestheticScore.execute(images, SynCDTinyDemoScoreModel.execute("clip", True, 0).args[0]).args[0]
    assert len(aesthetic) == 2 and aesthetic[0] != aesthetic[1]


def test_toy_identity_reads_shape_colour_and_texture(comfy_imports):
    """SynCD Toy-World Score Model + metric toy_identity: views of one toy identity score ~1 against each other, an
    object differing in one attribute ~2/3, in all three ~0; the metric refuses a DINOv2 model and vice versa."""
    from comfyui_syncd.demo.identity_models import SynCDToyWorldScoreModel
    from comfyui_syncd.nodes.identity_score import SynCDIdentityScore
    from comfyui_syncd.toyworld import views as V

    reader = SynCDToyWorldScoreModel.execute().args[0]
    refs = V.multi_view_set(V.Identity("cube", "red", "striped"), views=3, seed=1, size=128).image

    def mean(identity):
        image = V.multi_view_set(V.Identity(*identity), views=1, seed=9, size=128).image
        return SynCDIdentityScore.execute(image, refs, reader, "toy_identity").args[1]

    same, one_off, all_off = mean(("cube", "red", "striped")), mean(("cube", "blue", "striped")), \
        mean(("sphere", "blue", "plain"))
    assert same > 0.9 and 0.5 < one_off < 0.8 and all_off < 0.2, (same, one_off, all_off)
    with pytest.raises(ValueError, match="toy world's attribute reader"):
        SynCDIdentityScore.execute(refs, refs, load_tiny_dinov2(), "toy_identity")
    with pytest.raises(ValueError, match="needs a DINOv2 model"):
        SynCDIdentityScore.execute(refs, refs, reader, "mdinov2_i")


def load_tiny_dinov2():
    from comfyui_syncd.demo.identity_models import build_score_model

    return build_score_model("dinov2")

"""SynCD Identity Score in ComfyUI: a tiny random-weight DINOv2 saved as a transformers folder in the node's model
folder; per-image scores, their mean and a table."""

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture
def identity_folder(comfy_imports, tmp_path, monkeypatch):
    import folder_paths
    from transformers import Dinov2Config, Dinov2Model

    from comfyui_syncd.nodes import identity_score

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=224, patch_size=14)).save_pretrained(tmp_path / "tiny-dinov2")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, identity_score.FOLDER, ([str(tmp_path)], set()))
    identity_score.load_model.cache_clear()
    return tmp_path


def test_scores_follow_the_object_under_the_mask(identity_folder):
    from comfyui_syncd.nodes.identity_score import SynCDIdentityScore

    assert "tiny-dinov2" in [o for i in SynCDIdentityScore.define_schema().inputs if i.id == "model" for o in i.options]
    gen = torch.Generator().manual_seed(0)
    obj = torch.rand(30, 20, 3, generator=gen)
    images = torch.rand(3, 64, 64, 3, generator=gen)
    masks = torch.zeros(3, 64, 64)
    for i, (y, x) in enumerate(((5, 5), (30, 40), (10, 30))):
        images[i, y:y + 30, x:x + 20] = obj if i < 2 else torch.rand(30, 20, 3, generator=gen)  # 2: another object
        masks[i, y:y + 30, x:x + 20] = 1
    out = SynCDIdentityScore.execute(images[1:], images[:1], "mdinov2_i", "tiny-dinov2", image_masks=masks[1:],
                                     reference_masks=masks[:1])
    scores, mean, table = out.args
    assert scores[0] == pytest.approx(1.0, abs=1e-4) and scores[1] < scores[0]
    assert mean == pytest.approx(sum(scores) / 2, abs=1e-4)
    assert table.splitlines()[0] == "mdinov2_i against 1 reference(s)" and "image 1:" in table
    assert out.ui.as_dict() == {"text": (table,)}


def test_missing_model_and_mismatched_masks_are_named(identity_folder):
    from comfyui_syncd.nodes.identity_score import SynCDIdentityScore

    images = torch.rand(2, 32, 32, 3)
    with pytest.raises(ValueError, match="no model 'absent'"):
        SynCDIdentityScore.execute(images, images, "dinov2_i", "absent")
    with pytest.raises(ValueError, match="image_masks holds 1 masks for 2 images"):
        SynCDIdentityScore.execute(images, images, "dinov2_i", "tiny-dinov2", image_masks=torch.ones(1, 32, 32))

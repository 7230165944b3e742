"""The eval command's metrics (core/metrics.py) with transformers' real classes at tiny random-weight sizes, loaded
from local folders as the command loads real checkpoints (demo/eval_models.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_syncd.core import metrics
from comfyui_syncd.core.identity import CLIP, to_model_input
from comfyui_syncd.demo.eval_models import build, write_tiny_models
from comfyui_syncd.evaluation.scoring import load_models

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("eval_models"))


@pytest.fixture(scope="module")
def models(folders):
    return load_models({kind: str(path) for kind, path in folders.items()})


def scene(seed, box=(20, 60, 30, 70), object_seed=123):
    """A 96×112 image: random background, a textured rectangle at ``box`` (y0, y1, x0, x1); and its mask."""
    image = torch.rand(96, 112, 3, generator=torch.Generator().manual_seed(seed))
    y0, y1, x0, x1 = box
    image[y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0, 3, generator=torch.Generator().manual_seed(object_seed))
    mask = torch.zeros(96, 112)
    mask[y0:y1, x0:x1] = 1
    return image, mask


def test_clip_t_is_the_cosine_of_clips_projected_image_and_text_embeddings(folders, models):
    clip, tokenizer = build("clip")  # the same seeded weights that were saved
    image, _ = scene(0)
    caption = "a dog in the jungle"
    with torch.no_grad():
        pixels = to_model_input([image], 224, 224, CLIP)
        image_embed = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        text_embed = clip.text_projection(clip.text_model(**tokenizer([caption], return_tensors="pt")).pooler_output)
    expected = F.cosine_similarity(image_embed, text_embed)
    got = metrics.clip_t(metrics.image_features(models.clip_vision, [image], "clip"),
                         metrics.text_features(models.clip_text, models.clip_tokenizer, [caption]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    other = metrics.clip_t(metrics.image_features(models.clip_vision, [image], "clip"),
                           metrics.text_features(models.clip_text, models.clip_tokenizer, ["a red cube shaped can"]))
    assert abs(float(other - got)) > 1e-3  # the text matters


def test_geometric_score_is_the_root_of_tifa_times_mdinov2_i():
    assert metrics.geometric_score(0.81, 0.64) == pytest.approx(0.72)
    assert metrics.geometric_score(0.9, -0.1) == 0.0
    # SynCD Table 1, Ours (3B), 1 input: MDINOv2-I 0.777 (510 background prompts) / 0.708 (240 property), TIFA 0.902
    mdino = (510 * 0.777 + 240 * 0.708) / 750
    assert metrics.geometric_score(0.902, mdino) == pytest.approx(0.825, abs=1e-3)


def test_mdinov2_i_masks_the_background_but_sees_the_object(models):
    reference, ref_mask = scene(1)
    generated, mask = scene(2, box=(30, 70, 40, 80))  # other background, object elsewhere
    new_background, _ = scene(3, box=(30, 70, 40, 80))
    new_object, _ = scene(2, box=(30, 70, 40, 80), object_seed=7)

    def mdino(image, with_masks=True):
        refs = metrics.image_features(models.dinov2, [reference], "dinov2", [ref_mask] if with_masks else None)
        gen = metrics.image_features(models.dinov2, [image], "dinov2", [mask] if with_masks else None)
        return float(metrics.similarity_to_references(gen, refs)[0])

    base = mdino(generated)
    assert mdino(new_background) == pytest.approx(base, abs=1e-6)
    assert abs(mdino(new_object) - base) > 1e-3
    assert abs(mdino(new_background, with_masks=False) - mdino(generated, with_masks=False)) > 1e-3


def test_detector_and_segmenter_give_the_objects_mask(models):
    image, _ = scene(4)
    box = metrics.detect_box(models.detector, models.detector_processor, image, "dog", box_threshold=0.0)
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= 112 and 0 <= y0 < y1 <= 96
    assert metrics.detect_box(models.detector, models.detector_processor, image, "dog", box_threshold=1.01) is None
    mask = metrics.segment(models.segmenter, models.segmenter_processor, image, box)
    assert mask.shape == (96, 112) and set(mask.unique().tolist()) <= {0.0, 1.0}
    found = metrics.object_mask(image, "dog", models.detector, models.detector_processor, models.segmenter,
                                models.segmenter_processor, box_threshold=0.0)
    assert found is None if not mask.any() else torch.equal(found, mask)


def test_tifa_counts_the_questions_the_vqa_model_answers_as_expected(models):
    image, _ = scene(5)
    scores = metrics.choice_log_likelihoods(models.vqa, models.vqa_processor, image, "is there a dog?",
                                            ["yes", "no", "maybe"])
    assert scores.shape == (3,) and bool((scores < 0).all())
    preferred = ["yes", "no", "maybe"][int(scores.argmax())]
    other = next(c for c in ("yes", "no") if c != preferred)
    right = metrics.Question("is there a dog?", ("yes", "no", "maybe"), preferred)
    wrong = metrics.Question("is there a dog?", ("yes", "no", "maybe"), other)
    assert metrics.tifa_score(models.vqa, models.vqa_processor, image, [right])[0] == 1.0
    assert metrics.tifa_score(models.vqa, models.vqa_processor, image, [wrong])[0] == 0.0
    score, given = metrics.tifa_score(models.vqa, models.vqa_processor, image, [right, wrong])
    assert score == 0.5 and given == [preferred, preferred]
    other_image, _ = scene(6, object_seed=9)
    other_scores = metrics.choice_log_likelihoods(models.vqa, models.vqa_processor, other_image * 0.2,
                                                  "is there a dog?", ["yes", "no", "maybe"])
    assert not torch.allclose(scores, other_scores)  # the answer depends on the image
    with pytest.raises(ValueError, match="not among its choices"):
        metrics.Question("q?", ("yes", "no"), "perhaps")


def test_metrics_without_their_models_are_skipped_with_the_flag_to_give(folders):
    models = load_models({"clip": str(folders["clip"]), "dinov2": str(folders["dinov2"])})
    skipped = models.skipped()
    assert set(skipped) == {"MDINOv2-I", "MCLIP-I", "DINO", "MDINO", "TIFA", "GeometricScore"}
    assert skipped["MDINOv2-I"] == "no --detector, --segmenter" and skipped["TIFA"] == "no --vqa"
    assert math.isfinite(float(metrics.image_features(models.dinov2, [scene(0)[0]], "dinov2").sum()))

"""SynCD Dataset Writer in ComfyUI: one object scored with tiny real DINOv2 / CLIP models (random weights, std 0.3),
filtered by upstream's rule, written in upstream's layout; read back by core/dataset_format.read_dataset, by the
SynCD training dataset class and by a transcription of upstream's SynCDDataset.setup_metadata; rejected objects
leave nothing; paths cannot leave ComfyUI's output folder."""

import glob
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.comfy


@pytest.fixture
def output_dir(comfy_imports, tmp_path, monkeypatch):
    import folder_paths

    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(out))
    return out


@pytest.fixture(scope="module")
def score_models(comfy_imports):
    from comfyui_syncd.demo.identity_models import build_score_model

    return build_score_model("dinov2", 0), build_score_model("clip", 0, aesthetic=True)


def scene(count=3, size=64, seed=0):
    """``count`` images of one small textured object at different places on random backgrounds, and masks of a box
    around it (so the crops hold background too and the random models tell them apart)."""
    gen = torch.Generator().manual_seed(seed)
    obj = torch.rand(12, 10, 3, generator=gen)
    images, masks = torch.rand(count, size, size, 3, generator=gen), torch.zeros(count, size, size)
    for i in range(count):
        y, x = 4 + 9 * i, 6 + 11 * i
        images[i, y + 8:y + 20, x + 8:x + 18] = obj
        masks[i, y:y + 32, x:x + 28] = 1
    return images, masks


def upstream_setup_metadata(DIR, filter_aesthetics, filter_dino):
    """method/data/data.py SynCDDataset.setup_metadata (one folder), transcribed: (image paths, prompts) per kept
    entry."""
    found = []
    if filter_dino > 0 or filter_aesthetics > 0:
        metadata_files = glob.glob(f'{DIR}/*metadata_with_scores.json')
    else:
        metadata_files = glob.glob(f'{DIR}/*metadata.json')
    for metadata_file in metadata_files:
        with open(metadata_file, 'r') as f:
            for item in json.load(f):
                valid_clique = [1] * len(item['filenames'])
                if filter_dino > 0 or filter_aesthetics > 0:
                    dino_score = np.array(item['dino_scores'])
                    valid_clique = [item['aesthetics_scores'][pathlib.Path(x).stem] >= filter_aesthetics
                                    for x in item['filenames']]
                    valid_indices = [list(set(x).union(set(y))) for (x, y) in
                                     [((dino_score >= filter_dino) * (dino_score <= 0.98)).nonzero()]][0]
                    valid_clique = [x * (i in valid_indices) for i, x in enumerate(valid_clique)]
                if np.sum(valid_clique) > 1:
                    found.append(([f"{DIR}/{item['filenames'][i]}" for i in range(len(item['filenames']))
                                   if valid_clique[i] > 0],
                                  [item['prompts'][i] for i in range(len(item['filenames'])) if valid_clique[i] > 0]))
    return found


def test_writes_the_kept_images_readable_everywhere(output_dir, score_models):
    from comfyui_syncd.core import aesthetic, correspondence_format, dataset_format, filtering
    from comfyui_syncd.core.correspondence_format import Correspondences
    from comfyui_syncd.nodes.dataset_writer import SynCDDatasetWriter
    from comfyui_syncd.training.syncd import DataConfig, SyncdDataset

    dinov2, clip = score_models
    images, masks = scene()
    # what the rule keeps, from the core functions on the same models
    aes = aesthetic.aesthetic_scores(clip.net, clip.head, images)
    dino = filtering.dino_scores(dinov2.net, images, masks)
    assert float(dino.max()) <= filtering.NEAR_DUPLICATE and float(aes.max() - aes.min()) > 0.1
    drop = int(aes.argmin())
    min_aesthetic = float(aes.min()) + 1e-3  # rejects exactly one image on aesthetics
    kept = [i for i in range(3) if i != drop]
    min_dino = float(dino[min(kept), max(kept)]) - 1e-3  # the two others pair just above the threshold
    assert filtering.keep_images(aes.tolist(), dino, min_aesthetic, min_dino) == [i != drop for i in range(3)]
    corr = Correspondences(3, (16, 16), {(0, 1): torch.tensor([[0.1, 0.2, 0.3, 0.4]]),
                                         (0, 2): torch.tensor([[-0.5, 0.5, 0.25, -0.25]]),
                                         (1, 2): torch.tensor([[0.0, 0.0, 0.5, 0.5]])})

    out = SynCDDatasetWriter.execute(images, "view one\nview two\nview three", "toy", "toy/0001",
                                     "data/toys", "png", masks=masks, dinov2_model=dinov2, aesthetic_model=clip,
                                     min_aesthetic=min_aesthetic, min_dinov2=min_dino, correspondences=corr,
                                     asset_id="abc123")
    report, count = out.args
    assert count == 2 and f"image {drop}: rejected (aesthetic" in report and "2 of 3 images kept" in report
    assert out.ui.as_dict() == {"text": (report,)}
    root = output_dir / "data" / "toys"
    (record,) = dataset_format.read_dataset(root)
    prompts = ["view one", "view two", "view three"]
    assert record.prompts == [prompts[i] for i in kept] and record.category == "toy"
    assert record.object_id == "toy/0001" and record.objaverse_id == "abc123"
    assert all(p.parent == root and p.name.startswith("toy_0001_") for p in record.images)
    for path, i in zip(record.images, kept):  # PNG: exactly the IMAGE as SaveImage stores it
        assert np.array_equal(np.asarray(Image.open(path)), (images[i].numpy() * 255).clip(0, 255).astype(np.uint8))
    for path, i in zip(record.masks, kept):  # JPEG masks (upstream's layout): exact at mid-grey, and upstream's
        truth = masks[i].numpy() > 0.5      # > 0 binarization adds at most a few ringing pixels at the edge
        assert np.array_equal(np.asarray(Image.open(path).convert("L")) > 127, truth)
        assert (dataset_format.load_mask(path) != truth).sum() <= 16
    assert record.aesthetics_scores == {p.stem: pytest.approx(float(aes[i]), abs=1e-5)
                                        for p, i in zip(record.images, kept)}
    assert record.dino_scores == [[0.0, pytest.approx(float(dino[kept[0], kept[1]]), abs=1e-6)], [0.0, 0.0]]
    stored = correspondence_format.load(record.correspondences)
    assert stored.views == 2 and torch.equal(stored.between(0, 1), corr.between(*kept))
    # upstream's loaders: the training scripts' filter and upstream's own (scored files, same thresholds)
    (filtered,) = dataset_format.read_dataset(root, min_aesthetics=min_aesthetic, min_dino=min_dino)
    assert filtered.prompts == record.prompts
    for thresholds in ((0, 0), (min_aesthetic, min_dino)):
        ((paths, upstream_prompts),) = upstream_setup_metadata(str(root), *thresholds)
        assert [pathlib.Path(p) for p in paths] == record.images and upstream_prompts == record.prompts
        for p in map(pathlib.Path, paths):  # upstream opens f"{parent}/masks/{stem}.jpg" for every image
            assert (p.parent / "masks" / f"{p.stem}.jpg").is_file()
    dataset = SyncdDataset([record], DataConfig(dirs=[str(root)], num_images=3), resolution=64, image_size=32,
                           seed=0)
    item = dataset[(0, 0)]
    assert item["pixel_values"].shape == (3, 3, 64, 64) and set(item["prompts"]) <= set(record.prompts) | {""}
    # resume: the same object id again is skipped, nothing changes
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = SynCDDatasetWriter.execute(images.flip(0), "x", "toy", "toy/0001", "data/toys", "png", masks=masks)
    assert again.args == ("toy/0001: already in " + str(root) + " (resume): skipped", 0)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


def test_rejected_objects_are_not_written(output_dir, score_models):
    from comfyui_syncd.core import dataset_format
    from comfyui_syncd.nodes.dataset_writer import SynCDDatasetWriter

    dinov2, _ = score_models
    images, masks = scene(2)
    duplicates = torch.stack([images[0], images[0]])  # one image twice: a near-duplicate pair (1.0 > 0.98)
    report, count = SynCDDatasetWriter.execute(duplicates, "a dog", "dog", "dup", "ds", "jpg",
                                               masks=masks[:1].expand(2, -1, -1), dinov2_model=dinov2,
                                               min_dinov2=0.5).args
    assert count == 0 and "rejected: fewer than 2 images kept; nothing written" in report
    assert "image 0: rejected (best pair 1.000)" in report
    root = output_dir / "ds"
    assert not [p for p in root.rglob("*") if p.is_file()] and dataset_format.read_dataset(root) == []
    # without score models every image is kept; a single line serves every image; no masks: whole-image masks
    report, count = SynCDDatasetWriter.execute(images, "a dog", "dog", "plain", "ds", "jpg").args
    (record,) = dataset_format.read_dataset(root)
    assert count == 2 and record.prompts == ["a dog", "a dog"] and all(dataset_format.load_mask(m).all()
                                                                     for m in record.masks)
    assert not glob.glob(f"{root}/*metadata_with_scores.json")  # no scores: only the plain metadata


@pytest.mark.parametrize("folder", ["../outside", "/tmp/syncd_outside_dataset", "a/../../outside", ".", ""])
def test_dataset_folder_cannot_leave_the_output_folder(output_dir, folder):
    from comfyui_syncd.nodes.dataset_writer import SynCDDatasetWriter

    images, _ = scene(2)
    with pytest.raises(ValueError, match="dataset_folder"):
        SynCDDatasetWriter.execute(images, "a dog", "dog", "x", folder, "jpg")
    assert not pathlib.Path("/tmp/syncd_outside_dataset").exists()
    assert not (output_dir.parent / "outside").exists()


def test_symlinks_and_object_ids_cannot_escape(output_dir, tmp_path):
    from comfyui_syncd.nodes.dataset_writer import SynCDDatasetWriter

    images, _ = scene(2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (output_dir / "link").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="not a folder inside ComfyUI's output folder"):
        SynCDDatasetWriter.execute(images, "a dog", "dog", "x", "link/ds", "jpg")
    SynCDDatasetWriter.execute(images, "a dog", "dog", "../../evil/x", "ds", "jpg")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(output_dir / "ds") for p in written)
    with pytest.raises(ValueError, match="no usable file-name characters"):
        SynCDDatasetWriter.execute(images, "a dog", "dog", "../..", "ds", "jpg")
    with pytest.raises(ValueError, match="2 prompt line"):
        SynCDDatasetWriter.execute(images[:1].expand(3, -1, -1, -1), "a\nb", "dog", "y", "ds", "jpg")

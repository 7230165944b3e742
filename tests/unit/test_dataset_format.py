"""The SynCD multi-image dataset format (core/dataset_format.py): round trip, upstream's layout, path escapes,
atomic and resumable writes."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from comfyui_syncd.core import dataset_format as df

pytestmark = pytest.mark.unit


def _image(seed, size=(40, 32)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _mask(size=(40, 32), box=(8, 6, 30, 24)):
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[box[1]:box[3], box[0]:box[2]] = 255
    return m


def test_round_trip(tmp_path):
    w = df.DatasetWriter(tmp_path, image_format="png")
    images = [_image(i) for i in range(3)]
    meta = w.write("obj/1", images, ["a", "b", "c"], "mug", masks=[_mask(), None, Image.fromarray(_mask())],
                   aesthetics_scores=[5.0, 6.0, 7.0], dino_scores=np.eye(3) * 0.5,
                   extra={"objaverse_id": "abc", "correspondence": [1, 2]})
    assert meta == tmp_path / "obj_1_metadata.json"
    w.write("obj2", images[:2], ["d", "e"], "dog")
    records = df.read_dataset(tmp_path)  # metadata files in name order: obj2_ < obj_1_
    assert [r.object_id for r in records] == ["obj2", "obj/1"]
    r = records[1]
    assert r.prompts == ["a", "b", "c"] and r.category == "mug" and r.objaverse_id == "abc"
    assert [p.name for p in r.images] == ["obj_1_0.png", "obj_1_1.png", "obj_1_2.png"]
    for path, image in zip(r.images, images):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))  # PNG: lossless
    assert r.masks[1] is None and r.masks[0] == tmp_path / "masks" / "obj_1_0.jpg"
    assert np.array_equal(df.load_mask(r.masks[2]), df.load_mask(r.masks[0]))
    got = df.load_mask(r.masks[0])
    assert got.shape == (32, 40) and got[6:24, 8:30].all() and not got[0, 0]
    assert r.aesthetics_scores == {"obj_1_0": 5.0, "obj_1_1": 6.0, "obj_1_2": 7.0}
    assert r.dino_scores[1][1] == 0.5 and r.extra == {"correspondence": [1, 2]}
    assert not list(tmp_path.rglob("*.tmp"))


def test_resume_skips_written_objects(tmp_path):
    w = df.DatasetWriter(tmp_path)
    assert w.write("x", [_image(0), _image(1)], ["a", "b"], "cat") is not None
    assert w.has("x") and not w.has("y")
    assert w.write("x", [_image(5), _image(6)], ["changed", "changed"], "cat") is None
    (r,) = df.read_dataset(tmp_path)
    assert r.prompts == ["a", "b"]


def test_reads_upstream_layout(tmp_path):
    """A folder as the released SynCD data / upstream ``SynCDDataset`` reads it: several ``*metadata.json`` lists,
    filenames relative to DIR (a subfolder too), masks at ``<image folder>/masks/<stem>.jpg`` binarized > 0,
    objaverse ids, scores in ``*metadata_with_scores.json``."""
    (tmp_path / "masks").mkdir()
    (tmp_path / "sub" / "masks").mkdir(parents=True)
    names = ["0001_a.jpg", "0001_b.jpg", "0001_c.jpg", "sub/0002_a.jpg", "sub/0002_b.jpg"]
    for i, name in enumerate(names):
        _image(i).save(tmp_path / name)
        p = pathlib.Path(name)
        mask = _mask()
        mask[mask == 255] = 3  # faint but > 0: still foreground
        Image.fromarray(mask).save(tmp_path / p.parent / "masks" / f"{p.stem}.jpg", quality=100)
    entries = [{"filenames": names[:3], "prompts": ["p0", "p1", "p2"], "objaverse_id": "f00d", "category": "chair",
                "aesthetics_scores": {"0001_a": 6.0, "0001_b": 4.0, "0001_c": 6.5},
                "dino_scores": [[1.0, 0.9, 0.5], [0.9, 1.0, 0.6], [0.5, 0.6, 1.0]]}]
    (tmp_path / "rigid_metadata.json").write_text(json.dumps([{k: v for k, v in entries[0].items()
                                                              if "scores" not in k}]))
    (tmp_path / "rigid_metadata_with_scores.json").write_text(json.dumps(entries))
    (tmp_path / "deformable_metadata.json").write_text(json.dumps([
        {"filenames": names[3:], "prompts": ["q0", "q1"], "category": "dog"},
        {"filenames": names[3:4], "prompts": ["single"], "category": "dog"}]))  # one image: dropped (upstream)
    plain = df.read_dataset(tmp_path, scored=False)
    assert [r.category for r in plain] == ["dog", "chair"]  # files in name order
    dog, chair = plain
    assert dog.images == [tmp_path / "sub" / "0002_a.jpg", tmp_path / "sub" / "0002_b.jpg"]
    assert dog.masks == [tmp_path / "sub" / "masks" / "0002_a.jpg", tmp_path / "sub" / "masks" / "0002_b.jpg"]
    assert dog.object_id == "deformable_metadata:0" and chair.object_id == "f00d"
    assert df.load_mask(dog.masks[0])[10, 10] and not df.load_mask(dog.masks[0])[0, 0]
    assert df.read_dataset(tmp_path) == plain  # no filter: the plain files, as upstream
    # a filter reads the scored files (upstream); upstream's filter (aesthetics >= 5, DINO in [0.7, 0.98])
    (scored,) = df.read_dataset(tmp_path, scored=True)
    assert scored.metadata_file.name == "rigid_metadata_with_scores.json" and len(scored) == 3
    (filtered,) = df.read_dataset(tmp_path, min_aesthetics=5.0, min_dino=0.55)
    assert filtered.prompts == ["p0", "p2"]  # p1 fails aesthetics; all three are paired at >= 0.55
    assert df.read_dataset(tmp_path, min_aesthetics=5.0, min_dino=0.95) == []  # only self-pairs 1.0 > 0.98


@pytest.mark.parametrize("bad", ["../outside.jpg", "/etc/passwd", "a/../../x.jpg", "..\\x.jpg", "C:/x.jpg", ""])
def test_reader_refuses_paths_outside_the_folder(tmp_path, bad):
    (tmp_path / "evil_metadata.json").write_text(json.dumps([{"filenames": [bad, "ok.jpg"], "prompts": ["a", "b"],
                                                              "category": "x"}]))
    with pytest.raises(df.DatasetFormatError):
        df.read_dataset(tmp_path)


def test_reader_refuses_symlink_escape(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link").symlink_to(tmp_path)
    (tmp_path / "data" / "x_metadata.json").write_text(json.dumps([{"filenames": ["link/a.jpg", "b.jpg"],
                                                                    "prompts": ["a", "b"], "category": "x"}]))
    with pytest.raises(df.DatasetFormatError, match="outside"):
        df.read_dataset(tmp_path / "data")


@pytest.mark.parametrize("object_id", ["../../escape", "/abs/path", "a\\b", ".hidden", "x/../y"])
def test_writer_sanitizes_object_ids(tmp_path, object_id):
    root = tmp_path / "ds"
    w = df.DatasetWriter(root)
    meta = w.write(object_id, [_image(0), _image(1)], ["a", "b"], "cat", masks=[_mask(), _mask()])
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert all(p.is_relative_to(root) for p in written)
    assert meta.parent == root and not meta.name.startswith(".")
    (r,) = df.read_dataset(root)
    assert r.object_id == object_id and all(p.parent == root for p in r.images)


@pytest.mark.parametrize("object_id", ["..", "/", "", "./."])
def test_writer_rejects_ids_without_a_name(tmp_path, object_id):
    with pytest.raises(df.DatasetFormatError):
        df.DatasetWriter(tmp_path).write(object_id, [_image(0)], ["a"], "cat")


def test_a_crash_mid_object_leaves_nothing_visible(tmp_path, monkeypatch):
    w = df.DatasetWriter(tmp_path)
    w.write("done", [_image(0), _image(1)], ["a", "b"], "cat")
    calls = {"n": 0}
    save = Image.Image.save

    def crashing_save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # image 0, mask 0, then dies while writing image 1
            pathlib.Path(fp).write_bytes(b"partial")
            raise KeyboardInterrupt("killed")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        w.write("half", [_image(2), _image(3), _image(4)], ["a", "b", "c"], "cat", masks=[_mask()] * 3)
    monkeypatch.setattr(Image.Image, "save", save)
    assert [r.object_id for r in df.read_dataset(tmp_path)] == ["done"]
    assert not w.has("half") and not list(tmp_path.rglob("*.tmp"))
    # a crash while writing the metadata file itself leaves no metadata file
    write_text = pathlib.Path.write_text

    def crashing_write_text(self, *args, **kwargs):
        write_text(self, "[{\"filenames\": [", encoding="utf-8")
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_text", crashing_write_text)
    with pytest.raises(OSError):
        w.write("half", [_image(2), _image(3)], ["a", "b"], "cat")
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    assert [r.object_id for r in df.read_dataset(tmp_path)] == ["done"]
    assert not list(tmp_path.rglob("*.tmp"))
    # the rerun writes the object whole
    assert w.write("half", [_image(2), _image(3), _image(4)], ["a", "b", "c"], "cat", masks=[_mask()] * 3)
    assert [len(r) for r in df.read_dataset(tmp_path)] == [2, 3]


def test_upstream_glob_sees_only_complete_objects(tmp_path):
    """Temporary names never match upstream's ``glob(f'{DIR}/*metadata.json')``."""
    import glob

    tmp = df._tmp_name(tmp_path / "x_metadata.json")
    tmp.write_text("[]")
    assert glob.glob(f"{tmp_path}/*metadata.json") == []


def test_scores_and_correspondences_for_upstreams_loaders(tmp_path):
    """Scored objects are also listed in ``*metadata_with_scores.json`` (upstream reads only those when filtering);
    the correspondence file travels with the object, inside the folder."""
    import glob

    import torch

    from comfyui_syncd.core.correspondence_format import Correspondences, load

    corr = Correspondences(3, (8, 8), {(0, 1): torch.tensor([[0.5, -0.25, 0.0, 0.125]]), (1, 2): torch.zeros(0, 4)})
    w = df.DatasetWriter(tmp_path)
    tri = [[0.0, 0.8, 0.99], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
    w.write("chair/1", [_image(i) for i in range(3)], ["a", "b", "c"], "chair", masks=[_mask()] * 3,
            aesthetics_scores=[6.5, 6.1, 3.0], dino_scores=tri, correspondences=corr, extra={"objaverse_id": "f00"})
    w.write("plain", [_image(4), _image(5)], ["d", "e"], "dog", masks=[_mask()] * 2)
    assert sorted(pathlib.Path(p).name for p in glob.glob(f"{tmp_path}/*metadata_with_scores.json")) == \
        ["chair_1_metadata_with_scores.json"]
    assert len(glob.glob(f"{tmp_path}/*metadata.json")) == 2
    (chair,) = df.read_dataset(tmp_path, min_aesthetics=6.0, min_dino=0.7)  # 2 is below 6; 0-1 pair at 0.8
    assert chair.prompts == ["a", "b"] and chair.objaverse_id == "f00"
    assert chair.correspondences == tmp_path / "correspondences" / "chair_1.safetensors"
    back = load(chair.correspondences)
    assert back.views == 3 and torch.equal(back.between(1, 0), torch.tensor([[0.0, 0.125, 0.5, -0.25]]))
    assert df.read_dataset(tmp_path, min_aesthetics=6.0, min_dino=0.85) == []  # only the near-duplicate 0.99
    with pytest.raises(ValueError, match="correspondences of 3 views for 2 images"):
        w.write("bad", [_image(0), _image(1)], ["a", "b"], "x", correspondences=corr)
    (tmp_path / "evil_metadata.json").write_text(json.dumps([{"filenames": ["plain_0.jpg", "plain_1.jpg"],
                                                              "prompts": ["a", "b"], "category": "x",
                                                              "correspondences": "../x.safetensors"}]))
    with pytest.raises(df.DatasetFormatError, match="correspondences"):
        df.read_dataset(tmp_path)

"""Training configs (YAML/TOML into dataclasses, errors naming the key, upstream defaults, example files) and the
image-folder data (crops, flips, masks, captions, the resumable batch stream). No models, no ComfyUI."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_syncd.training import config, data, ico

pytestmark = pytest.mark.unit

CONFIGS = pathlib.Path(ico.__file__).resolve().parent / "configs"

MINIMAL_YAML = """
model:
  path: /models/sd15.safetensors
data:
  images: /data/teddy
concept:
  name: teddy
  noun: teddy bear
train:
  output_dir: /runs/teddy
  learning_rate: 2e-5
"""

MINIMAL_TOML = """
[model]
path = "/models/sd15.safetensors"
[data]
images = "/data/teddy"
[concept]
name = "teddy"
noun = "teddy bear"
[train]
output_dir = "/runs/teddy"
learning_rate = 2e-5
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_toml_give_the_same_config(tmp_path):
    a = config.load(write(tmp_path, "a.yaml", MINIMAL_YAML), ico.IcoConfig)
    b = config.load(write(tmp_path, "b.toml", MINIMAL_TOML), ico.IcoConfig)
    assert a == b
    assert a.train.learning_rate == 2e-5  # PyYAML reads "2e-5" as a string: accepted for a float key


def test_upstream_numbers_are_the_defaults(tmp_path):
    """DCI_ICO train.sh (--init_ctx "A" --ctx_end_init "." --modifier_token <new1>+<new2>+<new3>) and
    configs/finetune_addtoken.yaml (base_learning_rate 1e-5, batch 2, max_steps 900), src/model.py (10x context
    LR, AdamW with torch defaults), src/finetune_data.py (flip 0.5), sample.py (DDIM eta 1, CFG 6)."""
    cfg = config.load(write(tmp_path, "a.yaml", MINIMAL_YAML), ico.IcoConfig)
    c, t, v = cfg.concept, cfg.train, cfg.validation
    assert (c.num_tokens, c.prefix_init, c.suffix_init, c.init_token_ids) == (3, "A", ".", None)
    assert ico.UPSTREAM_INIT_TOKEN_IDS == (43514, 47629, 42170)
    assert (c.prefix_length, c.suffix_length) == (4, 2)  # upstream n_ctx / n_end_ctx for random init
    assert (t.max_steps, t.batch_size, t.scale_lr, t.context_lr_scale) == (900, 2, True, 10.0)
    assert (t.adam_beta1, t.adam_beta2, t.adam_epsilon, t.weight_decay) == (0.9, 0.999, 1e-8, 0.01)
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    assert opt.defaults["betas"] == (t.adam_beta1, t.adam_beta2) and opt.defaults["eps"] == t.adam_epsilon
    assert opt.defaults["weight_decay"] == t.weight_decay
    assert cfg.data.flip_p == 0.5 and cfg.data.resolution is None  # 512 (SD1.5) / 1024 (SDXL)
    assert (v.guidance_scale, v.eta) == (6.0, 1.0)


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "max_step", 10, "train.max_step: unknown key"),
    ("trian", "max_steps", 10, "trian: unknown key"),
    ("train", "max_steps", "ten", "train.max_steps: expected an integer, found str 'ten'"),
    ("train", "scale_lr", 1, "train.scale_lr: expected true or false"),
    ("train", "mixed_precision", "fp8", "train.mixed_precision: 'fp8' is not one of"),
    ("validation", "prompts", "a dog", "validation.prompts: expected a list"),
    ("concept", "noun", None, "concept.noun: expected a string, found null"),
    ("train", "mixed_precision", 16, "train.mixed_precision: 16 is not one of"),
])
def test_config_errors_name_the_key(tmp_path, section, key, value, message):
    import yaml

    raw = yaml.safe_load(MINIMAL_YAML)
    raw.setdefault(section, {})[key] = value
    path = write(tmp_path, "c.yaml", yaml.safe_dump(raw))
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.load(path, ico.IcoConfig)


def test_missing_required_key_and_bad_files(tmp_path):
    with pytest.raises(config.ConfigError, match=re.escape("concept.noun: required key is missing")):
        config.load(write(tmp_path, "a.yaml", MINIMAL_YAML.replace("  noun: teddy bear\n", "")), ico.IcoConfig)
    with pytest.raises(config.ConfigError, match="a .yaml, .yml or .toml file"):
        config.load(write(tmp_path, "a.json", "{}"), ico.IcoConfig)
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "a.toml", "[model\n"), ico.IcoConfig)


SECTIONS = {"model": ico.ModelConfig, "data": ico.DataConfig, "concept": ico.ConceptConfig,
            "train": ico.TrainConfig, "validation": ico.ValidationConfig}


@pytest.mark.parametrize("name", ["ico_sd15.yaml", "ico_sdxl.yaml"])
def test_example_configs_load_and_document_every_key(name):
    path = CONFIGS / name
    cfg = config.load(path, ico.IcoConfig)
    ico.check(cfg)
    raw = config.read_file(path)
    listed = {f"{section}.{key}" for section, keys in raw.items() for key in keys}
    assert [f.name for f in dataclasses.fields(ico.IcoConfig)] == list(SECTIONS)
    assert listed == {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    section, commented = None, set()
    for line in path.read_text().splitlines():  # each key's own line carries a comment
        if m := re.match(r"^(\w+):", line):
            section = m.group(1)
        elif m := re.match(r"^  (\w+):.*#", line):
            commented.add(f"{section}.{m.group(1)}")
    assert listed - commented == set(), f"{name}: keys without a comment"
    assert cfg.concept.name in " ".join(cfg.validation.prompts)


# --- data --------------------------------------------------------------------------------------------------------

def _halves(path, w=96, h=64):
    """Left half red, right half blue, top row marker green: crops and flips are visible."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2, 0] = 255
    img[:, w // 2:, 2] = 255
    img[0, :, 1] = 255
    Image.fromarray(img).save(path)


def test_centre_crop_flip_resize_and_mask_alignment(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "masks").mkdir()
    _halves(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.txt").write_text("a photo of a bear\n")
    mask = np.zeros((64, 96), np.uint8)
    mask[:, 16:48] = 255  # the left half of the centre crop (x 16..80)
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    (rec,) = data.list_images(tmp_path / "imgs", masks=tmp_path / "masks")
    assert rec.caption == "a photo of a bear"
    plain = data.load_example(rec, 32, flip=False)
    flipped = data.load_example(rec, 32, flip=True)
    assert plain["pixel_values"].shape == (3, 32, 32) and plain["mask"].shape == (1, 32, 32)
    assert plain["pixel_values"].min() >= -1 and plain["pixel_values"].max() <= 1
    # centre square crop of 96x64 is x 16..80: red on the left half, blue on the right
    assert plain["pixel_values"][0, 16, :12].mean() > 0.9 and plain["pixel_values"][2, 16, -12:].mean() > 0.9
    assert torch.allclose(flipped["pixel_values"], plain["pixel_values"].flip(-1), atol=1e-6)
    assert plain["mask"][0, :, :12].mean() > 0.95 and plain["mask"][0, :, -12:].mean() < 0.05
    assert torch.allclose(flipped["mask"], plain["mask"].flip(-1))
    assert plain["original_size"] == (64, 96) and plain["crop_top_left"] == (0, 8)  # 96x64 -> 48x32, crop x 8


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no images"):
        data.list_images(tmp_path)
    _halves(tmp_path / "b.jpg")
    with pytest.raises(ValueError, match="has no caption"):
        data.list_images(tmp_path, need_captions=True)
    assert data.list_images(tmp_path, need_captions=True, default_caption="a bear")[0].caption == "a bear"
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match="has no mask"):
        data.list_images(tmp_path, masks=tmp_path / "m")


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_batch_stream_resumes_exactly_and_shards_across_processes():
    full = _take(data.StepBatches(7, 2, seed=3), 20)
    assert _take(data.StepBatches(7, 2, seed=3, start=13), 7) == full[13:]  # resume at micro-batch 13
    flat = [k for batch in full for k in batch]
    for epoch in range(5):  # every epoch visits every item once
        assert sorted(i for i, _ in flat[epoch * 7:(epoch + 1) * 7]) == list(range(7))
    assert 0.2 < np.mean([f for _, f in flat]) < 0.8
    assert _take(data.StepBatches(7, 2, seed=4), 20) != full
    ranks = [_take(data.StepBatches(7, 2, seed=3, rank=r, world=2), 10) for r in range(2)]
    assert [k for m in range(10) for r in range(2) for k in ranks[r][m]] == flat  # two processes: same stream


def test_ico_dataset_mixes_regularisation_like_upstream(tmp_path):
    for name in ("t", "r"):
        (tmp_path / name).mkdir()
    for i in range(3):
        _halves(tmp_path / "t" / f"{i}.png")
    for i in range(4):
        _halves(tmp_path / "r" / f"{i}.png")
        (tmp_path / "r" / f"{i}.txt").write_text(f"caption {i}")
    ds = ico.IcoDataset(data.list_images(tmp_path / "t"), data.list_images(tmp_path / "r", need_captions=True), 16)
    assert len(ds) == 8  # 2 x regularisation count
    items = [ds[(i, False)] for i in range(8)]
    assert [x["image_index"] for x in items] == [-1, -1, -1, -1, 4 % 3, 5 % 3, 6 % 3, 7 % 3]
    assert [x["caption"] for x in items[:4]] == [f"caption {i}" for i in range(4)]
    assert len(ico.IcoDataset(data.list_images(tmp_path / "t"), [], 16)) == 3
    few = ico.IcoDataset(data.list_images(tmp_path / "t"), data.list_images(tmp_path / "r", need_captions=True)[:1],
                         16)  # fewer regularisation than reference images: every reference image still comes up
    assert [few[(i, False)]["image_index"] for i in range(len(few))] == [-1, -1, -1, 0, 1, 2]


def test_script_reports_config_errors_without_loading_anything(tmp_path, capsys):
    path = write(tmp_path, "bad.yaml", MINIMAL_YAML.replace("  learning_rate: 2e-5\n", "  learning_rat: 2e-5\n"))
    assert ico.main(["--config", str(path)]) == 2
    assert "train.learning_rat: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("section, key, value, message", [
    ("validation", "prompts", ["embedding:other dog"], "uses embedding:other"),
    ("concept", "name", "my concept", "must be one word"),
    ("concept", "num_tokens", 4, "upstream initialises at most 3 tokens"),
    ("concept", "init_token_ids", [1, 2], "2 ids for num_tokens 3"),
    ("train", "checkpoint_every", 0, "train.checkpoint_every: at least 1"),
])
def test_checks_beyond_types(tmp_path, section, key, value, message):
    import yaml

    raw = yaml.safe_load(MINIMAL_YAML)
    raw.setdefault(section, {})[key] = value
    cfg = config.from_dict(ico.IcoConfig, raw)
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        ico.check(cfg)

"""ICO training tests: tiny SD1.5/SDXL diffusers pipelines (random weights, ComfyUI's CLIP tokenizer files) saved
once per session, a few generated 64 px images, and runs driven in-process or as ``python -m`` subprocesses.

Torch runs single-threaded here: tiny models are faster that way (thread hand-offs cost more than the maths on
a loaded 2-core machine) and the in-process reference run then does exactly the floating-point operations of the
single-threaded subprocess runs it is compared with bit for bit."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import ico_tiny_models  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd15(comfy_path, tmp_path_factory) -> pathlib.Path:
    return ico_tiny_models.save_pipeline(tmp_path_factory.mktemp("tiny_sd15"), "sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(comfy_path, tmp_path_factory) -> pathlib.Path:
    return ico_tiny_models.save_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), "sdxl")


@pytest.fixture(scope="session")
def concept_images(tmp_path_factory) -> pathlib.Path:
    return ico_tiny_models.save_images(tmp_path_factory.mktemp("concept"), count=3, seed=0)


@pytest.fixture(scope="session")
def reg_images(tmp_path_factory) -> pathlib.Path:
    return ico_tiny_models.save_images(tmp_path_factory.mktemp("reg"), count=2, seed=7,
                                       captions=["a photo of a bear", "a bear in the woods"])


@pytest.fixture
def ico_config(tiny_sd15, concept_images, tmp_path):
    """``ico_config(**sections)`` -> IcoConfig for the tiny SD1.5 model (64 px, no workers, no validation);
    each keyword updates that section's dict, e.g. ``train={"max_steps": 4}``."""
    from comfyui_syncd.training import config, ico

    def make(**sections):
        raw = {"model": {"path": str(tiny_sd15)},
               "data": {"images": str(concept_images), "resolution": 64, "num_workers": 0},
               "concept": {"name": "myconcept", "noun": "teddy bear"},
               "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "checkpoint_every": 100},
               "validation": {"every": 0}}
        for key, value in sections.items():
            raw[key] = {**raw.get(key, {}), **value}
        return config.from_dict(ico.IcoConfig, raw)
    return make


@pytest.fixture(scope="session")
def comfy_imports(comfy_path):
    """ComfyUI on sys.path with --cpu set before anything imports comfy.model_management."""
    from comfyui_syncd.comfy_inprocess import import_comfy

    return import_comfy(cpu=True)


def _train(raw):
    from comfyui_syncd.training import config, ico

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the single-threaded subprocess runs it is compared with
    try:
        return ico.train(ico.prepare(config.from_dict(ico.IcoConfig, raw), resume=None), progress=False)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_sd15(tiny_sd15, concept_images, reg_images, tmp_path_factory):
    """A finished in-process SD1.5 run of ``ico_raw`` (the uninterrupted reference)."""
    raw = ico_tiny_models.ico_raw(tiny_sd15, concept_images, reg_images, tmp_path_factory.mktemp("run_sd15"))
    return _train(raw)


@pytest.fixture(scope="session")
def trained_sdxl(tiny_sdxl, concept_images, reg_images, tmp_path_factory):
    raw = ico_tiny_models.ico_raw(tiny_sdxl, concept_images, reg_images, tmp_path_factory.mktemp("run_sdxl"),
                                  max_steps=2)
    raw["validation"]["every"] = 2
    return _train(raw)


# --- SynCD (test_syncd_*.py) ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_image_encoder(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=32, hidden_act="quick_gelu"))
    folder = tmp_path_factory.mktemp("image_encoder")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Three objects (3, 2 and 3 images, 96x80, a coloured subject box on noise with its mask) written with the
    pack's dataset writer."""
    root = tmp_path_factory.mktemp("syncd_data")
    import numpy as np
    from PIL import Image

    from comfyui_syncd.core.dataset_format import DatasetWriter

    writer = DatasetWriter(root, image_format="png")
    rng = np.random.default_rng(0)
    for o, count in enumerate((3, 2, 3)):
        images, masks = [], []
        colour = rng.uniform(0, 255, 3)
        for i in range(count):
            img = rng.uniform(0, 80, (80, 96, 3))
            mask = np.zeros((80, 96), np.uint8)
            x, y = int(rng.integers(10, 50)), int(rng.integers(10, 40))
            img[y:y + 30, x:x + 30] = colour
            mask[y:y + 30, x:x + 30] = 255
            images.append(Image.fromarray(img.astype(np.uint8)))
            masks.append(mask)
        writer.write(f"object{o}", images, [f"a photo of object {o}, view {i}" for i in range(count)], "thing",
                     masks=masks)
    return root

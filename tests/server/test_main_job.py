"""The README's main job: SynCD data generation for the shipped toy prompts with ``--tiny``, i.e. the shipped
deformable workflow on the shipped toy-world model. Its sets show toy objects the attribute reader recognises."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_syncd.client import toy_swap
from comfyui_syncd.core.dataset_format import read_dataset
from comfyui_syncd.toyworld import reader as R, sets

pytestmark = pytest.mark.server

REPO = pathlib.Path(__file__).resolve().parents[2]
DEMO_PROMPTS = REPO / "toyworld" / "demo_prompts.jsonl"


def test_main_job_generates_toy_sets_on_the_toy_model(comfy_server, tmp_path):
    out = tmp_path / "toy_dataset"
    done = subprocess.run([sys.executable, "-m", "comfyui_syncd", "datagen", "--prompts", str(DEMO_PROMPTS), "--out",
                           str(out), "--server", comfy_server.url, "--tiny", "--limit", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_dataset(out)
    assert [r.category for r in records] == ["cube", "sphere"]
    images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for r in records for p in r.images]
    assert all(i.shape == (toy_swap.SIZE, toy_swap.SIZE, 3) for i in images) and all(m is not None for r in records for m in r.masks)
    reading = R.read(torch.from_numpy(np.stack(images)))
    asked = [sets.background_of(prompt) for r in records for prompt in r.prompts]
    # recognisable scenes: the reader reads the prompt's background in most images (toy model 11 of 12 in the
    # README's run; the random tiny models' noise 1 of 6, i.e. chance)
    assert sum(got == want for got, want in zip(reading.labels["background"], asked)) >= 4

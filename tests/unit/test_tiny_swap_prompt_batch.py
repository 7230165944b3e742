"""``run --tiny`` on a per-image-prompts graph: SynCD Per-Image Prompts becomes its tiny demo counterpart with the
same lines and option, its CLIP link is cut, and both its outputs (CONDITIONING, the prompts text) keep their
consumers; no ComfyUI needed."""

from __future__ import annotations

import pytest
from test_tiny_swap import FAMILY, OBJECT_INFO, SEED, assert_consistent, by_id, node_def, source

from comfyui_syncd.client.tiny_swap import tiny_swap
from comfyui_syncd.client.ui_graph import UIGraph
from comfyui_syncd.client.workflow_format import to_api

pytestmark = pytest.mark.unit

TEXT = ["STRING", {"multiline": True, "default": "a dog"}]
PER_IMAGE = ["BOOLEAN", {"default": True}]
INFO = {**OBJECT_INFO,
        "SynCDPromptBatch": node_def({"clip": ["CLIP"], "text": TEXT, "prompt_per_image": PER_IMAGE},
                                     ["CONDITIONING", "STRING"], names=["CONDITIONING", "prompts"]),
        "SynCDTinyDemoPromptBatch": node_def({"family": FAMILY, "text": TEXT, "prompt_per_image": PER_IMAGE,
                                              "seed": SEED}, ["CONDITIONING", "STRING"],
                                             names=["CONDITIONING", "prompts"], category="SynCD/testing")}
LINES = "a dog on a beach\na dog in a forest\na dog in a living room"


def graph() -> dict:
    g = UIGraph(INFO)
    g.extra["syncd"] = {"family": "flux"}
    unet = g.add("UNETLoader", unet_name="flux1-dev.safetensors")                             # 1
    clip = g.add("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5.safetensors",
                 type="flux")                                                                  # 2
    batch = g.add("SynCDPromptBatch", text=LINES, prompt_per_image=False,
                  properties={"syncd_datagen": "prompts"})                                     # 3
    shared = g.add("SynCDSharedAttention")                                                     # 4
    empty = g.add("EmptyLatentImage", batch_size=3)                                            # 5
    sampler = g.add("KSampler", steps=50, cfg=1.0)                                             # 6
    g.connect(clip, 0, batch, "clip")
    g.connect(unet, 0, shared, "model")
    g.connect(clip, 0, shared, "clip")
    g.connect(batch, 1, shared, "prompt")
    g.connect(shared, 0, sampler, "model")
    g.connect(batch, 0, sampler, "positive")
    g.connect(batch, 0, sampler, "negative")
    g.connect(empty, 0, sampler, "latent_image")
    g.group("all", g.nodes)
    return g.to_json()


def test_prompt_batch_becomes_the_tiny_one_with_the_same_lines():
    swapped, report = tiny_swap(graph(), INFO)
    assert_consistent(swapped)
    node = by_id(swapped)[3]
    assert node["type"] == "SynCDTinyDemoPromptBatch"
    assert node["properties"]["syncd_datagen"] == "prompts", "the driver still finds its slot"
    assert source(swapped, 4, "prompt") == (3, 1) and source(swapped, 4, "clip") is None
    assert source(swapped, 6, "positive") == (3, 0) and source(swapped, 6, "negative") == (3, 0)
    assert not [e for e in node["inputs"] if e["name"] == "clip"]
    assert "#3 SynCDTinyDemoPromptBatch: was SynCDPromptBatch (flux, same prompts)" in report
    api = to_api(swapped, INFO)
    assert api["3"]["inputs"] == {"family": "flux", "text": LINES, "prompt_per_image": False, "seed": 0}

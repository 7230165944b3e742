"""Every workflow in workflows/ is editor-format JSON that runs end to end through the server API."""

from __future__ import annotations

import io
import json
import pathlib

import pytest
from PIL import Image

from comfyui_syncd.client.workflow_format import is_ui_format, to_api

WORKFLOWS = sorted((pathlib.Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))


def test_workflows_are_shipped():
    assert {p.name for p in WORKFLOWS} >= {"syncd_tiny_demo_sd15.json", "jedi_tiny_demo_flux.json"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_editor_format(path):
    workflow = json.loads(path.read_text())
    assert is_ui_format(workflow) and workflow["version"] == 0.4
    link_ids = {link[0] for link in workflow["links"]}
    for node in workflow["nodes"]:
        assert {"id", "type", "pos", "size", "inputs", "outputs", "widgets_values", "mode"} <= set(node)
        for slot in node["inputs"]:
            assert slot["link"] is None or slot["link"] in link_ids


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_runs_and_saves_images(path, comfy_client):
    workflow = json.loads(path.read_text())
    api = to_api(workflow, comfy_client.object_info())
    assert "SynCDSharedAttention" in {n["class_type"] for n in api.values()}
    result = comfy_client.run(api, timeout=300, extra_data={"extra_pnginfo": {"workflow": workflow}})
    images = [f for f in result.files() if f.kind == "images" and f.type == "output"]
    batch = next(n["inputs"]["batch_size"] for n in api.values() if "batch_size" in n["inputs"])
    assert len(images) == batch
    for item in images:
        with Image.open(io.BytesIO(comfy_client.view(item.filename, item.subfolder, item.type))) as image:
            assert image.size == (64, 64)
            assert json.loads(image.info["workflow"])["nodes"] == workflow["nodes"]


@pytest.mark.parametrize("name,family,mask_mode", [("syncd_tiny_demo_sd15.json", "sd15", "automatic"),
                                                   ("jedi_tiny_demo_flux.json", "flux", "none")])
def test_demo_settings(name, family, mask_mode, comfy_client):
    api = to_api(json.loads((WORKFLOWS[0].parent / name).read_text()), comfy_client.object_info())
    by_type = {}
    for node in api.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    assert by_type["SynCDTinyDemoModel"][0]["family"] == family
    attention = by_type["SynCDSharedAttention"][0]
    assert (attention["images_per_subject"], attention["mask_mode"]) == (3, mask_mode)
    assert sorted(e["text"] for e in by_type["SynCDTinyDemoTextEncode"]) == ["", "a photo of a dog on the beach"]
    sampler = by_type["KSampler"][0]
    assert (sampler["steps"], sampler["sampler_name"], sampler["scheduler"]) == (4, "euler", "normal")
    assert "SaveImage" in by_type and "VAEDecode" in by_type

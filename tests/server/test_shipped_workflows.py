"""Every workflow in workflows/ is editor-format JSON that runs end to end through the server API."""

from __future__ import annotations

import io
import json
import pathlib

import pytest
from PIL import Image

from comfyui_syncd.client.workflow_format import is_ui_format, to_api

WORKFLOWS = sorted((pathlib.Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))


# workflow -> (pack nodes it must use, images it saves)
EXPECTED = {
    "syncd_tiny_demo_sd15.json": ({"SynCDSharedAttention"}, 3),
    "jedi_tiny_demo_flux.json": ({"SynCDSharedAttention"}, 3),
    "syncd_customization_sdxl_1ref.json": ({"SynCDReferenceImages", "SynCDApplyReferences", "SynCDNormalizedGuider",
                                            "SamplerCustomAdvanced", "SynCDIPAdapterApply"}, 1),
    "syncd_customization_sdxl_3ref.json": ({"SynCDReferenceImages", "SynCDApplyReferences",
                                            "SynCDCustomizationSampler", "SynCDIPAdapterApply"}, 1),
    "syncd_customization_flux_1ref.json": ({"SynCDReferenceImages", "SynCDApplyReferences", "SynCDNormalizedGuider",
                                            "SamplerCustomAdvanced"}, 1),
    "syncd_customization_flux_3ref.json": ({"SynCDReferenceImages", "SynCDApplyReferences",
                                            "SynCDCustomizationSampler"}, 1),
    "jedi_inpainting_sd15.json": ({"JeDiJointImageSet", "SynCDSharedAttention", "JeDiImageGuider"}, 3),
}


def test_workflows_are_shipped():
    assert {p.name for p in WORKFLOWS} == set(EXPECTED)


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
    nodes, count = EXPECTED[path.name]
    assert nodes <= {n["class_type"] for n in api.values()}
    result = comfy_client.run(api, timeout=300, extra_data={"extra_pnginfo": {"workflow": workflow}})
    images = [f for f in result.files() if f.kind == "images" and f.type == "output"]
    assert len(images) == count
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


@pytest.mark.parametrize("name,family,references", [("syncd_customization_sdxl_1ref.json", "sdxl", 1),
                                                    ("syncd_customization_sdxl_3ref.json", "sdxl", 3),
                                                    ("syncd_customization_flux_1ref.json", "flux", 1),
                                                    ("syncd_customization_flux_3ref.json", "flux", 3)])
def test_customization_settings(name, family, references, comfy_client):
    api = to_api(json.loads((WORKFLOWS[0].parent / name).read_text()), comfy_client.object_info())
    by_type = {}
    for node in api.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    assert by_type["SynCDTinyDemoModel"][0]["family"] == family
    assert by_type["SynCDTinyDemoReferences"][0]["count"] == references
    apply = by_type["SynCDApplyReferences"][0]
    assert apply["reference_noise"] == "auto" and (apply["start_percent"], apply["end_percent"]) == (0.0, 1.0)
    guidance = (by_type.get("SynCDNormalizedGuider") or by_type["SynCDCustomizationSampler"])[0]
    want = (1.5, 1.0, 1.0) if family == "flux" else (7.5, 8.0, 13.0)
    assert (guidance["text_scale"], guidance["image_scale_start"], guidance["image_scale_end"]) == want
    assert guidance["combination"] == "normalized"
    if family == "sdxl":  # global image feature of one reference at the upstream inference scale
        ip = by_type["SynCDIPAdapterApply"][0]
        assert (ip["weight"], ip["reference_weight"]) == (0.6, 1.0)
        assert by_type["ImageFromBatch"][0]["length"] == 1

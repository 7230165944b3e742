"""The shipped workflows (workflows/*.json): real-model editor graphs with a Note and stage groups, upstream's
settings, and every one runs end to end with ``run --tiny`` through the real headless server."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest
from PIL import Image

from comfyui_syncd.client import toy_swap as TS
from comfyui_syncd.client.workflow_format import FRONTEND_ONLY_NODES, is_ui_format, to_api

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO / "workflows"
WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*.json"))

CUSTOMIZATION = {"SynCDReferenceImages", "SynCDApplyReferences", "SynCDCheckpointLoader"}
# workflow -> (family, pack nodes it must use, images it saves)
EXPECTED = {
    "syncd_customization_sdxl_1ref.json": ("sdxl", CUSTOMIZATION | {"SynCDNormalizedGuider", "SynCDIPAdapterLoader",
                                                                    "SynCDIPAdapterApply"}, 1),
    "syncd_customization_sdxl_3ref.json": ("sdxl", CUSTOMIZATION | {"SynCDCustomizationSampler",
                                                                    "SynCDIPAdapterLoader", "SynCDIPAdapterApply"}, 1),
    "syncd_consistent_set_sdxl_3ref.json": ("sdxl", CUSTOMIZATION | {"SynCDNormalizedGuider", "SynCDIPAdapterLoader",
                                                                     "SynCDIPAdapterApply", "SynCDSharedAttention"}, 3),
    "syncd_identity_score_sdxl_3ref.json": ("sdxl", CUSTOMIZATION | {"SynCDNormalizedGuider", "SynCDIPAdapterLoader",
                                                                     "SynCDIPAdapterApply", "SynCDSharedAttention",
                                                                     "SynCDIdentityScore"}, 3),
    "syncd_customization_flux_1ref.json": ("flux", CUSTOMIZATION | {"SynCDNormalizedGuider"}, 1),
    "syncd_customization_flux_3ref.json": ("flux", CUSTOMIZATION | {"SynCDCustomizationSampler"}, 1),
    "syncd_datagen_deformable_flux.json": ("flux", {"SynCDPromptBatch", "SynCDSharedAttention",
                                                    "SynCDAutomaticMasks"}, 6),
    # 3 views + their 3 rendered masks
    "syncd_datagen_rigid_flux.json": ("flux", {"SynCDPromptBatch", "SynCDMeshViews", "SynCDSharedAttention",
                                               "SynCDFeatureWarp"}, 6),
    "syncd_consistent_set_qwen_image.json": ("qwen_image", {"SynCDReferenceImages", "SynCDApplyReferences",
                                                            "SynCDSharedAttention", "SynCDNormalizedGuider"}, 3),
    "jedi_coupled_attention_sd15.json": ("sd15", {"SynCDSharedAttention"}, 3),
    "jedi_inpainting_sd15.json": ("sd15", {"JeDiJointImageSet", "SynCDSharedAttention", "JeDiImageGuider"}, 3),
    # 3 images (λ −2, 0, 2) + the weight maps of the steps in the window (--tiny: 4 steps, the first in 0.3)
    "dci_lambda_sweep_sd15.json": ("sd15", {"DCIDualBranch", "DCIGuider", "DCIWeightMaps"}, 4),
    "dci_lambda_sweep_sdxl.json": ("sdxl", {"DCIDualBranch", "DCIGuider", "DCIWeightMaps"}, 4),
}
# loader -> {widget index: models folder} for the files it names
LOADER_FILES = {"CheckpointLoaderSimple": {0: "checkpoints"}, "UNETLoader": {0: "diffusion_models"},
                "DualCLIPLoader": {0: "text_encoders", 1: "text_encoders"}, "VAELoader": {0: "vae"},
                "CLIPLoader": {0: "text_encoders"},
                "CLIPVisionLoader": {0: "clip_vision"}, "SynCDIPAdapterLoader": {0: "ipadapter"},
                "SynCDCheckpointLoader": {0: "syncd"}, "SynCDIdentityModelLoader": {0: "syncd_identity"}}
# text-to-image workflows: --tiny runs them on the shipped toy-world model (client/toy_swap.py)
ON_TOY_MODEL = {"syncd_datagen_deformable_flux", "jedi_coupled_attention_sd15", "jedi_inpainting_sd15",
                "dci_lambda_sweep_sd15", "dci_lambda_sweep_sdxl", "syncd_datagen_rigid_flux",
                "syncd_customization_sdxl_1ref", "syncd_customization_sdxl_3ref", "syncd_consistent_set_sdxl_3ref",
                "syncd_identity_score_sdxl_3ref", "syncd_customization_flux_1ref", "syncd_customization_flux_3ref",
                "syncd_consistent_set_qwen_image"}
TOY_FILES = {"syncd_datagen_rigid_flux": TS.SHIPPED_DEPTH_CHOICE}  # the others: TS.SHIPPED_CHOICE
SWAPPED_BY_TOY = {"SynCDMeshViews": "SynCDToyWorldMeshViews", "SynCDCheckpointLoader": "SynCDToyWorldCheckpoint",
                  "SynCDIPAdapterLoader": "SynCDToyWorldIPAdapter"}  # pack node -> what runs in its place
TINY_TYPES = {"SynCDTinyDemoModel", "SynCDTinyDemoTextEncode", "SynCDTinyDemoReferences", "SynCDTinyDemoIPAdapter",
              "SynCDTinyDemoPromptBatch"}
SWAPPED_BY_TINY = {"SynCDCheckpointLoader": None, "SynCDIPAdapterLoader": "SynCDTinyDemoIPAdapter",
                   "SynCDPromptBatch": "SynCDTinyDemoPromptBatch"}  # pack node -> what runs in its place


def load(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / name).read_text())


def by_type(api: dict) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for node in api.values():
        found.setdefault(node["class_type"], []).append(node["inputs"])
    return found


def note_text(workflow: dict) -> str:
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1, "one Note node"
    return notes[0]["widgets_values"][0]


def test_notes_say_what_tiny_runs_on():
    for path in WORKFLOWS:
        text = note_text(json.loads(path.read_text()))
        assert f"run workflows/{path.name} --tiny" in text
        assert ("toy-world model" in text) == (path.stem in ON_TOY_MODEL), path.name
        assert ("noise-like" in text) == (path.stem not in ON_TOY_MODEL), path.name


def test_workflows_are_shipped():
    assert {p.name for p in WORKFLOWS} == set(EXPECTED)
    # the template browser's card image for each (ComfyUI serves workflows/ at /api/workflow_templates/<pack>/)
    assert {p.name for p in WORKFLOWS_DIR.glob("*.jpg")} == {p.with_suffix(".jpg").name for p in WORKFLOWS}


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
def test_real_loaders_note_and_groups(path, comfy_client):
    """Only real loaders (no SynCD/testing node); the Note names every model file with its folder; every node
    but the Note sits inside one of the stage groups, and the groups do not overlap."""
    workflow = json.loads(path.read_text())
    info = comfy_client.object_info()
    family, _, _ = EXPECTED[path.name]
    types = {n["type"] for n in workflow["nodes"]}
    testing = {t for t in types if info.get(t, {}).get("category", "").startswith("SynCD/testing")}
    assert not testing and not types & TINY_TYPES, f"demo nodes in a shipped workflow: {testing}"
    assert workflow["extra"]["syncd"]["family"] == family
    loaders = {"flux": {"UNETLoader", "DualCLIPLoader", "VAELoader"},
               "qwen_image": {"UNETLoader", "CLIPLoader", "VAELoader"}}.get(family, {"CheckpointLoaderSimple"})
    assert loaders <= types
    if "SynCDReferenceImages" in types or "JeDiJointImageSet" in types:
        assert "LoadImage" in types

    note = note_text(workflow)
    for node in workflow["nodes"]:
        for index, folder in LOADER_FILES.get(node["type"], {}).items():
            assert f"models/{folder}/{node['widgets_values'][index]}" in note, (node["type"], folder)
        if node["type"] == "LoadImage":
            assert f"input/{workflow_first_reference(workflow)}" in note
    assert f"python -m comfyui_syncd run workflows/{path.name} --tiny" in note

    titles = [g["title"] for g in workflow["groups"]]
    assert {"Models", "Prompts", "Sampling", "Output"} <= set(titles)
    assert ("References" in titles) == ("LoadImage" in types)
    boxes = [g["bounding"] for g in workflow["groups"]]
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_NODES:
            continue
        x, y = node["pos"]
        inside = [t for t, (gx, gy, w, h) in zip(titles, boxes)
                  if gx <= x and x + node["size"][0] <= gx + w and gy <= y - 30 and y + node["size"][1] <= gy + h]
        assert len(inside) == 1, f"#{node['id']} {node['type']} lies in groups {inside}"
    for i, (ax, ay, aw, ah) in enumerate(boxes):
        for bx, by, bw, bh in boxes[i + 1:]:
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, "overlapping groups"


def workflow_first_reference(workflow: dict) -> str:
    return min((n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "LoadImage"))


def test_sdxl_customization_settings(comfy_client):
    """Upstream's SDXL inference (method/sample.py): terminus-xl-gamma-v1 as v-prediction + zero-SNR, the SynCD
    checkpoint with the IP-Adapter, euler_ancestral 50 steps at 1024², s_txt 7.5, s_img 8 -> 13, IP 0.6."""
    for name, all_in_one, references in (("syncd_customization_sdxl_1ref.json", False, 1),
                                         ("syncd_customization_sdxl_3ref.json", True, 3)):
        workflow = load(name)
        api = to_api(workflow, comfy_client.object_info())
        found = by_type(api)
        assert found["CheckpointLoaderSimple"][0]["ckpt_name"] == "terminus-xl-gamma-v1.safetensors"
        assert found["ModelSamplingDiscrete"][0] == {"sampling": "v_prediction", "zsnr": True,
                                                     "model": [id_of(api, "CheckpointLoaderSimple"), 0]}
        assert found["SynCDCheckpointLoader"][0]["checkpoint_name"] == "sdxl_finetuned_20k.ckpt"
        assert found["SynCDCheckpointLoader"][0]["model"] == [id_of(api, "ModelSamplingDiscrete"), 0]
        assert found["SynCDIPAdapterLoader"][0]["ipadapter_name"] == "ip-adapter-plus_sdxl_vit-h.safetensors"
        assert found["CLIPVisionLoader"][0]["clip_name"] == "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
        assert len(found["LoadImage"]) == references
        assert found["EmptyLatentImage"][0] == {"width": 1024, "height": 1024, "batch_size": 1}
        texts = sorted(e["text"] for e in found["CLIPTextEncode"])
        assert texts == ["An action figure riding a motorcycle", "photo of a action figure"]
        negative = found["ConditioningZeroOut"][0]["conditioning"]
        assert api[negative[0]]["inputs"]["text"] == "An action figure riding a motorcycle"
        ip = found["SynCDIPAdapterApply"][0]
        assert (ip["weight"], ip["reference_weight"]) == (0.6, 1.0)
        assert found["ImageFromBatch"][0]["length"] == 1
        guidance = (found["SynCDCustomizationSampler"] if all_in_one else found["SynCDNormalizedGuider"])[0]
        assert (guidance["text_scale"], guidance["image_scale_start"], guidance["image_scale_end"],
                guidance["combination"]) == (7.5, 8.0, 13.0, "normalized")
        if all_in_one:
            assert (guidance["steps"], guidance["sampler_name"], guidance["scheduler"]) == (50, "euler_ancestral",
                                                                                           "simple")
        else:
            assert found["BasicScheduler"][0]["steps"] == 50 and found["BasicScheduler"][0]["scheduler"] == "simple"
            assert found["KSamplerSelect"][0]["sampler_name"] == "euler_ancestral"
        note = note_text(workflow)
        assert "v_prediction" in note and "zsnr" in note and "ModelSamplingDiscrete" in note


def id_of(api: dict, class_type: str) -> str:
    (node_id,) = [i for i, n in api.items() if n["class_type"] == class_type]
    return node_id


def test_flux_customization_settings(comfy_client):
    """Upstream's Flux sampling (sample_flux.py + README): FLUX.1-dev + pytorch_model.bin, 512 px, 30 steps,
    guidance 3.5, true CFG 1.5, image scale 1.0, references conditioned on the prompt itself."""
    for name, all_in_one, references in (("syncd_customization_flux_1ref.json", False, 1),
                                         ("syncd_customization_flux_3ref.json", True, 3)):
        api = to_api(load(name), comfy_client.object_info())
        found = by_type(api)
        assert found["UNETLoader"][0]["unet_name"] == "flux1-dev.safetensors"
        assert found["DualCLIPLoader"][0]["type"] == "flux"
        assert found["SynCDCheckpointLoader"][0]["checkpoint_name"] == "pytorch_model.bin"
        assert found["EmptySD3LatentImage"][0] == {"width": 512, "height": 512, "batch_size": 1}
        assert [g["guidance"] for g in found["FluxGuidance"]] == [3.5, 3.5]
        assert found["ModelSamplingFlux"][0]["width"] == 512 * (references + 1)
        apply = found["SynCDApplyReferences"][0]
        guidance = (found["SynCDCustomizationSampler"] if all_in_one else found["SynCDNormalizedGuider"])[0]
        assert apply["reference_conditioning"] == guidance["positive"], "references share the prompt's text"
        assert (guidance["text_scale"], guidance["image_scale_start"], guidance["image_scale_end"]) == (1.5, 1.0, 1.0)
        steps = guidance["steps"] if all_in_one else found["BasicScheduler"][0]["steps"]
        assert steps == 30
        negative_text = api[api[guidance["negative"][0]]["inputs"]["conditioning"][0]]["inputs"]["text"]
        assert negative_text == "3d render, cartoon, low resolution, illustration, blurry, unrealistic"


def test_datagen_and_jedi_settings(comfy_client):
    info = comfy_client.object_info()
    api = to_api(load("syncd_datagen_deformable_flux.json"), info)
    found = by_type(api)
    shared = found["SynCDSharedAttention"][0]
    assert (shared["images_per_subject"], shared["mask_mode"], shared["subject_word"]) == (3, "automatic", "dog")
    assert shared["clip"] == [id_of(api, "DualCLIPLoader"), 0], "real models find the subject word with T5/CLIP"
    # upstream: one prompt per image; the per-image node's encoded prompts feed the masks' subject-word lookup
    (batch,) = found["SynCDPromptBatch"]
    assert shared["prompt"] == [id_of(api, "SynCDPromptBatch"), 1] and batch["prompt_per_image"] is True
    assert batch["clip"] == [id_of(api, "DualCLIPLoader"), 0] and "CLIPTextEncode" not in found
    prompts = batch["text"].splitlines()
    assert len(prompts) == 3 and len(set(prompts)) == 3 and all("dog" in p for p in prompts)
    assert all(p.endswith(". wide angle shot") and p.count(". ") >= 2 for p in prompts)  # "{bg}. {desc}. ..."
    assert found["FluxGuidance"][0]["conditioning"] == [id_of(api, "SynCDPromptBatch"), 0]
    assert found["EmptySD3LatentImage"][0] == {"width": 1024, "height": 1024, "batch_size": 3}
    sampler = found["KSampler"][0]
    assert (sampler["steps"], sampler["cfg"]) == (50, 1.0) and found["FluxGuidance"][0]["guidance"] == 3.5

    api = to_api(load("syncd_datagen_rigid_flux.json"), info)
    found = by_type(api)
    (batch,) = found["SynCDPromptBatch"]
    prompts = batch["text"].splitlines()
    assert len(set(prompts)) == 3
    assert all(p.endswith(" a natural image with the object on the ground.") for p in prompts)
    (negative,) = found["CLIPTextEncode"]
    assert negative["text"] == "3d render, cartoon, low resolution, illustration, blurry"
    assert [id_of(api, "SynCDPromptBatch"), 0] in [g["conditioning"] for g in found["FluxGuidance"]]

    found = by_type(to_api(load("jedi_coupled_attention_sd15.json"), info))
    assert found["SynCDSharedAttention"][0]["mask_mode"] == "none"
    assert found["EmptyLatentImage"][0]["batch_size"] == found["SynCDSharedAttention"][0]["images_per_subject"] == 3

    found = by_type(to_api(load("jedi_inpainting_sd15.json"), info))
    assert len(found["LoadImage"]) == 2 and found["JeDiJointImageSet"][0]["images_to_generate"] == 1
    assert found["SynCDSharedAttention"][0]["images_per_subject"] == 3


def test_qwen_image_settings(comfy_client):
    """ComfyUI's Qwen-Image template loaders and settings; MSA with automatic masks (the subject word found with the
    real Qwen2.5-VL tokenizer) over a set of 3, SynCD references on the base weights (not the Edit input)."""
    api = to_api(load("syncd_consistent_set_qwen_image.json"), comfy_client.object_info())
    found = by_type(api)
    assert found["UNETLoader"][0]["unet_name"] == "qwen_image_fp8_e4m3fn.safetensors"
    assert found["CLIPLoader"][0]["type"] == "qwen_image"
    assert found["VAELoader"][0]["vae_name"] == "qwen_image_vae.safetensors"
    assert found["ModelSamplingAuraFlow"][0]["shift"] == 3.1
    shared = found["SynCDSharedAttention"][0]
    assert (shared["images_per_subject"], shared["mask_mode"], shared["subject_word"]) == (3, "automatic", "dog")
    assert shared["clip"] == [id_of(api, "CLIPLoader"), 0]
    assert found["EmptySD3LatentImage"][0] == {"width": 1328, "height": 1328, "batch_size": 3}
    assert found["BasicScheduler"][0]["steps"] == 20 and found["SynCDNormalizedGuider"][0]["text_scale"] == 2.5
    assert "TextEncodeQwenImageEditPlus" not in found


def test_real_workflow_without_models_is_refused(comfy_client):
    """Without --tiny the server validates the real loaders: no model files -> the names are not in the lists."""
    from comfyui_syncd.client.api import PromptValidationError

    api = to_api(load("jedi_coupled_attention_sd15.json"), comfy_client.object_info())
    with pytest.raises(PromptValidationError, match="ckpt_name"):
        comfy_client.run(api, timeout=60)


# --tiny runs every workflow (on the toy model where it can); --random-tiny too those of another architecture than
# the toy model's SD1.5, so their graphs also run as they are on their own (tiny, random-weight) architecture
TINY_RUNS = [(p, False) for p in WORKFLOWS] + [(p, True) for p in WORKFLOWS
                                              if p.stem in ON_TOY_MODEL and EXPECTED[p.name][0] != "sd15"]


@pytest.mark.parametrize("path,random_tiny", TINY_RUNS,
                         ids=[p.stem + ("-random" if r else "") for p, r in TINY_RUNS])
def test_runs_with_tiny(path, random_tiny, comfy_server, tmp_path):
    """``python -m comfyui_syncd run WORKFLOW --tiny [--random-tiny]``: loaders swapped, the server runs it,
    images come back."""
    family, pack_nodes, count = EXPECTED[path.name]
    out = tmp_path / "out"
    toy = path.stem in ON_TOY_MODEL and not random_tiny
    stepped = ("KSampler", "KSamplerAdvanced", "BasicScheduler", "SynCDCustomizationSampler")
    fewer_steps = [arg for n in json.loads(path.read_text())["nodes"] if toy and n["type"] in stepped
                   for arg in ("--set", f"{n['id']}.steps=6")]  # the toy model's 25 steps, cut for CI time
    done = subprocess.run([sys.executable, "-m", "comfyui_syncd", "run", str(path), "--tiny", "--server",
                           comfy_server.url, "--out", str(out), *fewer_steps] + ["--random-tiny"] * random_tiny,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    which = "(depth-conditioned )?toy-world (customization )?model" if toy else "tiny demo models"
    assert re.match(rf"--tiny: \d+ change\(s\) for the {which}:", lines[0])
    workflow = json.loads(path.read_text())
    loader = next(n for n in workflow["nodes"] if n["type"] in ("CheckpointLoaderSimple", "UNETLoader"))
    toy_file = TOY_FILES.get(path.stem, TS.SHIPPED_CHOICE)
    assert (f"  #{loader['id']} SynCDToyWorldModel: was {loader['type']} (toy-world model {toy_file})" if toy
            else f"  #{loader['id']} SynCDTinyDemoModel: was {loader['type']} ({family})") in lines
    saved = sorted(out.glob("*.png"))
    assert [str(p) for p in saved] == sorted(l for l in lines if l.endswith(".png"))
    if "SynCDIdentityScore" in pack_nodes:  # the score table the node shows is printed after the files
        score = next(n for n in workflow["nodes"] if n["type"] == "SynCDIdentityScore")
        metric = "toy_identity (toy attribute reader)" if toy else "dinov2_i (tiny-dinov2)"
        table = lines[lines.index(f"#{score['id']} SynCD Identity Score:") + 1:]
        assert table[0] == f"{metric} against 3 reference(s); masks: references", table
        assert [l.split(":")[0] for l in table[1:5]] == ["image 0", "image 1", "image 2", "mean"], table
    maps = [p for p in saved if p.name.startswith("dci_weight_maps")]  # one per step in DCI's window
    assert len(saved) == count if not (toy and maps) else (len(saved) - len(maps) == count - 1 and len(maps) >= 1)
    for png in saved:
        with Image.open(png) as image:
            assert image.size == ((TS.SIZE,) * 2 if toy else (64, 64))
            embedded = json.loads(image.info.get("workflow", "null"))  # the graph that ran (none with --set)
            prompt = json.loads(image.info["prompt"])
        ran = {n["class_type"] for n in prompt.values()}
        if toy:  # the pack's nodes run as they are, on the toy model's MODEL, CLIP and VAE
            running = {SWAPPED_BY_TOY.get(n, n) for n in pack_nodes}
            assert running <= ran and "SynCDToyWorldModel" in ran and not ran & TINY_TYPES
            assert embedded is None or embedded["extra"]["syncd"] == {"family": "sd15", "toy": toy_file}
            assert prompt[str(loader["id"])]["inputs"] == {"model_file": toy_file}
            if family in ("flux", "qwen_image") and "SynCDPromptBatch" not in pack_nodes:  # a flow model's graph
                assert not ran & set(TS.BYPASSED), "the flow shift and FluxGuidance are bypassed on the toy UNet"
                guided = [n["inputs"] for n in prompt.values() if n["class_type"] in TS.GUIDANCE_NODES]
                assert guided and all((g["text_scale"], g["image_scale_start"], g["image_scale_end"]) == (7.5, 8.0, 13.0)
                                      for g in guided), "the server's defaults for the guider's scales"
                texts = [n["inputs"].get("text") for n in prompt.values() if n["class_type"] == "CLIPTextEncode"]
                assert "3d render" not in " ".join(t for t in texts if isinstance(t, str)), "the negative is emptied"
        else:
            assert pack_nodes - set(SWAPPED_BY_TINY) <= ran
            assert {SWAPPED_BY_TINY[n] for n in pack_nodes & set(SWAPPED_BY_TINY)} - {None} <= ran
            assert "SynCDTinyDemoModel" in ran
            assert embedded["extra"]["syncd"] == {"family": family, "tiny": True}
        assert not ran & (set(LOADER_FILES) | {"LoadImage", "LoadImageMask"}), "a real loader was left"


def test_toy_world_dci_branch_of_the_shipped_sweep_runs_with_a_concept_lora(comfy_server, comfy_client):
    """The toy world's ``dci`` stage graph (toyworld/concepts.py), made from the shipped λ sweep by the real
    toy swap and UI -> API conversion, runs on ComfyUI, and its LoraLoaderModelOnly feeds the DCI branch: a k/v
    difference file changes the image at strength 1 and not at strength 0."""
    import torch

    from comfyui_syncd.client.toy_swap import toy_swap
    from comfyui_syncd.toyworld import concepts
    from comfyui_syncd.training import checkpoints

    object_info = comfy_client.object_info()
    swapped, _ = toy_swap(load(concepts.WORKFLOW), object_info)
    graph = concepts.sweep_graph(to_api(swapped, object_info))
    gen = torch.Generator().manual_seed(0)
    diffs = {checkpoints.comfy_unet_key(f"{block}.transformer_blocks.0.attn2.to_{kv}.weight", 1):
             torch.randn(width, 64, generator=gen) * 0.5
             for block, width in (("down_blocks.0.attentions.0", 64), ("mid_block.attentions.0", 128))
             for kv in "kv"}
    checkpoints.save_weight_diffs(comfy_server.base_dir / "models" / "loras" / "toy_case00_1ref.safetensors", diffs)
    images = []
    for strength in (1.0, 0.0, 1.0):
        g = concepts.set_concept(graph, "toy_case00_1ref", "a cone on grass, on the left", "cone", strength=2.0,
                                 window=0.3, seed=3, steps=4, cfg=5.0)
        g[concepts.LORA_NODE]["inputs"]["strength_model"] = strength
        images.append(concepts.run_image(comfy_client, g))
    assert images[0].shape == (1, TS.SIZE, TS.SIZE, 3)
    assert torch.equal(images[0], images[2])                    # deterministic
    assert (images[0] - images[1]).abs().mean() > 2 / 255      # the concept's k/v reach the sampled branch

"""``client/tiny_swap.py`` on small hand-made editor graphs with a hand-made ``/object_info``: node types, links
re-pointed to the right output slots, widget values, cut CLIP links, sizes and steps; no ComfyUI needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from comfyui_syncd.client.tiny_swap import TinySwapError, infer_family, tiny_swap
from comfyui_syncd.client.ui_graph import UIGraph
from comfyui_syncd.client.workflow_format import to_api

pytestmark = pytest.mark.unit

FAMILY = ["COMBO", {"options": ["sd15", "sdxl", "flux"], "default": "sd15"}]
SEED = ["INT", {"default": 0, "min": 0, "control_after_generate": False}]


def node_def(required: dict, outputs: list[str], optional: dict | None = None, names: list[str] | None = None,
             category: str = "test") -> dict:
    return {"input": {"required": required, "optional": optional or {}},
            "input_order": {"required": list(required), "optional": list(optional or {})},
            "output": outputs, "output_name": names or outputs, "category": category}


OBJECT_INFO = {
    "CheckpointLoaderSimple": node_def({"ckpt_name": [[]]}, ["MODEL", "CLIP", "VAE"]),
    "UNETLoader": node_def({"unet_name": [[]], "weight_dtype": [["default", "fp8_e4m3fn"]]}, ["MODEL"]),
    "DualCLIPLoader": node_def({"clip_name1": [[]], "clip_name2": [[]], "type": [["sdxl", "flux"]]}, ["CLIP"],
                               optional={"device": [["default", "cpu"], {"advanced": True}]}),
    "CLIPLoader": node_def({"clip_name": [[]], "type": [["stable_diffusion"]]}, ["CLIP"]),
    "VAELoader": node_def({"vae_name": [[]]}, ["VAE"]),
    "CLIPTextEncode": node_def({"text": ["STRING", {"multiline": True, "dynamicPrompts": True}], "clip": ["CLIP"]},
                               ["CONDITIONING"]),
    "CLIPSetLastLayer": node_def({"clip": ["CLIP"], "stop_at_clip_layer": ["INT", {"default": -1}]}, ["CLIP"]),
    "CLIPVisionLoader": node_def({"clip_name": [[]]}, ["CLIP_VISION"]),
    "LoadImage": node_def({"image": [[], {"image_upload": True}]}, ["IMAGE", "MASK"]),
    "LoadImageMask": node_def({"image": [[], {"image_upload": True}], "channel": [["alpha", "red"]]}, ["MASK"]),
    "EmptyLatentImage": node_def({"width": ["INT", {"default": 512}], "height": ["INT", {"default": 512}],
                                  "batch_size": ["INT", {"default": 1}]}, ["LATENT"]),
    "ImageScale": node_def({"image": ["IMAGE"], "upscale_method": [["nearest-exact", "lanczos"]],
                            "width": ["INT", {"default": 512}], "height": ["INT", {"default": 512}],
                            "crop": [["disabled", "center"]]}, ["IMAGE"]),
    "KSampler": node_def({"model": ["MODEL"], "seed": ["INT", {"default": 0, "control_after_generate": True}],
                          "steps": ["INT", {"default": 20}], "cfg": ["FLOAT", {"default": 8.0}],
                          "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
                          "latent_image": ["LATENT"]}, ["LATENT"]),
    "VAEDecode": node_def({"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"]),
    "SaveImage": node_def({"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}, []),
    "PrimitiveStringMultiline": node_def({"value": ["STRING", {"multiline": True}]}, ["STRING"]),
    "SynCDSharedAttention": node_def({"model": ["MODEL"], "images_per_subject": ["INT", {"default": 3}]}, ["MODEL"],
                                     optional={"clip": ["CLIP"], "prompt": ["STRING", {"default": ""}]}),
    "SynCDCheckpointLoader": node_def({"model": ["MODEL"], "checkpoint_name": ["COMBO", {"options": []}],
                                       "strength": ["FLOAT", {"default": 1.0}]}, ["MODEL", "IPADAPTER"],
                                      optional={"ipadapter": ["IPADAPTER"]}),
    "SynCDIPAdapterLoader": node_def({"ipadapter_name": ["COMBO", {"options": []}]}, ["IPADAPTER"]),
    "SynCDIPAdapterApply": node_def({"model": ["MODEL"], "ipadapter": ["IPADAPTER"], "clip_vision": ["CLIP_VISION"],
                                     "image": ["IMAGE"], "weight": ["FLOAT", {"default": 0.6}]}, ["MODEL"]),
    "SynCDReferenceImages": node_def({"images": ["IMAGE"], "vae": ["VAE"]}, ["SYNCD_REFERENCES"],
                                     optional={"masks": ["MASK"]}),
    "SynCDTinyDemoModel": node_def({"family": FAMILY, "seed": SEED, "width": ["INT", {"default": 32}]},
                                   ["MODEL", "VAE"], category="SynCD/testing"),
    "SynCDTinyDemoTextEncode": node_def({"family": FAMILY, "text": ["STRING", {"multiline": True, "default": "x"}],
                                         "seed": SEED}, ["CONDITIONING"], category="SynCD/testing"),
    "SynCDTinyDemoReferences": node_def({"count": ["INT", {"default": 3}], "size": ["INT", {"default": 64}],
                                         "seed": SEED}, ["IMAGE", "MASK"], category="SynCD/testing"),
    "SynCDTinyDemoIPAdapter": node_def({"model": ["MODEL"], "seed": SEED}, ["IPADAPTER", "CLIP_VISION"],
                                       category="SynCD/testing"),
}


def assert_consistent(workflow: dict) -> None:
    """Every link is on its origin's output list and on its target's input slot, and nothing else is."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    assert workflow["last_link_id"] >= max(links, default=0)
    for link_id, origin, slot, target, target_slot, kind in links.values():
        assert link_id in nodes[origin]["outputs"][slot]["links"], (link_id, nodes[origin])
        assert nodes[origin]["outputs"][slot]["type"] == kind
        assert nodes[target]["inputs"][target_slot]["link"] == link_id, (link_id, nodes[target])
    for node in nodes.values():
        for entry in node["inputs"]:
            assert entry["link"] is None or entry["link"] in links, (node["id"], entry)
        for output in node["outputs"]:
            assert all(link in links for link in output["links"]), (node["id"], output)


def source(workflow: dict, node_id: int, input_name: str) -> tuple[int, int] | None:
    """(origin node, origin slot) feeding ``input_name`` of node ``node_id``."""
    node = next(n for n in workflow["nodes"] if n["id"] == node_id)
    entry = next(e for e in node["inputs"] if e["name"] == input_name)
    if entry["link"] is None:
        return None
    link = next(link for link in workflow["links"] if link[0] == entry["link"])
    return link[1], link[2]


def by_id(workflow: dict) -> dict[int, dict]:
    return {n["id"]: n for n in workflow["nodes"]}


def sd_graph(ckpt="v1-5-pruned-emaonly.safetensors", family_note=None):
    """Checkpoint -> shared attention (with the optional clip) -> KSampler; external VAELoader for the decode."""
    g = UIGraph(OBJECT_INFO)
    if family_note:
        g.extra["syncd"] = {"family": family_note}
    ckpt_node = g.add("CheckpointLoaderSimple", ckpt_name=ckpt)                        # 1
    positive = g.add("CLIPTextEncode", text="a photo of a dog")                        # 2
    negative = g.add("CLIPTextEncode", text="")                                        # 3
    shared = g.add("SynCDSharedAttention")                                             # 4
    empty = g.add("EmptyLatentImage", width=1024, height=768, batch_size=3)            # 5
    sampler = g.add("KSampler", steps=50, cfg=7.5)                                     # 6
    vae = g.add("VAELoader", vae_name="sdxl_vae.safetensors")                          # 7
    decode = g.add("VAEDecode")                                                        # 8
    save = g.add("SaveImage")                                                          # 9
    g.connect(ckpt_node, 1, positive, "clip")
    g.connect(ckpt_node, 1, negative, "clip")
    g.connect(ckpt_node, 0, shared, "model")
    g.connect(ckpt_node, 1, shared, "clip")
    g.connect(shared, 0, sampler, "model")
    g.connect(positive, 0, sampler, "positive")
    g.connect(negative, 0, sampler, "negative")
    g.connect(empty, 0, sampler, "latent_image")
    g.connect(sampler, 0, decode, "samples")
    g.connect(vae, 0, decode, "vae")
    g.connect(decode, 0, save, "images")
    g.group("all", g.nodes)
    return g.to_json()


def test_checkpoint_workflow_is_swapped_in_place():
    workflow = sd_graph()
    original = json.loads(json.dumps(workflow))
    swapped, report = tiny_swap(workflow, OBJECT_INFO)
    assert workflow == original, "the input workflow must not be modified"
    assert_consistent(swapped)
    nodes = by_id(swapped)
    assert {i: n["type"] for i, n in nodes.items()} == {
        1: "SynCDTinyDemoModel", 2: "SynCDTinyDemoTextEncode", 3: "SynCDTinyDemoTextEncode",
        4: "SynCDSharedAttention", 5: "EmptyLatentImage", 6: "KSampler", 8: "VAEDecode", 9: "SaveImage"}
    assert nodes[1]["widgets_values"] == ["sd15", 0, 32]  # family inferred from the checkpoint name, defaults
    assert nodes[2]["widgets_values"] == ["sd15", "a photo of a dog", 0]
    assert nodes[3]["widgets_values"] == ["sd15", "", 0]
    assert [o["type"] for o in nodes[1]["outputs"]] == ["MODEL", "VAE"]
    assert source(swapped, 4, "model") == (1, 0)
    assert source(swapped, 8, "vae") == (1, 1), "the removed VAELoader's consumer reads the tiny model's VAE"
    assert source(swapped, 4, "clip") is None, "the optional clip input is cut"
    assert all(e["name"] != "clip" for n in (nodes[2], nodes[3]) for e in n["inputs"])
    assert nodes[5]["widgets_values"] == [64, 48, 3], "longer side to 64 px, aspect kept, batch kept"
    assert nodes[6]["widgets_values"][:4] == [0, "fixed", 4, 7.5], "steps capped, seed and cfg kept"
    assert swapped["extra"]["syncd"] == {"family": "sd15", "tiny": True}
    assert swapped["groups"] == original["groups"]
    assert any("#4 SynCDSharedAttention: disconnected its optional input 'clip'" in line for line in report)
    assert any(line.startswith("#7 VAELoader: removed") for line in report)
    assert "#6 KSampler: steps 50 -> 4" in report

    api = to_api(swapped, OBJECT_INFO)
    assert api["1"] == {"inputs": {"family": "sd15", "seed": 0, "width": 32}, "class_type": "SynCDTinyDemoModel",
                        "_meta": {"title": "SynCDTinyDemoModel"}}
    assert api["8"]["inputs"] == {"samples": ["6", 0], "vae": ["1", 1]}
    assert api["4"]["inputs"]["model"] == ["1", 0] and "clip" not in api["4"]["inputs"]
    assert api["6"]["inputs"]["steps"] == 4


def test_family_from_extra_and_from_loaders():
    assert infer_family(sd_graph(family_note="sdxl")) == "sdxl"
    assert infer_family(sd_graph("sd_xl_base_1.0.safetensors")) == "sdxl"
    assert infer_family(sd_graph("dreamshaper_8.safetensors")) == "sd15"
    swapped, _ = tiny_swap(sd_graph(family_note="sdxl"), OBJECT_INFO)
    assert {n["widgets_values"][0] for n in swapped["nodes"] if n["type"].startswith("SynCDTinyDemo")} == {"sdxl"}
    swapped, _ = tiny_swap(sd_graph(), OBJECT_INFO, family="flux")  # explicit family wins
    assert by_id(swapped)[1]["widgets_values"][0] == "flux"
    with pytest.raises(TinySwapError, match="extra.syncd.family is 'sd3'"):
        infer_family(sd_graph(family_note="sd3"))
    with pytest.raises(TinySwapError, match="cannot tell the model family"):
        infer_family({"nodes": [], "links": []})


def flux_graph():
    """UNET + DualCLIP + VAE loaders; the prompt text comes from a primitive into the encoder's text widget."""
    g = UIGraph(OBJECT_INFO)
    unet = g.add("UNETLoader", unet_name="flux1-dev.safetensors")                      # 1
    clip = g.add("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5.safetensors", type="flux")  # 2
    vae = g.add("VAELoader", vae_name="ae.safetensors")                                # 3
    prompt = g.add("PrimitiveStringMultiline", value="a dog. wide angle shot")         # 4
    encode = g.add("CLIPTextEncode", text="unused")                                    # 5
    shared = g.add("SynCDSharedAttention")                                             # 6
    sampler = g.add("KSampler", steps=3)                                               # 7
    decode = g.add("VAEDecode")                                                        # 8
    decode2 = g.add("VAEDecode")                                                       # 9
    g.connect(prompt, 0, encode, "text")
    g.connect(clip, 0, encode, "clip")
    g.connect(unet, 0, shared, "model")
    g.connect(clip, 0, shared, "clip")
    g.connect(prompt, 0, shared, "prompt")
    g.connect(shared, 0, sampler, "model")
    g.connect(encode, 0, sampler, "positive")
    g.connect(encode, 0, sampler, "negative")
    g.connect(sampler, 0, decode, "samples")
    g.connect(vae, 0, decode, "vae")
    g.connect(vae, 0, decode2, "vae")
    g.group("all", g.nodes)
    return g.to_json()


def test_flux_loaders_collapse_into_one_tiny_model():
    swapped, report = tiny_swap(flux_graph(), OBJECT_INFO)
    assert_consistent(swapped)
    nodes = by_id(swapped)
    assert 2 not in nodes and 3 not in nodes, "DualCLIPLoader and VAELoader are removed"
    assert nodes[1]["type"] == "SynCDTinyDemoModel" and nodes[1]["widgets_values"][0] == "flux"
    assert source(swapped, 8, "vae") == (1, 1) and source(swapped, 9, "vae") == (1, 1)
    assert sorted(nodes[1]["outputs"][1]["links"]) == sorted(
        nodes[i]["inputs"][1]["link"] for i in (8, 9)), "both VAE links now leave the tiny model's VAE output"
    encode = nodes[5]
    assert encode["type"] == "SynCDTinyDemoTextEncode"
    assert source(swapped, 5, "text") == (4, 0), "a linked text widget stays linked"
    assert next(e for e in encode["inputs"] if e["name"] == "text")["widget"] == {"name": "text"}
    assert source(swapped, 6, "prompt") == (4, 0) and source(swapped, 6, "clip") is None
    assert nodes[7]["widgets_values"][2] == 3, "steps below the cap are kept"
    api = to_api(swapped, OBJECT_INFO)
    assert api["5"]["inputs"]["text"] == ["4", 0] and api["5"]["inputs"]["family"] == "flux"
    assert "#2 DualCLIPLoader: removed (the tiny text encoder needs no CLIP)" in report


def ip_adapter_graph(with_ipadapter_input: bool = True):
    """SDXL customization shape: SynCD checkpoint between the base model and the IP-Adapter apply."""
    g = UIGraph(OBJECT_INFO)
    g.extra["syncd"] = {"family": "sdxl"}
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="terminus.safetensors")           # 1
    ip_loader = g.add("SynCDIPAdapterLoader", ipadapter_name="ip-adapter-plus_sdxl_vit-h.safetensors")  # 2
    vision = g.add("CLIPVisionLoader", clip_name="vit-h.safetensors")                  # 3
    syncd = g.add("SynCDCheckpointLoader", checkpoint_name="sdxl_finetuned_20k.ckpt")  # 4
    image = g.add("LoadImage", image="ref.png")                                        # 5
    mask = g.add("LoadImageMask", image="ref_mask.png", channel="red")                 # 6
    scale = g.add("ImageScale", width=1024, height=1024)                               # 7
    refs = g.add("SynCDReferenceImages")                                               # 8
    apply = g.add("SynCDIPAdapterApply")                                               # 9
    g.connect(ckpt, 0, syncd, "model")
    if with_ipadapter_input:
        g.connect(ip_loader, 0, syncd, "ipadapter")
    g.connect(syncd, 0, apply, "model")
    g.connect(syncd, 1, apply, "ipadapter")
    g.connect(vision, 0, apply, "clip_vision")
    g.connect(image, 0, scale, "image")
    g.connect(scale, 0, apply, "image")
    g.connect(scale, 0, refs, "images")
    g.connect(mask, 0, refs, "masks")
    g.connect(ckpt, 2, refs, "vae")
    g.group("all", g.nodes)
    return g.to_json()


def test_ip_adapter_checkpoint_and_images():
    swapped, report = tiny_swap(ip_adapter_graph(), OBJECT_INFO)
    assert_consistent(swapped)
    nodes = by_id(swapped)
    assert 3 not in nodes and 4 not in nodes, "CLIPVisionLoader and SynCDCheckpointLoader are removed"
    assert nodes[2]["type"] == "SynCDTinyDemoIPAdapter"
    assert source(swapped, 2, "model") == (1, 0), "the tiny IP-Adapter is fitted to the tiny model"
    assert source(swapped, 9, "model") == (1, 0), "the SynCD checkpoint passes its model through"
    assert source(swapped, 9, "ipadapter") == (2, 0), "... and the IP-Adapter it was given"
    assert source(swapped, 9, "clip_vision") == (2, 1)
    assert nodes[5]["type"] == nodes[6]["type"] == "SynCDTinyDemoReferences"
    assert nodes[5]["widgets_values"] == [1, 64, 0] == nodes[6]["widgets_values"]
    assert source(swapped, 7, "image") == (5, 0)
    assert source(swapped, 8, "masks") == (6, 1), "LoadImageMask's MASK (slot 0) becomes the demo MASK (slot 1)"
    assert nodes[7]["widgets_values"] == ["nearest-exact", 64, 64, "disabled"]
    assert "#4 SynCDCheckpointLoader: removed; MODEL and IPADAPTER pass through" in report
    api = to_api(swapped, OBJECT_INFO)
    assert api["9"]["inputs"]["ipadapter"] == ["2", 0] and api["9"]["inputs"]["clip_vision"] == ["2", 1]
    assert api["2"]["inputs"] == {"seed": 0, "model": ["1", 0]}


def test_refusals():
    with pytest.raises(TinySwapError, match="its 'ipadapter' input is not connected"):
        tiny_swap(ip_adapter_graph(with_ipadapter_input=False), OBJECT_INFO)
    api = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}}}
    with pytest.raises(TinySwapError, match="API format"):
        tiny_swap(api, OBJECT_INFO)
    # a required CLIP input the tiny models cannot feed
    g = UIGraph(OBJECT_INFO)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="v1-5.safetensors")
    skip = g.add("CLIPSetLastLayer")
    g.connect(ckpt, 1, skip, "clip")
    with pytest.raises(TinySwapError, match="#2 CLIPSetLastLayer input 'clip' needs the CLIP of #1"):
        tiny_swap(g.to_json(left=g.nodes), OBJECT_INFO)
    info = {k: v for k, v in OBJECT_INFO.items() if k != "SynCDTinyDemoModel"}
    with pytest.raises(TinySwapError, match="the server has no SynCDTinyDemoModel node"):
        tiny_swap(sd_graph(), info)


def test_bypassed_loader_is_left_alone():
    workflow = sd_graph()
    by_id(workflow)[7]["mode"] = 4  # the VAELoader is bypassed: the frontend and the converter skip it
    swapped, _ = tiny_swap(workflow, OBJECT_INFO)
    assert by_id(swapped)[7]["type"] == "VAELoader"


def test_pure_module(tmp_path):
    """Importable without ComfyUI: the browser test and the command line use it before any server exists."""
    probe = ("import sys, comfyui_syncd.client.tiny_swap, comfyui_syncd.client.ui_graph; "
             "print([m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'torch')])")
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_widget_values_follow_the_definitions():
    """Defaults from the definition, explicit values by name, the editor's extra entries (seed control,
    the image upload button), and errors for unknown names or a model file without a value."""
    from comfyui_syncd.client.ui_graph import WidgetError, build_widgets_values

    assert build_widgets_values("KSampler", OBJECT_INFO["KSampler"], {"steps": 30}) == [0, "fixed", 30, 8.0]
    assert build_widgets_values("LoadImage", OBJECT_INFO["LoadImage"], {"image": "a.png"}) == ["a.png", "image"]
    assert build_widgets_values("UNETLoader", OBJECT_INFO["UNETLoader"], {"unet_name": "f.safetensors"}) == [
        "f.safetensors", "default"]
    with pytest.raises(WidgetError, match="KSampler has no widget inputs \\['stepz'\\]"):
        build_widgets_values("KSampler", OBJECT_INFO["KSampler"], {"stepz": 3})
    with pytest.raises(WidgetError, match="CheckpointLoaderSimple.ckpt_name has no default"):
        build_widgets_values("CheckpointLoaderSimple", OBJECT_INFO["CheckpointLoaderSimple"], {})

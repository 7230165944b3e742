"""``client/toy_swap.py`` on a hand-made Flux data-generation graph: loaders become one toy-world model, the
text encoders stay on its CLIP, the zeroed negative becomes the empty prompt, sizes/steps/cfg follow the toy
model, and what the toy model cannot run is refused."""

from __future__ import annotations

import pytest

from comfyui_syncd.client.tiny_swap import TinySwapError
from comfyui_syncd.client.toy_swap import CFG, SHIPPED_CHOICE, SHIPPED_DEPTH_CHOICE, SIZE, STEPS, toy_swap
from comfyui_syncd.client.ui_graph import UIGraph
from comfyui_syncd.client.workflow_format import to_api

pytestmark = pytest.mark.unit


def node_def(required: dict, outputs: list[str], optional: dict | None = None) -> dict:
    return {"input": {"required": required, "optional": optional or {}},
            "input_order": {"required": list(required), "optional": list(optional or {})},
            "output": outputs, "output_name": outputs, "category": "test"}


OBJECT_INFO = {
    "UNETLoader": node_def({"unet_name": [[]], "weight_dtype": [["default"]]}, ["MODEL"]),
    "DualCLIPLoader": node_def({"clip_name1": [[]], "clip_name2": [[]], "type": [["flux"]]}, ["CLIP"]),
    "VAELoader": node_def({"vae_name": [[]]}, ["VAE"]),
    "CLIPTextEncode": node_def({"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}, ["CONDITIONING"]),
    "SynCDPromptBatch": node_def({"clip": ["CLIP"], "text": ["STRING", {"multiline": True}]},
                                 ["CONDITIONING", "STRING"]),
    "FluxGuidance": node_def({"conditioning": ["CONDITIONING"], "guidance": ["FLOAT", {"default": 3.5}]},
                             ["CONDITIONING"]),
    "ConditioningZeroOut": node_def({"conditioning": ["CONDITIONING"]}, ["CONDITIONING"]),
    "SynCDSharedAttention": node_def({"model": ["MODEL"], "images_per_subject": ["INT", {"default": 3}]}, ["MODEL"],
                                     optional={"clip": ["CLIP"], "prompt": ["STRING", {"default": ""}],
                                               "mask_dilation": ["INT", {"default": 9}]}),
    "EmptySD3LatentImage": node_def({"width": ["INT", {"default": 1024}], "height": ["INT", {"default": 1024}],
                                     "batch_size": ["INT", {"default": 1}]}, ["LATENT"]),
    "KSampler": node_def({"model": ["MODEL"], "seed": ["INT", {"default": 0, "control_after_generate": True}],
                          "steps": ["INT", {"default": 20}], "cfg": ["FLOAT", {"default": 8.0}],
                          "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
                          "latent_image": ["LATENT"]}, ["LATENT"]),
    "VAEDecode": node_def({"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"]),
    "SaveImage": node_def({"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}, []),
    "InstructPixToPixConditioning": node_def({"positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
                                              "vae": ["VAE"], "pixels": ["IMAGE"]},
                                             ["CONDITIONING", "CONDITIONING", "LATENT"]),
    "SynCDToyWorldModel": node_def({"model_file": [[SHIPPED_CHOICE, "mine.safetensors"]]}, ["MODEL", "CLIP", "VAE"]),
    "SynCDMeshViews": node_def({"mesh": [["pack/mug.glb"]], "width": ["INT", {"default": 512}]},
                               ["IMAGE", "MASK", "SYNCD_CORRESPONDENCES", "STRING"]),
    "SynCDToyWorldMeshViews": node_def({"shape": [["cube", "cone"]], "views": ["INT", {"default": 3}],
                                        "size": ["INT", {"default": 128}],
                                        "seed": ["INT", {"default": 0, "control_after_generate": True}]},
                                       ["IMAGE", "MASK", "SYNCD_CORRESPONDENCES", "STRING"]),
    "LoadImage": node_def({"image": [["ref_1.png", "ref_2.png"]]}, ["IMAGE", "MASK"]),
    "LoadImageMask": node_def({"image": [["ref_1.png", "ref_2.png"]], "channel": [["alpha", "red"]]}, ["MASK"]),
    "ImageBatch": node_def({"image1": ["IMAGE"], "image2": ["IMAGE"]}, ["IMAGE"]),
    "MaskComposite": node_def({"destination": ["MASK"], "source": ["MASK"]}, ["MASK"]),
    "BasicScheduler": node_def({"model": ["MODEL"], "scheduler": [["normal", "ddim_uniform"]],
                                "steps": ["INT", {"default": 20}], "denoise": ["FLOAT", {"default": 1.0}]},
                               ["SIGMAS"]),
    "ModelSamplingAuraFlow": node_def({"model": ["MODEL"], "shift": ["FLOAT", {"default": 3.1}]}, ["MODEL"]),
    "SynCDToyWorldReferences": node_def({
        "shape": [["cube", "cone"]], "colour": [["red", "blue"]], "texture": [["plain", "striped"]],
        "views": ["INT", {"default": 3}], "index": ["INT", {"default": -1}], "size": ["INT", {"default": 64}],
        "seed": ["INT", {"default": 0, "control_after_generate": False}]}, ["IMAGE", "MASK"]),
}


def flux_datagen(depth: bool = False) -> dict:
    g = UIGraph(OBJECT_INFO)
    unet = g.add("UNETLoader", unet_name="flux1-dev.safetensors")                     # 1
    clip = g.add("DualCLIPLoader", clip_name1="clip_l", clip_name2="t5", type="flux")  # 2
    vae = g.add("VAELoader", vae_name="ae.safetensors")                                # 3
    prompts = g.add("SynCDPromptBatch", text="a cube on grass\na cube in the snow")     # 4
    guided = g.add("FluxGuidance")                                                     # 5
    zero = g.add("ConditioningZeroOut")                                                # 6
    shared = g.add("SynCDSharedAttention")                                             # 7
    empty = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=3)        # 8
    sampler = g.add("KSampler", steps=50, cfg=1.0)                                     # 9
    decode = g.add("VAEDecode")                                                        # 10
    save = g.add("SaveImage")                                                          # 11
    g.connect(clip, 0, prompts, "clip")
    g.connect(prompts, 0, guided, "conditioning")
    g.connect(prompts, 0, zero, "conditioning")
    g.connect(unet, 0, shared, "model")
    g.connect(clip, 0, shared, "clip")
    g.connect(prompts, 1, shared, "prompt")
    g.connect(shared, 0, sampler, "model")
    g.connect(guided, 0, sampler, "positive")
    g.connect(zero, 0, sampler, "negative")
    g.connect(empty, 0, sampler, "latent_image")
    g.connect(sampler, 0, decode, "samples")
    g.connect(vae, 0, decode, "vae")
    g.connect(decode, 0, save, "images")
    if depth:
        views = g.add("SynCDMeshViews")                                               # 12
        ip2p = g.add("InstructPixToPixConditioning")                                   # 13
        g.connect(views, 0, ip2p, "pixels")
        g.connect(vae, 0, ip2p, "vae")
        g.connect(guided, 0, ip2p, "positive")
        g.connect(zero, 0, ip2p, "negative")
    g.group("all", g.nodes)
    workflow = g.to_json()
    for node in workflow["nodes"]:
        if node["type"] == "SynCDMeshViews":
            node["properties"]["syncd_datagen"] = "mesh"
    return workflow


def test_flux_datagen_runs_on_the_toy_model():
    swapped, report = toy_swap(flux_datagen(), OBJECT_INFO)
    api = to_api(swapped, OBJECT_INFO)
    assert "2" not in api and "3" not in api, "the CLIP and VAE loaders fold into the toy model"
    assert api["1"]["class_type"] == "SynCDToyWorldModel" and api["1"]["inputs"] == {"model_file": SHIPPED_CHOICE}
    assert api["4"]["inputs"]["clip"] == ["1", 1] and api["7"]["inputs"]["clip"] == ["1", 1]
    assert api["7"]["inputs"]["model"] == ["1", 0] and api["10"]["inputs"]["vae"] == ["1", 2]
    assert api["4"]["inputs"]["text"] == "a cube on grass\na cube in the snow"
    assert api["6"]["class_type"] == "CLIPTextEncode" and api["6"]["inputs"] == {"text": "", "clip": ["1", 1]}
    assert (api["8"]["inputs"]["width"], api["8"]["inputs"]["height"]) == (SIZE, SIZE) == (128, 128)
    assert api["9"]["inputs"]["steps"] == STEPS and api["9"]["inputs"]["cfg"] == CFG
    assert swapped["extra"]["syncd"]["toy"] == SHIPPED_CHOICE
    assert any("ConditioningZeroOut" in line for line in report)


def test_other_model_file_and_refusals():
    swapped, _ = toy_swap(flux_datagen(), OBJECT_INFO, model_file="mine.safetensors", steps=7, cfg=3.0)
    api = to_api(swapped, OBJECT_INFO)
    assert api["1"]["inputs"]["model_file"] == "mine.safetensors" and api["9"]["inputs"]["steps"] == 7
    with pytest.raises(TinySwapError, match="not on the server"):
        toy_swap(flux_datagen(), OBJECT_INFO, model_file="missing.safetensors")
    with pytest.raises(TinySwapError, match="depth conditioning"):
        toy_swap(flux_datagen(depth=True), OBJECT_INFO)
    without = {k: v for k, v in OBJECT_INFO.items() if k != "SynCDToyWorldModel"}
    with pytest.raises(TinySwapError, match="SynCDToyWorldModel"):
        toy_swap(flux_datagen(), without)


def test_rigid_datagen_runs_on_a_depth_conditioned_toy_model():
    swapped, report = toy_swap(flux_datagen(depth=True), OBJECT_INFO, model_file="mine.safetensors", depth=True)
    api = to_api(swapped, OBJECT_INFO)
    assert api["12"]["class_type"] == "SynCDToyWorldMeshViews" and api["12"]["inputs"]["size"] == SIZE
    assert api["13"]["class_type"] == "InstructPixToPixConditioning"
    assert api["13"]["inputs"]["pixels"] == ["12", 0] and api["13"]["inputs"]["vae"] == ["1", 2]
    views = next(n for n in swapped["nodes"] if n["id"] == 12)
    assert views["properties"]["syncd_datagen"] == "seed", "no mesh file for a toy solid: the object's seed poses it"
    assert any("SynCDMeshViews" in line for line in report)
    plain, _ = toy_swap(flux_datagen(), OBJECT_INFO, depth=True)  # depth=True on a workflow without depth: as before
    assert to_api(plain, OBJECT_INFO) == to_api(toy_swap(flux_datagen(), OBJECT_INFO)[0], OBJECT_INFO)


def test_foreground_mask_dilation_keeps_upstreams_share_of_the_token_grid():
    from comfyui_syncd.client.toy_swap import scaled_dilation

    assert [scaled_dilation(9, g) for g in (8, 16, 32, 64)] == [3, 5, 9, 19]  # upstream: 9 on Flux's 32x32 tokens
    assert scaled_dilation(1, 8) == 1
    for size, expected in ((128, 5), (64, 3)):
        swapped, report = toy_swap(flux_datagen(), OBJECT_INFO, size=size)
        assert to_api(swapped, OBJECT_INFO)["7"]["inputs"]["mask_dilation"] == expected
        assert any(f"mask_dilation 9 -> {expected}" in line for line in report)


def test_demo_swap_prefers_the_toy_model_and_falls_back_to_the_random_tiny_models():
    from comfyui_syncd.client.toy_swap import demo_swap

    family = ["COMBO", {"options": ["sd15", "sdxl", "flux"], "default": "sd15"}]
    seed = ["INT", {"default": 0, "control_after_generate": False}]
    info = {**OBJECT_INFO,
            "SynCDTinyDemoModel": node_def({"family": family, "seed": seed}, ["MODEL", "VAE"]),
            "SynCDTinyDemoPromptBatch": node_def({"family": family, "text": ["STRING", {"multiline": True}],
                                                  "prompt_per_image": ["BOOLEAN", {"default": True}]},
                                                 ["CONDITIONING", "STRING"])}
    swapped, _, which = demo_swap(flux_datagen(), info)
    assert which == "the toy-world model" and to_api(swapped, info)["1"]["class_type"] == "SynCDToyWorldModel"
    swapped, report, which = demo_swap(flux_datagen(), info, random_only=True)
    assert which == "the tiny demo models" and to_api(swapped, info)["1"]["class_type"] == "SynCDTinyDemoModel"
    swapped, report, which = demo_swap(flux_datagen(depth=True), info)
    assert which == "the tiny demo models" and "depth conditioning" in report[0]
    with_depth = {**info, "SynCDToyWorldModel": node_def(
        {"model_file": [[SHIPPED_CHOICE, SHIPPED_DEPTH_CHOICE]]}, ["MODEL", "CLIP", "VAE"])}
    swapped, report, which = demo_swap(flux_datagen(depth=True), with_depth)
    api = to_api(swapped, with_depth)
    assert which == "the depth-conditioned toy-world model" and api["1"]["inputs"]["model_file"] == SHIPPED_DEPTH_CHOICE
    assert api["12"]["class_type"] == "SynCDToyWorldMeshViews"
    assert to_api(demo_swap(flux_datagen(), with_depth)[0], with_depth)["1"]["inputs"]["model_file"] == SHIPPED_CHOICE
    not_shipped = {**info, "SynCDToyWorldModel": node_def({"model_file": [["mine.safetensors"]]},
                                                           ["MODEL", "CLIP", "VAE"])}
    assert demo_swap(flux_datagen(), not_shipped)[2] == "the tiny demo models"


def test_image_loaders_become_views_of_one_rendered_toy_object():
    g = UIGraph(OBJECT_INFO)
    g.add("UNETLoader", unet_name="flux1-dev.safetensors")                             # 1
    first = g.add("LoadImage", image="ref_1.png")                                       # 2
    second = g.add("LoadImage", image="ref_2.png")                                      # 3
    mask = g.add("LoadImageMask", image="ref_1.png", channel="alpha")                   # 4
    batch = g.add("ImageBatch")                                                         # 5
    masks = g.add("MaskComposite")                                                      # 6
    g.connect(first, 0, batch, "image1")
    g.connect(second, 0, batch, "image2")
    g.connect(second, 1, masks, "destination")
    g.connect(mask, 0, masks, "source")
    g.group("all", g.nodes)
    swapped, report = toy_swap(g.to_json(), OBJECT_INFO)
    api = to_api(swapped, OBJECT_INFO)
    assert {api[k]["class_type"] for k in ("2", "3", "4")} == {"SynCDToyWorldReferences"}
    views = {k: (api[k]["inputs"]["views"], api[k]["inputs"]["index"]) for k in ("2", "3", "4")}
    assert views == {"2": (2, 0), "3": (2, 1), "4": (1, 0)}  # the k-th image file -> view k of the same object
    assert all(api[k]["inputs"]["size"] == SIZE and api[k]["inputs"]["seed"] == 0 for k in ("2", "3", "4"))
    assert api["5"]["inputs"] == {"image1": ["2", 0], "image2": ["3", 0]}
    assert api["6"]["inputs"] == {"destination": ["3", 1], "source": ["4", 1]}  # LoadImageMask's MASK is slot 1
    assert sum("rendered toy object" in line for line in report) == 3


def test_flow_schedules_are_refused():
    g = UIGraph(OBJECT_INFO)
    unet = g.add("UNETLoader", unet_name="qwen_image.safetensors")
    shift = g.add("ModelSamplingAuraFlow")
    g.connect(unet, 0, shift, "model")
    g.group("all", g.nodes)
    with pytest.raises(TinySwapError, match="flow schedule"):
        toy_swap(g.to_json(), OBJECT_INFO)


def test_custom_sampling_schedules_get_the_toy_models_steps():
    g = UIGraph(OBJECT_INFO)
    unet = g.add("UNETLoader", unet_name="sd15.safetensors")
    schedule = g.add("BasicScheduler", scheduler="ddim_uniform", steps=200)
    g.connect(unet, 0, schedule, "model")
    g.group("all", g.nodes)
    swapped, report = toy_swap(g.to_json(), OBJECT_INFO, steps=12)
    api = to_api(swapped, OBJECT_INFO)
    assert api["2"]["inputs"]["steps"] == 12 and api["2"]["inputs"]["scheduler"] == "ddim_uniform"
    assert "#2 BasicScheduler: steps 200 -> 12" in report

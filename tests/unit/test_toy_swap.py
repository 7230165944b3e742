"""``client/toy_swap.py`` on a hand-made Flux data-generation graph: loaders become one toy-world model, the
text encoders stay on its CLIP, the zeroed negative becomes the empty prompt, sizes/steps/cfg follow the toy
model, flow shifts are bypassed, and what the toy model cannot run is refused."""

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
    "ModelSamplingFlux": node_def({"model": ["MODEL"], "max_shift": ["FLOAT", {"default": 1.15}]}, ["MODEL"]),
    "SynCDNormalizedGuider": node_def({"model": ["MODEL"], "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
                                       "text_scale": ["FLOAT", {"default": 7.5}],
                                       "image_scale_start": ["FLOAT", {"default": 8.0}],
                                       "image_scale_end": ["FLOAT", {"default": 13.0}]}, ["GUIDER"]),
    "SynCDToyWorldReferences": node_def({
        "shape": [["cube", "cone"]], "colour": [["red", "blue"]], "texture": [["plain", "striped"]],
        "views": ["INT", {"default": 3}], "index": ["INT", {"default": -1}], "size": ["INT", {"default": 64}],
        "seed": ["INT", {"default": 0, "control_after_generate": False}]}, ["IMAGE", "MASK"]),
    # the SDXL customization workflow's loaders and what the toy customization model puts in their place
    "CheckpointLoaderSimple": node_def({"ckpt_name": [[]]}, ["MODEL", "CLIP", "VAE"]),
    "ModelSamplingDiscrete": node_def({"model": ["MODEL"], "sampling": [["eps", "v_prediction"]],
                                       "zsnr": ["BOOLEAN", {"default": False}]}, ["MODEL"]),
    "SynCDCheckpointLoader": node_def({"model": ["MODEL"], "checkpoint_name": ["COMBO", {"options": []}],
                                       "strength": ["FLOAT", {"default": 1.0}]}, ["MODEL", "IPADAPTER"],
                                      optional={"ipadapter": ["IPADAPTER"]}),
    "SynCDIPAdapterLoader": node_def({"ipadapter_name": ["COMBO", {"options": []}]}, ["IPADAPTER"]),
    "CLIPVisionLoader": node_def({"clip_name": [[]]}, ["CLIP_VISION"]),
    "SynCDIPAdapterApply": node_def({"model": ["MODEL"], "ipadapter": ["IPADAPTER"], "clip_vision": ["CLIP_VISION"],
                                     "image": ["IMAGE"], "weight": ["FLOAT", {"default": 0.6}]}, ["MODEL"]),
    "SynCDReferenceImages": node_def({"images": ["IMAGE"], "vae": ["VAE"]}, ["SYNCD_REFERENCES"],
                                     optional={"masks": ["MASK"]}),
    "SynCDApplyReferences": node_def({"model": ["MODEL"], "references": ["SYNCD_REFERENCES"],
                                      "reference_conditioning": ["CONDITIONING"]}, ["MODEL"]),
    "SynCDToyWorldCheckpoint": node_def({"model": ["MODEL"], "model_file": [["toy_syncd (shipped)", "mine.safetensors"]],
                                         "strength": ["FLOAT", {"default": 1.0}]}, ["MODEL", "IPADAPTER"],
                                        optional={"ipadapter": ["IPADAPTER"]}),
    "SynCDToyWorldIPAdapter": node_def({"model_file": [["toy_syncd (shipped)", "mine.safetensors"]]}, ["IPADAPTER"]),
    "SynCDToyWorldCLIPVision": node_def({"model_file": [["toy_syncd (shipped)", "mine.safetensors"]]},
                                        ["CLIP_VISION"]),
    "SynCDIdentityModelLoader": node_def({"model": [["dinov2-large"]]}, ["SYNCD_SCORE_MODEL"]),
    "SynCDIdentityScore": node_def({"images": ["IMAGE"], "references": ["IMAGE"], "score_model": ["SYNCD_SCORE_MODEL"],
                                    "metric": [["mdinov2_i", "dinov2_i", "toy_identity"]]},
                                   ["FLOAT", "FLOAT", "STRING"]),
    "SynCDToyWorldScoreModel": node_def({}, ["SYNCD_SCORE_MODEL"]),
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


def flux_customization(references: bool = True) -> dict:
    """The shape of the shipped Flux customization workflow: SynCD checkpoint on the UNet (no IP-Adapter), the
    flow shift after SynCD Apply References, FluxGuidance on both prompts, a style negative, upstream's Flux scales."""
    g = UIGraph(OBJECT_INFO)
    unet = g.add("UNETLoader", unet_name="flux1-dev.safetensors")                            # 1
    clip = g.add("DualCLIPLoader", clip_name1="clip_l", clip_name2="t5", type="flux")         # 2
    vae = g.add("VAELoader", vae_name="ae.safetensors")                                       # 3
    syncd = g.add("SynCDCheckpointLoader", checkpoint_name="pytorch_model.bin")               # 4
    shift = g.add("ModelSamplingFlux")                                                        # 5
    image = g.add("LoadImage", image="ref_1.png") if references else g.add("VAEDecode")       # 6
    refs = g.add("SynCDReferenceImages")                                                      # 7
    prompt = g.add("CLIPTextEncode", text="An action figure on top of a mountain")           # 8
    negative = g.add("CLIPTextEncode", text="3d render, cartoon, blurry")                    # 9
    flux_pos, flux_neg = g.add("FluxGuidance"), g.add("FluxGuidance")                         # 10, 11
    apply_refs = g.add("SynCDApplyReferences")                                                # 12
    guider = g.add("SynCDNormalizedGuider", text_scale=1.5, image_scale_start=1.0, image_scale_end=1.0)  # 13
    g.connect(unet, 0, syncd, "model")
    if references:
        g.connect(image, 0, refs, "images")
        g.connect(image, 1, refs, "masks")
    g.connect(vae, 0, refs, "vae")
    for text, flux in ((prompt, flux_pos), (negative, flux_neg)):
        g.connect(clip, 0, text, "clip")
        g.connect(text, 0, flux, "conditioning")
    g.connect(syncd, 0, apply_refs, "model")
    g.connect(refs, 0, apply_refs, "references")
    g.connect(flux_pos, 0, apply_refs, "reference_conditioning")
    g.connect(apply_refs, 0, shift, "model")
    g.connect(shift, 0, guider, "model")
    g.connect(flux_pos, 0, guider, "positive")
    g.connect(flux_neg, 0, guider, "negative")
    g.group("all", g.nodes)
    return g.to_json()


def test_flux_customization_runs_on_the_toy_customization_model():
    """No toy DiT: the flow shift and FluxGuidance are bypassed, the guider gets its default (SDXL) scales, the
    style negative becomes the empty prompt; the toy checkpoint takes its own IP-Adapter (none is connected)."""
    from comfyui_syncd.client.toy_swap import SCENE_PROMPTS

    swapped, report = toy_swap(flux_customization(), OBJECT_INFO)
    api = to_api(swapped, OBJECT_INFO)
    assert not {"5", "10", "11"} & set(api), "ModelSamplingFlux and both FluxGuidance are bypassed"
    assert api["13"]["inputs"]["model"] == ["12", 0] and api["12"]["inputs"]["model"] == ["4", 0]
    assert api["13"]["inputs"]["positive"] == ["8", 0] and api["13"]["inputs"]["negative"] == ["9", 0]
    assert {k: api["13"]["inputs"][k] for k in ("text_scale", "image_scale_start", "image_scale_end")} == \
        {"text_scale": 7.5, "image_scale_start": 8.0, "image_scale_end": 13.0}
    assert (api["4"]["class_type"], api["4"]["inputs"]) == ("SynCDToyWorldCheckpoint", {
        "model_file": "toy_syncd (shipped)", "strength": 1.0, "model": ["1", 0]})
    assert api["9"]["inputs"]["text"] == "" and api["8"]["inputs"]["text"] == SCENE_PROMPTS[0]
    assert "#5 ModelSamplingFlux: bypassed (Flux's flow shift; the toy model keeps its own ε-prediction " \
           "schedule)" in report
    assert "#9 CLIPTextEncode: prompt '3d render, cartoon, blurry' -> '' (the toy models' unconditional)" in report
    assert any(line.startswith("#13 SynCDNormalizedGuider: text_scale 1.5 -> 7.5, image_scale_start 1.0 -> 8.0, "
                               "image_scale_end 1.0 -> 13.0") for line in report)
    # without toy references no prompt is rewritten (the negative neither); an SD graph keeps its own scales
    kept = to_api(toy_swap(flux_customization(references=False), OBJECT_INFO)[0], OBJECT_INFO)
    assert kept["9"]["inputs"]["text"] == "3d render, cartoon, blurry"
    sdxl = UIGraph(OBJECT_INFO)
    sdxl.add("CheckpointLoaderSimple", ckpt_name="sdxl.safetensors")
    sdxl.add("SynCDNormalizedGuider", text_scale=3.0)
    sdxl.group("all", sdxl.nodes)
    assert to_api(toy_swap(sdxl.to_json(), OBJECT_INFO)[0], OBJECT_INFO)["2"]["inputs"]["text_scale"] == 3.0


def test_qwen_image_flow_shift_is_bypassed():
    g = UIGraph(OBJECT_INFO)
    unet = g.add("UNETLoader", unet_name="qwen_image.safetensors")
    shift = g.add("ModelSamplingAuraFlow")
    guider = g.add("SynCDNormalizedGuider", text_scale=2.5, image_scale_start=1.0, image_scale_end=1.0)
    g.connect(unet, 0, shift, "model")
    g.connect(shift, 0, guider, "model")
    g.group("all", g.nodes)
    swapped, report = toy_swap(g.to_json(), OBJECT_INFO)
    api = to_api(swapped, OBJECT_INFO)
    assert "2" not in api and api["3"]["inputs"]["model"] == ["1", 0] and api["3"]["inputs"]["text_scale"] == 7.5
    assert "#2 ModelSamplingAuraFlow: bypassed (Qwen-Image's flow shift; the toy model keeps its own ε-prediction " \
           "schedule)" in report


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


def sdxl_customization() -> dict:
    """The shape of the shipped SDXL customization workflow: v-prediction base, SynCD checkpoint between the base
    model and the IP-Adapter apply, a reference image, the prompt and the reference prompt."""
    g = UIGraph(OBJECT_INFO)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="terminus-xl-gamma-v1.safetensors")   # 1
    vpred = g.add("ModelSamplingDiscrete", sampling="v_prediction", zsnr=True)              # 2
    ip_loader = g.add("SynCDIPAdapterLoader", ipadapter_name="ip-adapter-plus_sdxl_vit-h.safetensors")  # 3
    vision = g.add("CLIPVisionLoader", clip_name="CLIP-ViT-H-14.safetensors")              # 4
    syncd = g.add("SynCDCheckpointLoader", checkpoint_name="sdxl_finetuned_20k.ckpt")      # 5
    image = g.add("LoadImage", image="ref_1.png")                                           # 6
    refs = g.add("SynCDReferenceImages")                                                    # 7
    prompt = g.add("CLIPTextEncode", text="An action figure riding a motorcycle")           # 8
    ref_prompt = g.add("CLIPTextEncode", text="photo of a action figure")                   # 9
    negative = g.add("ConditioningZeroOut")                                                 # 10
    apply_refs = g.add("SynCDApplyReferences")                                              # 11
    apply_ip = g.add("SynCDIPAdapterApply")                                                 # 12
    g.connect(ckpt, 0, vpred, "model")
    g.connect(vpred, 0, syncd, "model")
    g.connect(ip_loader, 0, syncd, "ipadapter")
    g.connect(image, 0, refs, "images")
    g.connect(image, 1, refs, "masks")
    g.connect(ckpt, 2, refs, "vae")
    for text in (prompt, ref_prompt):
        g.connect(ckpt, 1, text, "clip")
    g.connect(prompt, 0, negative, "conditioning")
    g.connect(syncd, 0, apply_refs, "model")
    g.connect(refs, 0, apply_refs, "references")
    g.connect(ref_prompt, 0, apply_refs, "reference_conditioning")
    g.connect(apply_refs, 0, apply_ip, "model")
    g.connect(syncd, 1, apply_ip, "ipadapter")
    g.connect(vision, 0, apply_ip, "clip_vision")
    g.connect(image, 0, apply_ip, "image")
    g.group("all", g.nodes)
    return g.to_json()


def test_sdxl_customization_runs_on_the_toy_customization_model():
    from comfyui_syncd.client.toy_swap import REFERENCE_PROMPT, SCENE_PROMPTS

    swapped, report = toy_swap(sdxl_customization(), OBJECT_INFO, customization_file="mine.safetensors")
    api = to_api(swapped, OBJECT_INFO)
    assert "2" not in api, "ModelSamplingDiscrete (v-prediction) is bypassed: the toy model is ε-prediction"
    assert (api["5"]["class_type"], api["5"]["inputs"]) == ("SynCDToyWorldCheckpoint", {
        "model_file": "mine.safetensors", "strength": 1.0, "model": ["1", 0], "ipadapter": ["3", 0]})
    assert (api["3"]["class_type"], api["3"]["inputs"]) == ("SynCDToyWorldIPAdapter", {"model_file": "mine.safetensors"})
    assert (api["4"]["class_type"], api["4"]["inputs"]) == ("SynCDToyWorldCLIPVision", {"model_file": "mine.safetensors"})
    assert api["12"]["inputs"]["ipadapter"] == ["5", 1] and api["12"]["inputs"]["clip_vision"] == ["4", 0]
    assert api["6"]["class_type"] == "SynCDToyWorldReferences" and api["6"]["inputs"]["shape"] == "cube"
    assert api["9"]["inputs"]["text"] == REFERENCE_PROMPT == "photo of a cube"   # into reference_conditioning
    assert api["8"]["inputs"]["text"] == SCENE_PROMPTS[0] and "cube" in SCENE_PROMPTS[0]
    assert (api["10"]["class_type"], api["10"]["inputs"]) == ("CLIPTextEncode", {"text": "", "clip": ["1", 1]}), \
        "the zeroed negative becomes the empty prompt: the toy models' unconditional (captions dropped to '')"
    assert "#2 ModelSamplingDiscrete: bypassed (the toy model keeps its own ε-prediction schedule)" in report
    assert "#5 SynCDToyWorldCheckpoint: was SynCDCheckpointLoader (toy-world customization model " \
           "mine.safetensors)" in report
    shipped, _ = toy_swap(sdxl_customization(), OBJECT_INFO)
    assert to_api(shipped, OBJECT_INFO)["3"]["inputs"]["model_file"] == "toy_syncd (shipped)"
    from comfyui_syncd.client.toy_swap import demo_swap

    assert demo_swap(sdxl_customization(), OBJECT_INFO)[2] == "the toy-world customization model"


def test_consistent_set_prompts_name_the_toy_subject():
    from comfyui_syncd.client.toy_swap import SCENE_PROMPTS

    info = {**OBJECT_INFO, "PrimitiveStringMultiline": node_def({"value": ["STRING", {"multiline": True}]},
                                                                ["STRING"]),
            "SynCDSharedAttention": node_def({"model": ["MODEL"], "images_per_subject": ["INT", {"default": 3}]},
                                             ["MODEL"], optional={"subject_word": ["STRING", {"default": ""}]})}
    g = UIGraph(info)
    g.add("UNETLoader", unet_name="sd15.safetensors")                                    # 1
    g.add("LoadImage", image="ref_1.png")                                                # 2
    g.add("PrimitiveStringMultiline", value="a toy robot on a desk\na toy robot in a park")  # 3
    g.add("SynCDSharedAttention", subject_word="toy robot")                              # 4
    g.group("all", g.nodes)
    swapped, report = toy_swap(g.to_json(), info)
    api = to_api(swapped, info)
    assert api["3"]["inputs"]["value"] == "\n".join(SCENE_PROMPTS[:2])   # one toy scene per line
    assert api["4"]["inputs"]["subject_word"] == "cube"
    without_refs = g.to_json()
    without_refs["nodes"] = [n for n in without_refs["nodes"] if n["type"] != "LoadImage"]
    kept = to_api(toy_swap(without_refs, info)[0], info)
    assert kept["3"]["inputs"]["value"] == "a toy robot on a desk\na toy robot in a park", "no references: as written"


def test_customization_needs_the_toy_customization_file():
    info = {**OBJECT_INFO, "SynCDToyWorldCheckpoint": node_def({"model": ["MODEL"], "model_file": [[]]},
                                                               ["MODEL", "IPADAPTER"])}
    with pytest.raises(TinySwapError, match="needs the toy-world customization model 'toy_syncd \\(shipped\\)'"):
        toy_swap(sdxl_customization(), info)


def test_identity_scores_read_the_toy_identity():
    g = UIGraph(OBJECT_INFO)
    g.add("UNETLoader", unet_name="sd15.safetensors")                       # 1
    loader = g.add("SynCDIdentityModelLoader", model="dinov2-large")        # 2
    image = g.add("LoadImage", image="ref_1.png")                           # 3
    score = g.add("SynCDIdentityScore", metric="mdinov2_i")                 # 4
    g.connect(loader, 0, score, "score_model")
    g.connect(image, 0, score, "images")
    g.connect(image, 0, score, "references")
    g.group("all", g.nodes)
    swapped, report = toy_swap(g.to_json(), OBJECT_INFO)
    api = to_api(swapped, OBJECT_INFO)
    assert api["2"]["class_type"] == "SynCDToyWorldScoreModel" and api["2"]["inputs"] == {}
    assert api["4"]["inputs"] == {"metric": "toy_identity", "score_model": ["2", 0], "images": ["3", 0],
                                  "references": ["3", 0]}
    assert any(line.startswith("#4 SynCDIdentityScore: metric mdinov2_i -> toy_identity") for line in report)

"""Regenerate workflows/*.json (editor format, real-model loaders) from a server's /object_info.

    python scripts/make_workflows.py [--server URL]   # default: a private embedded server

Widget values come from the node definitions' defaults plus the explicit values below (upstream's
settings), so a node that gains inputs only needs a rerun. Every workflow loads the real models
(ComfyUI's loaders plus the pack's SynCD loaders), names the files and folders in a Note and groups its
nodes by stage; ``python -m comfyui_syncd run WORKFLOW --tiny`` runs it on the tiny demo models.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from comfyui_syncd.client.api import ComfyClient
from comfyui_syncd.client.ui_graph import UIGraph

WORKFLOWS = pathlib.Path(__file__).resolve().parent.parent / "workflows"

# -- model files: (folder, file name, download URL for the editor's missing-models dialog or None) -------
HF = "https://huggingface.co"
SD15 = ("checkpoints", "v1-5-pruned-emaonly-fp16.safetensors",
        f"{HF}/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors")
TERMINUS = ("checkpoints", "terminus-xl-gamma-v1.safetensors", None)
SDXL_BASE = ("checkpoints", "sd_xl_base_1.0.safetensors",
             f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors")
FLUX_DEV = ("diffusion_models", "flux1-dev.safetensors", f"{HF}/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors")
CLIP_L = ("text_encoders", "clip_l.safetensors",
          f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors")
T5XXL = ("text_encoders", "t5xxl_fp16.safetensors",
         f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors")
FLUX_DEPTH = ("diffusion_models", "flux1-depth-dev.safetensors",
              f"{HF}/black-forest-labs/FLUX.1-Depth-dev/resolve/main/flux1-depth-dev.safetensors")
FLUX_VAE = ("vae", "ae.safetensors",
            f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors")
IP_ADAPTER = ("ipadapter", "ip-adapter-plus_sdxl_vit-h.safetensors",
              f"{HF}/h94/IP-Adapter/resolve/main/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors")
CLIP_VISION = ("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", None)
SYNCD_SDXL = ("syncd", "sdxl_finetuned_20k.ckpt", None)
SYNCD_FLUX = ("syncd", "pytorch_model.bin", None)
IDENTITY_DINOV2 = ("syncd_identity", "dinov2-large", None)  # a transformers folder (facebook/dinov2-large)

SYNCD_SDXL_URL = "https://www.cs.cmu.edu/~syncd-project/assets/sdxl_finetuned_20k.ckpt"
SYNCD_FLUX_URL = f"{HF}/spaces/nupurkmr9/SynCD/resolve/main/models/pytorch_model.bin"
CLIP_VISION_URL = f"{HF}/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors"
EXAMPLE_SUBJECT_URL = "https://www.cs.cmu.edu/~syncd-project/assets/actionfigure_1.tar.gz"

# -- upstream's prompts (method/README.md of nupurkmr9/syncd) ---------------------------------------------
SDXL_PROMPT = "An action figure riding a motorcycle"
FLUX_PROMPT = "An action figure on top of a mountain, sunset in the background. Realistic shot."
CATEGORY = "action figure"
FLUX_NEGATIVE = "3d render, cartoon, low resolution, illustration, blurry, unrealistic"  # sample_flux.py
# data generation: one prompt per image, "{background}. {description}. wide angle shot" (gen_deformable.py) and
# "{background} a natural image with the object on the ground." (gen_rigid.py)
DATAGEN_DESCRIPTION = "A fluffy brown dog with floppy ears and a red collar"
DATAGEN_PROMPTS = tuple(f"{background}. {DATAGEN_DESCRIPTION}. wide angle shot" for background in (
    "A dog lies on the wooden floor of a sunlit living room", "A dog runs along a sandy beach at sunset",
    "A dog stands in a snowy forest clearing"))
JEDI_PROMPT = "a photo of a corgi dog on the beach"
RIGID_PROMPTS = tuple(f"{background} a natural image with the object on the ground." for background in (
    "a mug on a wooden kitchen table next to a bowl of fruit", "a mug on an office desk beside a laptop",
    "a mug on a stone garden wall in front of flowers"))
RIGID_NEGATIVE = "3d render, cartoon, low resolution, illustration, blurry"  # gen_rigid.py

COLORS = {"Models": "#3f789e", "References": "#8a6d3b", "Mesh": "#8a6d3b", "Prompts": "#3f8e5a", "Sampling": "#7a4f9e",
          "Output": "#555555"}

TINY_HINT = ("Try it without any download (tiny random models, noise-like images):\n"
             "  python -m comfyui_syncd run workflows/{name} --tiny")
TOY_HINT = ("Try it without any download, on the pack's toy-world model (a small SD1.5 trained from scratch on 128 px "
            "toy objects: cubes, spheres, cones... on grass, sand, snow; any CPU, seconds):\n"
            "  python -m comfyui_syncd run workflows/{name} --tiny")
TOY_DEPTH_HINT = ("Try it without any download, on the pack's depth-conditioned toy-world model (the toy model "
                  "fine-tuned on 128 px toy renders with their depth; a toy solid's views, from SynCD Toy-World Mesh "
                  "Views, stand in for the mesh; any CPU, seconds):\n"
                  "  python -m comfyui_syncd run workflows/{name} --tiny")

TOY_CUSTOMIZATION_HINT = ("Try it without any download, on the pack's toy-world model and its toy SynCD "
                          "customization model (trained with the pack's script on 128 px toy sets generated with "
                          "Masked Shared Attention; a rendered red striped cube is the reference; any CPU, "
                          "seconds):\n"
                          "  python -m comfyui_syncd run workflows/{name} --tiny")
TOY_FLOW_HINT = ("\nThe toy world has no {model}: its models are small UNets, so --tiny bypasses the flow shift{flux} "
                 "and gives SynCD's guidance its default (SDXL) scales. To run the graph as it is, on tiny "
                 "{model} models with random weights, add --random-tiny.")


def with_try_hint(workflow: dict, object_info: dict, name: str) -> dict:
    """The Note's --tiny hint says what --tiny runs the workflow on: the toy-world model where it can (for a flow
    model's graph, what changes on the toy UNet)."""
    from comfyui_syncd.client.toy_swap import FLOW_SCHEDULES, demo_swap

    _, _, which = demo_swap(workflow, object_info)
    hint = {"the toy-world model": TOY_HINT, "the depth-conditioned toy-world model": TOY_DEPTH_HINT,
            "the toy-world customization model": TOY_CUSTOMIZATION_HINT}.get(which)
    if hint is None:
        return workflow
    kinds = {n["type"] for n in workflow["nodes"]}
    if kinds & set(FLOW_SCHEDULES):
        flux = "ModelSamplingFlux" in kinds
        hint += TOY_FLOW_HINT.format(model="Flux" if flux else "Qwen-Image",
                                     flux=" and FluxGuidance" if "FluxGuidance" in kinds else "")
    for node in workflow["nodes"]:
        if node["type"] == "Note":
            node["widgets_values"][0] = node["widgets_values"][0].replace(TINY_HINT.format(name=name),
                                                                          hint.format(name=name))
    return workflow


def models_property(*files) -> dict:
    """``properties.models``: the editor lists missing ones with a download button (Hugging Face safetensors)."""
    return {"models": [{"name": name, "url": url, "directory": folder} for folder, name, url in files if url]}


def files_block(lines: list[tuple[tuple, str]]) -> str:
    return "\n".join(f"• models/{folder}/{name}\n    {how}" for (folder, name, _), how in lines)


REFERENCE_HOWTO = (
    "• input/{first} ... — photos of your subject (or upload them on the Load Image nodes), subject centred "
    "(they are centre-cropped to a square). Mark the subject on each: right-click the Load Image node › Open in MaskEditor and paint it; the "
    "painted area is the foreground mask (Load Image's MASK output is 1 − alpha, so transparent = subject). A "
    "black-and-white mask file works too: Load Image (as Mask), channel red, in place of the MASK link.")


class Builder(UIGraph):
    """UIGraph with the pieces the workflows share."""

    def reference_chain(self, count: int, size: int, prefix: str = "syncd_reference") -> dict:
        """``count`` Load Image nodes -> one IMAGE batch and one MASK batch at ``size``², centre-cropped the same
        way (masks go through images so they are batched and cropped exactly like their photos)."""
        loads = [self.add("LoadImage", title=f"Reference {k + 1}", image=f"{prefix}_{k + 1}.png")
                 for k in range(count)]
        as_images = [self.add("MaskToImage", title=f"Mask {k + 1} as image") for k in range(count)]
        for load, as_image in zip(loads, as_images):
            self.connect(load, 1, as_image, "mask")

        def batch(nodes: list[dict], what: str) -> tuple[dict, list[dict]]:
            current, made = nodes[0], []
            for k, node in enumerate(nodes[1:], start=2):
                joined = self.add("ImageBatch", title=f"{what} 1–{k}")
                self.connect(current, 0, joined, "image1")
                self.connect(node, 0, joined, "image2")
                current = joined
                made.append(joined)
            return current, made

        images, image_batches = batch(loads, "Photos")
        masks, mask_batches = batch(as_images, "Masks")
        scale_images = self.add("ImageScale", title="Photos to model size", upscale_method="lanczos", width=size,
                                height=size, crop="center")
        scale_masks = self.add("ImageScale", title="Masks to model size", upscale_method="bilinear", width=size,
                               height=size, crop="center")
        to_mask = self.add("ImageToMask", channel="red")
        self.connect(images, 0, scale_images, "image")
        self.connect(masks, 0, scale_masks, "image")
        self.connect(scale_masks, 0, to_mask, "image")
        return {"loads": loads, "images": scale_images, "masks": to_mask,
                "columns": [loads, as_images, image_batches + mask_batches + [scale_images, scale_masks, to_mask]]}

    def output(self, latent_source: dict, vae_source: tuple[dict, int], prefix: str) -> list[dict]:
        decode = self.add("VAEDecode")
        save = self.add("SaveImage", size=(420, 460), filename_prefix=prefix)
        self.connect(latent_source, 0, decode, "samples")
        self.connect(vae_source[0], vae_source[1], decode, "vae")
        self.connect(decode, 0, save, "images")
        return [decode, save]

    def ksampler(self, model: dict, positive, negative, latent, **settings) -> dict:
        """A KSampler wired to ``model`` and the conditionings and latent (a node, or (node, output slot))."""
        sampler = self.add("KSampler", sampler_name="euler", **settings)
        for source, name in ((model, "model"), (positive, "positive"), (negative, "negative"),
                             (latent, "latent_image")):
            node, slot = source if isinstance(source, tuple) else (source, 0)
            self.connect(node, slot, sampler, name)
        return sampler

    def groups_in_order(self, **stages: list[list[dict]]) -> None:
        for title, columns in stages.items():
            self.group(title, *columns, color=COLORS[title])


def normalized_sampling(g: Builder, model: dict, positive: dict, negative: dict, latent: dict, all_in_one: bool,
                        steps: int, sampler_name: str, scales: dict) -> tuple[dict, list]:
    """The sampling stage of a customization workflow: SynCD Customization Sampler (all in one), or the normalized
    guider with SamplerCustomAdvanced. Returns (the node whose output 0 is the LATENT, the stage's nodes)."""
    if all_in_one:
        sampler = g.add("SynCDCustomizationSampler", steps=steps, sampler_name=sampler_name, scheduler="simple",
                        **scales)
        g.connect(model, 0, sampler, "model")
        g.connect(positive, 0, sampler, "positive")
        g.connect(negative, 0, sampler, "negative")
        g.connect(latent, 0, sampler, "latent_image")
        return sampler, [sampler]
    guider = g.add("SynCDNormalizedGuider", **scales)
    noise = g.add("RandomNoise")
    select = g.add("KSamplerSelect", sampler_name=sampler_name)
    schedule = g.add("BasicScheduler", scheduler="simple", steps=steps)
    sampler = g.add("SamplerCustomAdvanced")
    g.connect(model, 0, guider, "model")
    g.connect(positive, 0, guider, "positive")
    g.connect(negative, 0, guider, "negative")
    g.connect(model, 0, schedule, "model")
    g.connect(noise, 0, sampler, "noise")
    g.connect(guider, 0, sampler, "guider")
    g.connect(select, 0, sampler, "sampler")
    g.connect(schedule, 0, sampler, "sigmas")
    g.connect(latent, 0, sampler, "latent_image")
    return sampler, [guider, noise, select, schedule, sampler]


def sdxl_customization(object_info: dict, name: str, references: int, all_in_one: bool, set_size: int = 1,
                       score: bool = False) -> dict:
    """SynCD SDXL: terminus-xl-gamma-v1 (v-prediction, zero-SNR) + the SynCD LoRA and IP-Adapter, references
    injected every step, normalized text+image guidance (sdxl_pipeline/sample.py). With ``set_size`` > 1 a batch
    of that many new images of the subject also shares attention (Masked Shared Attention, automatic masks)."""
    g = Builder(object_info)
    g.extra["syncd"] = {"family": "sdxl"}
    checkpoint = g.add("CheckpointLoaderSimple", properties=models_property(TERMINUS), ckpt_name=TERMINUS[1])
    sampling = g.add("ModelSamplingDiscrete", title="v-prediction + zero terminal SNR", sampling="v_prediction",
                     zsnr=True)
    ip_loader = g.add("SynCDIPAdapterLoader", properties=models_property(IP_ADAPTER), ipadapter_name=IP_ADAPTER[1])
    vision = g.add("CLIPVisionLoader", clip_name=CLIP_VISION[1])
    syncd = g.add("SynCDCheckpointLoader", checkpoint_name=SYNCD_SDXL[1], strength=1.0)
    g.connect(checkpoint, 0, sampling, "model")
    g.connect(sampling, 0, syncd, "model")
    g.connect(ip_loader, 0, syncd, "ipadapter")

    refs = g.reference_chain(references, 1024)
    encoded = g.add("SynCDReferenceImages")
    first = g.add("ImageFromBatch", title="Global image (one reference)", batch_index=0, length=1)
    g.connect(refs["images"], 0, encoded, "images")
    g.connect(refs["masks"], 0, encoded, "masks")
    g.connect(checkpoint, 2, encoded, "vae")
    g.connect(refs["images"], 0, first, "image")

    positive = g.add("CLIPTextEncode", title="Prompt", text=SDXL_PROMPT)
    prompt = None
    if set_size > 1:  # one text for the encoder and the shared attention's subject-word lookup
        prompt = g.add("PrimitiveStringMultiline", title="Prompt (one for the whole set)", size=(400, 160),
                       value=SDXL_PROMPT)
        g.connect(prompt, 0, positive, "text")
    negative = g.add("ConditioningZeroOut", title="Negative: zeroed text (upstream)")
    reference_text = g.add("CLIPTextEncode", title="Reference prompt: photo of a <category>",
                           text=f"photo of a {CATEGORY}")
    for encoder in (positive, reference_text):
        g.connect(checkpoint, 1, encoder, "clip")
    g.connect(positive, 0, negative, "conditioning")

    apply = g.add("SynCDApplyReferences")
    ip = g.add("SynCDIPAdapterApply", weight=0.6, reference_weight=1.0)
    empty = g.add("EmptyLatentImage", width=1024, height=1024, batch_size=set_size)
    g.connect(syncd, 0, apply, "model")
    g.connect(encoded, 0, apply, "references")
    g.connect(reference_text, 0, apply, "reference_conditioning")
    g.connect(apply, 0, ip, "model")
    g.connect(syncd, 1, ip, "ipadapter")
    g.connect(vision, 0, ip, "clip_vision")
    g.connect(first, 0, ip, "image")
    g.connect(encoded, 0, ip, "references")
    # upstream: s_txt 7.5, s_img 8 rising by 5 over the steps; EulerAncestral, 50 steps with trailing
    # spacing, which is ComfyUI's 'simple' scheduler
    scales = dict(text_scale=7.5, image_scale_start=8.0, image_scale_end=13.0, combination="normalized")
    model, sampling_nodes = ip, [[apply, ip, empty]]
    if set_size > 1:
        model = g.add("SynCDSharedAttention", images_per_subject=set_size, mask_mode="automatic",
                      subject_word=CATEGORY, unmasked_first_step=True)
        g.connect(ip, 0, model, "model")
        g.connect(checkpoint, 1, model, "clip")
        g.connect(prompt, 0, model, "prompt")
        sampling_nodes = [[apply, ip, model, empty]]
    sampler, stage = normalized_sampling(g, model, positive, negative, empty, all_in_one, 50, "euler_ancestral",
                                         scales)
    sampling_nodes.append(stage)
    prefix = f"syncd_sdxl_{references}ref" + (f"_set{set_size}" if set_size > 1 else "")
    outputs = g.output(sampler, (checkpoint, 2), prefix)
    scoring = []
    if score:  # the new images scored against the reference photos (SynCD Identity Score, DINOv2)
        identity = g.add("SynCDIdentityModelLoader", title="Identity model (DINOv2)", model=IDENTITY_DINOV2[1])
        scorer = g.add("SynCDIdentityScore", size=(380, 260), metric="dinov2_i")
        g.connect(identity, 0, scorer, "score_model")
        g.connect(outputs[0], 0, scorer, "images")
        g.connect(refs["images"], 0, scorer, "references")
        g.connect(refs["masks"], 0, scorer, "reference_masks")
        scoring = [identity, scorer]

    first_file = "syncd_reference_1.png"
    consistent_set = [] if set_size == 1 else [
        "",
        f"Consistent set: the {set_size} new images of the batch share attention (SynCD Masked Shared Attention, "
        f"images_per_subject {set_size}): every image attends to its own tokens, the foreground of the other "
        "new images (masks estimated every step from the attention to the subject word, which must be in the "
        "prompt) and the references' foreground. The guider's unconditional branch sees neither; its image and "
        "full branches see both. One prompt drives the whole batch here; the scenes differ by the noise. For a "
        "different scene per image, replace the positive CLIP Text Encode by SynCD Per-Image Prompts (one prompt "
        "per line, image i gets line i) and connect its prompts output to the shared attention's prompt.",
    ]
    identity_note = [] if not score else [
        "",
        "Identity score: SynCD Identity Score compares every new image with the reference photos in DINOv2 "
        "feature space (dinov2_i: the references cropped to the square around their masks; the new images whole) "
        "and shows the per-image scores and their mean on the node. For SynCD's MDINOv2-I proper, connect masks "
        "of the new images (e.g. from a segmentation node) to image_masks and choose mdinov2_i; clip_i and dino "
        "need a CLIP (openai/clip-vit-large-patch14) or DINO (facebook/dino-vits16) folder instead.",
    ]
    note = g.note("\n".join([
        f"SynCD customization — SDXL (the paper's model), {references} reference image(s)"
        + (f", a consistent set of {set_size} new images" if set_size > 1 else "")
        + (", scored against the references" if score else ""),
        *consistent_set,
        *identity_note,
        "",
        "Put these files into your ComfyUI folder:",
        files_block([
            (TERMINUS, "base model bghira/terminus-xl-gamma-v1 (Hugging Face) as one single-file checkpoint. It is "
                       "v-prediction with zero terminal SNR: keep the ModelSamplingDiscrete node (v_prediction, "
                       "zsnr on) right after the loader. Its own VAE decodes here (upstream: sdxl-vae-fp16-fix, "
                       "the same VAE made safe for fp16)."),
            (SYNCD_SDXL, f"the SynCD SDXL model: {SYNCD_SDXL_URL} (read with torch.load(weights_only=True); "
                         "python -m comfyui_syncd convert-checkpoint turns it into .safetensors)"),
            (IP_ADAPTER, IP_ADAPTER[2]),
            (CLIP_VISION, f"{CLIP_VISION_URL}, renamed"),
        ] + ([(IDENTITY_DINOV2, "a folder: the Hugging Face model facebook/dinov2-large (config.json + weights), "
                                "for SynCD Identity Score")] if score else [])),
        REFERENCE_HOWTO.format(first=first_file),
        f"  Upstream's example subject: {EXAMPLE_SUBJECT_URL}",
        "",
        "Upstream's settings (method/sample.py): euler_ancestral, 50 steps, 'simple' scheduler (= trailing "
        "spacing), 1024×1024; normalized guidance with text scale 7.5 and image scale 8 → 13 over the steps; "
        "IP-Adapter weight 0.6 with one reference as the global image (1.0 in the reference pass); negative = "
        "zeroed text embedding (ConditioningZeroOut); reference prompt 'photo of a <category>' — change the "
        f"category ('{CATEGORY}') and the prompt to your subject.",
        "",
        TINY_HINT.format(name=name),
    ]))
    g.groups_in_order(Models=[[checkpoint, sampling, syncd], [ip_loader, vision]],
                      References=refs["columns"] + [[encoded, first]],
                      Prompts=[[positive, negative, reference_text]] + ([[prompt]] if prompt else []),
                      Sampling=sampling_nodes, Output=[outputs] + ([scoring] if scoring else []))
    return g.to_json(left=[note])


def flux_models(g: Builder) -> tuple[dict, dict, dict]:
    unet = g.add("UNETLoader", properties=models_property(FLUX_DEV), unet_name=FLUX_DEV[1])
    clip = g.add("DualCLIPLoader", properties=models_property(CLIP_L, T5XXL), clip_name1=CLIP_L[1],
                 clip_name2=T5XXL[1], type="flux")
    vae = g.add("VAELoader", properties=models_property(FLUX_VAE), vae_name=FLUX_VAE[1])
    return unet, clip, vae


FLUX_FILES = [(FLUX_DEV, "FLUX.1-dev"), (CLIP_L, "text encoder"), (T5XXL, "text encoder (or an fp8 T5-XXL)"),
              (FLUX_VAE, "the FLUX VAE")]


def flux_customization(object_info: dict, name: str, references: int, all_in_one: bool) -> dict:
    """SynCD Flux (repo-only in-context model): FLUX.1-dev + the SynCD LoRA, clean references beside the
    target, normalized guidance (flux_pipeline/sample_flux.py)."""
    g = Builder(object_info)
    g.extra["syncd"] = {"family": "flux"}
    unet, clip, vae = flux_models(g)
    syncd = g.add("SynCDCheckpointLoader", checkpoint_name=SYNCD_FLUX[1], strength=1.0)
    # upstream shifts the sigmas by the whole canvas' length: target + references side by side at 512 px
    shift = g.add("ModelSamplingFlux", title="Shift for the canvas (target + references)", width=512 * (references + 1),
                  height=512)
    g.connect(unet, 0, syncd, "model")

    refs = g.reference_chain(references, 512)
    encoded = g.add("SynCDReferenceImages")
    g.connect(refs["images"], 0, encoded, "images")
    g.connect(refs["masks"], 0, encoded, "masks")
    g.connect(vae, 0, encoded, "vae")

    positive_text = g.add("CLIPTextEncode", title="Prompt", text=FLUX_PROMPT)
    negative_text = g.add("CLIPTextEncode", title="Negative prompt (upstream)", text=FLUX_NEGATIVE)
    positive = g.add("FluxGuidance", guidance=3.5)
    negative = g.add("FluxGuidance", guidance=3.5)
    for encoder in (positive_text, negative_text):
        g.connect(clip, 0, encoder, "clip")
    g.connect(positive_text, 0, positive, "conditioning")
    g.connect(negative_text, 0, negative, "conditioning")

    apply = g.add("SynCDApplyReferences")
    empty = g.add("EmptySD3LatentImage", width=512, height=512, batch_size=1)
    g.connect(syncd, 0, apply, "model")
    g.connect(encoded, 0, apply, "references")
    g.connect(positive, 0, apply, "reference_conditioning")  # one canvas, one text upstream
    g.connect(apply, 0, shift, "model")
    # upstream README: true_cfg 1.5 (text scale), image_cfg 1.0, no adaptive schedule
    scales = dict(text_scale=1.5, image_scale_start=1.0, image_scale_end=1.0, combination="normalized")
    sampler, stage = normalized_sampling(g, shift, positive, negative, empty, all_in_one, 30, "euler", scales)
    sampling_nodes = [[apply, shift, empty], stage]
    outputs = g.output(sampler, (vae, 0), f"syncd_flux_{references}ref")

    note = g.note("\n".join([
        f"SynCD customization — FLUX.1-dev (the repository's in-context model), {references} reference image(s)",
        "",
        "Put these files into your ComfyUI folder:",
        files_block(FLUX_FILES + [(SYNCD_FLUX, f"the SynCD Flux LoRA: {SYNCD_FLUX_URL}")]),
        REFERENCE_HOWTO.format(first="syncd_reference_1.png"),
        f"  Upstream's example subject: {EXAMPLE_SUBJECT_URL}",
        "",
        "Upstream's settings (method/sample_flux.py, README): 512×512 target, references at 512 px placed clean "
        "beside it; 30 steps euler, FluxGuidance 3.5; true CFG (text scale) 1.5, image scale 1.0; negative prompt "
        "as upstream; the references share the prompt's text (one canvas upstream); the sigma shift is computed "
        "for the whole canvas (ModelSamplingFlux, width 512 × (references + 1)). Text scale 1.0 skips the "
        "separate guidance branches and is faster.",
        "",
        TINY_HINT.format(name=name),
    ]))
    g.groups_in_order(Models=[[unet, clip, vae, syncd]], References=refs["columns"] + [[encoded]],
                      Prompts=[[positive_text, negative_text], [positive, negative]], Sampling=sampling_nodes,
                      Output=[outputs])
    return g.to_json(left=[note])


QWEN_SPLIT = f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files"
QWEN_IMAGE = ("diffusion_models", "qwen_image_fp8_e4m3fn.safetensors",
              f"{QWEN_SPLIT}/diffusion_models/qwen_image_fp8_e4m3fn.safetensors")
QWEN_TE = ("text_encoders", "qwen_2.5_vl_7b_fp8_scaled.safetensors",
           f"{QWEN_SPLIT}/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors")
QWEN_VAE = ("vae", "qwen_image_vae.safetensors", f"{QWEN_SPLIT}/vae/qwen_image_vae.safetensors")
QWEN_PROMPT = ("A fluffy brown dog with floppy ears sitting on a wooden floor in a sunlit living room, a large "
               "window behind it. Realistic photo.")


def qwen_image_consistent_set(object_info: dict, name: str, references: int = 1, set_size: int = 3) -> dict:
    """Qwen-Image (base weights, ComfyUI's Qwen-Image template loaders and settings): a consistent set of
    ``set_size`` new images sharing attention (automatic masks) plus the references' features."""
    g = Builder(object_info)
    g.extra["syncd"] = {"family": "qwen_image"}
    unet = g.add("UNETLoader", properties=models_property(QWEN_IMAGE), unet_name=QWEN_IMAGE[1])
    clip = g.add("CLIPLoader", properties=models_property(QWEN_TE), clip_name=QWEN_TE[1], type="qwen_image")
    vae = g.add("VAELoader", properties=models_property(QWEN_VAE), vae_name=QWEN_VAE[1])
    shift = g.add("ModelSamplingAuraFlow", shift=3.1)  # ComfyUI's Qwen-Image template
    g.connect(unet, 0, shift, "model")

    refs = g.reference_chain(references, 1024)
    encoded = g.add("SynCDReferenceImages")
    g.connect(refs["images"], 0, encoded, "images")
    g.connect(refs["masks"], 0, encoded, "masks")
    g.connect(vae, 0, encoded, "vae")

    prompt = g.add("PrimitiveStringMultiline", title="Prompt (names the subject word)", size=(400, 200),
                   value=QWEN_PROMPT)
    positive = g.add("CLIPTextEncode", title="Prompt", text=QWEN_PROMPT)  # the text comes from the link
    negative = g.add("CLIPTextEncode", title="Negative prompt", text=" ")
    reference_text = g.add("CLIPTextEncode", title="Reference prompt: photo of a <subject>", text="photo of a dog")
    g.connect(prompt, 0, positive, "text")
    for encoder in (positive, negative, reference_text):
        g.connect(clip, 0, encoder, "clip")

    apply = g.add("SynCDApplyReferences")
    shared = g.add("SynCDSharedAttention", images_per_subject=set_size, mask_mode="automatic", subject_word="dog",
                   unmasked_first_step=True)
    empty = g.add("EmptySD3LatentImage", width=1328, height=1328, batch_size=set_size)
    g.connect(shift, 0, apply, "model")
    g.connect(encoded, 0, apply, "references")
    g.connect(reference_text, 0, apply, "reference_conditioning")
    g.connect(apply, 0, shared, "model")
    g.connect(clip, 0, shared, "clip")
    g.connect(prompt, 0, shared, "prompt")
    # the template's cfg 2.5 as the text scale; image scale 1 (no extra image guidance, as SynCD's Flux model)
    scales = dict(text_scale=2.5, image_scale_start=1.0, image_scale_end=1.0, combination="normalized")
    sampler, stage = normalized_sampling(g, shared, positive, negative, empty, False, 20, "euler", scales)
    outputs = g.output(sampler, (vae, 0), "syncd_qwen_image_set")

    note = g.note("\n".join([
        f"SynCD on Qwen-Image — a consistent set of {set_size} new images of your subject, {references} reference "
        "image(s)",
        "",
        f"The {set_size} images of the batch share attention (SynCD Masked Shared Attention, automatic masks from "
        "the attention to the subject word, which must be in the prompt; the first step shares everything) and "
        "see the references' features (SynCD Apply References: one extra pass per step over the clean "
        "references, their keys placed beside the image in Qwen-Image's RoPE space). There are no SynCD weights "
        "for Qwen-Image: this is the training-free part of SynCD on the base model, so identity is looser than "
        "with the SDXL/Flux customization models. Qwen-Image-Edit's own reference input "
        "(TextEncodeQwenImageEditPlus) needs the Edit weights and cannot restrict sharing to the subject's "
        "foreground, so it is not used here.",
        "",
        "Put these files into your ComfyUI folder:",
        files_block([(QWEN_IMAGE, "Qwen-Image (or the bf16 file)"), (QWEN_TE, "text encoder (CLIPLoader, type "
                                                                               "qwen_image)"),
                     (QWEN_VAE, "the Qwen-Image VAE (Wan 2.1)")]),
        REFERENCE_HOWTO.format(first="syncd_reference_1.png"),
        "",
        "Settings: ComfyUI's Qwen-Image template (ModelSamplingAuraFlow shift 3.1, 20 steps euler 'simple', "
        "cfg 2.5 → text scale 2.5, 1328×1328); image scale 1.0. Change the subject word, the reference prompt "
        "and the prompt to your subject.",
        "",
        TINY_HINT.format(name=name),
    ]))
    g.groups_in_order(Models=[[unet, clip, vae, shift]], References=refs["columns"] + [[encoded]],
                      Prompts=[[prompt], [positive, negative, reference_text]],
                      Sampling=[[apply, shared, empty], stage], Output=[outputs])
    return g.to_json(left=[note])


def DATAGEN_SLOT(role: str) -> dict:  # noqa: N802 - reads as a constant at the call sites
    """Marks a node the data-generation driver fills or reads (datagen/driver.py ``slots``)."""
    return {"syncd_datagen": role}


def flux_datagen(object_info: dict, name: str) -> dict:
    """SynCD data generation, deformable objects (dataset/gen_deformable.py): 3 images of one subject share
    attention to each other's foreground; masks estimated every step from the attention to the subject word."""
    g = Builder(object_info)
    g.extra["syncd"] = {"family": "flux"}
    unet, clip, vae = flux_models(g)
    positive_text = g.add("SynCDPromptBatch", title="Prompts, one per image: {background}. {description}. wide "
                          "angle shot", size=(420, 240), text="\n".join(DATAGEN_PROMPTS),
                          properties=DATAGEN_SLOT("prompts"))
    positive = g.add("FluxGuidance", guidance=3.5)
    negative = g.add("ConditioningZeroOut", title="Negative (unused at cfg 1)")
    g.connect(clip, 0, positive_text, "clip")
    g.connect(positive_text, 0, positive, "conditioning")
    g.connect(positive_text, 0, negative, "conditioning")

    shared = g.add("SynCDSharedAttention", images_per_subject=3, mask_mode="automatic", subject_word="dog",
                   unmasked_first_step=True, properties=DATAGEN_SLOT("subject_word"))
    empty = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=3)
    g.connect(unet, 0, shared, "model")
    g.connect(clip, 0, shared, "clip")
    g.connect(positive_text, 1, shared, "prompt")  # the encoded prompts: each image's subject word in its own line
    sampler = g.ksampler(shared, positive, negative, empty, steps=50, cfg=1.0, scheduler="simple",
                         properties=DATAGEN_SLOT("seed"))
    outputs = g.output(sampler, (vae, 0), "syncd_datagen")
    outputs[1]["properties"].update(DATAGEN_SLOT("images"))
    masks = g.add("SynCDAutomaticMasks")
    mask_image = g.add("MaskToImage", title="Masks as images")
    save_masks = g.add("SaveImage", size=(420, 460), filename_prefix="syncd_datagen_mask",
                       properties=DATAGEN_SLOT("masks"))
    g.connect(shared, 0, masks, "model")
    g.connect(outputs[0], 0, masks, "images")
    g.connect(masks, 0, mask_image, "mask")
    g.connect(mask_image, 0, save_masks, "images")

    note = g.note("\n".join([
        "SynCD data generation — deformable subject on FLUX.1-dev (Masked Shared Attention)",
        "",
        "Three images of one subject are generated together: every image attends to its own tokens and to the "
        "foreground of the other two, so the subject stays the same while poses and views vary. The foreground "
        "masks are estimated at every step from the attention to the subject word (Otsu threshold); the first "
        "step shares everything.",
        "",
        "Put these files into your ComfyUI folder:",
        files_block(FLUX_FILES),
        "",
        "Upstream's settings (dataset/gen_deformable.py): 3 images per subject, 1024×1024, 50 steps, guidance 3.5, "
        "no true CFG (cfg 1), prompt '{background}. {description}. wide angle shot', subject word = the category "
        "in lower case. As upstream, each image has its own prompt: line i of SynCD Per-Image Prompts conditions "
        "image i, and its 'prompts' output tells the shared attention where the subject word sits in each line "
        "(every line must contain it). Turn prompt_per_image off for one prompt (the first line) for the whole "
        "set. SynCD Automatic Masks saves each image's subject mask (the Otsu map of the attention to the "
        "subject word, as upstream saves for training).",
        "",
        TINY_HINT.format(name=name),
    ]))
    g.groups_in_order(Models=[[unet, clip, vae]], Prompts=[[positive_text], [positive, negative]],
                      Sampling=[[shared], [empty, sampler]], Output=[outputs, [masks, mask_image, save_masks]])
    return g.to_json(left=[note])


def flux_datagen_rigid(object_info: dict, name: str) -> dict:
    """SynCD data generation, rigid objects (dataset/gen_rigid.py): FLUX.1-Depth-dev conditioned on the rendered
    depth of 3 views of a mesh, MSA on the rendered masks, and the anchor view's latents warped into the other
    views at their correspondences while sigma > 0.8."""
    g = Builder(object_info)
    g.extra["syncd"] = {"family": "flux"}
    unet = g.add("UNETLoader", properties=models_property(FLUX_DEPTH), unet_name=FLUX_DEPTH[1])
    clip = g.add("DualCLIPLoader", properties=models_property(CLIP_L, T5XXL), clip_name1=CLIP_L[1],
                 clip_name2=T5XXL[1], type="flux")
    vae = g.add("VAELoader", properties=models_property(FLUX_VAE), vae_name=FLUX_VAE[1])
    views = g.add("SynCDMeshViews", size=(340, 560), width=512, height=512,
                  properties={"syncd_datagen": "mesh"})
    positive_text = g.add("SynCDPromptBatch", title="Prompts, one per view: {background} a natural image with the "
                          "object on the ground.", size=(420, 220), text="\n".join(RIGID_PROMPTS),
                          properties=DATAGEN_SLOT("prompts"))
    negative_text = g.add("CLIPTextEncode", title="Negative prompt (upstream)", text=RIGID_NEGATIVE)
    positive = g.add("FluxGuidance", guidance=10.0)
    negative = g.add("FluxGuidance", guidance=10.0)
    for encoder, guided in ((positive_text, positive), (negative_text, negative)):
        g.connect(clip, 0, encoder, "clip")
        g.connect(encoder, 0, guided, "conditioning")
    depth = g.add("InstructPixToPixConditioning", title="Depth conditioning (FLUX.1-Depth)")
    g.connect(positive, 0, depth, "positive")
    g.connect(negative, 0, depth, "negative")
    g.connect(vae, 0, depth, "vae")
    g.connect(views, 0, depth, "pixels")

    shared = g.add("SynCDSharedAttention", images_per_subject=3, mask_mode="foreground_masks")
    warp = g.add("SynCDFeatureWarp", images_per_object=3)
    g.connect(unet, 0, shared, "model")
    g.connect(views, 1, shared, "foreground_masks")
    g.connect(shared, 0, warp, "model")
    g.connect(views, 2, warp, "correspondences")
    sampler = g.ksampler(warp, (depth, 0), (depth, 1), (depth, 2), steps=30, cfg=2.5, scheduler="simple",
                         properties=DATAGEN_SLOT("seed"))
    outputs = g.output(sampler, (vae, 0), "syncd_datagen_rigid")
    outputs[1]["properties"].update(DATAGEN_SLOT("images"))
    mask_image = g.add("MaskToImage", title="Masks as images")
    save_masks = g.add("SaveImage", size=(420, 460), filename_prefix="syncd_datagen_rigid_mask",
                       properties=DATAGEN_SLOT("masks"))
    g.connect(views, 1, mask_image, "mask")
    g.connect(mask_image, 0, save_masks, "images")

    note = g.note("\n".join([
        "SynCD data generation — rigid object on FLUX.1-Depth-dev (depth + Masked Shared Attention + feature warp)",
        "",
        "SynCD Mesh Views renders 3 views of a mesh (its depth, masks and cross-view correspondences; the least-"
        "overlap triplet of views that pass upstream's matching rule). The depth conditions FLUX.1-Depth-dev "
        "through ComfyUI's InstructPixToPixConditioning; the three images share attention to each other's "
        "rendered foreground; while sigma > 0.8 the anchor view's (the last) latents are written into the other "
        "views at their correspondences (SynCD eq. 2).",
        "",
        "Put these files into your ComfyUI folder:",
        files_block([(FLUX_DEPTH, "FLUX.1-Depth-dev"), (CLIP_L, "text encoder"),
                     (T5XXL, "text encoder (or an fp8 T5-XXL)"), (FLUX_VAE, "the FLUX VAE")]),
        "Meshes: pick one on SynCD Mesh Views (the pack's procedural meshes, or GLB/OBJ/PLY files in input/3d/).",
        "",
        "Upstream's settings (dataset/gen_rigid.py): 512×512, 30 steps euler, guidance 10, true CFG 2.5 from the "
        "first step with the negative prompt '3d render, cartoon, low resolution, illustration, blurry', prompt "
        "'{background} a natural image with the object on the ground.', warping while sigma > 0.8 with the last "
        "view as the anchor. Each view has its own prompt (line i of SynCD Per-Image Prompts; prompt_per_image "
        "off: the first line for all). python -m comfyui_syncd datagen fills the prompts, the mesh and the seed "
        "per object.",
        "",
        TINY_HINT.format(name=name),
    ]))
    g.groups_in_order(Models=[[unet, clip, vae]], Mesh=[[views]],
                      Prompts=[[positive_text, negative_text], [positive, negative, depth]],
                      Sampling=[[shared, warp], [sampler]], Output=[outputs + [mask_image, save_masks]])
    return g.to_json(left=[note])


def sd15_checkpoint(g: Builder) -> dict:
    return g.add("CheckpointLoaderSimple", properties=models_property(SD15), ckpt_name=SD15[1])


JEDI_WEIGHTS = ("JeDi's fine-tuned joint-image model is not public: on plain SD1.5 this runs JeDi's sampling "
                "(coupled self-attention over the image set) training-free, so the subject is only loosely shared.")


def jedi_coupled(object_info: dict, name: str) -> dict:
    """JeDi coupled self-attention: a set of 3 images of one subject attends jointly (no masks)."""
    g = Builder(object_info)
    g.extra["syncd"] = {"family": "sd15"}
    checkpoint = sd15_checkpoint(g)
    positive = g.add("CLIPTextEncode", title="Prompt", text=JEDI_PROMPT)
    negative = g.add("CLIPTextEncode", title="Negative prompt", text="")
    for encoder in (positive, negative):
        g.connect(checkpoint, 1, encoder, "clip")
    coupled = g.add("SynCDSharedAttention", images_per_subject=3, mask_mode="none")
    empty = g.add("EmptyLatentImage", width=512, height=512, batch_size=3)
    g.connect(checkpoint, 0, coupled, "model")
    sampler = g.ksampler(coupled, positive, negative, empty, steps=30, cfg=7.5, scheduler="normal")
    outputs = g.output(sampler, (checkpoint, 2), "jedi_coupled")
    note = g.note("\n".join([
        "JeDi coupled self-attention — a set of 3 images of one subject on SD1.5",
        "",
        "Every image's self-attention sees all tokens of the other images of its set (mask_mode none), so the "
        "three images share one subject. " + JEDI_WEIGHTS,
        "",
        "Put this file into your ComfyUI folder:",
        files_block([(SD15, "Stable Diffusion 1.5 (any SD1.5 checkpoint works)")]),
        "",
        "Settings: 512×512, batch 3 = one set, euler, 30 steps, cfg 7.5.",
        "",
        TINY_HINT.format(name=name),
    ]), size=(480, 560))
    g.groups_in_order(Models=[[checkpoint]], Prompts=[[positive, negative]], Sampling=[[coupled], [empty, sampler]],
                      Output=[outputs])
    return g.to_json(left=[note])


def jedi_inpainting(object_info: dict, name: str) -> dict:
    """JeDi personalization as inpainting: [2 references | 1 new image], coupled attention, image guidance."""
    g = Builder(object_info)
    g.extra["syncd"] = {"family": "sd15"}
    checkpoint = sd15_checkpoint(g)
    refs = g.reference_chain(2, 512, prefix="jedi_reference")
    joint = g.add("JeDiJointImageSet", images_to_generate=1)
    g.connect(refs["images"], 0, joint, "reference_images")
    g.connect(refs["masks"], 0, joint, "reference_masks")
    g.connect(checkpoint, 2, joint, "vae")
    positive = g.add("CLIPTextEncode", title="Prompt", text=JEDI_PROMPT)
    negative = g.add("CLIPTextEncode", title="Negative prompt", text="")
    for encoder in (positive, negative):
        g.connect(checkpoint, 1, encoder, "clip")
    coupled = g.add("SynCDSharedAttention", images_per_subject=3, mask_mode="foreground_masks",
                    unmasked_first_step=True)
    guider = g.add("JeDiImageGuider")
    noise = g.add("RandomNoise")
    select = g.add("KSamplerSelect", sampler_name="euler")
    schedule = g.add("BasicScheduler", scheduler="normal", steps=50)
    sampler = g.add("SamplerCustomAdvanced")
    g.connect(checkpoint, 0, coupled, "model")
    g.connect(joint, 1, coupled, "foreground_masks")
    g.connect(coupled, 0, guider, "model")
    g.connect(positive, 0, guider, "positive")
    g.connect(negative, 0, guider, "negative")
    g.connect(coupled, 0, schedule, "model")
    g.connect(noise, 0, sampler, "noise")
    g.connect(guider, 0, sampler, "guider")
    g.connect(select, 0, sampler, "sampler")
    g.connect(schedule, 0, sampler, "sigmas")
    g.connect(joint, 0, sampler, "latent_image")
    outputs = g.output(sampler, (checkpoint, 2), "jedi_inpainting")
    note = g.note("\n".join([
        "JeDi personalization as inpainting — 2 references + 1 new image on SD1.5",
        "",
        "The references and the image to generate form one joint set; every step the references are replaced "
        "by their forward-diffused versions, coupled self-attention shares the subject's foreground, and JeDi's "
        "image guidance (ε⁰ without reference access) pulls the new image towards the references. "
        + JEDI_WEIGHTS,
        "",
        "Put these files into your ComfyUI folder:",
        files_block([(SD15, "Stable Diffusion 1.5 (any SD1.5 checkpoint works)")]),
        REFERENCE_HOWTO.format(first="jedi_reference_1.png"),
        "",
        "Settings: 512×512, euler, 50 steps, image guidance scale 3. The output holds the 2 reconstructed "
        "references and the new image.",
        "",
        TINY_HINT.format(name=name),
    ]))
    g.groups_in_order(Models=[[checkpoint]], References=refs["columns"] + [[joint]], Prompts=[[positive, negative]],
                      Sampling=[[coupled, guider], [noise, select, schedule, sampler]], Output=[outputs])
    return g.to_json(left=[note])


DCI_PROMPT = "a photo of a V* dog in times square"
DCI_STRENGTHS = (-2.0, 0.0, 2.0)  # λ: the paper's typical range is −2..2


def dci_sweep(object_info: dict, name: str, family: str) -> dict:
    """DCI (official sample.py): one prompt, three λ; DDIM η=1 (ComfyUI's ddpm sampler on the ddim_uniform
    schedule), 200 steps, CFG 6, window 0.3 (the code's agg_time; the paper: 0.15); weight maps of the middle λ."""
    g = Builder(object_info)
    g.extra["syncd"] = {"family": family}
    checkpoint = sd15_checkpoint(g) if family == "sd15" else g.add(
        "CheckpointLoaderSimple", properties=models_property(SDXL_BASE), ckpt_name=SDXL_BASE[1])
    size = 512 if family == "sd15" else 1024
    prompt = g.add("PrimitiveStringMultiline", title="Prompt (with the concept)", value=DCI_PROMPT)
    branches = [g.add("DCIDualBranch", title=f"DCI λ = {strength:g}", concept="V* dog", auxiliary_noun="dog",
                      strength=strength, window=0.3) for strength in DCI_STRENGTHS]
    for branch in branches:
        g.connect(checkpoint, 0, branch, "model")
        g.connect(checkpoint, 1, branch, "clip")
        g.connect(prompt, 0, branch, "prompt")
    positive = g.add("CLIPTextEncode", title="Concept prompt", text=DCI_PROMPT)
    auxiliary = g.add("CLIPTextEncode", title="Auxiliary prompt (built by DCI)", text="a photo of a dog in times square")
    negative = g.add("CLIPTextEncode", title="Negative prompt", text="")
    for encoder in (positive, auxiliary, negative):
        g.connect(checkpoint, 1, encoder, "clip")
    g.connect(branches[0], 1, positive, "text")
    g.connect(branches[0], 2, auxiliary, "text")
    empty = g.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    noise = g.add("RandomNoise")
    select = g.add("KSamplerSelect", sampler_name="ddpm")
    schedule = g.add("BasicScheduler", scheduler="ddim_uniform", steps=200)
    g.connect(checkpoint, 0, schedule, "model")
    guiders, samplers, outputs = [], [], []
    for branch, strength in zip(branches, DCI_STRENGTHS):
        guider = g.add("DCIGuider", cfg=6.0)
        sampler = g.add("SamplerCustomAdvanced", title=f"Sample λ = {strength:g}")
        g.connect(branch, 0, guider, "model")
        g.connect(positive, 0, guider, "positive")
        g.connect(auxiliary, 0, guider, "auxiliary")
        g.connect(negative, 0, guider, "negative")
        g.connect(noise, 0, sampler, "noise")
        g.connect(guider, 0, sampler, "guider")
        g.connect(select, 0, sampler, "sampler")
        g.connect(schedule, 0, sampler, "sigmas")
        g.connect(empty, 0, sampler, "latent_image")
        guiders.append(guider)
        samplers.append(sampler)
        outputs += g.output(sampler, (checkpoint, 2), f"dci_lambda_{strength:g}")
    maps = g.add("DCIWeightMaps", title=f"Auxiliary-branch weight maps (λ = {DCI_STRENGTHS[1]:g})")
    as_image = g.add("MaskToImage")
    preview = g.add("SaveImage", size=(420, 460), filename_prefix="dci_weight_maps")
    g.connect(guiders[1], 0, maps, "guider")
    g.connect(samplers[1], 0, maps, "samples")
    g.connect(maps, 0, as_image, "mask")
    g.connect(as_image, 0, preview, "images")
    model_file = SD15 if family == "sd15" else SDXL_BASE
    note = g.note("\n".join([
        f"DCI dual-branch inference — a λ sweep on {'SD1.5' if family == 'sd15' else 'SDXL'}",
        "",
        "The concept branch (your prompt) and the auxiliary branch (the same prompt with 'V* dog' replaced by "
        "'dog', built by DCI Dual-Branch) are integrated in every cross-attention layer during the first 30% of "
        "the timesteps. Higher λ follows the prompt more, lower λ keeps the concept. Outputs: one image per λ, "
        "and the auxiliary branch's weight maps per step for the middle λ (white = from the auxiliary branch).",
        "",
        "Put this file into your ComfyUI folder:",
        files_block([(model_file, "the base model; for a learned concept use your ICO fine-tuned model")]),
        "",
        "With an ICO concept (python -m comfyui_syncd.training.ico): add LoraLoaderModelOnly with its k/v file "
        "after the checkpoint, and write the concept as embedding:<name> in the prompt and in each DCI node's "
        "concept, e.g. prompt 'a photo of a embedding:my_dog dog in times square', concept 'embedding:my_dog dog'.",
        "",
        "Settings (official sample.py): DDIM η=1 (sampler ddpm, scheduler ddim_uniform), 200 steps, CFG 6, "
        "window 0.3 (the paper uses 0.15).",
        "",
        TINY_HINT.format(name=name),
    ]), size=(480, 640))
    g.groups_in_order(Models=[[checkpoint]], Prompts=[[prompt], branches, [positive, auxiliary, negative]],
                      Sampling=[[empty, noise, select, schedule], guiders, samplers],
                      Output=[outputs[0::2], outputs[1::2], [maps, as_image, preview]])
    return g.to_json(left=[note])


# -- template browser thumbnails: the editor shows workflows/<name>.jpg on each template card -------------
THUMBNAILS = {  # name -> (title, subtitle, reference images, generated images, accent colour)
    "syncd_customization_sdxl_1ref.json": ("SynCD customization", "SDXL · 1 reference", 1, 1, "#3f789e"),
    "syncd_customization_sdxl_3ref.json": ("SynCD customization", "SDXL · 3 references", 3, 1, "#3f789e"),
    "syncd_consistent_set_sdxl_3ref.json": ("SynCD consistent set", "SDXL · 3 references + 3 shared images", 3, 3,
                                            "#3f789e"),
    "syncd_identity_score_sdxl_3ref.json": ("SynCD identity score", "SDXL consistent set · DINOv2 vs references",
                                            3, 3, "#3f789e"),
    "syncd_customization_flux_1ref.json": ("SynCD customization", "FLUX.1-dev · 1 reference", 1, 1, "#3f789e"),
    "syncd_customization_flux_3ref.json": ("SynCD customization", "FLUX.1-dev · 3 references", 3, 1, "#3f789e"),
    "syncd_datagen_deformable_flux.json": ("SynCD data generation", "FLUX.1-dev · 3 images share a subject", 0, 3,
                                           "#8a6d3b"),
    "syncd_datagen_rigid_flux.json": ("SynCD data generation", "FLUX.1-Depth · 3 views of a mesh, warped", 0, 3,
                                      "#8a6d3b"),
    "syncd_consistent_set_qwen_image.json": ("SynCD consistent set", "Qwen-Image · 1 reference + 3 shared images", 1,
                                             3, "#3f789e"),
    "jedi_coupled_attention_sd15.json": ("JeDi coupled attention", "SD1.5 · a set of 3 images", 0, 3, "#3f8e5a"),
    "jedi_inpainting_sd15.json": ("JeDi inpainting", "SD1.5 · 2 references + 1 new image", 2, 1, "#3f8e5a"),
    "dci_lambda_sweep_sd15.json": ("DCI dual-branch", "SD1.5 · λ sweep −2, 0, 2", 0, 3, "#9e4f4f"),
    "dci_lambda_sweep_sdxl.json": ("DCI dual-branch", "SDXL · λ sweep −2, 0, 2", 0, 3, "#9e4f4f"),
}


def thumbnail(title: str, subtitle: str, references: int, generated: int, accent: str, size: int = 512):
    """A title card: the method, the base model, and the images in and out as squares."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), "#202020")
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, size, 14], fill=accent)
    draw.text((32, 48), title, font=ImageFont.load_default(size=36), fill="#f0f0f0")
    draw.text((32, 104), subtitle, font=ImageFont.load_default(size=24), fill="#b0b0b0")
    box, gap, top = 88, 16, 250
    boxes = [("ref", k) for k in range(references)] + [("out", k) for k in range(generated)]
    width = len(boxes) * box + (len(boxes) - 1) * gap + (48 if references else 0)
    x = (size - width) // 2
    for i, (kind, _) in enumerate(boxes):
        if kind == "out" and references and i == references:
            draw.polygon([(x + 4, top + box // 2 - 14), (x + 28, top + box // 2), (x + 4, top + box // 2 + 14)],
                         fill="#d0d0d0")
            x += 48
        fill = "#3a3a3a" if kind == "ref" else accent
        draw.rounded_rectangle([x, top, x + box, top + box], radius=10, fill=fill, outline="#d0d0d0", width=2)
        cx, cy = x + box // 2, top + box // 2  # the subject: the same disc in every image
        draw.ellipse([cx - 22, cy - 22, cx + 22, cy + 22], fill="#e8c070")
        x += box + gap
    legend = "grey: your references · coloured: generated" if references else "generated together, one subject"
    draw.text((32, 400), legend, font=ImageFont.load_default(size=22), fill="#909090")
    draw.text((32, 450), "ComfyUI-SynCD", font=ImageFont.load_default(size=20), fill=accent)
    return image


BUILDERS = {
    "syncd_customization_sdxl_1ref.json": lambda info, name: sdxl_customization(info, name, 1, False),
    "syncd_customization_sdxl_3ref.json": lambda info, name: sdxl_customization(info, name, 3, True),
    "syncd_consistent_set_sdxl_3ref.json": lambda info, name: sdxl_customization(info, name, 3, False, set_size=3),
    "syncd_identity_score_sdxl_3ref.json": lambda info, name: sdxl_customization(info, name, 3, False, set_size=3,
                                                                                 score=True),
    "syncd_customization_flux_1ref.json": lambda info, name: flux_customization(info, name, 1, False),
    "syncd_customization_flux_3ref.json": lambda info, name: flux_customization(info, name, 3, True),
    "syncd_datagen_deformable_flux.json": flux_datagen,
    "syncd_datagen_rigid_flux.json": flux_datagen_rigid,
    "syncd_consistent_set_qwen_image.json": qwen_image_consistent_set,
    "jedi_coupled_attention_sd15.json": jedi_coupled,
    "jedi_inpainting_sd15.json": jedi_inpainting,
    "dci_lambda_sweep_sd15.json": lambda info, name: dci_sweep(info, name, "sd15"),
    "dci_lambda_sweep_sdxl.json": lambda info, name: dci_sweep(info, name, "sdxl"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="a running ComfyUI with this pack (default: start one)")
    args = parser.parse_args()
    if args.server:
        object_info = ComfyClient(args.server).object_info()
    else:
        from comfyui_syncd.client.embedded import EmbeddedServer

        with EmbeddedServer() as server:
            object_info = ComfyClient(server.url).object_info()
    wanted = set(BUILDERS) | {pathlib.Path(name).with_suffix(".jpg").name for name in BUILDERS}
    for stale in sorted({p.name for p in WORKFLOWS.glob("*.json")} | {p.name for p in WORKFLOWS.glob("*.jpg")}):
        if stale not in wanted:  # this script is the only writer of workflows/
            (WORKFLOWS / stale).unlink()
            print(f"removed {WORKFLOWS / stale}")
    for name, build in BUILDERS.items():
        workflow = with_try_hint(build(object_info, name), object_info, name)
        (WORKFLOWS / name).write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n")
        thumbnail(*THUMBNAILS[name]).save(WORKFLOWS / pathlib.Path(name).with_suffix(".jpg"), quality=88)
        print(WORKFLOWS / name)


if __name__ == "__main__":
    main()

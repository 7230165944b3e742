"""SynCDReferenceImages and SynCDApplyReferences: the SynCD customization model's reference conditioning as nodes."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from . import choices, wiring
from .reference_injection import (MASK_USES, NOISE_MODES, REFERENCE_TEXT_MODES, ReferenceConfig,
                                  apply_reference_injection)
from .references import MAX_REFERENCES, ReferenceSet, References, foreground_masks


def encode_references(vae, images: torch.Tensor, masks=None, mask_dilation: int = 3) -> ReferenceSet:
    """VAE-encode 1..8 reference images once; masks default to the whole image."""
    if vae is None:
        raise ValueError("SynCD Reference Images: no VAE connected; connect the VAE of the model you sample with "
                         "(the references are encoded with it)")
    if images.ndim != 4 or not 1 <= images.shape[0] <= MAX_REFERENCES:
        raise ValueError(f"SynCD Reference Images: give 1 to {MAX_REFERENCES} reference images as one IMAGE batch; "
                         f"got {images.shape[0] if images.ndim == 4 else 'a non-batch'} image(s). Batch images of "
                         f"one size with an image-batch node.")
    r, h, w, _ = images.shape
    masks = foreground_masks(masks, r, h, w, "SynCD Reference Images")
    if not (masks > 0.5).any():
        logging.warning("SynCD Reference Images: every foreground mask is empty, so the references contribute "
                        "nothing; check the masks (white = subject)")
    if mask_dilation < 1 or mask_dilation % 2 == 0:
        raise ValueError(f"SynCD Reference Images: mask_dilation must be an odd box size (1 = none, 3, 5, ...); "
                         f"got {mask_dilation}")
    if getattr(vae, "latent_dim", 2) == 3:  # a video VAE (Wan 2.1 for Qwen-Image) reads a batch as frames: one each
        latents = torch.cat([vae.encode(images[i:i + 1, ..., :3]) for i in range(r)])
    else:
        latents = vae.encode(images[..., :3])
    return ReferenceSet(images=images[..., :3].cpu(), latents=latents.float().cpu(), masks=masks.float().cpu(),
                        mask_dilation=mask_dilation)


class SynCDReferenceImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDReferenceImages",
            display_name="SynCD Reference Images",
            category="SynCD/customization",
            description="Encodes 1 to 8 images of your subject once, with their foreground masks, for SynCD "
                        "Apply References. The number of references may differ from training.",
            inputs=[io.Image.Input("images", tooltip="1 to 8 reference images of one subject, as one batch."),
                    io.Vae.Input("vae", tooltip="The VAE of the model you sample with."),
                    io.Mask.Input("masks", optional=True,
                                  tooltip="One foreground mask per reference (white = subject), any resolution. "
                                          "Without masks the whole images are used (upstream: dilated object "
                                          "masks)."),
                    io.Int.Input("mask_dilation", default=3, min=1, max=31, step=2,
                                 tooltip="The masks are binarized (> 0), brought to the latent grid and dilated with "
                                         "this box (upstream: 3, i.e. 3×3 at 128² for 1024 px), then taken per "
                                         "layer with nearest resizing. 1 = no dilation.")],
            outputs=[References.Output(display_name="REFERENCES")],
        )

    @classmethod
    def execute(cls, images, vae=None, masks=None, mask_dilation=3) -> io.NodeOutput:
        return io.NodeOutput(encode_references(vae, images, masks, mask_dilation))


class SynCDApplyReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDApplyReferences",
            display_name="SynCD Apply References",
            category="SynCD/customization",
            description="The SynCD customization model's reference conditioning: every step, one extra forward "
                        "pass over the references (noised to the current level for SD1.5/SDXL, clean beside the "
                        "target for Flux and Qwen-Image) captures their self-attention features, and the target's self-attention "
                        "attends to its own tokens and the references' foreground tokens. Sample with the SynCD "
                        "Normalized Text+Image Guider.",
            inputs=[io.Model.Input("model"),
                    References.Input("references"),
                    io.Conditioning.Input("reference_conditioning",
                                          tooltip="Text of the reference pass (of the text+image branch with "
                                                  "the SynCD guider). Upstream SDXL: 'photo of a <category>'; "
                                                  "Flux: the target prompt (upstream's canvas shares it)."),
                    io.Combo.Input("reference_noise", options=list(NOISE_MODES), default="auto",
                                   tooltip="auto: noised for SD1.5/SDXL, clean for Flux/Qwen-Image (as the official models "
                                           "were trained). noised: fresh noise to the current level every step. "
                                           "clean: the encoded references at the current timestep."),
                    io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                                 control_after_generate=False,
                                 tooltip="Seed of the references' fresh noise (noised mode)."),
                    io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                                   tooltip="Sampling progress at which reference injection starts."),
                    io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                                   tooltip="Sampling progress at which reference injection ends."),
                    io.Combo.Input("reference_text", options=list(REFERENCE_TEXT_MODES), default="per_branch",
                                   tooltip="per_branch (upstream): with the SynCD guider, the text+image branch's "
                                           "references see reference_conditioning and the image-only branch's see "
                                           "that branch's own (negative/zeroed) text; both in one batched pass. "
                                           "reference_prompt: every branch's references see reference_conditioning "
                                           "(one text, cheaper)."),
                    io.Boolean.Input("flux_uncond_text_sees_references", default=True,
                                     tooltip="Flux/Qwen-Image with the SynCD guider: in the unconditional branch the target's "
                                             "text tokens still attend to the references while its image tokens "
                                             "keep to themselves (upstream's block-diagonal negative branch). Off: "
                                             "the unconditional branch sees no references at all."),
                    io.Combo.Input("use_masks", options=list(MASK_USES), default="auto",
                                   tooltip="Whether only the references' foreground (their masks) is seen. auto: as "
                                           "upstream, yes for SD1.5/SDXL, no for Flux (the SynCD Flux model attends "
                                           "to the whole references, unmasked); yes for Qwen-Image (no SynCD model: "
                                           "foreground-only sharing as in eq. 1).")],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def validate_inputs(cls, reference_noise=None, reference_text=None, use_masks=None):
        return choices.check(cls, reference_noise=reference_noise, reference_text=reference_text, use_masks=use_masks)

    @classmethod
    def execute(cls, model, references, reference_conditioning, reference_noise, noise_seed, start_percent,
                end_percent, reference_text="per_branch", flux_uncond_text_sees_references=True,
                use_masks="auto") -> io.NodeOutput:
        if start_percent > end_percent:
            raise ValueError(f"SynCD Apply References: start_percent ({start_percent}) is after end_percent "
                             f"({end_percent})")
        if not reference_conditioning:
            raise ValueError("SynCD Apply References: reference_conditioning is empty; encode the reference "
                             "prompt (e.g. 'photo of a dog') and connect it")
        wiring.check_conditioning("SynCD Apply References", model, reference_conditioning=reference_conditioning)
        sampling = model.get_model_object("model_sampling")
        config = ReferenceConfig(references=references, conditioning=reference_conditioning,
                                 noise_mode=reference_noise, seed=noise_seed,
                                 sigma_start=sampling.percent_to_sigma(start_percent),
                                 sigma_end=sampling.percent_to_sigma(end_percent), reference_text=reference_text,
                                 flux_uncond_text_sees_references=flux_uncond_text_sees_references,
                                 use_masks=use_masks)
        patched, _ = apply_reference_injection(model, config)
        return io.NodeOutput(patched)

"""SynCDReferenceImages and SynCDApplyReferences: the SynCD customization model's reference conditioning as nodes."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from .reference_injection import NOISE_MODES, ReferenceConfig, apply_reference_injection
from .references import MAX_REFERENCES, ReferenceSet, References, foreground_masks


def encode_references(vae, images: torch.Tensor, masks=None) -> ReferenceSet:
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
    latents = vae.encode(images[..., :3])
    return ReferenceSet(images=images[..., :3].cpu(), latents=latents.float().cpu(), masks=masks.float().cpu())


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
                                          "masks).")],
            outputs=[References.Output(display_name="REFERENCES")],
        )

    @classmethod
    def execute(cls, images, vae=None, masks=None) -> io.NodeOutput:
        return io.NodeOutput(encode_references(vae, images, masks))


class SynCDApplyReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDApplyReferences",
            display_name="SynCD Apply References",
            category="SynCD/customization",
            description="The SynCD customization model's reference conditioning: every step, one extra forward "
                        "pass over the references (noised to the current level for SD1.5/SDXL, clean beside the "
                        "target for Flux) captures their self-attention features, and the target's self-attention "
                        "attends to its own tokens and the references' foreground tokens. Sample with the SynCD "
                        "Normalized Text+Image Guider.",
            inputs=[io.Model.Input("model"),
                    References.Input("references"),
                    io.Conditioning.Input("reference_conditioning",
                                          tooltip="Text of the reference pass (upstream: 'photo of a <category>')."),
                    io.Combo.Input("reference_noise", options=list(NOISE_MODES), default="auto",
                                   tooltip="auto: noised for SD1.5/SDXL, clean for Flux (as the official models "
                                           "were trained). noised: fresh noise to the current level every step. "
                                           "clean: the encoded references at the current timestep."),
                    io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                                 control_after_generate=False,
                                 tooltip="Seed of the references' fresh noise (noised mode)."),
                    io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                                   tooltip="Sampling progress at which reference injection starts."),
                    io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                                   tooltip="Sampling progress at which reference injection ends.")],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, references, reference_conditioning, reference_noise, noise_seed, start_percent,
                end_percent) -> io.NodeOutput:
        if start_percent > end_percent:
            raise ValueError(f"SynCD Apply References: start_percent ({start_percent}) is after end_percent "
                             f"({end_percent})")
        if not reference_conditioning:
            raise ValueError("SynCD Apply References: reference_conditioning is empty; encode the reference "
                             "prompt (e.g. 'photo of a dog') and connect it")
        sampling = model.get_model_object("model_sampling")
        config = ReferenceConfig(references=references, conditioning=reference_conditioning,
                                 noise_mode=reference_noise, seed=noise_seed,
                                 sigma_start=sampling.percent_to_sigma(start_percent),
                                 sigma_end=sampling.percent_to_sigma(end_percent))
        patched, _ = apply_reference_injection(model, config)
        return io.NodeOutput(patched)

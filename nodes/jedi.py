"""JeDiJointImageSet: personalization as inpainting of a joint image set (JeDi §3.3).

The references are the known elements of the set, the images to generate the missing ones. The LATENT carries a
``noise_mask`` that is 0 on the references and 1 on the images to generate, so ComfyUI's sampler applies JeDi's
replacement trick itself (``KSamplerX0Inpaint``): before every model call the references are replaced by their
forward-diffused versions x̂_t = x̂ + σ_t·n (the noise n is the sampling noise, fixed over the run), and after it by
the clean references, so only the missing images keep the backward-diffusion output. Coupled attention over the
set comes from SynCD Masked Shared Attention with images_per_subject = the set size.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from .references import MAX_REFERENCES, foreground_masks


def joint_image_set(vae, images: torch.Tensor, to_generate: int, masks=None) -> tuple[dict, torch.Tensor]:
    """(LATENT with the replacement mask, foreground MASK batch for the whole set)."""
    if vae is None:
        raise ValueError("JeDi Joint Image Set: no VAE connected; connect the VAE of the model you sample with")
    n = images.shape[0]
    if not 1 <= n <= MAX_REFERENCES:
        raise ValueError(f"JeDi Joint Image Set: give 1 to {MAX_REFERENCES} reference images; got {n}")
    latents = vae.encode(images[..., :3]).float().cpu()
    size = n + to_generate
    samples = torch.cat([latents, torch.zeros(to_generate, *latents.shape[1:])])
    h, w = images.shape[1:3]
    ref_masks = foreground_masks(masks, n, h, w, "JeDi Joint Image Set")
    ref_masks = torch.nn.functional.interpolate(ref_masks[:, None], size=(h, w), mode="area")[:, 0]
    foreground = torch.cat([ref_masks, torch.ones(to_generate, h, w)])
    keep = torch.zeros(size, 1, *latents.shape[2:])
    keep[n:] = 1.0
    return {"samples": samples, "noise_mask": keep}, foreground


class JeDiJointImageSet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JeDiJointImageSet",
            display_name="JeDi Joint Image Set (inpainting)",
            category="SynCD/customization",
            description="JeDi personalization as inpainting: a latent batch of [references | images to generate] "
                        "whose noise_mask makes the sampler replace the references by their noised versions every "
                        "step (the replacement trick). Put SynCD Masked Shared Attention (images_per_subject = "
                        "set size) on the model and sample with JeDi Image Guider.",
            inputs=[io.Image.Input("reference_images", tooltip="The known images of the set (1 to 8, one batch)."),
                    io.Vae.Input("vae"),
                    io.Int.Input("images_to_generate", default=1, min=1, max=16,
                                 tooltip="How many new images of the subject to generate."),
                    io.Mask.Input("reference_masks", optional=True,
                                  tooltip="Foreground masks of the references, for masked sharing.")],
            outputs=[io.Latent.Output(display_name="LATENT"),
                     io.Mask.Output(display_name="foreground_masks",
                                    tooltip="One mask per image of the set (generated images: whole image).")],
        )

    @classmethod
    def execute(cls, reference_images, vae, images_to_generate, reference_masks=None) -> io.NodeOutput:
        return io.NodeOutput(*joint_image_set(vae, reference_images, images_to_generate, reference_masks))

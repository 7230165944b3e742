"""SynCDAutomaticMasks: the subject masks Masked Shared Attention estimated while sampling (SynCD §3.1).

Upstream's deformable data generation saves, per image, the Otsu map of the running mean attention to the subject
word (undilated, on the token grid) as the image's mask for training. The automatic mode of SynCD Masked Shared
Attention keeps that estimate in its run state (``nodes/shared_attention.py``, attached to the patched MODEL); this
node reads it after the sampler has run and sizes it to the decoded images.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention.masks import resize_to_grid
from .shared_attention import RUN_ATTACHMENT

NAME = "SynCD Automatic Masks"


def estimated_masks(model, images: torch.Tensor, dilated: bool = False) -> torch.Tensor:
    """(B, H, W) masks of the last sampling run of ``model``, nearest-resized to the (B, H, W, C) ``images``."""
    run = model.get_attachment(RUN_ATTACHMENT) if hasattr(model, "get_attachment") else None
    if run is None:
        raise ValueError(f"{NAME}: the MODEL has no Masked Shared Attention; connect the MODEL output of SynCD Masked "
                         f"Shared Attention (mask_mode automatic) that the sampler used")
    if run.config.mask_mode != "automatic":
        raise ValueError(f"{NAME}: SynCD Masked Shared Attention runs with mask_mode "
                         f"'{run.config.mask_mode}'; masks are estimated only with mask_mode automatic")
    estimator = run.estimator
    masks = None
    if estimator is not None:
        estimator.finish_step()  # fold in the last step's attention (no-op if already folded)
        masks = estimator.masks if dilated else estimator.otsu_masks
    if masks is None:
        raise ValueError(f"{NAME}: no estimate yet; connect the images decoded from this model's sampler output "
                         f"so that this node runs after sampling")
    if masks.shape[0] != images.shape[0]:
        raise ValueError(f"{NAME}: the last sampling run estimated {masks.shape[0]} masks but {images.shape[0]} "
                         f"images are connected; connect the images of that run")
    h, w = images.shape[1:3]
    return resize_to_grid(masks.cpu(), h, w).view(-1, h, w).float()


class SynCDAutomaticMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDAutomaticMasks",
            display_name=NAME,
            category="SynCD/datagen",
            description="The subject masks SynCD Masked Shared Attention (mask_mode automatic) estimated while "
                        "sampling: per image the Otsu threshold of the mean attention to the subject word, as "
                        "upstream's deformable data generation saves for training. Runs after the sampler.",
            inputs=[io.Model.Input("model", tooltip="The MODEL output of SynCD Masked Shared Attention (automatic) "
                                                    "that the sampler used."),
                    io.Image.Input("images", tooltip="The images decoded from that sampler's output: orders this "
                                                     "node after sampling and gives the mask size."),
                    io.Boolean.Input("dilated", default=False,
                                     tooltip="off: the Otsu map as upstream saves it; on: dilated with a 3x3 box, "
                                             "the mask the sharing used.")],
            outputs=[io.Mask.Output(display_name="masks")],
        )

    @classmethod
    def execute(cls, model, images, dilated=False) -> io.NodeOutput:
        return io.NodeOutput(estimated_masks(model, images, dilated))

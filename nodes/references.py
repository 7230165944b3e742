"""The reference set handed from SynCDReferenceImages to the patches that use it (type ``SYNCD_REFERENCES``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

References = io.Custom("SYNCD_REFERENCES")

MAX_REFERENCES = 8


@dataclass(frozen=True)
class ReferenceSet:
    images: torch.Tensor    # (R, H, W, 3) ComfyUI IMAGE in [0, 1]
    latents: torch.Tensor   # (R, C, h, w) VAE latents as ``VAE.encode`` returns them (before ``process_in``)
    masks: torch.Tensor     # (R, H, W) foreground in [0, 1]; all ones where no mask was given
    mask_dilation: int = 3  # box size at the latent grid (upstream inference: 3×3 at 128² for 1024 px)

    def __len__(self) -> int:
        return self.latents.shape[0]


def foreground_masks(masks, count: int, height: int, width: int, node: str) -> torch.Tensor:
    """(count, H, W) foreground masks of ``count`` images: all ones without masks, else one mask per image."""
    if masks is None:
        return torch.ones(count, height, width)
    masks = masks if masks.ndim == 3 else masks.unsqueeze(0)
    if masks.shape[0] != count:
        raise ValueError(f"{node}: {masks.shape[0]} foreground mask(s) for {count} reference image(s); give one "
                         f"mask per reference image (white = subject), or no masks to use the whole images")
    return masks.float().cpu()

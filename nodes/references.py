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

    def __len__(self) -> int:
        return self.latents.shape[0]

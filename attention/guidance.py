"""Text + image guidance: SynCD eq. 4, Brooks et al. (InstructPix2Pix), JeDi eq. 3 and guidance rescale.

All functions take per-branch predictions of one parameterization and return the guided prediction. Eq. 4,
Brooks et al. and JeDi eq. 3 are affine combinations (coefficients summing to 1) and SynCD's normalization compares
norms of differences, so they give the same result on ε, v or x_t − x̂₀. Guidance rescale compares standard
deviations and must get the model's own prediction (v for the official SynCD SDXL model).
"""

from __future__ import annotations

import torch


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm over every non-batch dim, shaped to broadcast against ``x``."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def normalized_guidance(uncond: torch.Tensor, image: torch.Tensor, full: torch.Tensor,
                        image_scale: float, text_scale: float, canvas=None) -> torch.Tensor:
    """SynCD eq. 4 as the official code computes it (``normalized_guidance_image``, nupurkmr9/syncd
    ``method/pipelines/sdxl_pipeline/pipeline.py`` and ``flux_pipeline/pipeline.py``).

    Δ_img = ε_img − ε_unc, Δ_txt = ε_full − ε_img; per sample, the larger of the two is shrunk to the norm of the
    smaller (both scaled by min(1, m/‖Δ‖) with m the smaller norm; no epsilon); ε = ε_img + s_img·Δ_img + s_txt·Δ_txt.
    ``canvas`` is an optional (uncond, image, full) triple of predictions for further tokens of every sample's canvas
    (the Flux references, which upstream packs beside the target): their differences count in the norms, as upstream
    takes them over the whole packed canvas, but only the target is returned.
    """
    d_img, d_txt = image - uncond, full - image
    n_img, n_txt = _per_sample_norm(d_img), _per_sample_norm(d_txt)
    if canvas is not None:
        c_unc, c_img, c_full = (c.float() for c in canvas)
        n_img = (n_img.float() ** 2 + (c_img - c_unc).pow(2).sum()).sqrt().to(n_img.dtype)
        n_txt = (n_txt.float() ** 2 + (c_full - c_img).pow(2).sum()).sqrt().to(n_txt.dtype)
    m = torch.minimum(n_img, n_txt)
    d_img = d_img * torch.clamp(m / n_img, max=1.0).nan_to_num(1.0)
    d_txt = d_txt * torch.clamp(m / n_txt, max=1.0).nan_to_num(1.0)
    return image + image_scale * d_img + text_scale * d_txt


def brooks_guidance(uncond: torch.Tensor, image: torch.Tensor, full: torch.Tensor,
                    image_scale: float, text_scale: float, canvas=None) -> torch.Tensor:
    """Brooks et al. 2023 (InstructPix2Pix) eq. 3, the un-normalized combination SynCD compares against:
    ε = ε_unc + s_img·(ε_img − ε_unc) + s_txt·(ε_full − ε_img). ``canvas`` is accepted and unused (no norms)."""
    return uncond + image_scale * (image - uncond) + text_scale * (full - image)


def guidance_rescale(guided: torch.Tensor, full: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2024 eq. 15–16: match the per-sample std of the guided prediction to the fully conditioned one,
    blended with weight ``phi`` (0 = off)."""
    if phi == 0:
        return guided
    dims = list(range(1, guided.dim()))
    rescaled = guided * (full.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def jedi_image_guidance(null: torch.Tensor, full: torch.Tensor, scale: float) -> torch.Tensor:
    """JeDi eq. 3: ε̃ = ε⁰ + λ·(ε(x_t, x̂, M) − ε⁰), ε⁰ with the text prompt and all reference images null."""
    return null + scale * (full - null)


def linear_image_scale(start: float, end: float, step: int, steps: int) -> float:
    """The image scale of SynCD's adaptive schedule at ``step`` of ``steps``: linear from ``start`` (first step) to
    ``end`` (last step). Upstream SDXL uses 8 + 5·(1000 − t)/1000, i.e. start 8 rising by 5."""
    if steps <= 1:
        return start
    return start + (end - start) * min(max(step, 0), steps - 1) / (steps - 1)

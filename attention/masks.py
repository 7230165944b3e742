"""Foreground masks on token grids, and SynCD's automatic masks for deformable subjects (§3.2).

Automatic masks follow the official ``AttentionStore`` (``dataset/src/editor.py``):
per layer, the attention between image tokens and the text tokens, softmaxed
over the text tokens, averaged over heads, summed over the subject word's
tokens; averaged over layers within a step and over the steps so far; then
Otsu-thresholded per image and dilated with a 3×3 box, re-estimated after
every step.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def resize_to_grid(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H, W) masks → (B, h·w) bool by nearest sampling: any resolution or ratio, non-square grids included.

    Upstream resizes masks to each layer's grid with ``F.interpolate(mode="nearest")`` (nupurkmr9/syncd
    ``method/pipelines/sdxl_pipeline/pipeline.py``); a token is foreground when the sampled value is > 0."""
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    grid = F.interpolate(masks.unsqueeze(1).float(), size=(h, w), mode="nearest")
    return (grid > 0).flatten(1)


def foreground_grid(masks: torch.Tensor, h: int, w: int, dilation: int) -> torch.Tensor:
    """(B, H, W) masks → (B, h, w) float in {0, 1}: binarize > 0, area-downsample to the h×w grid (a cell is
    foreground when any of its pixels is), dilate with a ``dilation``×``dilation`` box (1 or 0: none).

    This is upstream's rule at its two places: reference masks at inference are binarized, resized to the latent
    grid and dilated 3×3 (nupurkmr9/syncd ``method/data/data.py``, 128² at 1024 px); rigid data generation
    area-downsamples the rendered foreground to the token grid, dilates 9×9 and binarizes > 0
    (``dataset/gen_rigid.py``, 32² at 512 px). Layers then take it with :func:`resize_to_grid`."""
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    cells = F.interpolate((masks.unsqueeze(1) > 0).float(), size=(h, w), mode="area")
    grid = (cells > 0).float().squeeze(1)
    if dilation > 1:
        grid = dilate(grid, dilation)
    return grid


def layer_foreground(masks: torch.Tensor, base_grid: tuple[int, int], dilation: int,
                     layer_grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) pixel masks → (B, h·w) bool foreground tokens of a layer: :func:`foreground_grid` at the base grid
    (the latent or token grid), then nearest to the layer's grid."""
    return resize_to_grid(foreground_grid(masks, *base_grid, dilation), *layer_grid)


def subject_attention(image_vectors: torch.Tensor, text_vectors: torch.Tensor,
                      token_positions: Sequence[int]) -> torch.Tensor:
    """(B, heads, P, D) image and (B, heads, T, D) text vectors → (B, P): softmax over text tokens of the
    scaled dot products, summed over the subject's token positions and averaged over heads."""
    scale = image_vectors.shape[-1] ** -0.5
    logits = torch.einsum("bhpd,bhtd->bhpt", image_vectors.float(), text_vectors.float()) * scale
    probs = logits.softmax(dim=-1)[..., list(token_positions)].sum(-1)
    return probs.mean(1)


def subject_attention_rows(image_vectors: torch.Tensor, text_vectors: torch.Tensor,
                           row_positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """:func:`subject_attention` where every row has its own subject-token positions (one prompt per image, as
    upstream's data generation gives each image of a set its own background prompt, so the subject word sits at
    different positions): row b sums the softmax over the text tokens at ``row_positions[b]``."""
    b, t = image_vectors.shape[0], text_vectors.shape[2]
    if len(row_positions) != b:
        raise ValueError(f"subject token positions for {len(row_positions)} rows, but the batch has {b} rows")
    scale = image_vectors.shape[-1] ** -0.5
    logits = torch.einsum("bhpd,bhtd->bhpt", image_vectors.float(), text_vectors.float()) * scale
    select = torch.zeros(b, t, device=logits.device)
    for row, positions in enumerate(row_positions):
        select[row, list(positions)] = 1.0
    return torch.einsum("bhpt,bt->bhp", logits.softmax(dim=-1), select).mean(1)


def otsu_binarize(maps: torch.Tensor, levels: int = 10) -> torch.Tensor:
    """Per-image Otsu threshold as in the official code: min-max normalize, try thresholds t/levels,
    maximize p_lo·p_hi·(μ_lo − μ_hi)². (B, P) → (B, P) float in {0, 1}.

    Deviation: values equal to the threshold become 1 (the official code leaves them fractional)."""
    lo, hi = maps.min(-1, keepdim=True).values, maps.max(-1, keepdim=True).values
    norm = (maps - lo) / (hi - lo).clamp_min(1e-12)
    thresholds = torch.arange(levels, device=maps.device, dtype=norm.dtype) / levels
    low = norm.unsqueeze(1) < thresholds.view(1, -1, 1)                      # (B, levels, P)
    n_low = low.sum(-1).to(norm.dtype)
    n_high = norm.shape[1] - n_low
    sum_low = (norm.unsqueeze(1) * low).sum(-1)
    mean_low = sum_low / n_low.clamp_min(1)
    mean_high = (norm.sum(-1, keepdim=True) - sum_low) / n_high.clamp_min(1)
    g = (n_low / norm.shape[1]) * (n_high / norm.shape[1]) * (mean_low - mean_high) ** 2
    g = torch.where((n_low > 0) & (n_high > 0), g, torch.zeros_like(g))      # an empty side never wins
    best = torch.where(g.amax(1) > 0, g.argmax(1), torch.zeros_like(g.argmax(1)))  # first maximum, else t = 0
    return (norm >= thresholds[best].unsqueeze(1)).to(maps.dtype)


def dilate(masks: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Binary dilation of (B, h, w) masks with a size×size box (upstream: conv with ones, ``padding="same"``,
    clamped to [0, 1]); ``size`` is odd."""
    if size % 2 == 0:
        raise ValueError(f"mask dilation must be an odd box size (1, 3, 5, ...); got {size}")
    return F.max_pool2d(masks.unsqueeze(1).float(), size, stride=1, padding=size // 2).squeeze(1)


class AutomaticMaskEstimator:
    """Running estimate of per-image subject masks over a sampling run (SynCD §3.2).

    ``add`` takes one layer's (B, P) subject attention at its (h, w) grid; ``finish_step`` folds the step's
    layer average into the running mean over steps; ``masks`` is the Otsu + dilation of that mean at the
    canonical grid, or None before the first step has finished."""

    def __init__(self, grid: tuple[int, int]):
        self.grid = grid
        self._step_sum: Optional[torch.Tensor] = None
        self._step_layers = 0
        self._history_sum: Optional[torch.Tensor] = None
        self._history_steps = 0
        self._masks: Optional[torch.Tensor] = None
        self._otsu: Optional[torch.Tensor] = None

    def add(self, maps: torch.Tensor, hw: tuple[int, int]) -> None:
        b = maps.shape[0]
        grid_maps = maps.reshape(b, 1, *hw).float()
        if hw != self.grid:
            grid_maps = F.interpolate(grid_maps, size=self.grid, mode="bilinear", align_corners=False)
        grid_maps = grid_maps.flatten(1).detach()
        self._step_sum = grid_maps if self._step_sum is None else self._step_sum + grid_maps
        self._step_layers += 1

    def finish_step(self) -> None:
        if self._step_layers == 0:
            return
        step_mean = self._step_sum / self._step_layers
        self._history_sum = step_mean if self._history_sum is None else self._history_sum + step_mean
        self._history_steps += 1
        self._step_sum, self._step_layers = None, 0
        mean = self._history_sum / self._history_steps
        binary = otsu_binarize(mean).reshape(-1, *self.grid)
        self._otsu = binary
        self._masks = dilate(binary).clamp(0, 1)

    @property
    def masks(self) -> Optional[torch.Tensor]:
        """(B, h, w) float masks in {0, 1}, or None."""
        return self._masks

    @property
    def otsu_masks(self) -> Optional[torch.Tensor]:
        """(B, h, w) Otsu maps before dilation (upstream saves these for training), or None."""
        return self._otsu

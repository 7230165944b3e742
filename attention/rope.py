"""Moving rotary-encoded keys to another position (Flux's axial RoPE).

Flux encodes each token's [index, row, col] id with one 2×2 rotation per
frequency pair, the axes' pairs concatenated along the head dimension
(``EmbedND``/``rope`` in Flux). A rotation composes additively, so keys already
rotated for row r become keys at row r + offset by one more rotation of the
row axis' pairs by ``offset · ω`` — no recomputation from ids. SynCD stacks the
other images below the query's own image (``flux_syncd.py``): slot s sits
``s · h`` rows down.
"""

from __future__ import annotations

from typing import Sequence

import torch


def axis_frequencies(dim: int, theta: float) -> torch.Tensor:
    """ω_k = θ^(-2k/dim), k = 0..dim/2-1: Flux's per-axis RoPE frequencies."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def shift_axis(x: torch.Tensor, offset: float, axes_dim: Sequence[int], axis: int, theta: float) -> torch.Tensor:
    """Rotate RoPE-encoded vectors x (..., head_dim) as if their position on ``axis`` moved by ``offset``."""
    start = sum(axes_dim[:axis])
    dim = axes_dim[axis]
    if sum(axes_dim) != x.shape[-1]:
        raise ValueError(f"axes_dim {list(axes_dim)} does not sum to head_dim {x.shape[-1]}")
    angle = (offset * axis_frequencies(dim, theta)).to(device=x.device, dtype=torch.float32)
    cos, sin = angle.cos(), angle.sin()
    out = x.clone()
    pairs = x[..., start:start + dim].float().reshape(*x.shape[:-1], dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    out[..., start:start + dim] = rotated.reshape(*x.shape[:-1], dim).to(x.dtype)
    return out

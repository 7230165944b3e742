"""SynCD's dataset filter (upstream ``dataset/cal_scores.py`` + ``method/data/data.py`` L146-170), pure torch.

Per object (the images generated together of one subject):

* **aesthetic**: the LAION score of each image (:mod:`core.aesthetic`);
* **DINOv2**: the cosine similarity of every image pair on square crops around the object mask, background kept
  (``dinov2_vitl14_reg`` CLS, L2-normalised; :func:`core.identity.features` with ``mask_background=False``),
  stored as upstream does: the strict upper triangle (``torch.triu(sim, diagonal=1)``), zeros elsewhere;
* **keep rule**: image i is kept when its aesthetic score is ≥ ``min_aesthetic`` and it is in at least one pair
  whose similarity lies in [``min_dino``, 0.98] (more similar pairs are near-duplicates and do not count); an
  object is kept when at least 2 of its images are. A DINOv2 threshold ≤ 0 switches the pair part off, as in
  upstream's loader (whose zero-filled lower triangle then pairs every image).

The paper's thresholds: aesthetic > 6, mean DINOv2 > 0.7; upstream's code leaves both off (-1).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .identity import features

NEAR_DUPLICATE = 0.98   # upstream: hard-coded upper bound of a counting pair
MIN_KEPT = 2            # upstream: an object needs more than one image
PAPER_MIN_AESTHETIC = 6.0
PAPER_MIN_DINO = 0.7


def pairwise_dino(feats: torch.Tensor) -> torch.Tensor:
    """Upstream's stored DINOv2 matrix: cosine of L2-normalised features, strict upper triangle (diagonal and below
    zero)."""
    return torch.triu(feats @ feats.T, diagonal=1)


def dino_scores(model, images: torch.Tensor, masks: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, N) upstream DINOv2 scores of one object's (N, H, W, 3) images with (N, H, W) masks: square crop around
    each mask, background kept (``cal_scores.py`` with ``cropped_image=True``)."""
    return pairwise_dino(features(model, images, masks, "dinov2", mask_background=False))


def keep_images(aesthetics: Optional[Sequence[float]], dino, min_aesthetic: float, min_dino: float) -> list[bool]:
    """Upstream's keep rule per image (see the module docstring). ``aesthetics``: per image or None (that part
    off); ``dino``: (N, N) pair matrix (upstream's triangle or a full symmetric one; only the strict upper
    triangle is read) or None (that part off)."""
    n = None
    if aesthetics is not None:
        aesthetics = torch.as_tensor(list(aesthetics), dtype=torch.float64)
        n = aesthetics.numel()
    if dino is not None:
        dino = torch.as_tensor(dino, dtype=torch.float64)
        if dino.ndim != 2 or dino.shape[0] != dino.shape[1] or (n is not None and dino.shape[0] != n):
            raise ValueError(f"DINOv2 scores must be an N x N matrix for the {n or 'N'} images; got "
                             f"{tuple(dino.shape)}")
        n = dino.shape[0]
    if n is None:
        raise ValueError("keep_images needs aesthetic scores, DINOv2 scores or both")
    keep = torch.ones(n, dtype=torch.bool)
    if aesthetics is not None:
        keep &= aesthetics >= min_aesthetic
    if dino is not None and min_dino > 0:
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        pair_ok = upper & (dino >= min_dino) & (dino <= NEAR_DUPLICATE)
        keep &= pair_ok.any(0) | pair_ok.any(1)
    return keep.tolist()


def object_kept(keep: Sequence[bool]) -> bool:
    """Upstream: an object is used when at least 2 of its images are kept."""
    return sum(bool(k) for k in keep) >= MIN_KEPT


def mean_pair_score(dino) -> float:
    """The mean DINOv2 similarity over the object's image pairs (the paper's "mean intra-cluster similarity")."""
    dino = torch.as_tensor(dino, dtype=torch.float64)
    n = dino.shape[0]
    if n < 2:
        return float("nan")
    rows, cols = torch.triu_indices(n, n, offset=1)
    return float(dino[rows, cols].mean())


def subset_dino(dino, indices: Sequence[int]) -> list[list[float]]:
    """The pair matrix of the images ``indices`` (in that order), in upstream's strict-upper-triangle layout."""
    dino = torch.as_tensor(dino, dtype=torch.float64)
    full = torch.triu(dino, diagonal=1)
    full = full + full.T
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    return torch.triu(full[idx][:, idx], diagonal=1).tolist()

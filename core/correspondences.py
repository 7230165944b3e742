"""Cross-view pixel correspondences of a rendered rigid object (SynCD §3.2; upstream ``gen_corresp.py`` and
``dataloader.py``), in :mod:`core.correspondence_format`'s convention.

* :func:`match_views`: unproject view A's pixel centres with its depth, project into view B, read B's depth at the
  nearest pixel (``grid_sample`` nearest, ``align_corners=False``) and keep pairs with both depths > 0 and
  |Δd| < ``tolerance`` (upstream: 0.01 on the unit-cube mesh, at 128²).
* :func:`find_triplets`: upstream's rules: views with elevation outside (0°, 60°) are left out, every triplet of the
  rest gets the pairs (0,1), (0,2), (1,2); a pair needs more than ``min_fraction`` (0.1) of the grid's pixels matched
  and a triplet all three pairs. :func:`least_overlap` picks the k-th smallest total match count.
* :func:`sample_placement` / :func:`place_correspondences`: upstream's render augmentation (resize, area < 0.1
  discarded, scale rule, paste on black at random x with y near the bottom) and the same transform of the rows.

Pure torch: no ComfyUI import.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import torch

from .correspondence_format import Correspondences
from .mesh_views import Camera, Placement, View, grid_size, render_view

TOLERANCE = 0.01
MIN_FRACTION = 0.1
ELEVATION_RANGE = (0.0, 60.0)
TRIPLET_PAIRS = ((0, 1), (0, 2), (1, 2))


def pixel_grid(size: tuple[int, int], dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized (y, x) of every pixel centre, each (H, W): x = (2c + 1)/W - 1 (align_corners=False)."""
    h, w = size
    y = (2 * torch.arange(h, dtype=dtype) + 1) / h - 1
    x = (2 * torch.arange(w, dtype=dtype) + 1) / w - 1
    return torch.meshgrid(y, x, indexing="ij")


def _project(points: torch.Tensor, view: View) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World points (N, 3) -> normalized y, x in ``view`` and camera z."""
    cam = points @ view.world_to_camera[:3, :3].T + view.world_to_camera[:3, 3]
    z = cam[:, 2]
    safe = torch.where(z.abs() > 1e-12, z, torch.full_like(z, 1e-12))
    u = view.K[0, 0] * cam[:, 0] / safe + view.K[0, 2]
    v = view.K[1, 1] * cam[:, 1] / safe + view.K[1, 2]
    h, w = view.size
    return 2 * v / h - 1, 2 * u / w - 1, z


def unproject(view: View) -> torch.Tensor:
    """World points (H·W, 3) of every pixel centre of ``view`` at its depth (background rows are meaningless)."""
    h, w = view.size
    gy, gx = pixel_grid((h, w))
    u, v = (gx + 1) * w / 2, (gy + 1) * h / 2
    d = view.depth.double()
    cam = torch.stack([(u - view.K[0, 2]) / view.K[0, 0] * d, (v - view.K[1, 2]) / view.K[1, 1] * d, d], -1)
    rot, t = view.world_to_camera[:3, :3], view.world_to_camera[:3, 3]
    return (cam.reshape(-1, 3) - t) @ rot  # rot.T @ (x - t) per row


def match_views(a: View, b: View, tolerance: float = TOLERANCE) -> torch.Tensor:
    """(M, 4) float32 rows [y_a, x_a, y_b, x_b]: every pixel centre of ``a`` whose surface point is the one ``b`` sees
    at the nearest pixel of its projection (upstream ``getcorresp``: |Δd| < tolerance, both depths > 0)."""
    points = unproject(a)
    yb, xb, zb = _project(points, b)
    grid = torch.stack([xb, yb], -1).view(1, 1, -1, 2)
    sampled = torch.nn.functional.grid_sample(b.depth.view(1, 1, *b.size).double(), grid, mode="nearest",
                                              padding_mode="zeros", align_corners=False).view(-1)
    da = a.depth.reshape(-1).double()
    keep = (da > 0) & (zb > 0) & (sampled > 0) & ((sampled - zb).abs() < tolerance)
    ya, xa = (g.reshape(-1) for g in pixel_grid(a.size))
    return torch.stack([ya[keep], xa[keep], yb[keep], xb[keep]], -1).float()


def match_views_reference(a: View, b: View, tolerance: float = TOLERANCE) -> torch.Tensor:
    """Straightforward per-pixel loop version of :func:`match_views` (tests only)."""
    rows = []
    ha, wa = a.size
    hb, wb = b.size
    rot_a, t_a = a.world_to_camera[:3, :3], a.world_to_camera[:3, 3]
    for r in range(ha):
        for c in range(wa):
            d = float(a.depth[r, c])
            if d <= 0:
                continue
            cam = torch.tensor([(c + 0.5 - a.K[0, 2]) / a.K[0, 0] * d, (r + 0.5 - a.K[1, 2]) / a.K[1, 1] * d, d],
                               dtype=torch.float64)
            world = rot_a.T @ (cam - t_a)
            pb = b.world_to_camera[:3, :3] @ world + b.world_to_camera[:3, 3]
            if pb[2] <= 0:
                continue
            u = float(b.K[0, 0] * pb[0] / pb[2] + b.K[0, 2])
            v = float(b.K[1, 1] * pb[1] / pb[2] + b.K[1, 2])
            cb, rb = round(u - 0.5), round(v - 0.5)  # nearest pixel centre
            if not (0 <= cb < wb and 0 <= rb < hb):
                continue
            db = float(b.depth[rb, cb])
            if db > 0 and abs(db - float(pb[2])) < tolerance:
                rows.append([(2 * r + 1) / ha - 1, (2 * c + 1) / wa - 1, 2 * v / hb - 1, 2 * u / wb - 1])
    return torch.tensor(rows, dtype=torch.float32).view(-1, 4)


@dataclasses.dataclass(frozen=True)
class Triplet:
    """Three view indices (ascending) and their correspondences; ``matches`` = total rows over the three pairs."""
    views: tuple[int, int, int]
    correspondences: Correspondences

    @property
    def matches(self) -> int:
        return sum(int(r.shape[0]) for r in self.correspondences.pairs.values())


def pair_passes(rows: torch.Tensor, size: tuple[int, int], min_fraction: float = MIN_FRACTION) -> bool:
    """Upstream: a pair needs more than ``min_fraction`` of the grid's pixels matched (> 1638 at 128²)."""
    return rows.shape[0] > min_fraction * size[0] * size[1]


def find_triplets(views: list, elevations, elevation_range=ELEVATION_RANGE, min_fraction: float = MIN_FRACTION,
                  tolerance: float = TOLERANCE, allowed=None, progress=None) -> list[Triplet]:
    """Every triplet (i < j < k, in ``itertools.combinations`` order) of the views with elevation strictly inside
    ``elevation_range`` whose pairs (0,1), (0,2), (1,2) all pass :func:`pair_passes`; ``allowed(i)`` can leave out
    more views. Each pair is matched once, from the lower to the higher view index, as upstream."""
    lo, hi = elevation_range
    usable = [i for i, e in enumerate(elevations) if lo < e < hi and (allowed is None or allowed(i))]
    if len(usable) < 3:
        return []
    size = views[usable[0]].size
    cache: dict = {}

    def pair(i, j):
        if (i, j) not in cache:
            cache[(i, j)] = match_views(views[i], views[j], tolerance)
            if progress is not None:
                progress()
        return cache[(i, j)]

    out = []
    for combo in itertools.combinations(usable, 3):
        pairs = {}
        for a, b in TRIPLET_PAIRS:
            rows = pair(combo[a], combo[b])
            if not pair_passes(rows, size, min_fraction):
                break
            pairs[(a, b)] = rows
        else:
            out.append(Triplet(tuple(combo), Correspondences(3, tuple(size), pairs)))
    return out


def least_overlap(triplets: list[Triplet], k: int = 0) -> Triplet | None:
    """Upstream ``get_minimum_k_overlap``: the k-th smallest total match count (stable: ties keep their order);
    None when there are not k + 1 triplets."""
    if len(triplets) <= k:
        return None
    return sorted(triplets, key=lambda t: t.matches)[k]


# --- render augmentation (upstream dataloader.scale_shift / shift_scale_correspondences) --------------------------

MIN_AREA = 0.1
SMALL_AREA = 0.2


def sample_placement(area: float, size: tuple[int, int], rng: random.Random, min_area: float = MIN_AREA
                     ) -> Placement | None:
    """Upstream's scale and paste position for a render whose object covers ``area`` of the image: None if
    area < 0.1; scale ~ U(0.9, 0.95) if area < 0.2, else U(0.7, 0.95); x uniform, y in [H - h - 100, H - h] with
    100 px of upstream's 1024² canvas scaled to H (h, w = the scaled size rounded up to whole pixels, where upstream
    truncates: so the scaled image, and every moved coordinate, stays inside the canvas)."""
    if area < min_area:
        return None
    h, w = size
    scale = rng.uniform(0.9 if area < SMALL_AREA else 0.7, 0.95)
    sh, sw = math.ceil(h * scale), math.ceil(w * scale)
    margin = round(100 * h / 1024)
    x = rng.randint(0, w - sw)
    y = rng.randint(max(h - sh - margin, 0), h - sh)
    return Placement(scale, (float(x), float(y)))


def place_rows(rows: torch.Tensor, first: Placement, second: Placement, size: tuple[int, int]) -> torch.Tensor:
    """Rows [y_a, x_a, y_b, x_b] moved with their images' placements on an (H, W) canvas: c' = s(c + 1) - 1 + 2p/L
    (upstream's ``s·c + 1 - 2p/1024 - s`` in PyTorch3D NDC, whose axes are flipped)."""
    h, w = size
    out = rows.clone()
    for cols, pl in (((0, 1), first), ((2, 3), second)):
        s = pl.scale
        out[:, cols[0]] = s * (rows[:, cols[0]] + 1) - 1 + 2 * pl.offset[1] / h
        out[:, cols[1]] = s * (rows[:, cols[1]] + 1) - 1 + 2 * pl.offset[0] / w
    return out


def place_correspondences(corr: Correspondences, placements: list[Placement], size: tuple[int, int]
                          ) -> Correspondences:
    """Every pair of ``corr`` moved with the placement of its two views (one placement per view)."""
    if len(placements) != corr.views:
        raise ValueError(f"{len(placements)} placements for {corr.views} views; give one per view")
    pairs = {(a, b): place_rows(rows, placements[a], placements[b], size) for (a, b), rows in corr.pairs.items()}
    return Correspondences(corr.views, corr.size, pairs)


# --- the whole rigid-object view selection -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RigidViews:
    """The chosen triplet: its camera indices and cameras, placements (None = not augmented), the renders at the
    output size (placed), the correspondences on the grid (placed), and how many triplets passed the rules."""
    indices: tuple[int, int, int]
    cameras: list
    placements: list
    views: list
    correspondences: Correspondences
    candidates: int


def rigid_views(mesh, cameras: list[Camera], size: tuple[int, int], grid: int = 128, tolerance: float = TOLERANCE,
                min_fraction: float = MIN_FRACTION, elevation_range=ELEVATION_RANGE, rank: int = 0,
                augment: bool = True, seed: int = 0, progress=None) -> RigidViews:
    """Upstream's rigid-object pipeline on a (normalized) mesh: render the cameras whose elevation is inside
    ``elevation_range`` on the correspondence grid, match every triplet (:func:`find_triplets`), take the
    ``rank``-th least-overlap one (:func:`least_overlap`), draw each view's placement (:func:`sample_placement`,
    from ``seed``; views whose object covers < 10% of the grid leave their triplets out, where upstream drops the
    sample), and render the three views at ``size`` = (H, W) with the placements applied.
    ``progress(done, total)`` is called as work finishes."""
    h, w = int(size[0]), int(size[1])
    gsize = grid_size((h, w), grid)
    aspect = h / w
    lo, hi = elevation_range
    usable = [i for i, c in enumerate(cameras) if lo < c.elevation < hi]
    if len(usable) < 3:
        raise ValueError(f"{len(usable)} of the {len(cameras)} cameras have an elevation inside ({lo:g}°, {hi:g}°); "
                         f"a triplet needs 3: add views (or other elevations) or widen the elevation range")
    total = len(usable) + len(usable) * (len(usable) - 1) // 2 + 3
    done = [0]

    def step():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    low: list = [None] * len(cameras)
    for i in usable:
        low[i] = render_view(mesh, cameras[i], gsize, aspect=aspect)
        step()
    areas = {i: float(low[i].mask.float().mean()) for i in usable}
    allowed = (lambda i: areas[i] >= MIN_AREA) if augment else None
    triplets = find_triplets(low, [c.elevation for c in cameras], elevation_range, min_fraction, tolerance,
                             allowed=allowed, progress=step)
    choice = least_overlap(triplets, rank)
    if choice is None:
        small = [i for i in usable if areas[i] < MIN_AREA] if augment else []
        raise ValueError(
            f"only {len(triplets)} triplet(s) of the {len(usable)} usable views pass upstream's rules (each pair "
            f"> {min_fraction:g} of the {gsize[0]}x{gsize[1]} grid matched within {tolerance:g}), triplet_rank "
            f"{rank} needs {rank + 1}"
            + (f"; {len(small)} view(s) show the object on < {MIN_AREA:g} of the image" if small else "")
            + ": add views, change the seed or the cameras, or lower min_matched_fraction or triplet_rank")
    chosen = [cameras[i] for i in choice.views]
    placements = [None] * 3
    corr = choice.correspondences
    if augment:
        rng = random.Random(int(seed))
        placements = [sample_placement(areas[i], (h, w), rng) for i in choice.views]
        corr = place_correspondences(corr, placements, (h, w))
    views = []
    for cam, pl in zip(chosen, placements):
        views.append(render_view(mesh, cam, (h, w), pl, aspect))
        step()
    if progress is not None:
        progress(total, total)
    return RigidViews(choice.views, chosen, placements, views, corr, len(triplets))

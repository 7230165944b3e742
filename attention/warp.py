"""SynCD eq. 2: cross-view feature warping from the anchor view into the other views of one object.

Upstream (``dataset/src/flux_depth_syncd.py: warpcorrespondence``) warps the packed noisy latents x_t of the views of
one rigid object before the transformer runs, while σ > 0.8:

* the token grid is nearest-resized to the correspondence grid (64² → 128²);
* for every other view v, the **anchor** (the last view) is sampled with ``grid_sample`` (bicubic,
  ``align_corners=False``) at the anchor-side coordinates of the pair (v, anchor), NaNs set to 0, and written at the
  floor pixels of view v's coordinates (hard replacement, α = 1);
* the first non-anchor view also takes the second non-anchor view's already warped features (pair (0, 1)) where the
  anchor gave it nothing;
* below σ = 0.9 each write mask is eroded (3×3 mean, zero padded, ≥ 0.9);
* the grid is nearest-resized back (128² → 64²: only even (row, col) writes survive);
* a pixel index out of range disables warping.

Here the same happens for any correspondence grid (Hc, Wc) and token grid (H, W) (a UNet latent grid, or Flux's
packed 2×2 grid: :func:`pack_2x2`), several objects at once, with α and the interpolation as parameters. One
generalisation: a token whose nearest correspondence pixel is not written keeps its own value exactly (upstream's
nearest round trip is the identity only when Hc/H and Wc/W are integers, where both agree).

Coordinates follow :mod:`core.correspondence_format` (normalized, +x right, +y down, align_corners=False).
Pure torch: no ComfyUI import.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from ..core.correspondence_format import Correspondences

INTERPOLATIONS = ("bicubic", "bilinear")
ERODE_BELOW = 0.9        # upstream erodes the write masks while σ < 0.9
UPSTREAM_THRESHOLD = 0.8  # upstream warps while σ > 0.8 (gen_rigid.py --warp_thresh)


@dataclasses.dataclass(frozen=True)
class WarpStep:
    """One write of SynCD eq. 2: view ``target`` takes view ``source``'s features at ``coords`` where ``written``."""
    target: int
    source: int
    written: torch.Tensor   # (Hc, Wc) bool: correspondence-grid pixels of ``target`` this pair writes
    coords: torch.Tensor    # (Hc, Wc, 2) float: grid_sample (x, y) in ``source`` per written pixel (0 elsewhere)
    fill_only: bool         # upstream's second pass: only where the earlier steps wrote nothing into ``target``


@dataclasses.dataclass(frozen=True)
class WarpPlan:
    """Everything eq. 2 needs for one object on one token grid (built once, reused every step)."""
    views: int
    anchor: int
    grid: tuple[int, int]      # token grid (H, W)
    fine: tuple[int, int]      # correspondence grid (Hc, Wc)
    steps: tuple[WarpStep, ...]
    up_rows: torch.Tensor      # (Hc,) token row each correspondence-grid row shows (nearest upsampling)
    up_cols: torch.Tensor      # (Wc,)
    down_rows: torch.Tensor    # (H,) correspondence-grid row each token row reads (nearest downsampling)
    down_cols: torch.Tensor    # (W,)
    valid: bool = True         # False: a correspondence falls outside the grid, warping disabled (upstream)
    problem: str = ""

    def to(self, device) -> "WarpPlan":
        steps = tuple(dataclasses.replace(s, written=s.written.to(device), coords=s.coords.to(device))
                      for s in self.steps)
        return dataclasses.replace(self, steps=steps, up_rows=self.up_rows.to(device), up_cols=self.up_cols.to(device),
                                   down_rows=self.down_rows.to(device), down_cols=self.down_cols.to(device))


def nearest_indices(size_in: int, size_out: int) -> torch.Tensor:
    """Source index of every output index of ``F.interpolate(mode='nearest')`` from size_in to size_out."""
    src = torch.arange(size_in, dtype=torch.float32).view(1, 1, size_in, 1)
    return F.interpolate(src, size=(size_out, 1), mode="nearest").view(size_out).long()


def pixel_index(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Upstream's write pixel of a normalized coordinate: floor(size · (c + 1) / 2) (pixel centres map to
    themselves)."""
    return torch.floor(size * (coord.double() + 1.0) / 2.0).long()


def build_plan(corr: Correspondences, grid: tuple[int, int], anchor: int = -1,
               fill_from_second_view: bool = True) -> WarpPlan:
    """SynCD eq. 2 / upstream ``warpcorrespondence``: per non-anchor view, the correspondence-grid pixels it writes
    and where in the anchor it samples them; plus upstream's second pass (first non-anchor view ← second one)."""
    views = corr.views
    if not -views <= anchor < views:
        raise ValueError(f"anchor view {anchor} does not exist: the correspondences have {views} views")
    anchor %= views
    hc, wc = corr.size
    h, w = grid
    targets = [v for v in range(views) if v != anchor]
    pairs = [(t, anchor, False) for t in targets]
    if fill_from_second_view and len(targets) >= 2:
        pairs.append((targets[0], targets[1], True))
    steps, problem = [], ""
    for target, source, fill_only in pairs:
        rows = corr.between(target, source).float()
        written = torch.zeros(hc * wc, dtype=torch.bool)
        coords = torch.zeros(hc * wc, 2)
        if rows.numel():
            py, px = pixel_index(rows[:, 0], hc), pixel_index(rows[:, 1], wc)
            sy, sx = pixel_index(rows[:, 2], hc), pixel_index(rows[:, 3], wc)
            if min(py.min(), px.min(), sy.min(), sx.min()) < 0 or max(py.max(), sy.max()) >= hc \
                    or max(px.max(), sx.max()) >= wc:
                problem = (f"a correspondence of views ({target}, {source}) falls outside the {hc}x{wc} grid "
                           f"(a coordinate of exactly +1); as upstream, warping is disabled for this object")
            else:
                flat = py * wc + px
                # Several rows on one pixel: the last row wins (deterministic; upstream's index_put is unspecified).
                owner = torch.full((hc * wc,), -1, dtype=torch.long)
                owner.scatter_reduce_(0, flat, torch.arange(len(rows)), reduce="amax", include_self=True)
                written = owner >= 0
                coords[written] = rows[owner[written]][:, [3, 2]]
        steps.append(WarpStep(target, source, written.view(hc, wc), coords.view(hc, wc, 2), fill_only))
    return WarpPlan(views, anchor, (h, w), (hc, wc), tuple(steps), nearest_indices(h, hc), nearest_indices(w, wc),
                    nearest_indices(hc, h), nearest_indices(wc, w), valid=not problem, problem=problem)


def erode(mask: torch.Tensor) -> torch.Tensor:
    """Upstream's erosion: 3×3 mean of the (…, H, W) 0/1 mask with zero padding, kept where ≥ 0.9."""
    shape = mask.shape
    flat = mask.reshape(-1, 1, *shape[-2:]).float()
    mean = F.conv2d(flat, torch.full((1, 1, 3, 3), 1.0 / 9.0, dtype=flat.dtype, device=flat.device), padding=1)
    return (mean.clamp(0, 1) >= 0.9).to(mask.dtype).reshape(shape)


def write_masks(plan: WarpPlan, erosion: bool) -> list[torch.Tensor]:
    """The (Hc, Wc) float write mask of every step (upstream: the fill pass only where the eroded first-pass mask of
    its target is 0, then eroded itself)."""
    masks, first = [], {}
    for step in plan.steps:
        m = step.written.float()
        if step.fill_only and step.target in first:
            m = m * (1.0 - first[step.target])
        if erosion:
            m = erode(m)
        if not step.fill_only:
            first[step.target] = torch.maximum(first.get(step.target, torch.zeros_like(m)), m)
        masks.append(m)
    return masks


def token_write_masks(plan: WarpPlan, erosion: bool) -> torch.Tensor:
    """(V, H, W) bool: which tokens of each view the warp writes at the token grid."""
    out = torch.zeros(plan.views, *plan.grid, dtype=torch.bool, device=plan.down_rows.device)
    for step, m in zip(plan.steps, write_masks(plan, erosion)):
        out[step.target] |= m[plan.down_rows][:, plan.down_cols] > 0
    return out


def warp_views(x: torch.Tensor, plan: WarpPlan, alpha: float = 1.0, interpolation: str = "bicubic",
               erosion: bool = False) -> torch.Tensor:
    """SynCD eq. 2 on the views of G objects sharing one plan: x (G, V, C, H, W) → warped copy. A written token
    becomes x + α·(anchor sample − x) (upstream: α = 1); all other tokens are returned unchanged."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
    g, v, c, h, w = x.shape
    if (h, w) != plan.grid or v != plan.views:
        raise ValueError(f"the plan is for {plan.views} views on a {plan.grid} grid, the features are {v} views "
                         f"on ({h}, {w})")
    out = x.clone()
    if not plan.valid:
        return out
    work = x.float()
    fine = work[:, :, :, plan.up_rows][..., plan.up_cols]       # (G, V, C, Hc, Wc): upstream's nearest upsampling
    fine_out = fine.clone()
    tokens = work.clone()
    for step, m in zip(plan.steps, write_masks(plan, erosion)):
        if not bool(m.any()):
            continue
        grid = step.coords.to(work.device).unsqueeze(0).expand(g, -1, -1, -1)
        sampled = F.grid_sample(fine_out[:, step.source], grid, mode=interpolation, align_corners=False)
        sampled = torch.nan_to_num(sampled)
        a = alpha * m.to(work.device)
        cur = fine_out[:, step.target]
        fine_out[:, step.target] = cur + a * (sampled - cur)
        a_tok = a[plan.down_rows][:, plan.down_cols]
        s_tok = sampled[..., plan.down_rows, :][..., plan.down_cols]
        cur_tok = tokens[:, step.target]
        tokens[:, step.target] = torch.where(a_tok > 0, cur_tok + a_tok * (s_tok - cur_tok), cur_tok)
    written = token_write_masks(plan, erosion).to(x.device)                  # (V, H, W)
    return torch.where(written[None, :, None], tokens.to(x.dtype), out)


def warp_views_reference(x: torch.Tensor, corr: Correspondences, anchor: int = -1, alpha: float = 1.0,
                         interpolation: str = "bicubic", erosion: bool = False) -> torch.Tensor:
    """Straightforward loop version of :func:`warp_views` for one object, x (V, C, H, W): row by row writes, pixel
    by pixel erosion, token by token output (for tests)."""
    views, c, h, w = x.shape
    hc, wc = corr.size
    anchor %= views
    up_r = nearest_indices(h, hc).tolist()   # PyTorch's own nearest rule (float scale), as upstream's interpolate
    up_c = nearest_indices(w, wc).tolist()
    down_r = nearest_indices(hc, h).tolist()
    down_c = nearest_indices(wc, w).tolist()
    x = x.float()
    fine = torch.zeros(views, c, hc, wc)
    for i in range(hc):
        for j in range(wc):
            fine[:, :, i, j] = x[:, :, up_r[i], up_c[j]]
    targets = [v for v in range(views) if v != anchor]
    pairs = [(t, anchor, False) for t in targets]
    if len(targets) >= 2:
        pairs.append((targets[0], targets[1], True))

    def floor_px(value, size):
        return int(torch.floor(torch.tensor(size * (float(value) + 1.0) / 2.0, dtype=torch.float64)))

    def erode_loop(m):
        out = torch.zeros_like(m)
        for i in range(hc):
            for j in range(wc):
                total = sum(float(m[a, b]) for a in range(i - 1, i + 2) for b in range(j - 1, j + 2)
                            if 0 <= a < hc and 0 <= b < wc)
                out[i, j] = 1.0 if total / 9.0 >= 0.9 else 0.0
        return out

    for target, source, _ in pairs:  # out of range anywhere: nothing is warped
        for row in corr.between(target, source).tolist():
            ys = [floor_px(row[0], hc), floor_px(row[2], hc)]
            xs = [floor_px(row[1], wc), floor_px(row[3], wc)]
            if min(ys + xs) < 0 or max(ys) >= hc or max(xs) >= wc:
                return x.clone()
    first_mask = torch.zeros(views, hc, wc)
    tokens = x.clone()
    for target, source, fill_only in pairs:
        values = torch.zeros(c, hc, wc)
        mask = torch.zeros(hc, wc)
        for row in corr.between(target, source).tolist():
            point = torch.tensor([row[3], row[2]]).view(1, 1, 1, 2)
            value = F.grid_sample(fine[source:source + 1], point, mode=interpolation, align_corners=False)
            py, px = floor_px(row[0], hc), floor_px(row[1], wc)
            values[:, py, px] = torch.nan_to_num(value.view(c))
            mask[py, px] = 1.0
        if fill_only:
            mask = mask * (1.0 - first_mask[target])
        if erosion:
            mask = erode_loop(mask)
        if not fill_only:
            first_mask[target] = torch.maximum(first_mask[target], mask)
        for i in range(hc):
            for j in range(wc):
                a = alpha * float(mask[i, j])
                fine[target, :, i, j] = fine[target, :, i, j] + a * (values[:, i, j] - fine[target, :, i, j])
        for i in range(h):
            for j in range(w):
                a = alpha * float(mask[down_r[i], down_c[j]])
                if a > 0:
                    tokens[target, :, i, j] = tokens[target, :, i, j] + a * (values[:, down_r[i], down_c[j]]
                                                                           - tokens[target, :, i, j])
    return tokens


def pack_2x2(x: torch.Tensor) -> torch.Tensor:
    """Flux's packed token grid of a (B, C, h, w) latent: (B, 4C, ⌈h/2⌉, ⌈w/2⌉), each token one 2×2 patch
    (padded to even sizes; the channel order inside a token and the padding do not matter to the warp)."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate") if (h % 2 or w % 2) else x
    return F.pixel_unshuffle(x, 2)


def unpack_2x2(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_2x2`, cropped to the latent's (h, w)."""
    return F.pixel_shuffle(tokens, 2)[..., :size[0], :size[1]]


def normalized_time(timestep: float, timestep_max: float) -> float:
    """The σ upstream compares with its thresholds (diffusers timestep / 1000): the model's timestep of σ over its
    timestep at σ_max (Flux: σ itself)."""
    return float(timestep) / float(timestep_max) if timestep_max else 0.0


def warp_active(t: float, threshold: float = UPSTREAM_THRESHOLD) -> bool:
    """Upstream: warp while σ > threshold (0.8)."""
    return t > threshold


def erosion_active(t: float, below: float = ERODE_BELOW) -> bool:
    """Upstream: erode the write masks while σ < 0.9."""
    return t < below


def warp_latent_batch(x: torch.Tensor, plans: list[Optional[WarpPlan]], images_per_object: int, packed: bool,
                      alpha: float = 1.0, interpolation: str = "bicubic", erosion: bool = False) -> torch.Tensor:
    """SynCD eq. 2 on a latent batch (B, C, h, w) of consecutive objects of ``images_per_object`` views each;
    ``plans[k]`` is object k's plan on the token grid (None: leave it). ``packed``: Flux's 2×2 token grid."""
    size = tuple(x.shape[-2:])
    tokens = pack_2x2(x) if packed else x
    out = tokens.clone()
    by_plan: dict[int, list[int]] = {}
    for k, plan in enumerate(plans):
        if plan is not None and plan.valid:
            by_plan.setdefault(id(plan), []).append(k)
    for ks in by_plan.values():
        plan = plans[ks[0]]
        rows = torch.tensor([k * images_per_object + i for k in ks for i in range(images_per_object)],
                            device=x.device)
        views = tokens[rows].view(len(ks), images_per_object, *tokens.shape[1:])
        out[rows] = warp_views(views, plan, alpha, interpolation, erosion).view(len(rows), *tokens.shape[1:])
    return unpack_2x2(out, size) if packed else out

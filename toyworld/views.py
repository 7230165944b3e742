"""Identities and multi-view sets of the toy world (issue 13 §1): the same object drawn several times.

An identity is (shape, colour, texture). A multi-view set draws one identity ``views`` times at azimuths spread
around the object (at least ``min_azimuth_gap`` degrees apart), with fresh elevation, scale and position; either
in one scene (``same_scene=True``: one background and placement for every view, as SynCD's rigid sets) or each
view in its own random scene (deformable-style sets: new backgrounds and placements). Because textures are solid,
the same surface point carries the same colour in every view; :func:`correspondences` lists the pixels two views
share, in the pack's correspondence convention (``core/correspondence_format.py``); :func:`depth_images` and
:func:`set_correspondences` give what SynCD Mesh Views gives for a mesh (the toy world's rigid-object inputs).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch

from ..core.correspondence_format import Correspondences
from ..core.mesh_views import depth_for_conditioning
from . import scene as S

CAMERA_DISTANCE = 3 * S.BOUND  # a virtual eye this far in front of the object's centre turns depth into 1/d


@dataclasses.dataclass(frozen=True, order=True)
class Identity:
    """One toy object: what the attribute reader must read back the same in every view."""
    shape: str
    colour: str
    texture: str

    def __post_init__(self):
        for name in S.OBJECT_ATTRIBUTES:
            if getattr(self, name) not in S.VOCABULARIES[name]:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {S.VOCABULARIES[name]}")

    @property
    def phrase(self) -> str:
        """'a red striped cube'."""
        return S.object_phrase(self.shape, self.colour, self.texture)


def all_identities() -> list[Identity]:
    """Every identity (shapes × colours × textures), in vocabulary order."""
    return [Identity(*t) for t in itertools.product(S.SHAPES, S.COLOURS, S.TEXTURES)]


def random_identity(rng: np.random.Generator) -> Identity:
    return Identity(S.SHAPES[rng.integers(len(S.SHAPES))], S.COLOURS[rng.integers(len(S.COLOURS))],
                    S.TEXTURES[rng.integers(len(S.TEXTURES))])


def split_identities(held_out: float = 0.2, seed: int = 0) -> tuple[list[Identity], list[Identity]]:
    """(training, held-out) identities: a seeded shuffle, ``held_out`` of them kept out (for evaluating
    customization on objects no model has seen)."""
    ids = all_identities()
    order = np.random.default_rng(seed).permutation(len(ids))
    k = int(round(held_out * len(ids)))
    held = sorted(ids[i] for i in order[:k])
    return sorted(ids[i] for i in order[k:]), held


def view_scenes(identity: Identity, views: int = 3, seed: int = 0, same_scene: bool = False,
                background: str | None = None, placement: str | None = None,
                min_azimuth_gap: float = 45.0) -> list[S.Scene]:
    """The scenes of a ``views``-image set of ``identity``: azimuths evenly spread from a random start with
    jitter, but at least ``min_azimuth_gap`` degrees apart; elevation, scale and position drawn per view.
    ``background``/``placement`` pin those; ``same_scene`` keeps one background (same drawing) and placement."""
    if views < 1:
        raise ValueError(f"a multi-view set needs at least 1 view, got {views}")
    spacing = 360.0 / views
    if views > 1 and spacing < min_azimuth_gap:
        raise ValueError(f"{views} views cannot be {min_azimuth_gap}° apart in azimuth; lower min_azimuth_gap "
                         f"to at most {spacing:.0f}")
    rng = np.random.default_rng(seed)
    start = float(rng.uniform(0, 360))
    jitter = max(0.0, (spacing - min_azimuth_gap) / 2) if views > 1 else 0.0
    shared_bg = background or S.BACKGROUNDS[rng.integers(len(S.BACKGROUNDS))]
    shared_seed = int(rng.integers(2 ** 31))
    shared_place = placement or S.PLACEMENTS[rng.integers(len(S.PLACEMENTS))]
    scenes = []
    for k in range(views):
        if same_scene:
            bg, bg_seed, place = shared_bg, shared_seed, shared_place
        else:
            bg = background or S.BACKGROUNDS[rng.integers(len(S.BACKGROUNDS))]
            bg_seed = int(rng.integers(2 ** 31))
            place = placement or S.PLACEMENTS[rng.integers(len(S.PLACEMENTS))]
        pose = S.sample_pose(rng, place)
        pose["azimuth"] = (start + k * spacing + float(rng.uniform(-jitter, jitter))) % 360.0
        scenes.append(S.Scene(shape=identity.shape, colour=identity.colour, texture=identity.texture, background=bg,
                              placement=place, background_seed=bg_seed, **pose))
    return scenes


def multi_view_set(identity: Identity, views: int = 3, seed: int = 0, size: int = S.SIZE, **options) -> S.Render:
    """Render a multi-view set of ``identity`` (see :func:`view_scenes` for the options)."""
    return S.render(view_scenes(identity, views, seed, **options), size=size)


def azimuth_gap(a: float, b: float) -> float:
    """Angular distance in degrees between two azimuths (0-180)."""
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def project(scene: S.Scene, points: torch.Tensor, size: int = S.SIZE) -> torch.Tensor:
    """Continuous pixel positions (row, col) (..., 2) of object-frame ``points`` (..., 3) in ``scene``'s camera
    (pixel (r, c) covers [r, r+1) × [c, c+1))."""
    right, up, _ = S.camera_basis(scene.azimuth, scene.elevation)
    scale = scene.scale * size / S.SIZE
    right, up = torch.tensor(right, dtype=points.dtype), torch.tensor(up, dtype=points.dtype)
    col = scene.cx * size + scale * (points @ right)
    row = scene.cy * size - scale * (points @ up)
    return torch.stack([row, col], -1)


def correspondences(render: S.Render, a: int, b: int, tolerance_px: float = 1.0) -> torch.Tensor:
    """Pixels of view ``a`` whose surface point is visible in view ``b``: (M, 4) rows [y_a, x_a, y_b, x_b] in
    normalized image coordinates ([-1, 1], align_corners=False: pixel c ↦ (2c + 1)/W - 1), the convention of
    ``core/correspondence_format.py``. Visible = view b's pixel under the projected point is the object's and
    holds a surface point within ``tolerance_px`` pixels (in object units: / scale) of it (a depth test)."""
    sa, sb = render.scenes[a], render.scenes[b]
    if not (sa.has_object and sb.has_object):
        return torch.zeros(0, 4)
    _, h, w = render.mask.shape
    ra, ca = render.mask[a].nonzero(as_tuple=True)
    points = render.coords[a, ra, ca]
    rc = project(sb, points, size=w).floor().long()
    inside = (rc[:, 0] >= 0) & (rc[:, 0] < h) & (rc[:, 1] >= 0) & (rc[:, 1] < w)
    ra, ca, points, rc = ra[inside], ca[inside], points[inside], rc[inside]
    rb, cb = rc[:, 0], rc[:, 1]
    scale = sb.scale * w / S.SIZE
    seen = render.mask[b, rb, cb] & ((render.coords[b, rb, cb] - points).norm(dim=-1) < tolerance_px / scale)
    rows = torch.stack([ra[seen], ca[seen], rb[seen], cb[seen]], -1).float()
    return torch.stack([(2 * rows[:, 0] + 1) / h - 1, (2 * rows[:, 1] + 1) / w - 1,
                        (2 * rows[:, 2] + 1) / h - 1, (2 * rows[:, 3] + 1) / w - 1], -1)


def depth_images(render: S.Render) -> torch.Tensor:
    """(B, H, W, 3) depth conditioning images in SynCD Mesh Views' convention (upstream's ``get_depth``: 1/d,
    normalized by its maximum, background 0), d measured from a virtual eye :data:`CAMERA_DISTANCE` in front of
    the object's centre (the renderer's camera is orthographic)."""
    d = torch.where(render.mask, render.depth + CAMERA_DISTANCE, torch.zeros_like(render.depth))
    return depth_for_conditioning(d)


def set_correspondences(render: S.Render) -> Correspondences:
    """Every pair of a multi-view set's :func:`correspondences`, on the render's pixel grid."""
    views, h, w = render.mask.shape
    pairs = {(a, b): correspondences(render, a, b) for a, b in itertools.combinations(range(views), 2)}
    return Correspondences(views=views, size=(h, w), pairs=pairs)

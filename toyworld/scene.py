"""Toy-world scenes: attribute vocabularies, captions, and a renderer with exact masks (issue 13 §1).

A scene is one object (an *identity* = shape, colour, texture) drawn as a shaded 3D solid seen from a random
azimuth/elevation, at a random scale and position inside one of three placement regions, over one of six
procedural backgrounds; or the background alone (``shape=None``, "no object").

Conventions:

* images are ComfyUI-style ``(B, H, W, 3)`` float32 in [0, 1]; masks ``(B, H, W)`` bool; default size 64 px;
* the object lives in its own frame (+Y up), inside a sphere of radius :data:`BOUND` around the origin; an
  orthographic camera looks at the origin from ``azimuth`` (degrees about +Y, 0 on +Z) and ``elevation`` (degrees
  above the XZ plane); ``scale`` is pixels per object unit, ``(cx, cy)`` the origin's pixel position
  (fractions of width/height);
* surfaces are found by sphere tracing signed-distance bounds, without anti-aliasing: a pixel is the object's
  exactly when its centre ray hit the surface, so ``mask`` is exactly the set of pixels drawn with the object's
  colour (the background is drawn first and never blended into the object);
* textures are solid (functions of the object-frame point), so every view of one identity carries the same
  pattern on the same surface points; ``coords`` returns that point per pixel (the cross-view correspondence),
  ``depth`` its distance along the view ray (0 = background).

Everything is deterministic by seed: :func:`sample_scene` draws from ``numpy.random.default_rng`` and the
renderer is pure float32 torch arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch

SIZE = 64

SHAPES = ("cube", "sphere", "cylinder", "cone", "diamond", "torus")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
TEXTURES = ("plain", "striped", "dotted")
BACKGROUNDS = ("wooden floor", "grass", "beach", "brick wall", "sky", "snow")
PLACEMENTS = ("left", "middle", "right")

VOCABULARIES = {"shape": SHAPES, "colour": COLOURS, "texture": TEXTURES, "background": BACKGROUNDS,
                "placement": PLACEMENTS}
OBJECT_ATTRIBUTES = ("shape", "colour", "texture")  # the identity
SCENE_ATTRIBUTES = ("background", "placement")      # what a prompt asks for besides the object

COLOUR_RGB = {"red": (0.86, 0.12, 0.10), "orange": (0.97, 0.52, 0.08), "yellow": (0.95, 0.86, 0.12),
              "green": (0.15, 0.66, 0.20), "blue": (0.12, 0.30, 0.88), "purple": (0.55, 0.18, 0.72)}
SECONDARY_RGB = (0.95, 0.95, 0.93)  # the second colour of striped and dotted objects
# No colour or texture word in a background phrase: prompts that leave the object's look open must not suggest one.
BACKGROUND_PHRASES = {"wooden floor": "on a wooden floor", "grass": "on grass", "beach": "on a sandy beach",
                      "brick wall": "in front of a brick wall", "sky": "against the sky", "snow": "in the snow"}
PLACEMENT_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
# Where the object's centre goes (fraction of the width) per placement: disjoint ranges with a gap between them,
# so the placement is always unambiguous to read back.
PLACEMENT_X = {"left": (0.25, 0.31), "middle": (0.47, 0.53), "right": (0.69, 0.75)}
CENTRE_Y = (0.52, 0.62)          # fraction of the height: the object stands in the lower middle
SCALE = (10.0, 13.0)             # pixels per object unit at 64 px (the object spans about 18-28 px)
AZIMUTH = (0.0, 360.0)
ELEVATION = (20.0, 50.0)         # degrees: low enough to see the sides, high enough to see a torus' hole
BOUND = 1.2                      # every shape lies inside this sphere around its origin
LIGHT = (-0.45, 0.75, 0.5)       # directional light in camera coordinates (x right, y up, z towards the camera)
AMBIENT = 0.35


@dataclasses.dataclass(frozen=True)
class Scene:
    """One toy image's content. ``shape=None`` means no object (background only; colour/texture None too)."""
    shape: str | None
    colour: str | None
    texture: str | None
    background: str
    placement: str | None
    azimuth: float = 0.0
    elevation: float = 30.0
    scale: float = 10.0
    cx: float = 0.5
    cy: float = 0.57
    background_seed: int = 0

    @property
    def has_object(self) -> bool:
        return self.shape is not None

    @property
    def identity(self) -> tuple | None:
        """(shape, colour, texture), or None without an object."""
        return (self.shape, self.colour, self.texture) if self.has_object else None

    def labels(self) -> dict:
        """Attribute labels by name (object attributes and placement are None without an object)."""
        return {"shape": self.shape, "colour": self.colour, "texture": self.texture, "background": self.background,
                "placement": self.placement}


def check_scene(scene: Scene) -> None:
    """Raise ValueError naming the attribute whose value is not in its vocabulary."""
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"background {scene.background!r} is not one of {BACKGROUNDS}")
    if scene.has_object:
        for name in ("shape", "colour", "texture", "placement"):
            if getattr(scene, name) not in VOCABULARIES[name]:
                raise ValueError(f"{name} {getattr(scene, name)!r} is not one of {VOCABULARIES[name]}")
    elif any(v is not None for v in (scene.colour, scene.texture, scene.placement)):
        raise ValueError("a scene without an object (shape=None) has colour, texture and placement None")


def object_phrase(shape: str, colour: str, texture: str) -> str:
    """'a red striped cube', 'an orange dotted cone' (plain objects: 'a plain red cube')."""
    if texture == "plain":
        return f"a plain {colour} {shape}"
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {texture} {shape}"


def caption(scene: Scene) -> str:
    """'a red striped cube on a wooden floor, on the left'; without an object: 'nothing on a wooden floor'."""
    if not scene.has_object:
        return f"nothing {BACKGROUND_PHRASES[scene.background]}"
    return (f"{object_phrase(scene.shape, scene.colour, scene.texture)} {BACKGROUND_PHRASES[scene.background]}, "
            f"{PLACEMENT_PHRASES[scene.placement]}")


def _uniform(rng, bounds) -> float:
    return float(rng.uniform(*bounds))


def sample_pose(rng: np.random.Generator, placement: str) -> dict:
    """Random azimuth, elevation, scale and position inside ``placement``'s region."""
    return {"azimuth": _uniform(rng, AZIMUTH), "elevation": _uniform(rng, ELEVATION), "scale": _uniform(rng, SCALE),
            "cx": _uniform(rng, PLACEMENT_X[placement]), "cy": _uniform(rng, CENTRE_Y)}


def sample_scene(rng: np.random.Generator, p_empty: float = 0.0, **fixed) -> Scene:
    """A random scene; ``fixed`` pins attributes or pose fields (e.g. ``shape="cube"``, ``azimuth=30``).
    With probability ``p_empty`` (unless ``shape`` is given) the scene has no object."""
    empty = "shape" not in fixed and p_empty > 0 and rng.random() < p_empty
    values = {"background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
              "background_seed": int(rng.integers(2 ** 31))}
    if empty:
        values.update(shape=None, colour=None, texture=None, placement=None)
    else:
        values.update(shape=SHAPES[rng.integers(len(SHAPES))], colour=COLOURS[rng.integers(len(COLOURS))],
                      texture=TEXTURES[rng.integers(len(TEXTURES))], placement=PLACEMENTS[rng.integers(3)])
        values["placement"] = fixed.get("placement", values["placement"])
        values.update(sample_pose(rng, values["placement"]))
    values.update(fixed)
    scene = Scene(**values)
    check_scene(scene)
    return scene


def sample_scenes(count: int, seed: int, p_empty: float = 0.0, **fixed) -> list[Scene]:
    """``count`` random scenes from ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, p_empty=p_empty, **fixed) for _ in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# backgrounds (numpy, (H, W, 3) float32)

def _value_noise(rng, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random (cells+1)² grid bilinearly upsampled to size²."""
    grid = rng.random((cells + 1, cells + 1))
    pos = np.linspace(0, cells, size, endpoint=False) + cells / size / 2
    i = np.minimum(pos.astype(int), cells - 1)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def draw_background(kind: str, seed: int, size: int = SIZE) -> np.ndarray:
    """One procedural background of ``kind`` (deterministic in ``seed``) as (size, size, 3) float32 in [0, 1]."""
    if kind not in BACKGROUNDS:
        raise ValueError(f"background {kind!r} is not one of {BACKGROUNDS}")
    rng = np.random.default_rng(seed)
    s = size / 64.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    fine = rng.random((size, size))
    if kind == "wooden floor":
        plank_h = rng.uniform(9, 13) * s
        row = np.floor((y + rng.uniform(0, plank_h)) / plank_h)
        shade = np.random.default_rng(seed + 1).uniform(0.8, 1.15, 64)[row.astype(int) % 64]
        grain = 0.5 + 0.5 * np.sin(x / (3.0 * s) * rng.uniform(0.4, 0.7) + 6 * _value_noise(rng, size, 4) + row * 1.7)
        base = np.array([0.58, 0.37, 0.19])
        img = base * (shade * (0.85 + 0.15 * grain) + 0.05 * fine)[..., None]
        seam = ((y + rng.uniform(0, plank_h)) % plank_h) < 1.0 * s
        img[seam] *= 0.55
    elif kind == "grass":
        blades = _value_noise(rng, size, 16) * 0.6 + 0.4 * fine
        streak = 0.5 + 0.5 * np.sin(x * rng.uniform(1.2, 1.8) / s + 3 * _value_noise(rng, size, 6))
        light = 0.75 + 0.35 * blades + 0.1 * streak
        img = np.array([0.20, 0.50, 0.13]) * light[..., None]
        img[..., 1] += 0.08 * (y / size)
    elif kind == "beach":
        horizon = rng.uniform(0.22, 0.32) * size
        sand = np.array([0.87, 0.77, 0.55]) * (0.9 + 0.1 * _value_noise(rng, size, 8) + 0.06 * fine)[..., None]
        sea = np.array([0.16, 0.48, 0.72]) * (0.9 + 0.15 * np.sin(x / (2.5 * s) + y))[..., None]
        img = np.where((y < horizon)[..., None], sea, sand)
    elif kind == "brick wall":
        bh, bw = 6 * s, 12 * s
        row = np.floor(y / bh)
        shift = (row % 2) * bw / 2 + rng.uniform(0, bw)
        col = np.floor((x + shift) / bw)
        tone = np.random.default_rng(seed + 2).uniform(0.8, 1.1, (64, 64))[row.astype(int) % 64, col.astype(int) % 64]
        img = np.array([0.62, 0.24, 0.16]) * (tone + 0.08 * fine)[..., None]
        mortar = ((y % bh) < 1.0 * s) | (((x + shift) % bw) < 1.0 * s)
        img[mortar] = np.array([0.74, 0.71, 0.66])
    elif kind == "sky":
        t = y / size
        img = np.array([0.25, 0.50, 0.92]) * (1 - t)[..., None] + np.array([0.62, 0.78, 0.98]) * t[..., None]
        clouds = np.clip((_value_noise(rng, size, 5) - 0.55) * 3.0, 0, 1)
        img = img * (1 - clouds[..., None]) + clouds[..., None] * 0.97
    else:  # snow
        drift = _value_noise(rng, size, 6)
        img = np.array([0.90, 0.93, 0.97]) * (0.9 + 0.08 * drift + 0.03 * fine)[..., None]
        img[..., 2] += 0.03
    return np.clip(img, 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# object signed-distance bounds (object frame, +Y up; every one 1-Lipschitz so sphere tracing never overshoots)

def _length(*parts):
    return torch.sqrt(sum(p * p for p in parts))


def sdf(shape: str, p: torch.Tensor) -> torch.Tensor:
    """Signed-distance bound of ``shape`` at points ``p`` (..., 3); negative inside."""
    x, y, z = p.unbind(-1)
    if shape == "sphere":
        return _length(x, y, z) - 0.8
    if shape == "cube":
        return torch.maximum(torch.maximum(x.abs(), y.abs()), z.abs()) - 0.6
    if shape == "cylinder":
        return torch.maximum(_length(x, z) - 0.62, y.abs() - 0.7)
    if shape == "cone":  # apex (0, 0.85, 0), base y = -0.6, base radius 0.78
        half = math.atan2(0.78, 1.45)
        side = _length(x, z) * math.cos(half) - (0.85 - y) * math.sin(half)
        return torch.maximum(side, -0.6 - y)
    if shape == "diamond":  # an octahedron stretched upright: tips (0, ±1.08, 0), equator half-diagonal 0.82
        a, h = 0.82, 1.08
        n = 1.0 / math.sqrt(2 * h * h + a * a)
        return ((x.abs() + z.abs()) * h + y.abs() * a - a * h) * n
    if shape == "torus":  # ring radius 0.68, tube radius 0.28, lying in the XZ plane
        return _length(_length(x, z) - 0.68, y) - 0.28
    raise ValueError(f"shape {shape!r} is not one of {SHAPES}")


def texture_mask(texture: str, p: torch.Tensor) -> torch.Tensor:
    """Where the solid texture takes the second colour, for object-frame points ``p`` (..., 3)."""
    x, y, z = p.unbind(-1)
    if texture == "plain":
        return torch.zeros_like(x, dtype=torch.bool)
    if texture == "striped":  # slanted bands, period 0.5 units
        return torch.frac((0.55 * x + 0.83 * y) / 0.5 + 100.0) < 0.5
    if texture == "dotted":  # a lattice of balls, spacing 0.45, radius 0.19
        q = torch.remainder(p + 0.225, 0.45) - 0.225
        return _length(*q.unbind(-1)) < 0.19
    raise ValueError(f"texture {texture!r} is not one of {TEXTURES}")


# ---------------------------------------------------------------------------------------------------------------
# rendering

@dataclasses.dataclass
class Render:
    """Rendered scenes: ``image`` (B, H, W, 3) float32 in [0, 1]; ``mask`` (B, H, W) bool, exactly the object's
    pixels; ``depth`` (B, H, W) float32 signed distance along the view ray from the plane through the object's centre
    (object units; negative = nearer the camera; 0 off the object);
    ``coords`` (B, H, W, 3) float32 object-frame surface point per pixel (0 off the object)."""
    scenes: list
    image: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    coords: torch.Tensor

    @property
    def captions(self) -> list[str]:
        return [caption(s) for s in self.scenes]


def camera_basis(azimuth: float, elevation: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Object-frame unit vectors (right, up, forward) of the orthographic camera; forward points from the camera
    towards the object."""
    az, el = math.radians(azimuth), math.radians(elevation)
    eye = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    forward = -eye
    right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return right, up, forward


def _rays(scene: Scene, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rays that pass through the bounding sphere: their pixel indices (row-major), their points on the plane
    through the object's centre (object frame), and the shared direction (camera forward)."""
    right, up, forward = camera_basis(scene.azimuth, scene.elevation)
    scale = scene.scale * size / SIZE
    c = (np.arange(size) + 0.5 - scene.cx * size) / scale
    r = (np.arange(size) + 0.5 - scene.cy * size) / scale
    inside = (c[None, :] ** 2 + r[:, None] ** 2) < BOUND * BOUND
    rows, cols = np.nonzero(inside)
    plane = c[cols, None] * right - r[rows, None] * up
    return (torch.from_numpy(rows * size + cols), torch.from_numpy(plane.astype(np.float32)),
            torch.tensor(forward, dtype=torch.float32))


def _trace(shape: str, plane: torch.Tensor, directions: torch.Tensor, steps: int = 128, eps: float = 1e-3):
    """Sphere tracing of the rays through ``plane`` (M, 3) points (on the plane through the object's centre,
    inside the bounding sphere) along ``directions`` (M, 3), marched from the bounding sphere's entry while they
    neither hit nor left it. Returns (hit (M,) bool, t (M,)), t measured from the centre plane."""
    half = torch.sqrt((BOUND * BOUND - (plane * plane).sum(-1)).clamp_min(0))
    t = -half
    hit = torch.zeros(len(plane), dtype=torch.bool)
    ids = torch.arange(len(plane))
    o, d, ta, lim = plane, directions, t.clone(), half
    for _ in range(steps):
        if ids.numel() == 0:
            break
        dist = sdf(shape, o + ta[:, None] * d)
        ta = ta + dist
        done = dist < eps
        keep = ~done & (ta < lim)
        if bool(done.any()):
            hit[ids[done]] = True
            t[ids[done]] = ta[done]
        if not bool(keep.all()):
            ids, o, d, ta, lim = ids[keep], o[keep], d[keep], ta[keep], lim[keep]
    return hit, t


def _normals(shape: str, p: torch.Tensor, h: float = 1e-3) -> torch.Tensor:
    offsets = torch.eye(3) * h
    grad = torch.stack([sdf(shape, p + o) - sdf(shape, p - o) for o in offsets], -1)
    return grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def render(scenes: Sequence[Scene] | Scene, size: int = SIZE) -> Render:
    """Draw ``scenes`` (one Scene or a list) at ``size`` px: background, then the shaded, textured object.
    Runs on one torch thread (its arrays are small: thread synchronisation would cost more than it gains,
    many times more on a busy machine); the caller's thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _render(scenes, size)
    finally:
        torch.set_num_threads(threads)


def _render(scenes, size: int) -> Render:
    if isinstance(scenes, Scene):
        scenes = [scenes]
    scenes = list(scenes)
    for s in scenes:
        check_scene(s)
    n, npix = len(scenes), size * size
    image = torch.from_numpy(np.stack([draw_background(s.background, s.background_seed, size) for s in scenes]))
    image = image.reshape(n, npix, 3).clone()
    mask = torch.zeros(n, npix, dtype=torch.bool)
    depth = torch.zeros(n, npix)
    coords = torch.zeros(n, npix, 3)
    light = torch.tensor(LIGHT, dtype=torch.float32)
    light = light / light.norm()
    for shape in SHAPES:
        rows = [i for i, s in enumerate(scenes) if s.shape == shape]
        if not rows:
            continue
        rays = [_rays(scenes[i], size) for i in rows]
        group = torch.cat([torch.full((len(pix),), k) for k, (pix, _, _) in enumerate(rays)])
        pixels = torch.cat([pix for pix, _, _ in rays])
        plane = torch.cat([pl for _, pl, _ in rays])
        directions = torch.stack([d for _, _, d in rays])[group]
        hit, t = _trace(shape, plane, directions)
        b_idx, p_idx, t = group[hit], pixels[hit], t[hit]      # the object's pixels: (image in group, pixel)
        p = plane[hit] + t[:, None] * directions[hit]
        normal = _normals(shape, p)
        # the light is fixed in camera coordinates; bring it into each image's object frame
        bases = [camera_basis(scenes[i].azimuth, scenes[i].elevation) for i in rows]
        to_object = torch.tensor(np.stack([np.stack([r, u, -f], 1) for r, u, f in bases]), dtype=torch.float32)
        light_obj = (to_object @ light)[b_idx]
        shade = AMBIENT + (1 - AMBIENT) * (normal * light_obj).sum(-1).clamp_min(0)
        base = torch.tensor([COLOUR_RGB[scenes[i].colour] for i in rows], dtype=torch.float32)[b_idx]
        pattern = torch.zeros(len(p), dtype=torch.bool)
        for texture in TEXTURES:
            sel = torch.tensor([scenes[rows[k]].texture == texture for k in range(len(rows))])[b_idx]
            if bool(sel.any()):
                pattern[sel] = texture_mask(texture, p[sel])
        albedo = torch.where(pattern[:, None], torch.tensor(SECONDARY_RGB, dtype=torch.float32), base)
        image_idx = torch.tensor(rows)[b_idx]
        image[image_idx, p_idx] = (albedo * shade[:, None]).clamp(0, 1)
        mask[image_idx, p_idx] = True
        depth[image_idx, p_idx] = t
        coords[image_idx, p_idx] = p
    return Render(scenes=scenes, image=image.reshape(n, size, size, 3), mask=mask.reshape(n, size, size),
                  depth=depth.reshape(n, size, size), coords=coords.reshape(n, size, size, 3))


def to_pil(image: torch.Tensor):
    """One (H, W, 3) float image as a PIL image (uint8)."""
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).numpy())


def contact_sheet(images: torch.Tensor, columns: int = 8):
    """(B, H, W, 3) images tiled into one PIL image (for looking at the toy world)."""
    b, h, w, _ = images.shape
    rows = -(-b // columns)
    sheet = torch.ones(rows * h, columns * w, 3)
    for i in range(b):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i]
    return to_pil(sheet)

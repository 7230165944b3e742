"""Depth, foreground masks and cameras of a mesh seen from several views (SynCD §3.2, rigid objects).

Upstream renders Objaverse assets with Cap3D's Blender renders and re-rasterizes the normalized mesh with
PyTorch3D (``gen_corresp.py``) to get z-buffers for the correspondences. Here one CPU path does both: trimesh reads
the mesh (GLB/glTF, OBJ, PLY, STL, OFF) and casts one ray per pixel centre (Embree through ``embreex`` when
installed, trimesh's own intersector otherwise). No display, GPU or system package is needed.

Conventions (all documented in the README):

* world: the mesh's own axes, **+Y up** (glTF); ``normalize_mesh`` centres the bounding box at the origin and
  scales its largest side to 1, as upstream (``load_mesh_glb`` / shap-E's ``normalize_scene``);
* camera at ``distance`` from the origin looking at it; ``elevation`` = degrees above the XZ plane, ``azimuth`` =
  degrees about +Y, 0 on +Z (the glTF front), 90 on +X;
* camera frame OpenCV-style: +x right, +y down, +z forward; ``world_to_camera`` maps world points into it;
* intrinsics ``K`` in pixels with pixel (r, c) covering [c, c+1) x [r, r+1) (its centre at c + 0.5, r + 0.5);
  ``fov`` spans the **shorter** image side (square renders: upstream's Blender ``x_fov``);
* depth = z in the camera frame (PyTorch3D's z-buffer), 0 = background.

Pure numpy/torch + trimesh: no ComfyUI import.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np
import torch

MESH_EXTENSIONS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")
# Cap3D's renders come from shap-E's Blender script (its ``00000.json`` files with x/y/z/origin/x_fov, which
# gen_corresp.py reads): 20 views, directions uniform on the sphere, camera distance 2 from the unit-cube object,
# Blender's default camera (50 mm lens on a 36 mm sensor: 2·atan(18/50) = 39.6°).
DEFAULT_VIEWS = 20
DEFAULT_DISTANCE = 2.0
DEFAULT_FOV = math.degrees(2 * math.atan(18 / 50))


class MeshError(ValueError):
    """A mesh file that cannot be used (missing, unreadable, no triangles)."""


def _trimesh():
    try:
        import trimesh
    except ImportError as exc:  # a dependency of the pack; say how to fix a broken install
        raise ImportError("comfyui_syncd's mesh views need trimesh: pip install trimesh embreex") from exc
    return trimesh


def load_mesh(path):
    """Read a mesh file (GLB/glTF, OBJ, PLY, STL, OFF) into one trimesh.Trimesh, scene transforms applied."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MeshError(f"mesh file {str(path)!r} does not exist")
    if path.suffix.lower() not in MESH_EXTENSIONS:
        raise MeshError(f"{path.name}: not a mesh file this pack reads ({', '.join(MESH_EXTENSIONS)})")
    trimesh = _trimesh()
    try:
        scene = trimesh.load_scene(str(path))
    except Exception as exc:  # trimesh raises many kinds for broken files
        raise MeshError(f"{path.name}: cannot read the mesh ({type(exc).__name__}: {exc})") from None
    meshes = [g for g in scene.dump(concatenate=False) if isinstance(g, trimesh.Trimesh) and len(g.faces)]
    if not meshes:
        raise MeshError(f"{path.name}: holds no triangles (a point cloud or an empty scene); give a triangle mesh")
    mesh = trimesh.util.concatenate(meshes) if len(meshes) > 1 else meshes[0]
    return trimesh.Trimesh(vertices=np.asarray(mesh.vertices, dtype=np.float64),
                           faces=np.asarray(mesh.faces), process=False)


def normalize_mesh(mesh):
    """Centre the axis-aligned bounding box at the origin and scale its largest side to 1 (upstream's normalization)."""
    lo, hi = mesh.bounds
    extent = float((hi - lo).max())
    if not extent > 0:
        raise MeshError("the mesh has no extent (all vertices coincide)")
    out = mesh.copy()
    out.vertices = (np.asarray(mesh.vertices) - (lo + hi) / 2) / extent
    return out


@dataclasses.dataclass(frozen=True)
class Camera:
    """A camera on a sphere around the origin, looking at it (angles in degrees)."""
    elevation: float
    azimuth: float
    distance: float = DEFAULT_DISTANCE
    fov: float = DEFAULT_FOV

    def position(self) -> np.ndarray:
        e, a = math.radians(self.elevation), math.radians(self.azimuth)
        return self.distance * np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])

    def world_to_camera(self) -> np.ndarray:
        """4x4 extrinsics (OpenCV camera: +x right, +y down, +z toward the origin), world up = +Y."""
        eye = self.position()
        forward = -eye / np.linalg.norm(eye)
        up = np.array([0.0, 1.0, 0.0]) if abs(forward[1]) < 1 - 1e-9 else np.array([0.0, 0.0, -1.0])
        right = np.cross(forward, up)
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        rot = np.stack([right, down, forward])
        out = np.eye(4)
        out[:3, :3] = rot
        out[:3, 3] = -rot @ eye
        return out


def random_cameras(views: int = DEFAULT_VIEWS, seed: int = 0, distance: float = DEFAULT_DISTANCE,
                   fov: float = DEFAULT_FOV) -> list[Camera]:
    """``views`` directions uniform on the sphere (upstream: Cap3D/shap-E's ``random_unit_vector`` per view)."""
    gen = torch.Generator().manual_seed(int(seed))
    dirs = torch.randn(views, 3, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    out = []
    for x, y, z in dirs.tolist():
        out.append(Camera(math.degrees(math.asin(max(-1.0, min(1.0, y)))), math.degrees(math.atan2(x, z)),
                          distance, fov))
    return out


@dataclasses.dataclass(frozen=True)
class Placement:
    """Upstream's render augmentation as an image transform: scale by ``scale`` about the top-left corner, then
    paste at ``offset`` = (x, y) pixels on a black canvas of the same size (``dataloader.scale_shift``)."""
    scale: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)


def intrinsics(fov: float, size: tuple[int, int], placement: Placement | None = None,
               aspect: float | None = None) -> np.ndarray:
    """3x3 K in pixels; ``fov`` (degrees) spans the shorter side of an image of height/width ``aspect`` (default:
    ``size``'s), so a smaller grid of about the same shape sees exactly the same normalized image; a placement
    scales and moves the image."""
    h, w = size
    aspect = h / w if aspect is None else float(aspect)
    t = math.tan(math.radians(fov) / 2)
    k = np.array([[w / 2 * min(1.0, aspect) / t, 0.0, w / 2], [0.0, h / 2 * min(1.0, 1 / aspect) / t, h / 2],
                  [0.0, 0.0, 1.0]])
    if placement is not None:  # u' = s·u + p for pixel coordinates u: the same as resizing and pasting the render
        s = placement.scale
        k[:2] *= s
        k[0, 2] += placement.offset[0]
        k[1, 2] += placement.offset[1]
    return k


@dataclasses.dataclass(frozen=True)
class View:
    """One rendered view: ``depth`` (H, W) float32 camera z (0 = background), intrinsics ``K`` (3x3, pixels) and
    extrinsics ``world_to_camera`` (4x4), both float64 tensors."""
    depth: torch.Tensor
    K: torch.Tensor
    world_to_camera: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """Foreground (H, W) bool: pixels where the mesh was hit."""
        return self.depth > 0

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.depth.shape)


def pixel_rays(k: np.ndarray, world_to_camera: np.ndarray, size: tuple[int, int]):
    """Origins (H·W, 3) and unit directions (H·W, 3) in world space through every pixel centre, row-major."""
    h, w = size
    v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    cam = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
    rot = world_to_camera[:3, :3]
    eye = -rot.T @ world_to_camera[:3, 3]
    dirs = cam @ rot  # camera -> world: rot.T @ d for each row
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return np.broadcast_to(eye, dirs.shape).copy(), dirs


def render_view(mesh, camera: Camera, size: tuple[int, int], placement: Placement | None = None,
                aspect: float | None = None) -> View:
    """Depth of ``mesh`` seen by ``camera`` at ``size`` = (H, W): the nearest hit of a ray through each pixel
    centre, as camera z (upstream's PyTorch3D z-buffer, one face per pixel, no blur). ``placement`` and ``aspect``
    as in :func:`intrinsics`."""
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"render size must be positive, got {h}x{w}")
    k = intrinsics(camera.fov, (h, w), placement, aspect)
    w2c = camera.world_to_camera()
    origins, dirs = pixel_rays(k, w2c, (h, w))
    locations, ray_index, _ = mesh.ray.intersects_location(origins, dirs, multiple_hits=False)
    depth = np.zeros(h * w, dtype=np.float64)
    if len(ray_index):
        z = (np.asarray(locations) - origins[ray_index]) @ w2c[2, :3]
        # an intersector may report several hits per ray: keep the nearest
        order = np.argsort(-z)
        depth[ray_index[order]] = z[order]
    depth[depth < 0] = 0.0
    return View(torch.from_numpy(depth.reshape(h, w).astype(np.float32)), torch.from_numpy(k),
                torch.from_numpy(w2c))


def render_views(mesh, cameras, size: tuple[int, int], placements=None, aspect: float | None = None,
                 progress=None) -> list[View]:
    """``render_view`` for every camera (``placements``: one per camera or None); ``progress()`` after each."""
    out = []
    for i, cam in enumerate(cameras):
        out.append(render_view(mesh, cam, size, None if placements is None else placements[i], aspect))
        if progress is not None:
            progress()
    return out


def grid_size(size: tuple[int, int], longer_side: int) -> tuple[int, int]:
    """The correspondence grid for an (H, W) image: ``longer_side`` on the longer side, the other in proportion
    (upstream: 128² for square renders)."""
    h, w = size
    scale = longer_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def depth_for_conditioning(depth: torch.Tensor) -> torch.Tensor:
    """(V, H, W) depth -> (V, H, W, 3) in [0, 1]: upstream's ``get_depth`` (1/d, min-max normalized, x3 channels).

    Background has 1/d = 0 (infinitely far), so it stays 0 and the nearest point is 1; upstream's background is
    1/65535 (its PNG's far value), a difference of under 2e-5·d_near."""
    inv = torch.where(depth > 0, 1.0 / depth.clamp_min(1e-12), torch.zeros_like(depth))
    top = inv.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (inv / top).unsqueeze(-1).expand(*depth.shape, 3).contiguous().float()

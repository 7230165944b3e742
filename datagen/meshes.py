"""The pack's embedded rigid-object meshes: a few procedural shapes built with trimesh, shipped in
``datagen/meshes/`` so the rigid data-generation path runs without downloading any asset.

``python -m comfyui_syncd.datagen.meshes [folder]`` regenerates them (deterministic: no random numbers). All are
+Y up (glTF convention), roughly unit size; the renderer normalizes every mesh anyway.
"""

from __future__ import annotations

import math
import pathlib
import sys

import numpy as np

FOLDER = pathlib.Path(__file__).resolve().parent / "meshes"


def _trimesh():
    import trimesh

    return trimesh


def _rotate_to_y_up(mesh):
    """trimesh builds revolutions and cylinders about +Z: turn +Z into +Y."""
    trimesh = _trimesh()
    mesh.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0]))
    return mesh


def mug():
    """A lathe-turned mug (outer wall, rim, inner wall, floor) with a half-torus handle on +X."""
    trimesh = _trimesh()
    profile = np.array([[0.0, 0.0], [0.34, 0.0], [0.36, 0.04], [0.37, 0.85], [0.37, 0.9], [0.33, 0.9],
                        [0.32, 0.85], [0.31, 0.1], [0.0, 0.1]])
    body = _rotate_to_y_up(trimesh.creation.revolve(profile, sections=48))
    handle = trimesh.creation.torus(0.22, 0.045, major_sections=32, minor_sections=12)  # ring in the XY plane
    handle.apply_translation([0.37, 0.47, 0.0])
    return trimesh.util.concatenate([body, handle])


def toolbox():
    """A box with a carrying handle on top (two posts and a bar)."""
    trimesh = _trimesh()
    parts = [trimesh.creation.box(extents=[1.0, 0.5, 0.55], transform=_at(0, 0.25, 0)),
             trimesh.creation.box(extents=[1.04, 0.06, 0.59], transform=_at(0, 0.5, 0)),  # lid rim
             trimesh.creation.box(extents=[0.06, 0.22, 0.08], transform=_at(-0.3, 0.64, 0)),
             trimesh.creation.box(extents=[0.06, 0.22, 0.08], transform=_at(0.3, 0.64, 0)),
             trimesh.creation.cylinder(radius=0.04, height=0.66, sections=16,
                                       transform=_at(0, 0.75, 0) @ _turn([0, 1, 0], math.pi / 2))]
    return trimesh.util.concatenate(parts)


def chair():
    """A chair as a union of boxes: seat, four legs, two back posts and a back rest (front = +Z)."""
    trimesh = _trimesh()
    parts = [trimesh.creation.box(extents=[0.5, 0.06, 0.5], transform=_at(0, 0.45, 0))]
    for x in (-0.22, 0.22):
        for z in (-0.22, 0.22):
            parts.append(trimesh.creation.box(extents=[0.05, 0.42, 0.05], transform=_at(x, 0.21, z)))
        parts.append(trimesh.creation.box(extents=[0.05, 0.5, 0.05], transform=_at(x, 0.73, -0.22)))
    parts.append(trimesh.creation.box(extents=[0.44, 0.22, 0.04], transform=_at(0, 0.86, -0.22)))
    return trimesh.util.concatenate(parts)


def torus_knot(p: int = 2, q: int = 3, tube: float = 0.12, segments: int = 256, sides: int = 16):
    """A (p, q) torus knot: a tube of radius ``tube`` swept along the knot with parallel-transported frames."""
    trimesh = _trimesh()
    t = np.linspace(0, 2 * math.pi, segments, endpoint=False)
    r = 0.5 + 0.2 * np.cos(q * t)
    curve = np.stack([r * np.cos(p * t), 0.2 * np.sin(q * t), r * np.sin(p * t)], -1)
    tangent = np.roll(curve, -1, 0) - np.roll(curve, 1, 0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.cross(tangent, [0.0, 1.0, 0.0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    binormal = np.cross(tangent, normal)
    a = np.linspace(0, 2 * math.pi, sides, endpoint=False)
    ring = np.cos(a)[None, :, None] * normal[:, None] + np.sin(a)[None, :, None] * binormal[:, None]
    vertices = (curve[:, None] + tube * ring).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(segments), np.arange(sides), indexing="ij")
    v00 = i * sides + j
    v10 = ((i + 1) % segments) * sides + j
    v01 = i * sides + (j + 1) % sides
    v11 = ((i + 1) % segments) * sides + (j + 1) % sides
    faces = np.concatenate([np.stack([v00, v10, v11], -1).reshape(-1, 3),
                            np.stack([v00, v11, v01], -1).reshape(-1, 3)])
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=True)
    trimesh.repair.fix_normals(mesh)
    return mesh


def _at(x, y, z):
    out = np.eye(4)
    out[:3, 3] = [x, y, z]
    return out


def _turn(axis, angle):
    return _trimesh().transformations.rotation_matrix(angle, axis)


# file name -> builder; GLB for most, PLY for one, so both shipped formats are exercised
MESHES = {"mug.glb": mug, "toolbox.glb": toolbox, "chair.glb": chair, "torus_knot.ply": torus_knot}


def shipped_meshes() -> list[str]:
    """File names of the embedded meshes that exist in ``datagen/meshes/``."""
    return sorted(p.name for p in FOLDER.iterdir() if p.is_file() and p.name in MESHES) if FOLDER.is_dir() else []


def write_meshes(folder=FOLDER) -> list[pathlib.Path]:
    """Build every procedural mesh and save it under ``folder`` (the format from the file name)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, build in MESHES.items():
        path = folder / name
        build().export(str(path))
        out.append(path)
    return out


if __name__ == "__main__":
    for written in write_meshes(sys.argv[1] if len(sys.argv) > 1 else FOLDER):
        print(f"{written} ({written.stat().st_size} bytes)")

"""SynCDMeshViews: depth, foreground masks and cross-view correspondences of a rigid object's mesh
(``core/mesh_views.py``, ``core/correspondences.py``) for SynCD's rigid data generation."""

from __future__ import annotations

import os
import pathlib

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..core import correspondences as corr_core
from ..core import mesh_views
from . import choices

Correspondences = io.Custom("SYNCD_CORRESPONDENCES")

PACK_PREFIX = "pack/"
PACK_MESHES = pathlib.Path(__file__).resolve().parent.parent / "datagen" / "meshes"
DEFAULT_MESH = PACK_PREFIX + "mug.glb"
CAMERA_MODES = ["random", "list"]
NAME = "SynCD Mesh Views"


def _mesh_files(base: pathlib.Path, depth: int = 2) -> list[str]:
    """Mesh files under ``base`` (relative, '/'-separated), at most ``depth`` folders deep (input/ and input/3d/)."""
    found = []
    if not base.is_dir():
        return found
    for root, dirs, files in os.walk(base):
        rel = pathlib.Path(root).relative_to(base)
        if len(rel.parts) >= depth:
            dirs[:] = []
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [(rel / f).as_posix() for f in sorted(files) if f.lower().endswith(mesh_views.MESH_EXTENSIONS)]
    return found


def mesh_options() -> list[str]:
    """The shipped meshes (``pack/<name>``) and the mesh files in ComfyUI's input folder (and its ``3d/``)."""
    return ([PACK_PREFIX + name for name in _mesh_files(PACK_MESHES, depth=1)]
            + _mesh_files(pathlib.Path(folder_paths.get_input_directory())))


def resolve_mesh(mesh: str, mesh_path: str) -> pathlib.Path:
    if mesh_path and mesh_path.strip():
        path = pathlib.Path(mesh_path.strip()).expanduser()
        if not path.is_file():
            raise ValueError(f"{NAME}: mesh_path {mesh_path!r} is not a file; give a GLB, OBJ or PLY file, or clear "
                             f"mesh_path to use the 'mesh' list")
        return path
    choices.require(NAME, "mesh", mesh, mesh_options())
    if mesh.startswith(PACK_PREFIX):
        return PACK_MESHES / mesh[len(PACK_PREFIX):]
    return pathlib.Path(folder_paths.get_input_directory()) / mesh


def parse_angles(text: str, what: str) -> list[float]:
    try:
        return [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{NAME}: {what} {text!r} is not a comma-separated list of degrees, e.g. '20, 30, 15'") \
            from None


def build_cameras(camera_mode: str, views: int, seed: int, elevations: str, azimuths: str, distance: float,
                  fov: float) -> list[mesh_views.Camera]:
    choices.require(NAME, "camera_mode", camera_mode, CAMERA_MODES)
    if camera_mode == "random":
        return mesh_views.random_cameras(views, seed, distance, fov)
    elev, azim = parse_angles(elevations, "elevations"), parse_angles(azimuths, "azimuths")
    if len(elev) != len(azim) or len(elev) < 3:
        raise ValueError(f"{NAME}: camera_mode 'list' needs as many elevations as azimuths, at least 3 "
                         f"(got {len(elev)} and {len(azim)})")
    return [mesh_views.Camera(e, a, distance, fov) for e, a in zip(elev, azim)]


class SynCDMeshViews(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        options = mesh_options()
        return io.Schema(
            node_id="SynCDMeshViews",
            display_name=NAME,
            category="SynCD/datagen",
            description="Renders a rigid object's mesh from several cameras and picks three views as SynCD's data "
                        "generation does: views with elevation in (0°, 60°), every pair of a triplet with more than "
                        "10% of the correspondence grid matched (unproject with depth, reproject, depth test), the "
                        "least-overlap triplet, then upstream's random scale and paste near the bottom. Outputs the "
                        "depth for depth conditioning (1/d, min-max normalized, gray), the foreground masks and the "
                        "cross-view correspondences for feature warping.",
            inputs=[
                io.Combo.Input("mesh", options=options, default=DEFAULT_MESH if DEFAULT_MESH in options else None,
                               tooltip="pack/...: the pack's procedural meshes; others: GLB/glTF, OBJ, PLY, STL or "
                                       "OFF files in ComfyUI's input folder (or input/3d). +Y is up."),
                io.Combo.Input("camera_mode", options=CAMERA_MODES, default="random",
                               tooltip="random: 'views' directions uniform on the sphere (upstream's Cap3D renders); "
                                       "list: the cameras given by 'elevations' and 'azimuths'."),
                io.Int.Input("views", default=mesh_views.DEFAULT_VIEWS, min=3, max=200,
                             tooltip="random mode: how many cameras to draw (upstream: 20 renders per asset)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the random cameras and of the scale/paste augmentation."),
                io.String.Input("elevations", default="15, 25, 35",
                                tooltip="list mode: comma-separated elevations in degrees (above the ground plane)."),
                io.String.Input("azimuths", default="0, 120, 240",
                                tooltip="list mode: comma-separated azimuths in degrees (0 = front, +Z; 90 = +X)."),
                io.Float.Input("camera_distance", default=mesh_views.DEFAULT_DISTANCE, min=0.6, max=100.0,
                               step=0.05, tooltip="Camera distance from the centre of the mesh, normalized to a unit "
                                                  "cube (upstream: 2)."),
                io.Float.Input("fov", default=round(mesh_views.DEFAULT_FOV, 2), min=1.0, max=150.0, step=0.1,
                               tooltip="Field of view in degrees across the shorter image side (upstream: Blender's "
                                       "default camera, 39.6°)."),
                io.Int.Input("width", default=512, min=16, max=8192, step=8,
                             tooltip="Width of the depth images and masks (upstream samples at 512²)."),
                io.Int.Input("height", default=512, min=16, max=8192, step=8, tooltip="Height of the depth images."),
                io.Int.Input("correspondence_size", default=128, min=16, max=1024,
                             tooltip="Longer side of the grid the correspondences are computed on (upstream: 128²)."),
                io.Float.Input("depth_tolerance", default=corr_core.TOLERANCE, min=0.0001, max=1.0, step=0.001,
                               tooltip="A match needs |Δdepth| below this, in unit-cube units (upstream: 0.01)."),
                io.Float.Input("min_matched_fraction", default=corr_core.MIN_FRACTION, min=0.0, max=1.0, step=0.01,
                               tooltip="Each pair of a triplet needs more than this fraction of the grid's pixels "
                                       "matched (upstream: 0.1)."),
                io.Int.Input("triplet_rank", default=0, min=0, max=1000,
                             tooltip="Which triplet by total matches, smallest first (upstream: 0 or 1, the least "
                                     "overlap)."),
                io.Float.Input("min_elevation", default=corr_core.ELEVATION_RANGE[0], min=-90.0, max=90.0, step=1.0,
                               tooltip="Views need an elevation above this (upstream: 0°)."),
                io.Float.Input("max_elevation", default=corr_core.ELEVATION_RANGE[1], min=-90.0, max=90.0, step=1.0,
                               tooltip="Views need an elevation below this (upstream: 60°)."),
                io.Boolean.Input("augment", default=True,
                                 tooltip="Upstream's render augmentation: scale U(0.7, 0.95) (U(0.9, 0.95) for small "
                                         "objects), pasted at a random x near the bottom; views whose object covers "
                                         "< 10% of the image are left out. The correspondences move with it."),
                io.String.Input("mesh_path", default="", optional=True,
                                tooltip="A mesh file path instead of 'mesh'."),
            ],
            outputs=[io.Image.Output(display_name="depth"),
                     io.Mask.Output(display_name="masks"),
                     Correspondences.Output(display_name="correspondences"),
                     io.String.Output(display_name="info")],
        )

    @classmethod
    def validate_inputs(cls, mesh=None, camera_mode=None):
        return choices.check(cls, mesh=mesh, camera_mode=camera_mode)

    @classmethod
    def execute(cls, mesh, camera_mode, views, seed, elevations, azimuths, camera_distance, fov, width, height,
                correspondence_size, depth_tolerance, min_matched_fraction, triplet_rank, min_elevation,
                max_elevation, augment, mesh_path="") -> io.NodeOutput:
        import comfy.utils

        path = resolve_mesh(mesh, mesh_path)
        if min_elevation >= max_elevation:
            raise ValueError(f"{NAME}: min_elevation {min_elevation:g} must be below max_elevation {max_elevation:g}")
        cameras = build_cameras(camera_mode, views, seed, elevations, azimuths, camera_distance, fov)
        try:
            normalized = mesh_views.normalize_mesh(mesh_views.load_mesh(path))
            bar = comfy.utils.ProgressBar(1)
            result = corr_core.rigid_views(
                normalized, cameras, (height, width), grid=correspondence_size, tolerance=depth_tolerance,
                min_fraction=min_matched_fraction, elevation_range=(min_elevation, max_elevation), rank=triplet_rank,
                augment=augment, seed=seed, progress=lambda done, total: bar.update_absolute(done, total))
        except ValueError as exc:
            raise ValueError(f"{NAME}: {exc}") from None
        depth = torch.stack([v.depth for v in result.views])
        image = mesh_views.depth_for_conditioning(depth)
        masks = (depth > 0).float()
        corr = result.correspondences
        lines = [f"{path.name}: views {list(result.indices)} of {len(cameras)}, triplet {triplet_rank} of "
                 f"{result.candidates} passing"]
        for i, (cam, pl) in enumerate(zip(result.cameras, result.placements)):
            where = "" if pl is None else f", scale {pl.scale:.3f} at x={pl.offset[0]:g} y={pl.offset[1]:g}"
            lines.append(f"view {i}: elevation {cam.elevation:.1f}°, azimuth {cam.azimuth:.1f}°{where}")
        grid = corr.size
        lines.append(f"matches on {grid[0]}x{grid[1]}: "
                     + ", ".join(f"{a}-{b} {int(r.shape[0])}" for (a, b), r in sorted(corr.pairs.items())))
        info = "\n".join(lines)
        return io.NodeOutput(image, masks, corr, info, ui=ui.PreviewText(info))

"""Mesh views and cross-view correspondences (core/mesh_views.py, core/correspondences.py) against ground truth:
a ground plane with a floating box above it, traced analytically (plane and slab intersections, one id per face),
so every pixel's surface point, its projection into the other view and its visibility there are known exactly."""

import math
import random

import numpy as np
import pytest
import torch

from comfyui_syncd.core import correspondence_format as fmt
from comfyui_syncd.core import correspondences as cc
from comfyui_syncd.core import mesh_views as mv

pytestmark = pytest.mark.unit

BOX = (np.array([-0.15, 0.2, -0.12]), np.array([0.15, 0.45, 0.12]))  # floats above the plane: occludes it
PLANE = 0.5  # ground plane y = 0, |x|, |z| <= PLANE


def scene_mesh():
    import trimesh

    plane = trimesh.Trimesh(vertices=[[-PLANE, 0, -PLANE], [PLANE, 0, -PLANE], [PLANE, 0, PLANE], [-PLANE, 0, PLANE]],
                            faces=[[0, 2, 1], [0, 3, 2]], process=False)
    box = trimesh.creation.box(bounds=np.stack(BOX))
    return trimesh.util.concatenate([plane, box])


def trace(origins, dirs):
    """Analytic first hit of each ray: (t, face id) with id 0 = plane, 1..6 = box faces, -1 = nothing."""
    n = len(origins)
    best_t = np.full(n, np.inf)
    best_id = np.full(n, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -origins[:, 1] / dirs[:, 1]
        p = origins + t[:, None] * dirs
        ok = (t > 1e-9) & (np.abs(p[:, 0]) <= PLANE) & (np.abs(p[:, 2]) <= PLANE)
        best_t[ok], best_id[ok] = t[ok], 0
        t0 = (BOX[0] - origins) / dirs
        t1 = (BOX[1] - origins) / dirs
        near, far = np.minimum(t0, t1), np.maximum(t0, t1)
        t_in, axis = near.max(1), near.argmax(1)
        t_out = far.min(1)
        side = np.where(t0[np.arange(n), axis] > t1[np.arange(n), axis], 1, 0)  # entered through the max face
    hit = (t_in <= t_out) & (t_in > 1e-9) & (t_in < best_t)
    best_t[hit], best_id[hit] = t_in[hit], 1 + 2 * axis[hit] + side[hit]
    return best_t, best_id


CAMERAS = (mv.Camera(35.0, 10.0), mv.Camera(40.0, 75.0, 2.2))  # upstream: unit-size object, distance 2, 39.6°


def analytic(view, camera):
    """Ground-truth depth (H, W) and face ids (H, W) of the pixel centres of ``view``."""
    origins, dirs = mv.pixel_rays(view.K.numpy(), view.world_to_camera.numpy(), view.size)
    t, ids = trace(origins, dirs)
    depth = np.where(ids >= 0, t * (dirs @ view.world_to_camera.numpy()[2, :3]), 0.0)
    return depth.reshape(view.size), ids.reshape(view.size), origins, dirs, t


def project(points, view):
    w2c, k = view.world_to_camera.numpy(), view.K.numpy()
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    return k[0, 0] * cam[:, 0] / cam[:, 2] + k[0, 2], k[1, 1] * cam[:, 1] / cam[:, 2] + k[1, 2], cam[:, 2]


def test_camera_looks_at_the_origin_with_y_up():
    cam = mv.Camera(0.0, 0.0, 2.0, 60.0)
    w2c = cam.world_to_camera()
    np.testing.assert_allclose(w2c[:3, :3] @ [0, 0, 0] + w2c[:3, 3], [0, 0, 2], atol=1e-12)  # origin ahead
    np.testing.assert_allclose(w2c[:3, :3] @ [1, 0, 0], [1, 0, 0], atol=1e-12)   # +X world is image right
    np.testing.assert_allclose(w2c[:3, :3] @ [0, 1, 0], [0, -1, 0], atol=1e-12)  # +Y world is image up
    side = mv.Camera(30.0, 90.0, 2.0).position()
    np.testing.assert_allclose(side, [2 * math.cos(math.radians(30)), 1.0, 0.0], atol=1e-12)
    k = mv.intrinsics(90.0, (100, 200))  # fov spans the shorter side: 90° over 100 px -> f = 50
    assert k[0, 0] == pytest.approx(50.0) and k[1, 1] == pytest.approx(50.0) and tuple(k[:2, 2]) == (100.0, 50.0)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_render_matches_the_analytic_depth(size):
    mesh = scene_mesh()
    view = mv.render_view(mesh, CAMERAS[0], size)
    depth, ids, *_ = analytic(view, CAMERAS[0])
    pad = np.pad(ids, 1, mode="edge")
    interior = np.all([pad[1 + dy:1 + dy + size[0], 1 + dx:1 + dx + size[1]] == ids
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)  # away from silhouettes and edges
    assert interior.sum() > 0.5 * ids.size and (ids[interior] >= 1).sum() > 30 and (ids[interior] == -1).any()
    np.testing.assert_allclose(view.depth.numpy()[interior], depth[interior], atol=1e-4)
    assert torch.equal(view.mask, view.depth > 0)


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_correspondences_are_exact_where_visible_and_absent_where_occluded(size):
    mesh = scene_mesh()
    a, b = (mv.render_view(mesh, cam, size) for cam in CAMERAS)
    rows = cc.match_views(a, b).double().numpy()
    h, w = size
    _, ids_a, origins, dirs, t = analytic(a, CAMERAS[0])
    depth_b, ids_b, *_ = analytic(b, CAMERAS[1])
    ids_a = ids_a.reshape(-1)
    points = origins + np.where(ids_a >= 0, t, 0.0)[:, None] * dirs
    u, v, z = project(points, b)
    # visibility in b: the first hit from b's camera toward the point is the point itself
    eye_b = mv.pixel_rays(b.K.numpy(), b.world_to_camera.numpy(), (1, 1))[0][0]
    to_point = points - eye_b
    dist = np.linalg.norm(to_point, axis=1)
    t_b, _ = trace(np.broadcast_to(eye_b, points.shape).copy(), to_point / np.maximum(dist, 1e-9)[:, None])
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h) & (ids_a >= 0)
    visible = inside & (t_b >= dist * (1 - 1e-7))
    occluded = inside & (dist - t_b > 0.03)  # something lies 0.03 or more in front of the point
    # clean: the 3x3 pixels of b around the projection show one face (no silhouette or edge within a pixel)
    col, row = np.clip(np.floor(u), 0, w - 1).astype(int), np.clip(np.floor(v), 0, h - 1).astype(int)
    pad = np.pad(ids_b, 1, constant_values=-2)
    around = np.stack([pad[row + 1 + dy, col + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 1)
    clean = inside & np.all(around == around[:, :1], 1)
    clean_visible = clean & visible & (around[:, 0] == ids_a)
    clean_occluded = clean & occluded & (around[:, 0] != ids_a)
    assert clean_visible.sum() > 1500 and clean_occluded.sum() > 100  # the scene tests both cases
    # upstream's rule on the analytic depth: b's depth at the nearest pixel within 0.01 of the point's depth
    expected = inside & (depth_b[row, col] > 0) & (np.abs(depth_b[row, col] - z) < cc.TOLERANCE)

    r = np.round(((rows[:, 0] + 1) * h - 1) / 2).astype(int)
    c = np.round(((rows[:, 1] + 1) * w - 1) / 2).astype(int)
    np.testing.assert_allclose(rows[:, 0], (2 * r + 1) / h - 1, atol=1e-6)  # a's side: pixel centres
    np.testing.assert_allclose(rows[:, 1], (2 * c + 1) / w - 1, atol=1e-6)
    index = r * w + c
    assert len(np.unique(index)) == len(index)
    matched = np.zeros(h * w, dtype=bool)
    matched[index] = True
    # every match lands on the analytic projection of its point (far within one pixel)
    np.testing.assert_allclose(rows[:, 3], 2 * u[index] / w - 1, atol=0.02 * 2 / w)
    np.testing.assert_allclose(rows[:, 2], 2 * v[index] / h - 1, atol=0.02 * 2 / h)
    # visible points are matched (exactly those that pass the 0.01 depth test at their nearest pixel of b: over 90%
    # here, the rest on surfaces that tilt away), occluded ones never
    assert np.array_equal(matched[clean_visible], expected[clean_visible])
    assert expected[clean_visible].mean() > 0.9
    assert not matched[clean_occluded].any()
    assert not matched[ids_a < 0].any() and not matched[~inside].any()


def test_vectorized_matching_equals_the_reference_loop():
    mesh = mv.normalize_mesh(scene_mesh())
    a, b = (mv.render_view(mesh, cam, (32, 48)) for cam in (mv.Camera(30, 0), mv.Camera(35, 30)))
    fast, slow = cc.match_views(a, b), cc.match_views_reference(a, b)
    assert fast.shape[0] > 100
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def fake_views(counts, monkeypatch, size=(10, 10)):
    """Views whose pair matches are ``counts[(i, j)]`` rows (monkeypatched matcher); records the pairs matched."""
    calls = []

    def match(a, b, tolerance):
        calls.append((a.index, b.index))
        return torch.zeros(counts.get((a.index, b.index), 0), 4)

    class Fake:
        def __init__(self, i):
            self.index, self.size = i, size

    monkeypatch.setattr(cc, "match_views", match)
    return [Fake(i) for i in range(max(max(k) for k in counts) + 1)], calls


def test_pair_and_triplet_rules(monkeypatch):
    assert cc.pair_passes(torch.zeros(1639, 4), (128, 128)) and not cc.pair_passes(torch.zeros(1638, 4), (128, 128))
    # 5 views on a 10x10 grid: a pair passes with > 10 rows; view 4 has elevation 70 (> 60), view 0 is at 0 (<= 0)
    counts = {(0, 1): 50, (0, 2): 50, (0, 3): 50, (1, 2): 30, (1, 3): 11, (2, 3): 10, (1, 4): 90, (2, 4): 90,
              (3, 4): 90}
    elevations = [0.0, 10.0, 20.0, 59.0, 70.0]
    views, calls = fake_views(counts, monkeypatch)
    found = cc.find_triplets(views, elevations)
    assert [t.views for t in found] == []  # (1, 2, 3) fails: its pair (2, 3) has exactly 10% matched
    assert (0, 1) not in calls and all(4 not in pair for pair in calls)  # out-of-range views are never matched
    counts[(2, 3)] = 11
    views, _ = fake_views(counts, monkeypatch)
    found = cc.find_triplets(views, [5.0, 10.0, 20.0, 59.0, 70.0])
    assert [t.views for t in found] == [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
    assert [t.matches for t in found] == [130, 111, 111, 52]
    assert {k: v.shape[0] for k, v in found[1].correspondences.pairs.items()} == {(0, 1): 50, (0, 2): 50, (1, 2): 11}
    assert cc.least_overlap(found, 0).views == (1, 2, 3)
    assert cc.least_overlap(found, 1).views == (0, 1, 3)  # ties keep the combination order
    assert cc.least_overlap(found, 2).views == (0, 2, 3)
    assert cc.least_overlap(found, 4) is None
    # with a lower bar the (2, 3) pair passes at 10 too
    counts[(2, 3)] = 10
    views, _ = fake_views(counts, monkeypatch)
    assert (1, 2, 3) in [t.views for t in cc.find_triplets(views, [5.0, 10.0, 20.0, 59.0, 70.0], min_fraction=0.05)]


def test_placement_moves_rows_like_the_intrinsics_and_like_upstream():
    size = (96, 128)
    place_a, place_b = mv.Placement(0.8, (10.0, 17.0)), mv.Placement(0.93, (3.0, 5.0))
    cam = mv.Camera(20, 30)
    points = np.random.default_rng(0).uniform(-0.4, 0.4, (50, 3))

    def normalized(placement):
        view = mv.View(torch.zeros(size), torch.from_numpy(mv.intrinsics(cam.fov, size, placement)),
                       torch.from_numpy(cam.world_to_camera()))
        u, v, _ = project(points, view)
        return torch.from_numpy(np.stack([2 * v / size[0] - 1, 2 * u / size[1] - 1], 1))

    rows = torch.cat([normalized(None), normalized(None)], 1)
    moved = cc.place_rows(rows, place_a, place_b, size)
    torch.testing.assert_close(moved, torch.cat([normalized(place_a), normalized(place_b)], 1))
    # upstream on its 1024² canvas, in PyTorch3D NDC (flipped axes): c' = s·c + 1 - 2p/1024 - s
    ndc = -rows
    s, (px, py) = 0.8, (100.0, 300.0)
    up = torch.stack([s * ndc[:, 0] + (1 - 2 * py / 1024) - s, s * ndc[:, 1] + (1 - 2 * px / 1024) - s], 1)
    ours = cc.place_rows(rows, mv.Placement(s, (px, py)), mv.Placement(s, (px, py)), (1024, 1024))[:, :2]
    torch.testing.assert_close(ours.float(), fmt.from_upstream_ndc(up))


def test_sample_placement_follows_upstream_rules():
    rng = random.Random(0)
    assert cc.sample_placement(0.099, (512, 512), rng) is None
    for area, lo in ((0.15, 0.9), (0.5, 0.7)):
        for _ in range(50):
            p = cc.sample_placement(area, (512, 768), rng)
            h, w = math.ceil(512 * p.scale), math.ceil(768 * p.scale)
            assert lo <= p.scale <= 0.95
            assert 0 <= p.offset[0] <= 768 - w and max(512 - h - 50, 0) <= p.offset[1] <= 512 - h
            corners = cc.place_rows(torch.tensor([[-1.0, -1.0, 1.0, 1.0]]), p, p, (512, 768))
            assert corners.abs().max() <= 1.0 + 1e-6  # the scaled image stays on the canvas (format limit)


def test_depth_for_conditioning_is_inverted_and_normalized():
    depth = torch.tensor([[[0.0, 2.0], [4.0, 1.0]]])
    out = mv.depth_for_conditioning(depth)
    assert out.shape == (1, 2, 2, 3) and torch.equal(out[..., 0], out[..., 2])
    torch.testing.assert_close(out[0, ..., 0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))


def test_rigid_views_end_to_end_and_file_round_trip(tmp_path):
    mesh = mv.normalize_mesh(mv.load_mesh(mv_pack("mug.glb")))
    cams = mv.random_cameras(20, seed=3)
    size = (96, 160)
    out = cc.rigid_views(mesh, cams, size, grid=64, seed=1)
    assert all(0 < cams[i].elevation < 60 for i in out.indices) and out.candidates >= 1
    assert [v.size for v in out.views] == [size] * 3 and out.correspondences.size == mv.grid_size(size, 64)
    grid = out.correspondences.size
    for rows in out.correspondences.pairs.values():
        assert rows.shape[0] > 0.1 * grid[0] * grid[1]
    # placed rows point at the same surface point in the placed full-size renders (within a pixel or two at the
    # silhouettes): unproject a's placed depth at the row, project into b
    views = out.views
    for (i, j), rows in out.correspondences.pairs.items():
        a, b = views[i], views[j]
        ra = ((rows[:, 0] + 1) * size[0] / 2).long().clamp(0, size[0] - 1)
        ca = ((rows[:, 1] + 1) * size[1] / 2).long().clamp(0, size[1] - 1)
        hit = a.depth[ra, ca] > 0
        assert hit.float().mean() > 0.97
        points = cc.unproject(a).view(*size, 3)[ra[hit], ca[hit]]
        yb, xb, _ = cc._project(points, b)
        err = torch.maximum((yb - rows[hit, 2]).abs() * size[0] / 2, (xb - rows[hit, 3]).abs() * size[1] / 2)
        assert err.median() < 0.5 and (err < 2.0).float().mean() > 0.95
    other = cc.rigid_views(mesh, cams, size, grid=64, seed=1, rank=1)
    assert other.correspondences.pairs.keys() == out.correspondences.pairs.keys()
    total = lambda r: sum(int(x.shape[0]) for x in r.correspondences.pairs.values())  # noqa: E731
    unplaced = cc.rigid_views(mesh, cams, size, grid=64, augment=False)
    assert unplaced.placements == [None] * 3 and unplaced.indices == out.indices
    assert total(unplaced) == total(out) <= total(cc.rigid_views(mesh, cams, size, grid=64, augment=False, rank=1))
    path = tmp_path / "mug.safetensors"
    fmt.save(path, out.correspondences)
    back = fmt.load(path)
    assert back.views == 3 and back.size == grid
    for key, rows in out.correspondences.pairs.items():
        assert torch.equal(back.pairs[key], rows)
    with pytest.raises(ValueError, match="triplet_rank 999 needs 1000"):
        cc.rigid_views(mesh, cams, size, grid=64, rank=999)
    with pytest.raises(ValueError, match="a triplet needs 3"):
        cc.rigid_views(mesh, [mv.Camera(-10, a) for a in (0, 90, 180)], size, grid=32)


def mv_pack(name):
    from comfyui_syncd.datagen import meshes

    return meshes.FOLDER / name


@pytest.mark.parametrize("ext", ["glb", "obj", "ply"])
def test_mesh_files_load_and_render_alike(tmp_path, ext):
    import trimesh

    source = trimesh.util.concatenate([trimesh.creation.box(extents=[2.0, 1.0, 0.5]),
                                       trimesh.creation.icosphere(subdivisions=2, radius=0.4)
                                       .apply_translation([0, 0.9, 0])])
    source.apply_translation([5.0, -3.0, 1.0])
    path = tmp_path / f"thing.{ext}"
    source.export(str(path))
    mesh = mv.normalize_mesh(mv.load_mesh(path))
    lo, hi = mesh.bounds
    np.testing.assert_allclose((lo + hi) / 2, 0, atol=1e-6)
    assert float((hi - lo).max()) == pytest.approx(1.0)
    reference = mv.normalize_mesh(trimesh.Trimesh(source.vertices, source.faces, process=False))
    cam = mv.Camera(25, 40)
    torch.testing.assert_close(mv.render_view(mesh, cam, (40, 48)).depth,
                               mv.render_view(reference, cam, (40, 48)).depth, atol=1e-4, rtol=0)


def test_mesh_errors_name_the_file(tmp_path):
    import trimesh

    with pytest.raises(mv.MeshError, match="does not exist"):
        mv.load_mesh(tmp_path / "absent.glb")
    cloud = tmp_path / "cloud.ply"
    trimesh.PointCloud(np.random.default_rng(0).normal(size=(20, 3))).export(str(cloud))
    with pytest.raises(mv.MeshError, match="cloud.ply: holds no triangles"):
        mv.load_mesh(cloud)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(mv.MeshError, match="not a mesh file"):
        mv.load_mesh(tmp_path / "notes.txt")


def test_shipped_meshes_are_small_and_regenerate(tmp_path):
    from comfyui_syncd.datagen import meshes

    assert meshes.shipped_meshes() == sorted(meshes.MESHES)
    assert sum((meshes.FOLDER / n).stat().st_size for n in meshes.MESHES) <= 1_000_000
    meshes.write_meshes(tmp_path)
    for name in meshes.MESHES:
        shipped, fresh = mv.load_mesh(meshes.FOLDER / name), mv.load_mesh(tmp_path / name)
        assert len(shipped.faces) > 50 and abs(len(fresh.faces) / len(shipped.faces) - 1) < 0.1  # trimesh may vary
        np.testing.assert_allclose(shipped.bounds, fresh.bounds, atol=1e-3)
        view = mv.render_view(mv.normalize_mesh(shipped), mv.Camera(30, 45), (64, 64))
        assert 0.1 < view.mask.float().mean() < 0.6  # the object fills a sensible part of the default view

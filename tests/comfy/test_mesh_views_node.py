"""SynCD Mesh Views in ComfyUI: the shipped meshes and the input folder's meshes in the combo, consistent output
shapes (square and not), masks = depth > 0, correspondences of the three chosen views."""

import pytest
import torch

pytestmark = pytest.mark.comfy

ARGS = dict(camera_mode="random", views=20, seed=0, elevations="15, 25, 35", azimuths="0, 120, 240",
            camera_distance=2.0, fov=39.6, width=96, height=96, correspondence_size=96, depth_tolerance=0.01,
            min_matched_fraction=0.1, triplet_rank=0, min_elevation=0.0, max_elevation=60.0, augment=True)


def run(**changes):
    from comfyui_syncd.nodes.mesh_views import SynCDMeshViews

    return SynCDMeshViews.execute(**{"mesh": "pack/mug.glb", **ARGS, **changes})


@pytest.mark.parametrize("height,width", [(96, 96), (112, 64)])
def test_outputs_are_consistent(comfy_imports, height, width):
    from comfyui_syncd.core.correspondence_format import Correspondences, check

    out = run(height=height, width=width)
    depth, masks, corr, info = out.args
    assert depth.shape == (3, height, width, 3) and masks.shape == (3, height, width)
    assert depth.dtype == torch.float32 and 0 <= float(depth.min()) and float(depth.max()) == pytest.approx(1.0)
    assert torch.equal(masks, (depth[..., 0] > 0).float())
    assert torch.equal(depth[..., 0], depth[..., 2])
    assert 0.05 < float(masks.mean()) < 0.9
    assert isinstance(corr, Correspondences) and corr.views == 3 and set(corr.pairs) == {(0, 1), (0, 2), (1, 2)}
    check(corr)
    gh, gw = corr.size
    assert max(gh, gw) == 96 and abs(gh / gw - height / width) < 0.05
    for rows in corr.pairs.values():
        assert rows.shape[0] > 0.1 * gh * gw
    # each view's matched points lie on the object in its (placed) mask
    for (a, b), rows in corr.pairs.items():
        for view, cols in ((a, (0, 1)), (b, (2, 3))):
            r = ((rows[:, cols[0]] + 1) * height / 2).long().clamp(0, height - 1)
            c = ((rows[:, cols[1]] + 1) * width / 2).long().clamp(0, width - 1)
            assert masks[view, r, c].mean() > 0.95
    assert info.startswith("mug.glb: views") and out.ui.as_dict() == {"text": (info,)}


def test_list_cameras_input_folder_meshes_and_errors(comfy_imports, tmp_path, monkeypatch):
    import folder_paths
    import trimesh

    from comfyui_syncd.nodes.mesh_views import SynCDMeshViews

    (tmp_path / "3d").mkdir()
    trimesh.creation.box(extents=[1.0, 0.6, 0.8]).export(str(tmp_path / "3d" / "crate.obj"))
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    options = [o for i in SynCDMeshViews.define_schema().inputs if i.id == "mesh" for o in i.options]
    assert {"pack/mug.glb", "pack/chair.glb", "pack/toolbox.glb", "pack/torus_knot.ply", "3d/crate.obj"} <= set(options)
    assert SynCDMeshViews.validate_inputs(mesh="3d/crate.obj", camera_mode="list") is True
    assert "not an option" in SynCDMeshViews.validate_inputs(mesh="3d/none.obj", camera_mode="list")

    out = run(mesh="3d/crate.obj", camera_mode="list", elevations="20, 30, 25", azimuths="0, 30, 60", augment=False)
    depth, masks, corr, info = out.args
    assert depth.shape == (3, 96, 96, 3) and torch.equal(masks, (depth[..., 0] > 0).float())
    assert "elevation 20.0°, azimuth 0.0°" in info and "elevation 25.0°, azimuth 60.0°" in info
    # the same box through mesh_path gives the same renders
    same = run(mesh="pack/mug.glb", mesh_path=str(tmp_path / "3d" / "crate.obj"), camera_mode="list",
               elevations="20, 30, 25", azimuths="0, 30, 60", augment=False)
    assert torch.equal(same.args[0], depth)

    with pytest.raises(ValueError, match="as many elevations as azimuths"):
        run(camera_mode="list", elevations="20, 30", azimuths="0, 30, 60")
    with pytest.raises(ValueError, match="SynCD Mesh Views: .*triplet_rank 0 needs 1"):
        run(camera_mode="list", elevations="20, 30, 25", azimuths="0, 120, 240", augment=False)  # little overlap
    with pytest.raises(ValueError, match="mesh_path .* is not a file"):
        run(mesh_path=str(tmp_path / "absent.glb"))

"""toyworld/sets.py: data-generation prompts for toy objects, and set consistency."""

from __future__ import annotations

import pytest

from comfyui_syncd.toyworld import reader as R, scene as S, sets, views

pytestmark = pytest.mark.unit


def test_prompts_name_shape_and_background_only(tmp_path):
    from comfyui_syncd.datagen.driver import read_prompts

    path = sets.prompts_file(tmp_path / "prompts.jsonl", count=8, seed=1)
    specs = read_prompts(path)
    assert [s.category for s in specs] == [S.SHAPES[i % 6] for i in range(8)]
    for spec in specs:
        assert len(spec.prompts) == 3 and len(set(spec.prompts)) == 3   # a background per image
        for prompt in spec.prompts:
            assert spec.category in prompt.split()                        # automatic masks find the category
            assert not any(w in prompt for w in S.COLOURS + S.TEXTURES)   # the look is left to the model
    assert sets.draw_objects(8, 1) == sets.draw_objects(8, 1) != sets.draw_objects(8, 2)
    with pytest.raises(ValueError, match="distinct backgrounds"):
        sets.draw_objects(1, 0, set_size=7)


def test_set_consistency_counts_sets_that_agree():
    cube = ("cube", "red", "plain")
    ids = [cube, cube, cube,                                   # consistent
           cube, ("cube", "blue", "plain"), cube,              # colour differs
           cube, None, cube]                                   # an image without an object
    got = sets.set_consistency(ids)
    assert got == {"shape": 2 / 3, "colour": 1 / 3, "texture": 2 / 3, "all": 1 / 3}
    with pytest.raises(ValueError, match="whole sets"):
        sets.set_consistency(ids[:4])


def test_true_multi_view_sets_read_as_consistent():
    """Rendered multi-view sets of one identity (the ideal generator) are consistent by the reader's reading;
    sets mixing identities are not."""
    same, mixed = [], []
    for i, identity in enumerate(views.all_identities()[::9][:12]):
        render = views.multi_view_set(identity, 3, seed=i)
        same += [render.image]
        other = views.all_identities()[(i * 9 + 4) % 108]
        mixed += [render.image[:2], views.multi_view_set(other, 1, seed=100 + i).image]
    import torch

    read_same = R.read(torch.cat(same))
    read_mixed = R.read(torch.cat(mixed))
    assert sets.set_consistency([read_same.identity(i) for i in range(len(read_same))])["all"] >= 0.6  # the ceiling: the reader errs on some views
    assert sets.set_consistency([read_mixed.identity(i) for i in range(len(read_mixed))])["all"] <= 0.2


def test_background_phrases_suggest_no_look():
    for phrase in S.BACKGROUND_PHRASES.values():
        assert not set(phrase.split()) & set(S.COLOURS + S.TEXTURES), phrase


def _to_pil(images):
    from PIL import Image

    return [Image.fromarray((255 * im.numpy()).round().astype("uint8")) for im in images]


def test_reader_scores_are_the_upstream_filters_inputs(tmp_path):
    """An image without an object scores 0 'aesthetics'; pairs score 0.98 × the share of agreeing attributes; the
    dataset writer stores them, and the training scripts' upstream filter (min_aesthetics 0.5, min_dino 0.98) then
    keeps the images that read the same identity as another of their set."""
    import numpy as np

    from comfyui_syncd.core import dataset_format

    cube = views.Identity("cube", "red", "plain")
    render = views.multi_view_set(cube, 3, seed=3)
    empty = S.render(S.sample_scenes(1, 5, p_empty=1.0)).image
    images = _to_pil(torch_cat([render.image[:2], empty]))
    keep, aesthetics, pairs = sets.reader_scores(images)
    ids = [R.read(render.image[:2]).identity(i) for i in range(2)]
    assert keep == [0, 1, 2] and aesthetics[2] == 0.0 and aesthetics[:2] == [1.0 if x else 0.0 for x in ids]
    agree = sum(a == b for a, b in zip(*ids)) / 3 if all(ids) else 0.0
    assert pairs[0][1] == pairs[1][0] == pytest.approx(0.98 * agree) and pairs[0][2] == pairs[0][0] == 0.0
    writer = dataset_format.DatasetWriter(tmp_path)
    writer.write("obj", images, ["a cube on grass"] * 3, "cube", aesthetics_scores=aesthetics,
                 dino_scores=np.asarray(pairs))
    kept = dataset_format.read_dataset(tmp_path, min_aesthetics=0.5, min_dino=0.98)
    expected = [0, 1] if ids[0] is not None and ids[0] == ids[1] else []
    assert [len(r.images) for r in kept] == ([2] if expected else [])


def torch_cat(parts):
    import torch

    return torch.cat(parts)


def test_condition_workflows_set_the_shared_attention():
    import json

    from comfyui_syncd.client.workflow_format import widget_values
    from comfyui_syncd.datagen.driver import DEFAULT_WORKFLOWS

    workflow = json.loads(DEFAULT_WORKFLOWS["deformable"].read_text())
    spec = {"input": {"required": {"model": ["MODEL"], "images_per_subject": ["INT", {"default": 3}],
                                   "mask_mode": [["foreground_masks", "none", "automatic"]]}},
            "input_order": {"required": ["model", "images_per_subject", "mask_mode"]}}
    shared = next(n for n in workflow["nodes"] if n["type"] == "SynCDSharedAttention")
    # the shipped node's widgets go beyond this minimal definition; only the first two are read and set
    object_info = {"SynCDSharedAttention": spec}
    got = {}
    for condition in sets.CONDITIONS:
        out = sets.condition_workflow(workflow, condition, object_info)
        node = next(n for n in out["nodes"] if n["id"] == shared["id"])
        muted = {n["type"] for n in out["nodes"] if n.get("mode") == 2}
        got[condition] = (widget_values(node, spec)["images_per_subject"], widget_values(node, spec)["mask_mode"], muted)
    assert got["msa_off"][:2] == (1, "automatic") and not got["msa_off"][2]
    assert got["msa_no_masks"][:2] == (3, "none") and {"SynCDAutomaticMasks", "MaskToImage", "SaveImage"} <= got["msa_no_masks"][2]
    assert got["msa_masks"][:2] == (3, "automatic") and not got["msa_masks"][2]
    assert widget_values(shared, spec)["images_per_subject"] == 3  # the input workflow is untouched
    with pytest.raises(ValueError, match="condition"):
        sets.condition_workflow(workflow, "msa_sometimes", object_info)
    unshared = {**workflow, "nodes": [n for n in workflow["nodes"] if n["type"] != "SynCDSharedAttention"]}
    with pytest.raises(ValueError, match="expected one SynCDSharedAttention node, found 0"):
        sets.condition_workflow(unshared, "msa_masks", object_info)


def test_self_attention_probe_shares_and_removes_attn1():
    """The attention_probe stage's switch: 'plain' is diffusers' own self-attention, 'shared' makes an image's output
    depend on the other images of its set only, 'no_self_attention' equals a UNet whose attn1 outputs are zero."""
    import copy

    import torch

    from comfyui_syncd.toyworld import base_model as B

    torch.manual_seed(0)
    unet = B.build_unet(seed=0).eval()
    with torch.no_grad():  # weights that carry signal through attn1
        for name, p in unet.named_parameters():
            if "attn1" in name and p.ndim == 2:
                p.normal_(0, 0.3)
    reference = copy.deepcopy(unet)
    x = torch.randn(6, 4, 8, 8)
    ctx = torch.randn(6, 77, B.CONTEXT_DIM)
    t = torch.tensor(500)
    with torch.no_grad():
        expected_plain = reference(x, t, encoder_hidden_states=ctx).sample
        probe = sets.SelfAttentionProbe(unet)
        probe.set("plain", 6)
        plain = unet(x, t, encoder_hidden_states=ctx).sample
        probe.set("shared", 6)
        shared = unet(x, t, encoder_hidden_states=ctx).sample
        x2 = x.clone()
        x2[4] += 1.0                                   # another image of the second set
        shared2 = unet(x2, t, encoder_hidden_states=ctx).sample
        probe.set("no_self_attention", 6)
        removed = unet(x, t, encoder_hidden_states=ctx).sample
        for name, module in reference.named_modules():
            if name.endswith("attn1"):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
        expected_removed = reference(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(plain, expected_plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(removed, expected_removed, atol=1e-4, rtol=1e-4)
    assert (shared - plain).abs().max() > 1e-2
    assert torch.equal(shared2[:3], shared[:3])        # the first set does not see the second
    assert (shared2[3] - shared[3]).abs().max() > 1e-3  # image 3 sees image 4 of its set
    with pytest.raises(ValueError, match="whole sets"):
        probe.set("shared", 4)
    probe.remove()
    probe.gain = 0.0
    with torch.no_grad():
        probe.state.set_sizes = None
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=ctx).sample, expected_plain, atol=1e-4, rtol=1e-4)


def test_rigid_condition_workflows_set_shared_attention_and_warping():
    import json

    import numpy as np

    from comfyui_syncd.client.workflow_format import widget_values
    from comfyui_syncd.datagen.driver import DEFAULT_WORKFLOWS

    workflow = json.loads(DEFAULT_WORKFLOWS["rigid"].read_text())
    shared_spec = {"input": {"required": {"images_per_subject": ["INT", {"default": 3}],
                                          "mask_mode": [["foreground_masks", "none", "automatic"]]}},
                   "input_order": {"required": ["images_per_subject", "mask_mode"]}}
    warp_spec = {"input": {"required": {"images_per_object": ["INT", {"default": 3}]}},
                 "input_order": {"required": ["images_per_object"]}}
    solid_spec = {"input": {"required": {"shape": [["cube", "cone"]], "views": ["INT", {"default": 3}],
                                         "size": ["INT", {"default": 128}], "seed": ["INT", {"default": 0}]}},
                  "input_order": {"required": ["shape", "views", "size", "seed"]}}
    object_info = {"SynCDSharedAttention": shared_spec, "SynCDFeatureWarp": warp_spec,
                   "SynCDToyWorldMeshViews": solid_spec}
    got = {}
    for condition in sets.RIGID_CONDITIONS:
        out = sets.rigid_condition_workflow(workflow, condition, object_info)
        shared = next(n for n in out["nodes"] if n["type"] == "SynCDSharedAttention")
        warp = next(n for n in out["nodes"] if n["type"] == "SynCDFeatureWarp")
        values = widget_values(shared, shared_spec)
        got[condition] = (values["images_per_subject"], values["mask_mode"], warp.get("mode", 0))
    assert got == {"depth_only": (1, "foreground_masks", 4), "depth_msa_no_masks": (3, "none", 4),
                   "depth_msa_masks": (3, "foreground_masks", 4), "depth_msa_masks_warp": (3, "foreground_masks", 0)}
    with pytest.raises(ValueError, match="condition"):
        sets.rigid_condition_workflow(workflow, "msa_off", object_info)
    unwarped = {**workflow, "nodes": [n for n in workflow["nodes"] if n["type"] != "SynCDFeatureWarp"]}
    with pytest.raises(ValueError, match="expected one SynCDFeatureWarp node, found 0"):
        sets.rigid_condition_workflow(unwarped, "depth_only", object_info)
    # a toy solid per object: the rigid workflow's mesh node swapped for the toy one, then given the object's shape
    toy = json.loads(json.dumps(workflow))
    mesh = next(n for n in toy["nodes"] if n["type"] == "SynCDMeshViews")
    mesh.update(type="SynCDToyWorldMeshViews", widgets_values=["cube", 3, 64, 7])
    solid = sets.solid_workflow(toy, "cone", object_info)
    node = next(n for n in solid["nodes"] if n["id"] == mesh["id"])
    assert widget_values(node, solid_spec)["shape"] == "cone" and widget_values(node, solid_spec)["seed"] == 7
    # the placement a rendered silhouette shows, for "placement follows depth"
    for placement, (lo, hi) in S.PLACEMENT_X.items():
        mask = np.zeros((64, 64))
        centre = int((lo + hi) / 2 * 64)
        mask[30:40, centre - 4:centre + 4] = 1
        assert sets.placement_of_mask(mask) == placement
    assert sets.placement_of_mask(np.zeros((8, 8))) is None
    # how far the other views' object colour is from the anchor's (the last view, the warp's source)
    silhouette = np.zeros((8, 8), bool)
    silhouette[2:5, 2:5] = True
    red, dark_red = np.zeros((8, 8, 3)), np.zeros((8, 8, 3))
    red[silhouette] = (1.0, 0, 0)
    dark_red[silhouette] = (0.5, 0, 0)
    dark_red[~silhouette] = 1.0  # the background does not count
    assert sets.anchor_colour_distance([red, red, red], [silhouette] * 3) == 0
    assert sets.anchor_colour_distance([dark_red, red, red], [silhouette] * 3) == pytest.approx(255 * 0.5 / 3 / 2)
    assert sets.anchor_colour_distance([red, red, red], [silhouette, silhouette, ~np.ones_like(silhouette)]) is None

"""The toy world's scenes (issue 13 §1): deterministic by seed, masks exactly the object's pixels, captions naming
every attribute, every vocabulary value reachable, multi-view sets of one identity in different poses."""

import dataclasses

import numpy as np
import pytest
import torch

from comfyui_syncd.toyworld import scene as S
from comfyui_syncd.toyworld import views as V


def test_same_seed_same_scenes_and_pixels_other_seed_differs():
    a, b, c = S.sample_scenes(12, 7, p_empty=0.2), S.sample_scenes(12, 7, p_empty=0.2), S.sample_scenes(12, 8)
    assert a == b and a != c
    ra, rb = S.render(a), S.render(b)
    for field in ("image", "mask", "depth", "coords"):
        assert torch.equal(getattr(ra, field), getattr(rb, field)), field
    assert not torch.equal(ra.image, S.render(c).image)
    assert ra.image.shape == (12, 64, 64, 3) and ra.image.dtype == torch.float32 and ra.mask.dtype == torch.bool
    assert 0 <= float(ra.image.min()) and float(ra.image.max()) <= 1


def test_background_drawing_is_deterministic_and_seeded():
    for kind in S.BACKGROUNDS:
        assert np.array_equal(S.draw_background(kind, 3), S.draw_background(kind, 3))
        assert not np.array_equal(S.draw_background(kind, 3), S.draw_background(kind, 4))


@pytest.mark.parametrize("shape", S.SHAPES)
def test_mask_is_exactly_the_pixels_that_change_with_the_background(shape):
    # The same object over two unrelated backgrounds: the pixels that differ are exactly those outside the mask,
    # and removing the object changes exactly the pixels inside it.
    scenes = S.sample_scenes(6, 11, shape=shape)
    on_sky = S.render([dataclasses.replace(s, background="sky") for s in scenes])
    on_grass = S.render([dataclasses.replace(s, background="grass") for s in scenes])
    empty = S.render([dataclasses.replace(s, shape=None, colour=None, texture=None, placement=None,
                                          background="sky") for s in scenes])
    assert torch.equal(on_sky.mask, on_grass.mask)
    mask = on_sky.mask
    assert bool((mask.flatten(1).sum(1) > 60).all()), "every object covers a visible area"
    differs = (on_sky.image != on_grass.image).any(-1)
    assert torch.equal(differs, ~mask)
    assert torch.equal((on_sky.image != empty.image).any(-1), mask)
    assert not bool(empty.mask.any())
    # depth and surface points exist exactly on the mask
    assert torch.equal(on_sky.coords.abs().sum(-1) > 0, mask)
    assert float(on_sky.coords.norm(dim=-1).max()) <= S.BOUND


def test_captions_name_every_attribute():
    for scene in S.sample_scenes(60, 3, p_empty=0.1):
        text = S.caption(scene)
        assert S.BACKGROUND_PHRASES[scene.background] in text
        if scene.has_object:
            for word in (scene.shape, scene.colour, scene.texture, S.PLACEMENT_PHRASES[scene.placement]):
                assert word in text, (word, text)
        else:
            assert text.startswith("nothing") and not any(w in text for w in S.SHAPES)
    assert S.caption(S.Scene("cube", "red", "striped", "wooden floor", "left")) == \
        "a red striped cube on a wooden floor, on the left"
    assert S.caption(S.Scene("cone", "orange", "plain", "sky", "right")).startswith("a plain orange cone")


def test_every_vocabulary_value_is_reachable_and_drawn():
    scenes = S.sample_scenes(500, 0, p_empty=0.1)
    for name, vocab in S.VOCABULARIES.items():
        assert {getattr(s, name) for s in scenes} - {None} == set(vocab), name
    assert any(not s.has_object for s in scenes)
    assert len(S.SHAPES) >= 6 and len(S.COLOURS) >= 6 and len(S.BACKGROUNDS) >= 6 and len(S.TEXTURES) >= 3
    # each texture draws its second colour on part of the object (plain: nowhere); each colour its own hue
    base = S.Scene("cube", "blue", "plain", "snow", "middle", azimuth=30, elevation=35, scale=11)
    second = torch.tensor(S.SECONDARY_RGB)
    for texture in S.TEXTURES:
        r = S.render(dataclasses.replace(base, texture=texture))
        pix = r.image[0][r.mask[0]]
        whitish = (pix[:, 0] > pix[:, 2] * 0.6) & (pix.min(-1).values > 0.2)  # blue is (0.12, 0.30, 0.88)
        frac = float(whitish.float().mean())
        assert (frac == 0) if texture == "plain" else (0.1 < frac < 0.9), (texture, frac)
    assert second.min() > 0.9
    means = [S.render(dataclasses.replace(base, colour=c)).image[0][S.render(base).mask[0]].mean(0)
             for c in S.COLOURS]
    assert min(float((means[i] - means[j]).abs().max()) for i in range(6) for j in range(i)) > 0.1
    # backgrounds are told apart by their mean colour
    bgs = [torch.from_numpy(S.draw_background(k, 0)).mean((0, 1)) for k in S.BACKGROUNDS]
    assert min(float((bgs[i] - bgs[j]).abs().max()) for i in range(6) for j in range(i)) > 0.05


def test_placement_and_scale_keep_the_object_in_its_region():
    r = S.render(S.sample_scenes(60, 5))
    for scene, mask in zip(r.scenes, r.mask):
        cols = mask.nonzero()[:, 1].float()
        centre = float(cols.mean()) / 64
        lo, hi = S.PLACEMENT_X[scene.placement]
        assert lo - 0.08 < centre < hi + 0.08, (scene.placement, centre)
        assert bool(mask.any())


def test_unknown_vocabulary_values_are_refused_by_name():
    with pytest.raises(ValueError, match="shape 'teapot'"):
        S.render(S.Scene("teapot", "red", "plain", "sky", "left"))
    with pytest.raises(ValueError, match="background"):
        S.draw_background("moon", 0)
    with pytest.raises(ValueError, match="colour"):
        V.Identity("cube", "teal", "plain")


def test_multi_view_set_shares_identity_and_differs_in_pose():
    identity = V.Identity("torus", "green", "dotted")
    r = V.multi_view_set(identity, views=4, seed=2)
    assert r.image.shape == (4, 64, 64, 3)
    assert all((s.shape, s.colour, s.texture) == (identity.shape, identity.colour, identity.texture)
               for s in r.scenes)
    azimuths = [s.azimuth for s in r.scenes]
    assert min(V.azimuth_gap(a, b) for i, a in enumerate(azimuths) for b in azimuths[:i]) >= 45
    assert len({s.elevation for s in r.scenes}) == 4
    for i in range(4):
        for j in range(i):
            assert not torch.equal(r.image[i], r.image[j])
    assert all(identity.phrase in c for c in r.captions)
    assert r.scenes == V.view_scenes(identity, views=4, seed=2)  # deterministic by seed
    # one scene for every view: same background drawing and placement, pose still differs
    same = V.view_scenes(identity, views=3, seed=4, same_scene=True)
    assert len({(s.background, s.background_seed, s.placement) for s in same}) == 1
    assert len({s.azimuth for s in same}) == 3
    pinned = V.view_scenes(identity, views=3, seed=4, background="beach", placement="right")
    assert {s.background for s in pinned} == {"beach"} and {s.placement for s in pinned} == {"right"}


def test_correspondences_join_the_same_surface_points():
    r = V.multi_view_set(V.Identity("cube", "red", "striped"), views=3, seed=9, same_scene=True)
    rows = V.correspondences(r, 0, 1)
    assert len(rows) > 20
    assert float(rows.abs().max()) < 1
    pix = ((rows + 1) * 64 / 2 - 0.5).round().long()
    pa, pb = r.coords[0, pix[:, 0], pix[:, 1]], r.coords[1, pix[:, 2], pix[:, 3]]
    assert float((pa - pb).norm(dim=-1).max()) < 1.5 / r.scenes[1].scale
    assert bool(r.mask[0, pix[:, 0], pix[:, 1]].all() and r.mask[1, pix[:, 2], pix[:, 3]].all())


def test_identities_split_is_seeded_and_disjoint():
    train, held = V.split_identities(0.2, seed=0)
    assert len(train) + len(held) == len(V.all_identities()) == 6 * 6 * 3
    assert not set(train) & set(held) and len(held) == round(0.2 * 108)
    assert V.split_identities(0.2, seed=0) == (train, held) and V.split_identities(0.2, seed=1)[1] != held

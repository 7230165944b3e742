"""toyworld/customization.py: held-out evaluation cases and their scoring (the training runs themselves are covered
by tests/training/test_toyworld_reproduce.py)."""

from __future__ import annotations

import pytest
import torch

from comfyui_syncd.toyworld import customization as C, scene as S, views

pytestmark = pytest.mark.unit


def test_cases_are_held_out_objects_with_a_prompt_naming_only_shape_and_scene():
    cases = C.eval_cases(6)
    _, held_out = views.split_identities()
    assert [c.identity for c in cases] == held_out[:6]
    assert [c.prompt for c in C.eval_cases(6)] == [c.prompt for c in cases]
    for c in cases:
        assert c.references.image.shape == (3, 64, 64, 3) and c.references.mask.any()
        assert c.identity.shape in c.prompt and S.BACKGROUND_PHRASES[c.background] in c.prompt
        assert S.PLACEMENT_PHRASES[c.placement] in c.prompt
        assert not set(c.prompt.replace(",", "").split()) & set(S.COLOURS + S.TEXTURES)
    refs = C.references(cases[0], 1)
    assert refs.pixels.shape == (1, 3, 64, 64) and refs.pixels.min() >= -1 and refs.category == cases[0].identity.shape


def test_score_reads_identity_and_prompt_following():
    """Renders that do what each case asks score high on identity and prompt following; renders of another object
    in another scene score low."""
    cases = C.eval_cases(12)
    good = S.render([S.Scene(shape=c.identity.shape, colour=c.identity.colour, texture=c.identity.texture,
                             background=c.background, placement=c.placement, background_seed=i,
                             **S.sample_pose(__import__("numpy").random.default_rng(i), c.placement))
                     for i, c in enumerate(cases)]).image
    bad = good.flip(0)  # every image shows another case's object and scene
    g, b = C.score(good, cases), C.score(bad, cases)
    assert g["identity"] >= 0.6 and g["background"] >= 0.9 and g["placement"] >= 0.8
    assert b["identity"] <= 0.2 and b["identity"] < g["identity"]


def test_saturation_value():
    grey = torch.full((2, 8, 8, 3), 0.5)
    assert C.saturation_value(grey) == pytest.approx((0.0, 0.5))
    red = torch.zeros(1, 4, 4, 3)
    red[..., 0] = 1.0
    assert C.saturation_value(red) == pytest.approx((1.0, 1.0))

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

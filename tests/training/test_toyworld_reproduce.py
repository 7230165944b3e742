"""``toyworld reproduce --quick``: every stage runs and leaves its artefacts; a rerun redoes nothing; the exported
model loads in ComfyUI."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.comfy  # ComfyUI's tokenizer files; its classes load the exported model


def test_quick_reproduce_runs_every_stage_and_resumes(tmp_path, capsys, comfy_imports):
    from comfyui_syncd.toyworld import reproduce as R

    out = tmp_path / "run"
    assert R.main(["reproduce", "--out", str(out), "--quick", "--no-progress"]) == 0
    for stage in R.STAGES:
        assert (out / stage / "done.json").is_file(), stage
    table = (out / "tables" / "base_model.md").read_text()
    assert "| shape |" in table and "| background |" in table
    eval_figures = json.loads((out / "base_eval" / "done.json").read_text())
    assert eval_figures["rendered"]["colour"] >= 0.8  # the reader reads true renders of the same captions
    # sets: the shipped deformable workflow on the toy model, once per condition, through the datagen driver
    from comfyui_syncd.core import dataset_format
    from comfyui_syncd.toyworld import sets

    consistency = json.loads((out / "sets" / "done.json").read_text())
    assert set(sets.CONDITIONS) <= set(consistency)
    for condition in sets.CONDITIONS:
        records = dataset_format.read_dataset(out / "sets" / condition)
        assert len(records) == R.QUICK.sets and all(len(r.images) == sets.SET_SIZE for r in records)
        scored = dataset_format.read_dataset(out / "sets" / condition, scored=True)
        assert all(len(r.dino_scores) == sets.SET_SIZE for r in scored)
        has_masks = [m is not None for r in records for m in r.masks]
        assert all(has_masks) if condition != "msa_no_masks" else not any(has_masks)
        assert records[0].prompts[0] == sets.draw_objects(1, R.SETS_SEED)[0]["prompts"][0]
        assert 0 <= consistency[condition]["all"] <= 1
    assert "msa_masks" in (out / "tables" / "set_consistency.md").read_text()
    # rigid sets: the shipped rigid workflow on the depth-conditioned model (the text-to-image script's concat
    # conditioning), toy solids' depth, silhouettes and correspondences, warping on and off
    import numpy as np
    from PIL import Image

    from comfyui_syncd.toyworld import base_model

    assert json.loads((out / "depth_model" / "done.json").read_text())["steps"] == R.QUICK.depth_steps
    _, configs, _ = base_model.read_file(out / "depth_model" / "toy_sd15_depth.safetensors")
    assert configs["unet"]["in_channels"] == 8
    rigid = json.loads((out / "rigid_sets" / "done.json").read_text())
    assert set(sets.RIGID_CONDITIONS) <= set(rigid)
    first = {}
    for condition in sets.RIGID_CONDITIONS:
        records = dataset_format.read_dataset(out / "rigid_sets" / condition)
        assert len(records) == R.QUICK.sets and all(len(r.masks) == sets.SET_SIZE for r in records)
        assert 0 <= rigid[condition]["placement_follows_depth"] <= 1 and rigid[condition]["colour_distance_to_anchor"] >= 0
        first[condition] = ([np.asarray(Image.open(p), dtype=np.float32) for p in records[0].images],
                            [np.asarray(Image.open(p)) for p in records[0].masks])
    silhouettes = first["depth_only"][1]
    assert all(np.array_equal(a, b) for c in first for a, b in zip(first[c][1], silhouettes))  # the same solids
    assert 0 < (silhouettes[0] > 127).mean() < 0.5
    view0 = {c: first[c][0][0] for c in first}
    assert np.abs(view0["depth_msa_masks_warp"] - view0["depth_msa_masks"]).max() > 0  # the warp wrote view 0
    assert np.abs(view0["depth_msa_masks"] - view0["depth_only"]).max() > 0            # shared attention acts
    assert "depth_msa_masks_warp" in (out / "tables" / "rigid_set_consistency.md").read_text()
    # how much the base model's images depend on self-attention: as trained (the reference), shared, zeroed
    probe = json.loads((out / "attention_probe" / "done.json").read_text())
    assert set(sets.PROBES) <= set(probe) and probe["plain"]["mean_abs_change_levels"] == 0
    assert probe["no_self_attention"]["mean_abs_change_levels"] > 0 and probe["shared"]["mean_abs_change_levels"] > 0
    # JeDi inpainting on the base model: the shipped workflow, coupled and uncoupled, per held-out object
    from comfyui_syncd.toyworld import inpainting

    inpainted = json.loads((out / "jedi_inpainting" / "done.json").read_text())
    assert set(inpainting.CONDITIONS) <= set(inpainted)
    assert all(0 <= inpainted[c]["identity"] <= 1 for c in inpainting.CONDITIONS)
    assert "coupled" in (out / "tables" / "jedi_inpainting.md").read_text()
    assert (out / "jedi_inpainting" / "grid.png").is_file()
    # customization: three models trained by the pack's scripts on the sets, evaluated per method and reference count
    from comfyui_syncd.toyworld import customization

    for name in customization.MODELS:
        assert list((out / "customize" / name / "checkpoints").glob("step_*")), name
    trained = json.loads((out / "customize" / "done.json").read_text())
    assert trained["syncd_msa"]["steps"] == R.QUICK.custom_steps
    results = json.loads((out / "customize_eval" / "done.json").read_text())
    assert {f"{m} | {c}" for m in customization.METHODS for c in (1, 3)} <= set(results)
    table = (out / "tables" / "customization.md").read_text()
    assert all(m in table for m in customization.METHODS)
    assert (out / "customize_eval" / "grid_3ref.png").is_file()
    # ... its SynCD model as the one file ComfyUI loads, run through the shipped customization workflows
    states, encoder, info = customization.read_bundle(out / "customize" / "syncd_msa" / "toy_syncd.safetensors")
    assert all(states.values()) and info == {"model": "syncd_msa", "size": R.QUICK.size, "steps": R.QUICK.custom_steps}
    assert trained["syncd_msa"]["file"].endswith("toy_syncd.safetensors") and "file" not in trained["jedi_msa"]
    comfy = json.loads((out / "customize_comfy" / "done.json").read_text())
    names = [f"syncd_customization_{family}_{c}ref" for family in ("sdxl", "flux") for c in (1, 3)]
    assert set(comfy) - {"seconds"} == set(names) and all(0 <= comfy[n]["identity"] <= 1 and comfy[n]["value"] > 0 for n in names)
    table = (out / "tables" / "customize_comfy.md").read_text()
    assert "the shipped SDXL workflow on ComfyUI" in table and "the shipped Flux workflow on ComfyUI" in table
    assert (out / "customize_comfy" / "grid.png").is_file()
    # DCI/ICO: an ICO concept per object and reference count, sampled through the shipped λ-sweep workflow
    from comfyui_syncd.toyworld import concepts

    dci = json.loads((out / "dci" / "done.json").read_text())
    assert {f"{name} | {c}" for name in concepts.SETTINGS for c in (1, 3)} <= set(dci)
    for count in (1, 3):
        name = concepts.concept_name(0, count)
        assert dci["ico"][name]["steps"] == R.QUICK.ico_steps
        assert (out / "dci" / "embeddings" / f"{name}.safetensors").is_file()
        assert (out / "dci" / "loras" / f"{name}.safetensors").is_file()
    assert all(name in (out / "tables" / "dci.md").read_text() for name in concepts.SETTINGS)
    assert (out / "dci" / "grid_1ref.png").is_file()
    stamps = {s: (out / s / "done.json").stat().st_mtime_ns for s in R.STAGES}
    capsys.readouterr()
    assert R.main(["reproduce", "--out", str(out), "--quick", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("done earlier") == len(R.STAGES)
    assert stamps == {s: (out / s / "done.json").stat().st_mtime_ns for s in R.STAGES}
    assert R.main(["reproduce", "--out", str(out), "--no-progress"]) == 2  # another scale in the same folder

    from comfyui_syncd.demo import toy_model

    model, clip, vae = toy_model.load(out / "export" / "toy_sd15.safetensors")
    assert clip.encode_from_tokens(clip.tokenize("a red cube on grass")).shape == (1, 77, 64)
    assert vae.decode(vae.encode(__import__("torch").rand(1, 64, 64, 3))).shape == (1, 64, 64, 3)


def test_the_loop_runs_at_128_px_through_the_base_model_evaluation(tmp_path, comfy_imports):
    """``--large`` renders, trains and samples at 128 px (here at the quick scale's sizes, up to base_eval)."""
    import dataclasses

    from PIL import Image

    from comfyui_syncd.toyworld import base_model as B, reproduce as R

    assert R.LARGE.size == 128
    out = tmp_path / "run"
    R.reproduce(out, progress=False, until="base_eval", scale=dataclasses.replace(R.QUICK, size=128))
    assert Image.open(out / "corpus" / "000000.png").size == (128, 128)
    _, configs, _ = B.read_file(out / "export" / "toy_sd15.safetensors")
    assert configs["unet"]["sample_size"] == 16 and configs["vae"]["sample_size"] == 128
    assert Image.open(out / "base_eval" / "samples.png").size == (8 * 128, 128)  # 6 samples on one row of 8
    with pytest.raises(ValueError, match="another scale"):
        R.reproduce(out, quick=True, progress=False, until="corpus")


def test_a_run_can_start_from_an_exported_model(tmp_path, comfy_imports):
    """``--from-model``: the base-model stages come from a toy model file (its figures, its weights), the later
    stages run on it; a file trained at other base settings is refused; the shipped model fits ``--large``."""
    import json
    import pathlib

    from comfyui_syncd.toyworld import reproduce as R

    R.reproduce(tmp_path / "a", quick=True, progress=False, until="export")
    model = tmp_path / "a" / "export" / "toy_sd15.safetensors"
    out = tmp_path / "b"
    figures = R.reproduce(out, quick=True, progress=False, until="base_eval", from_model=model)
    trained = json.loads((tmp_path / "a" / "text_to_image" / "done.json").read_text())
    assert figures["text_to_image"]["steps"] == trained["steps"] == R.QUICK.t2i_steps
    assert figures["vae"]["from_model"] == str(model.resolve())
    assert not list((out / "corpus").glob("*.png"))  # nothing rendered or trained again
    assert (out / "export" / "toy_sd15.safetensors").read_bytes() == model.read_bytes()
    assert "generated" in figures["base_eval"] and (out / "base_eval" / "samples.png").is_file()
    with pytest.raises(ValueError, match="other settings"):
        R.reproduce(tmp_path / "c", progress=False, until="export", from_model=model)  # FULL: not its scale
    shipped = R.reproduce(tmp_path / "d", progress=False, until="export", scale=R.LARGE,
                          from_model=pathlib.Path(R.__file__).parent / "weights" / "toy_sd15.safetensors")
    assert shipped["text_to_image"]["steps"] == R.LARGE.t2i_steps

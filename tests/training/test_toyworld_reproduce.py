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

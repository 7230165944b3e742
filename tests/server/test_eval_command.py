"""``python -m comfyui_syncd eval`` against the shared headless ComfyUI: slots found in the shipped customization
workflows, and the command end to end with ``--tiny`` on the SDXL 1-reference workflow (1 subject × 2 prompts × 1
seed, 1 and 3 references) with tiny random metric models (demo/eval_models.py), then resumed."""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys

import pytest
from PIL import Image, ImageSequence

from comfyui_syncd.client.workflow_format import widget_values
from comfyui_syncd.evaluation.workflow import EvalWorkflowError, fill, find_slots

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
SDXL_1REF = WORKFLOWS / "syncd_customization_sdxl_1ref.json"


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def test_slots_of_the_shipped_customization_workflows(comfy_client):
    info = comfy_client.object_info()
    sdxl = find_slots(load("syncd_customization_sdxl_1ref"), info)
    assert sdxl.nodes["images"] == [25] and sdxl.nodes["prompt"] == [13] and sdxl.references == [6]
    assert sdxl.nodes["reference_prompt"] == [15] and 20 in sdxl.nodes["seed"] and sdxl.keep_last is None
    flux = find_slots(load("syncd_customization_flux_3ref"), info)  # prompt behind FluxGuidance; refs = the prompt
    assert flux.nodes["prompt"] == [20] and flux.nodes["reference_prompt"] == [] and flux.references == [6, 7, 8]
    assert 26 in flux.nodes["seed"]  # the all-in-one SynCD Customization Sampler
    consistent = find_slots(load("syncd_consistent_set_sdxl_3ref"), info)
    assert consistent.nodes["prompt"] == [22] and consistent.nodes["subject_word"] == [28]  # the primitive
    jedi = find_slots(load("jedi_inpainting_sd15"), info)
    assert jedi.references == [2, 3] and jedi.keep_last == 1  # the first outputs are the reconstructed references

    with pytest.raises(EvalWorkflowError, match=r"found #16, #20, #24, #27.*--slot images=NODE_ID"):
        find_slots(load("dci_lambda_sweep_sd15"), info)
    with pytest.raises(EvalWorkflowError, match="no active LoadImage.*syncd_eval = 'references'"):
        find_slots(load("jedi_coupled_attention_sd15"), info)
    marked = load("jedi_coupled_attention_sd15")
    next(n for n in marked["nodes"] if n["id"] == 8)["properties"]["syncd_eval"] = "images"
    with pytest.raises(EvalWorkflowError, match="references"):
        find_slots(marked, info, {"prompt": [2]})


def test_fill_sets_prompt_class_seed_and_references(comfy_client):
    info = comfy_client.object_info()
    workflow = load("syncd_consistent_set_sdxl_3ref")
    slots = find_slots(workflow, info)
    filled = fill(workflow, slots, info, "a dog in the snow", "dog", 42, ["a.png", "b.png", "c.png"])
    nodes = {n["id"]: n for n in filled["nodes"]}

    def value(node_id, name):
        return widget_values(nodes[node_id], info[nodes[node_id]["type"]])[name]

    assert value(22, "value") == "a dog in the snow" and value(24, "text") == "photo of a dog"
    assert value(28, "subject_word") == "dog" and value(30, "noise_seed") == 42
    assert [value(i, "image") for i in (6, 7, 8)] == ["a.png", "b.png", "c.png"]
    assert value(21, "text") == "An action figure riding a motorcycle"  # linked to #22: the primitive is what counts


def eval_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "comfyui_syncd", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dreambooth_dir(tmp_path_factory):
    """A DreamBooth-layout folder: one subject with 4 photos, 2 object prompts (one per kind)."""
    root = tmp_path_factory.mktemp("dreambooth")
    (root / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\nmug,mug\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the snow'.format(unique_token, class_token),\n"
        "'a red {0} {1}'.format(unique_token, class_token)\n]\n")
    (root / "mug").mkdir()
    for i in range(4):
        image = Image.new("RGB", (96, 80), (30 * i, 40, 90))
        image.paste((200, 120 + 10 * i, 40), (25, 20, 70, 65))
        image.save(root / "mug" / f"{i:02d}.jpg")
    return root


def test_eval_command_generates_scores_and_resumes(comfy_server, comfy_client, dreambooth_dir, tmp_path):
    from comfyui_syncd.demo.eval_models import write_tiny_models

    models = write_tiny_models(tmp_path / "models", kinds=("dinov2", "clip", "detector", "segmenter", "vqa"))
    out = tmp_path / "out"
    command = ["--workflow", SDXL_1REF, "--dataset", dreambooth_dir, "--server", comfy_server.url, "--tiny",
               "--seeds", "1", "--seed", "5", "--references", "1", "3", "--out", out, "--box-threshold", "0"]
    for kind, folder in models.items():
        command += [f"--{kind}", folder]
    queued_before = len(comfy_client.get_json("/history"))
    first = eval_cli(*command)
    assert first.returncode == 0, first.stderr
    assert "4 images, 0 already in" in first.stdout
    assert len(comfy_client.get_json("/history")) == queued_before + 4

    method = out / "syncd_customization_sdxl_1ref"
    saved = sorted(p.relative_to(method).as_posix() for p in method.rglob("*.png"))
    assert saved == [f"{n}ref/mug/p0{i}_s5_0.png" for n in (1, 3) for i in (0, 1)]
    for n in (1, 3):
        for i, prompt in enumerate(("a mug in the snow", "a red mug")):
            with Image.open(method / f"{n}ref/mug/p0{i}_s5_0.png") as image:
                graph = json.loads(image.info["prompt"])  # the API graph SaveImage embeds
            assert graph["13"]["inputs"]["text"] == prompt and graph["15"]["inputs"]["text"] == "photo of a mug"
            assert graph["20"]["inputs"]["noise_seed"] == 5 and graph["13"]["class_type"] == "SynCDTinyDemoTextEncode"
            assert graph["6"]["class_type"] == "LoadImage"  # the references stayed real images under --tiny
            reference = graph["6"]["inputs"]["image"]
            folder, name = reference.split("/")
            with Image.open(io.BytesIO(comfy_client.view(name, folder, "input"))) as uploaded:
                assert sum(1 for _ in ImageSequence.Iterator(uploaded)) == n  # N references as N frames

    results = json.loads((out / "results.json").read_text())
    assert set(results["skipped"]) == {"DINO", "MDINO"} and "no --dino" in results["skipped"]["DINO"]
    for n in ("1", "3"):
        row = results["summary"]["syncd_customization_sdxl_1ref"][n]
        assert row["images"] == 2
        for metric in ("MDINOv2-I", "MDINOv2-I (background)", "MDINOv2-I (property)", "CLIP-I", "MCLIP-I", "CLIP-T",
                       "TIFA", "GeometricScore"):
            assert isinstance(row[metric], float), metric
        assert row["DINO"] is None
    assert len(results["images"]) == 4 and {r["kind"] for r in results["images"]} == {"background", "property"}
    table = (out / "results.md").read_text()
    assert "| 3-input | syncd_customization_sdxl_1ref |" in table and "- DINO: skipped (no --dino)" in table
    assert (out / "grids" / "syncd_customization_sdxl_1ref_3ref_mug.png").is_file()

    again = eval_cli(*command)
    assert again.returncode == 0, again.stderr
    assert "4 images, 4 already in" in again.stdout and "0 to generate" in again.stdout
    assert len(comfy_client.get_json("/history")) == queued_before + 4  # nothing queued
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]

"""``python -m comfyui_syncd run`` as a subprocess, against the shared server and once with its own.

The shipped SD1.5 JeDi workflow loads a real checkpoint; ``--tiny`` swaps it for the tiny demo model
(node ids stay: #1 model, #4 shared attention, #5 empty latent, #6 KSampler, #8 SaveImage)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

from comfyui_syncd.cli import parse_override

REPO = pathlib.Path(__file__).resolve().parents[2]
SD15 = REPO / "workflows" / "jedi_coupled_attention_sd15.json"


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "comfyui_syncd", "run", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def test_runs_a_ui_workflow_with_overrides(comfy_server, tmp_path):
    out = tmp_path / "out"
    done = run_cli(SD15, "--tiny", "--server", comfy_server.url, "--out", out, "--set", "6.steps=2",
                   "--set", "8.filename_prefix=cli_test", "--set", "5.batch_size=2", "--set", "4.images_per_subject=2",
                   "--set", "2.text=a corgi")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "KSampler (#6): 1/2" in lines and "KSampler (#6): 2/2" in lines  # --set steps=2 reached the server
    saved = [pathlib.Path(line) for line in lines if line.endswith(".png")]
    assert [p.name for p in saved] == [f"cli_test_0000{i}_.png" for i in (1, 2)]
    for path in saved:
        assert path.parent == out
        with Image.open(path) as image:
            assert image.size == (64, 64)
            prompt = json.loads(image.info["prompt"])  # SaveImage embeds the API graph
        assert prompt["6"]["inputs"]["steps"] == 2 and prompt["2"]["inputs"]["text"] == "a corgi"
        assert prompt["4"]["inputs"]["images_per_subject"] == 2
        assert prompt["1"]["class_type"] == "SynCDTinyDemoModel"


def test_runs_an_api_workflow(comfy_server, comfy_client, tmp_path):
    from comfyui_syncd.client.workflow_format import to_api

    from comfyui_syncd.client.tiny_swap import tiny_swap

    info = comfy_client.object_info()
    api = to_api(tiny_swap(json.loads(SD15.read_text()), info)[0], info)
    api["8"]["inputs"]["filename_prefix"] = "cli_api"
    path = tmp_path / "api.json"
    path.write_text(json.dumps(api))
    done = run_cli(path, "--server", comfy_server.url, "--out", tmp_path / "o", "--set", '6.sampler_name="ddim"',
                   "--set", "6.steps=1")
    assert done.returncode == 0, done.stderr
    assert "KSampler (#6): 1/1" in done.stdout.splitlines()
    assert len(list((tmp_path / "o").glob("cli_api_*.png"))) == 3


def test_tiny_prints_the_swaps(comfy_server, tmp_path):
    done = run_cli(SD15, "--tiny", "--server", comfy_server.url, "--out", tmp_path, "--set", "6.steps=1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "--tiny: 5 change(s) for the tiny demo models:"
    assert "  #1 SynCDTinyDemoModel: was CheckpointLoaderSimple (sd15)" in lines
    assert "  #2 SynCDTinyDemoTextEncode: was CLIPTextEncode (sd15, same text)" in lines
    assert "  #5 EmptyLatentImage: 512x512 -> 64x64" in lines
    assert "  #6 KSampler: steps 30 -> 4" in lines
    assert "KSampler (#6): 1/1" in lines  # --set applies to the swapped graph
    assert len(list(tmp_path.glob("jedi_coupled_*.png"))) == 3


def test_without_tiny_the_missing_checkpoint_is_refused(comfy_server, tmp_path):
    done = run_cli(SD15, "--server", comfy_server.url, "--out", tmp_path)
    assert done.returncode == 1
    assert "node #1 (CheckpointLoaderSimple): Value not in list: ckpt_name" in done.stderr
    assert not list(tmp_path.iterdir())


def test_tiny_refuses_an_api_workflow(tmp_path):
    """Refused before any server is contacted (the URL goes nowhere)."""
    path = tmp_path / "api.json"
    path.write_text(json.dumps({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}}}))
    done = run_cli(path, "--tiny", "--server", "http://127.0.0.1:9", "--out", tmp_path / "o", timeout=60)
    assert done.returncode == 1
    assert "--tiny works on editor-format workflows" in done.stderr and "is in API format" in done.stderr


def test_validation_error_exits_nonzero_with_node_errors(comfy_server, tmp_path):
    done = run_cli(SD15, "--tiny", "--server", comfy_server.url, "--out", tmp_path, "--set", "6.steps=0")
    assert done.returncode == 1
    assert "Prompt outputs failed validation" in done.stderr
    assert "node #6 (KSampler): Value 0 smaller than min of 1: steps" in done.stderr
    assert not list(tmp_path.iterdir())


def test_execution_error_exits_nonzero_with_node_and_message(comfy_server, tmp_path):
    done = run_cli(SD15, "--tiny", "--server", comfy_server.url, "--out", tmp_path, "--set", "1.width=48")
    assert done.returncode == 1
    assert "node #1 (SynCDTinyDemoModel) failed: ValueError: width must be a multiple of 32" in done.stderr
    assert "server traceback (most recent call last):" in done.stderr
    assert "tiny_models.py" in done.stderr


@pytest.mark.parametrize("override,message", [
    ("42.steps=3", "no node 42 in the workflow"),
    ("6.stepz=3", "node 6 (KSampler) has no input 'stepz'"),
    ("6steps=3", "expected NODE_ID.INPUT=VALUE"),
])
def test_bad_override_is_refused(comfy_server, tmp_path, override, message):
    done = run_cli(SD15, "--tiny", "--server", comfy_server.url, "--out", tmp_path, "--set", override)
    assert done.returncode == 1
    assert message in done.stderr


def test_unknown_node_type_exits_nonzero(comfy_server, tmp_path):
    workflow = json.loads(SD15.read_text())
    workflow["nodes"][0]["type"] = "NotInstalledNode"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(workflow))
    done = run_cli(path, "--server", comfy_server.url, "--out", tmp_path / "o")
    assert done.returncode == 1
    assert "node type NotInstalledNode (node #1) is not installed on the server" in done.stderr


def test_parse_override_values():
    assert parse_override("3.seed=42") == ("3", "seed", 42)
    assert parse_override("3.cfg=2.5") == ("3", "cfg", 2.5)
    assert parse_override("3.flag=true") == ("3", "flag", True)
    assert parse_override("3.text=a dog") == ("3", "text", "a dog")
    assert parse_override('3.text="42"') == ("3", "text", "42")
    assert parse_override("3.text=x=y") == ("3", "text", "x=y")
    assert parse_override("12:4.text=") == ("12:4", "text", "")


def test_embedded_server_run(tmp_path, comfy_path):
    """No --server: the command starts its own ComfyUI, runs the workflow and stops it."""
    done = run_cli(SD15, "--tiny", "--comfyui", comfy_path, "--set", "6.steps=1",
                   "--set", "8.filename_prefix=cli_embedded", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting ComfyUI from" in done.stderr
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == [
        f"cli_embedded_0000{i}_.png" for i in (1, 2, 3)]

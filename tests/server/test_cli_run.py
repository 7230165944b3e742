"""``python -m comfyui_syncd run`` as a subprocess, against the shared server and once with its own.

The shipped SD1.5 JeDi workflow loads a real checkpoint; ``--tiny`` swaps it for the tiny demo model
(node ids stay: #1 model, #4 shared attention, #5 empty latent, #6 KSampler, #8 SaveImage)."""

from __future__ import annotations

import http.server
import json
import os
import pathlib
import subprocess
import sys
import threading
import uuid

import pytest
from PIL import Image

from comfyui_syncd.cli import apply_overrides, parse_override
from comfyui_syncd.client.embedded import free_port

REPO = pathlib.Path(__file__).resolve().parents[2]
SD15 = REPO / "workflows" / "jedi_coupled_attention_sd15.json"


def run_cli(*args, cwd=None, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "comfyui_syncd", "run", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=env)


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
            assert image.size == (128, 128)  # the shipped toy-world model's size
            prompt = json.loads(image.info["prompt"])  # SaveImage embeds the API graph
        assert prompt["6"]["inputs"]["steps"] == 2 and prompt["2"]["inputs"]["text"] == "a corgi"
        assert prompt["4"]["inputs"]["images_per_subject"] == 2
        assert prompt["1"]["class_type"] == "SynCDToyWorldModel"  # --tiny: the shipped toy-world model


def test_tiny_runs_text_to_image_workflows_on_the_toy_model(comfy_server, tmp_path):
    """The toy-world model replaces the checkpoint (MODEL, CLIP, VAE), the real text encoders stay, sizes go to 128
    px (the shipped model's) and the sampler to the toy model's steps and cfg; --random-tiny keeps the random tiny models."""
    from comfyui_syncd.client import toy_swap

    assert (REPO / "toyworld" / "weights" / "toy_sd15.safetensors").is_file(), "the toy-world model is shipped"
    done = run_cli(SD15, "--tiny", "--server", comfy_server.url, "--out", tmp_path, "--set", "6.steps=1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("--tiny: ") and lines[0].endswith(" change(s) for the toy-world model:")
    assert f"  #1 SynCDToyWorldModel: was CheckpointLoaderSimple (toy-world model {toy_swap.SHIPPED_CHOICE})" in lines
    assert "  #5 EmptyLatentImage: 512x512 -> 128x128" in lines
    assert f"  #6 KSampler: steps 30 -> {toy_swap.STEPS}, cfg 7.5 -> {toy_swap.CFG}" in lines
    saved = sorted(tmp_path.glob("jedi_coupled_*.png"))
    assert len(saved) == 3
    with Image.open(saved[0]) as image:
        prompt = json.loads(image.info["prompt"])
    assert prompt["2"]["class_type"] == "CLIPTextEncode" and prompt["2"]["inputs"]["clip"] == ["1", 1]


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
    done = run_cli(SD15, "--tiny", "--random-tiny", "--server", comfy_server.url, "--out", tmp_path, "--set", "6.steps=1")
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
    done = run_cli(path, "--tiny", "--random-tiny", "--server", "http://127.0.0.1:9", "--out", tmp_path / "o", timeout=60)
    assert done.returncode == 1
    assert "--tiny works on editor-format workflows" in done.stderr and "is in API format" in done.stderr


@pytest.mark.parametrize("override,message", [
    ("6.sampler_name=foo", "node 6 (KSampler) input 'sampler_name' does not take \"foo\"; allowed: one of \"euler\", "),
    ("6.steps=0", "node 6 (KSampler) input 'steps' does not take 0; allowed: an integer (INT, >= 1 and <= 10000)"),
    ("6.steps=100000", "node 6 (KSampler) input 'steps' does not take 100000; "
                       "allowed: an integer (INT, >= 1 and <= 10000)"),
    ("6.model=5", "node 6 (KSampler) input 'model' does not take 5; allowed: a link from a MODEL output"),
    ("4.mask_mode=foo", "node 4 (SynCDSharedAttention) input 'mask_mode' does not take \"foo\"; "
                        "allowed: one of \"foreground_masks\", \"none\", \"automatic\""),
])
def test_set_value_checked_before_queueing(comfy_server, comfy_client, tmp_path, override, message):
    """Checked against /object_info: V1 combo, range, link input, V3 combo; one error line, nothing queued."""
    history = set(comfy_client.get_json("/history"))
    done = run_cli(SD15, "--tiny", "--random-tiny", "--server", comfy_server.url, "--out", tmp_path, "--set", override)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: --set '{override}': {message}")
    assert set(comfy_client.get_json("/history")) == history
    assert not list(tmp_path.iterdir())


def test_apply_overrides_checks_against_object_info():
    """Without a server: a hand-written /object_info with V1 and V3 input specs."""
    info = {"N": {"input": {
        "required": {"v1": [["a", "b"], {}], "v3": ["COMBO", {"options": ["x", "y"], "multiselect": False}],
                     "n": ["INT", {"min": 1, "max": 8}], "f": ["FLOAT", {"min": 0.0}], "b": ["BOOLEAN", {}],
                     "s": ["STRING", {}], "m": ["MODEL"],
                     "mc": ["COMBO", {"options": ["p", "q"], "multiselect": True, "multi_select": True}]},
        "optional": {"any": ["*", {}]}}}}
    good = ["1.v1=b", "1.v3=y", "1.n=8", "1.f=2", "1.f=0.5", "1.b=false", '1.s="7"', "1.s=text", "1.any=[1, 2]",
            '1.mc=["q", "p"]']
    prompt = {"1": {"class_type": "N", "inputs": {"m": ["2", 0]}}}
    apply_overrides(prompt, good, info)
    assert prompt["1"]["inputs"] == {"m": ["2", 0], "v1": "b", "v3": "y", "n": 8, "f": 0.5, "b": False, "s": "text",
                                     "any": {"__value__": [1, 2]}, "mc": {"__value__": ["q", "p"]}}
    n_range = "an integer (INT, >= 1 and <= 8)"
    bad = {"1.v1=c": 'one of "a", "b"', "1.v3=z": 'one of "x", "y"', "1.n=0": n_range, "1.n=9": n_range,
           "1.n=2.5": n_range, "1.n=true": n_range, "1.f=-1": "a number (FLOAT, >= 0.0)",
           '1.f="x"': "a number (FLOAT, >= 0.0)", "1.b=1": "true or false (BOOLEAN)", "1.s=42": "a string (STRING)",
           "1.m=5": "a link from a MODEL output", '1.m="x"': "a link from a MODEL output",
           '1.mc=["p", "r"]': 'one of "p", "q"'}
    for text, allowed in bad.items():
        _, name, value = parse_override(text)
        with pytest.raises(ValueError) as error:
            apply_overrides(prompt, [text], info)
        assert str(error.value).startswith(f"--set {text!r}: node 1 (N) input {name!r} does not take "
                                           f"{json.dumps(value)}; allowed: {allowed}")


def test_second_run_into_the_same_out_keeps_the_first_files(comfy_server, tmp_path):
    """The second run's server names clash with the first's (as on a fresh embedded server): they get the next
    free number, and the first run's files stay as they were."""
    prefix = f"cli_clash_{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    args = [SD15, "--tiny", "--random-tiny", "--server", comfy_server.url, "--out", out, "--set", "6.steps=1", "--set",
            "5.batch_size=2", "--set", "4.images_per_subject=2", "--set", f"8.filename_prefix={prefix}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert sorted(before) == [f"{prefix}_0000{i}_.png" for i in (1, 2)]
    for path in (comfy_server.base_dir / "output").glob(f"{prefix}_*"):
        path.unlink()  # so that the server numbers from 00001 again
    second = run_cli(*args, "--set", "6.seed=1")
    assert second.returncode == 0, second.stderr
    printed = [pathlib.Path(line) for line in second.stdout.splitlines() if line.endswith(".png")]
    assert [path.name for path in printed] == [f"{prefix}_0000{i}_.png" for i in (3, 4)]
    assert all(path.parent == out.resolve() for path in printed)
    for name, data in before.items():
        assert (out / name).read_bytes() == data
    assert {p.read_bytes() for p in printed}.isdisjoint(before.values())


def test_unreachable_server_is_one_error_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    done = run_cli(SD15, "--tiny", "--random-tiny", "--server", url, "--out", tmp_path, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"error: cannot reach {url}/object_info: [Errno 111] Connection refused"]


@pytest.mark.parametrize("object_info,answer", [
    (None, "answered HTTP 404 File not found"),
    ("<html>hello</html>", "did not answer JSON"),
    ('{"hello": 1}', "lists no ComfyUI nodes"),
])
def test_a_server_that_is_not_comfyui_is_one_error_line(tmp_path, object_info, answer):
    """A plain static HTTP server (404 for /object_info, or a file of that name) is not taken for ComfyUI."""
    site = tmp_path / "site"
    site.mkdir()
    if object_info is not None:
        (site / "object_info").write_text(object_info)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(site))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        done = run_cli(SD15, "--tiny", "--random-tiny", "--server", url, "--out", tmp_path / "o", timeout=60)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"error: {url}/object_info {answer}: {url} does not look like a ComfyUI server"]


def test_execution_error_exits_nonzero_with_node_and_message(comfy_server, tmp_path):
    done = run_cli(SD15, "--tiny", "--random-tiny", "--server", comfy_server.url, "--out", tmp_path, "--set", "1.width=48")
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
    done = run_cli(SD15, "--tiny", "--random-tiny", "--server", comfy_server.url, "--out", tmp_path, "--set", override)
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
    """No --server: the command starts its own ComfyUI (base dir under $TMPDIR), runs the workflow, stops it and
    removes the base dir."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = run_cli(SD15, "--tiny", "--comfyui", comfy_path, "--set", "6.steps=1",
                   "--set", "8.filename_prefix=cli_embedded", cwd=tmp_path, env={**os.environ, "TMPDIR": str(temp)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting ComfyUI from" in done.stderr
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == [
        f"cli_embedded_0000{i}_.png" for i in (1, 2, 3)]
    assert not list(temp.glob("comfyui-syncd-*"))

"""``datagen`` scale-out: real headless ComfyUI servers (and a local Ray cluster), one killed mid-run; the final
dataset holds every object exactly once. Objects run the shipped deformable workflow on the tiny demo models."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from comfyui_syncd.client.embedded import EmbeddedServer
from comfyui_syncd.core.dataset_format import read_dataset
from comfyui_syncd.datagen.driver import DEFAULT_WORKFLOWS, ObjectSpec, Writer, load_workflows, run_on_servers

pytestmark = pytest.mark.server

OBJECTS = [ObjectSpec(f"dog-{k}", "dog", tuple(f"a dog in scene {k}. a brown dog. wide angle shot" for _ in range(3)))
           for k in range(5)]


def _assert_exactly_once(root, writer):
    records = read_dataset(root)
    assert sorted(r.object_id for r in records) == sorted(o.object_id for o in OBJECTS)
    assert all(len(r.images) == 3 for r in records)
    metadata = sorted(p.name for p in root.glob("*metadata.json"))
    assert metadata == sorted(f"{o.object_id}_metadata.json" for o in OBJECTS)
    images = collections.Counter(p.name.rsplit("_", 1)[0] for p in root.glob("*.jpg"))
    assert images == {o.object_id: 3 for o in OBJECTS}
    assert writer.failed == {}


def test_two_servers_one_killed_mid_run(comfy_server, comfy_path, tmp_path):
    workflows = load_workflows(DEFAULT_WORKFLOWS)
    second = EmbeddedServer(comfy_path)
    second.start()
    try:
        writer = Writer(tmp_path / "ds")
        killed = threading.Event()

        def kill_second_after_first(w):
            if not killed.is_set():
                killed.set()
                os.killpg(second.process.pid, signal.SIGKILL)  # dies with whatever object it holds

        run_on_servers([comfy_server.url, second.url], OBJECTS, workflows, writer, seed=0, tiny="random", retries=2,
                       timeout=600, progress=kill_second_after_first)
        assert killed.is_set() and second.process.wait(timeout=30) is not None
        _assert_exactly_once(tmp_path / "ds", writer)
        assert len(writer.written) == len(OBJECTS)

        # a rerun finds everything written and generates nothing
        again = Writer(tmp_path / "ds")
        run_on_servers([comfy_server.url], OBJECTS, workflows, again, seed=0, tiny="random", retries=0, timeout=600)
        assert again.written == [] and again.failed == {}
    finally:
        second.stop()


def test_datagen_command_resumes_and_reports(comfy_server, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"object_id": o.object_id, "category": o.category,
                                           "prompts": list(o.prompts)}) + "\n" for o in OBJECTS[:2]))
    out = tmp_path / "ds"
    command = [sys.executable, "-m", "comfyui_syncd", "datagen", "--prompts", str(prompts), "--out", str(out),
               "--server", comfy_server.url, "--random-tiny", "--limit", "1"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "done: 1 written, 0 rejected by the filters, 0 failed, of 1" in first.stdout
    command[command.index("--limit"):command.index("--limit") + 2] = []
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "2 objects, 1 already in" in second.stdout and "done: 1 written" in second.stdout
    records = read_dataset(out)
    assert sorted(r.object_id for r in records) == ["dog-0", "dog-1"]
    assert all(m is not None for r in records for m in r.masks)  # the automatic subject masks (SynCDAutomaticMasks)
    meta = json.loads((out / "dog-1_metadata.json").read_text())[0]
    assert meta["category"] == "dog" and len(meta["prompts"]) == 3


def test_ray_two_actors_one_killed_mid_run(comfy_path, tmp_path):
    ray = pytest.importorskip("ray")
    from comfyui_syncd.datagen.ray_backend import run_on_ray

    workflows = load_workflows(DEFAULT_WORKFLOWS)
    writer = Writer(tmp_path / "ds")
    actors, killed = [], threading.Event()

    def kill_one_after_first(w):
        if not killed.is_set():
            killed.set()
            ray.kill(actors[1], no_restart=False)  # Ray restarts it and retries its tasks

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_on_ray("local", OBJECTS, workflows, writer, seed=0, tiny="random", retries=3, timeout=600, workers=2,
                   comfyui=str(comfy_path), progress=kill_one_after_first, on_started=actors.extend)
    finally:
        ray.shutdown()
    assert killed.is_set()
    _assert_exactly_once(tmp_path / "ds", writer)


def test_rigid_object_gets_its_rendered_masks(comfy_server, tmp_path):
    from comfyui_syncd.datagen.driver import REPO_MESHES

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"object_id": "mug-0", "category": "object", "kind": "rigid",
                                   "mesh": str(REPO_MESHES / "mug.glb"),
                                   "prompts": ["a kitchen table a natural image with the object on the ground."]}) + "\n")
    done = subprocess.run([sys.executable, "-m", "comfyui_syncd", "datagen", "--prompts", str(prompts), "--out",
                           str(tmp_path / "ds"), "--server", comfy_server.url, "--random-tiny"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (record,) = read_dataset(tmp_path / "ds")
    assert len(record.images) == 3 and all(m is not None for m in record.masks)
    entry = json.loads((tmp_path / "ds" / "mug-0_metadata.json").read_text())[0]
    assert entry["mesh"] == "mug.glb" and entry["prompts"] == ["a kitchen table"] * 3


def test_rigid_objects_run_on_the_depth_toy_model_with_a_pose_per_object(comfy_server, tmp_path):
    """``--tiny``: rigid objects on the shipped depth-conditioned toy model, a toy solid posed by each object's seed
    standing in for the mesh; its silhouettes are saved as the masks."""
    import numpy as np
    from PIL import Image

    from comfyui_syncd.datagen.driver import REPO_MESHES

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"object_id": f"mug-{i}", "category": "cube", "kind": "rigid",
                                           "mesh": str(REPO_MESHES / "mug.glb"),
                                           "prompts": ["a cube on grass", "a cube in the snow", "a cube on a sandy beach"]})
                               + "\n" for i in range(2)))
    done = subprocess.run([sys.executable, "-m", "comfyui_syncd", "datagen", "--prompts", str(prompts), "--out",
                           str(tmp_path / "ds"), "--server", comfy_server.url, "--tiny"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_dataset(tmp_path / "ds")
    assert len(records) == 2 and all(len(r.images) == 3 and all(m is not None for m in r.masks) for r in records)
    silhouettes = [[np.asarray(Image.open(m).convert("L")) > 127 for m in r.masks] for r in records]
    assert all(0 < s.mean() < 0.5 and s.shape == (128, 128) for views in silhouettes for s in views)
    assert not np.array_equal(silhouettes[0][0], silhouettes[1][0]), "each object is posed by its own seed"


def test_each_image_is_generated_and_stored_with_its_own_prompt(comfy_server, tmp_path):
    """The shipped deformable workflow on the tiny models through the driver: an object's 3 different prompts reach
    the sampler one per image (the images differ from a run with prompt_per_image off, the same seed) and the
    dataset stores each image's own caption (upstream's: the background, the description taken off)."""
    import numpy as np
    from PIL import Image

    backgrounds = ("a dog on a beach", "a dog in a snowy forest", "in a kitchen a dog")
    spec = ObjectSpec("dog-9", "dog", tuple(f"{b}. a brown dog. wide angle shot" for b in backgrounds),
                      extra=(("description", "a brown dog"),))
    workflows = load_workflows(DEFAULT_WORKFLOWS)
    one_prompt = json.loads(json.dumps(workflows["deformable"]))
    (batch,) = [n for n in one_prompt["nodes"] if n["type"] == "SynCDPromptBatch"]
    assert batch["widgets_values"][1] is True
    batch["widgets_values"][1] = False  # prompt_per_image off: the first prompt for the whole set
    for name, graphs in (("per_image", workflows), ("one_prompt", {"deformable": one_prompt})):
        writer = Writer(tmp_path / name)
        run_on_servers([comfy_server.url], [spec], graphs, writer, seed=0, tiny="random", retries=0, timeout=600)
        assert writer.written == ["dog-9"], writer.failed
    stored = {name: json.loads((tmp_path / name / "dog-9_metadata.json").read_text())[0]["prompts"]
              for name in ("per_image", "one_prompt")}
    assert stored == {"per_image": list(backgrounds), "one_prompt": [backgrounds[0]] * 3}
    (per_image,), (one,) = read_dataset(tmp_path / "per_image"), read_dataset(tmp_path / "one_prompt")
    pixels = [[np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in r.images] for r in (per_image, one)]
    assert all(np.abs(a - b).max() > 0 for a, b in zip(*pixels)), "other prompts for images 1 and 2 change the set"

"""``attention``, ``core``, ``training`` and ``toyworld`` import without ComfyUI: a fresh interpreter with no ComfyUI to find
imports every module of them and must not have loaded ``comfy``, ``comfy_api``, ``folder_paths`` or the pack's
ComfyUI nodes (the training scripts run where no ComfyUI is installed)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

FORBIDDEN = ("comfy", "comfy_api", "folder_paths", "comfyui_syncd.nodes")

PROBE = """
import importlib, json, pkgutil, sys
names = []
for package in ("comfyui_syncd.attention", "comfyui_syncd.core", "comfyui_syncd.training", "comfyui_syncd.toyworld"):
    names.append(package)
    names += [m.name for m in pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "loaded": sorted(sys.modules)}))
"""


def test_attention_core_and_training_import_without_comfyui(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env["HOME"] = str(tmp_path)  # no ~/comfy/ComfyUI either
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"comfyui_syncd.core.tokens", "comfyui_syncd.core.ip_adapter_model", "comfyui_syncd.core.weights",
            "comfyui_syncd.core.checkpoint_keys", "comfyui_syncd.core.dataset_format", "comfyui_syncd.attention.shared", "comfyui_syncd.training.ico",
            "comfyui_syncd.training.config", "comfyui_syncd.training.models", "comfyui_syncd.training.checkpoints",
            "comfyui_syncd.training.data"} <= set(result["imported"])
    loaded = [m for m in result["loaded"] if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert loaded == [], f"importing attention/core/training loaded {loaded}"

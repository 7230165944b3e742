"""Helpers of the training tests that run a script as ``python -m comfyui_syncd.training.<script>`` in a subprocess
(killed while checkpointing, then resumed) and compare the files it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import safetensors.torch
import torch

from comfyui_syncd.training import checkpoints

# The subprocesses import the very comfyui_syncd this test imported (not whichever copy is installed), then run
# the script as ``python -m <module>`` would (runpy, as __main__).
PINNED_PACKAGE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("comfyui_syncd", {init!r}, submodule_search_locations=[{root!r}])
package = importlib.util.module_from_spec(spec)
sys.modules["comfyui_syncd"] = package
spec.loader.exec_module(package)
"""

RUN_AS_MAIN = """
import runpy
sys.argv[0] = {module!r}
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""

KILLED_AT_CHECKPOINT_4 = """
import os, signal
import accelerate

save_state = accelerate.Accelerator.save_state

def killed_while_saving_4(self, output_dir=None, *args, **kwargs):
    result = save_state(self, output_dir, *args, **kwargs)
    if "step_000004" in str(output_dir):  # state written, checkpoint not yet complete
        os.kill(os.getpid(), signal.SIGKILL)
    return result

accelerate.Accelerator.save_state = killed_while_saving_4
"""


def script(module: str, *before: str) -> str:
    """``python -c`` source: pin the package, run the ``before`` snippets, run ``module`` as __main__."""
    import comfyui_syncd

    init = comfyui_syncd.__file__
    return (PINNED_PACKAGE.format(init=init, root=os.path.dirname(init)) + "".join(before)
            + RUN_AS_MAIN.format(module=module))


def single_thread_env() -> dict:
    """The environment with torch single-threaded, as the in-process runs the subprocesses are compared with."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tensors(path) -> dict:
    return safetensors.torch.load_file(str(path))


def killed_at_checkpoint_4(module: str, args: list, out) -> None:
    """Run the script (``args``: its command line, 2 steps a checkpoint) killed with SIGKILL while writing
    checkpoint 4: it leaves the complete checkpoint 2 and the half-written ``step_000004.tmp``."""
    killed = subprocess.run([sys.executable, "-c", script(module, KILLED_AT_CHECKPOINT_4), *args],
                            env=single_thread_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004.tmp"]
    assert json.loads((ckpts / "step_000002" / "state.json").read_text())["step"] == 2
    assert checkpoints.latest(out) == ckpts / "step_000002"


def resumed_from_checkpoint_2(module: str, args: list, out) -> str:
    """Rerun the same command after :func:`killed_at_checkpoint_4`: it resumes from step 2 and finishes; its
    stdout."""
    resumed = subprocess.run([sys.executable, "-c", script(module), *args], env=single_thread_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_000002'} at step 2" in resumed.stdout
    return resumed.stdout


def assert_same_tensors(out, ref, files) -> None:
    """The safetensors ``files`` (relative paths) of run folders ``out`` and ``ref`` hold equal tensors, bit for bit."""
    for sub in files:
        mine, theirs = tensors(out / sub), tensors(ref / sub)
        assert mine.keys() == theirs.keys(), sub
        for k in mine:
            assert torch.equal(mine[k], theirs[k]), (sub, k)

"""Two training processes (``accelerate launch --multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=1``:
torch.distributed over gloo, DDP on the CPU) run
training/syncd.py on the tiny SD1.5 model, write one checkpoint and the exports, and log the loss curve that one
process with the same global batch (batch 1 x gradient accumulation 2) logs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest
import safetensors.torch
import torch
import yaml
from test_syncd_training import _train, syncd_raw

from comfyui_syncd.training import checkpoints, loop

pytestmark = pytest.mark.comfy

STEPS = 3
# Per-step losses: the first step's forward passes are the same computations (one image set per forward in both
# runs, the same samples and random draws); later steps differ only by float rounding of the gradient average
# (DDP's all-reduce mean vs accumulated halves), which Adam carries into the weights at ~1e-7 relative.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not on PATH")
def test_two_processes_log_the_one_process_curve(tiny_sd15, tiny_image_encoder, tiny_dataset, tmp_path):
    common = {"max_steps": STEPS, "checkpoint_every": STEPS, "batch_size": 1, "learning_rate": 1.0e-3}
    two = syncd_raw(tiny_sd15, tiny_image_encoder, tiny_dataset, tmp_path / "two", gradient_accumulation_steps=1,
                    **common)
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(two))
    # ``accelerate launch --cpu`` alone starts one process on a single machine (its multi-CPU launch is mpirun with a
    # hostfile); ``--multi_gpu`` starts them with torch.distributed.run and ACCELERATE_USE_CPU=1 makes the
    # Accelerator take the MULTI_CPU path: gloo process group, DDP on the CPU.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    cmd = [shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "comfyui_syncd.training.syncd", "--config", str(cfg_path), "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    assert done.stdout.count("SynCD: sd15, 2 process(es)") == 1  # printed by the main process only

    one = _train(syncd_raw(tiny_sd15, tiny_image_encoder, tiny_dataset, tmp_path / "one",
                           gradient_accumulation_steps=2, **common))
    assert one.accelerator.num_processes == 1

    out = tmp_path / "two"
    assert [p.name for p in checkpoints.complete(out)] == [f"step_{STEPS:06d}"]
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert (out / "checkpoints" / f"step_{STEPS:06d}" / "random_states_1.pkl").is_file()  # both ranks' RNG states
    mine, ref = loop.read_losses(out), loop.read_losses(one.out)
    assert sorted(mine) == sorted(ref) == list(range(1, STEPS + 1))
    print("two processes:", mine, "\none process:  ", ref)
    for step in ref:
        assert mine[step] == pytest.approx(ref[step], rel=LOSS_RTOL), step
    assert len(set(ref.values())) == STEPS  # a curve, not a constant

    for sub in ("checkpoints/step_%06d/trainable.safetensors" % STEPS, "syncd/syncd.safetensors",
                "loras/syncd.safetensors", "ip_adapter/syncd.safetensors"):
        a = safetensors.torch.load_file(str(out / sub))
        b = safetensors.torch.load_file(str(one.out / sub))
        assert a.keys() == b.keys(), sub
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=WEIGHT_ATOL, msg=f"{sub}: {k}")
    # trained (peft initialises B at zero): the comparison is not between two untouched initialisations
    lora = safetensors.torch.load_file(str(out / "loras" / "syncd.safetensors"))
    assert any(v.abs().max() > 0 for k, v in lora.items() if k.endswith(".lora_up.weight"))

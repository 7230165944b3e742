"""``run`` stopped from outside (SIGTERM, SIGINT, --timeout) leaves nothing behind: no embedded ComfyUI process
and no temp folder, and no prompt of its own running or pending on a ``--server``.

The runs use the tiny SD1.5 JeDi workflow with 10000 steps, so they are still sampling when stopped."""

from __future__ import annotations

import json
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SD15 = REPO / "workflows" / "jedi_coupled_attention_sd15.json"
LONG = ["--tiny", "--random-tiny", "--set", "6.steps=10000"]  # signal handling: the quick random models


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "comfyui_syncd", "run", *map(str, args)]


def wait_for_line(stream, prefix: str, timeout: float) -> None:
    """Read ``stream`` (in a thread) until a line starts with ``prefix``."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        if line.startswith(prefix):
            return


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_the_embedded_server_and_removes_its_folder(tmp_path, comfy_path, sig, code):
    temp = tmp_path / "tmp"  # the embedded server's base dir goes here ($TMPDIR)
    temp.mkdir()
    process = subprocess.Popen(cli(SD15, *LONG, "--comfyui", comfy_path, "--out", tmp_path / "out"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(temp)})
    try:
        wait_for_line(process.stdout, "KSampler (#6): 1/10000", timeout=240)
        (base,) = temp.glob("comfyui-syncd-*")
        assert processes_mentioning(str(base))  # ComfyUI's main.py runs with --base-directory <base>
        process.send_signal(sig)
        stderr = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, stderr
    assert stderr.splitlines() == [f"starting ComfyUI from {comfy_path} ...",
                                   "interrupted: stopped the embedded ComfyUI"]
    assert not processes_mentioning(str(base))
    assert not base.exists()


def test_sigkill_of_run_leaves_no_server_running(tmp_path, comfy_path):
    """SIGKILL cannot be handled: the server learns of it from the kernel (PR_SET_PDEATHSIG) and exits."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    process = subprocess.Popen(cli(SD15, *LONG, "--comfyui", comfy_path, "--out", tmp_path / "out"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(temp)})
    try:
        wait_for_line(process.stdout, "KSampler (#6): 1/10000", timeout=240)
        (base,) = temp.glob("comfyui-syncd-*")
        assert processes_mentioning(str(base))
        process.kill()
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    deadline = time.monotonic() + 30
    while processes_mentioning(str(base)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_mentioning(str(base))


def test_sigint_interrupts_the_running_prompt_on_the_server(comfy_server, comfy_client, tmp_path):
    process = subprocess.Popen(cli(SD15, *LONG, "--server", comfy_server.url, "--out", tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(process.stdout, "KSampler (#6): 1/10000", timeout=120)
        process.send_signal(signal.SIGINT)
        stderr = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert re.fullmatch(rf"interrupted: prompt \w+ on {comfy_server.url}: interrupted it\n", stderr)
    assert comfy_client.get_json("/queue") == {"queue_running": [], "queue_pending": []}


def test_timeout_interrupts_the_running_prompt_on_the_server(comfy_server, comfy_client, tmp_path):
    done = subprocess.run(cli(SD15, *LONG, "--server", comfy_server.url, "--out", tmp_path, "--timeout", 1),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 124, done.stderr
    (line,) = done.stderr.splitlines()
    match = re.fullmatch(rf"error: prompt (\w+) did not finish within 1 s; prompt \1 on {comfy_server.url}: "
                         r"interrupted it", line)
    assert match, line
    assert comfy_client.get_json("/queue") == {"queue_running": [], "queue_pending": []}
    messages = [kind for kind, _ in comfy_client.history(match.group(1))["status"]["messages"]]
    assert "execution_interrupted" in messages


def test_timeout_removes_the_pending_prompt_from_the_queue(comfy_server, comfy_client, tmp_path):
    """Another client's long prompt runs first; ours, still pending at the timeout, is deleted from the queue."""
    from comfyui_syncd.client.tiny_swap import tiny_swap
    from comfyui_syncd.client.workflow_format import to_api

    info = comfy_client.object_info()
    blocker = to_api(tiny_swap(json.loads(SD15.read_text()), info)[0], info)
    blocker["6"]["inputs"]["steps"] = 10000
    blocker_id = comfy_client.queue_prompt(blocker)
    try:
        done = subprocess.run(cli(SD15, *LONG, "--server", comfy_server.url, "--out", tmp_path, "--timeout", 1),
                              capture_output=True, text=True, timeout=120)
        queue_now = comfy_client.get_json("/queue")
    finally:
        assert comfy_client.cancel(blocker_id) == "interrupted it"
    assert done.returncode == 124, done.stderr
    assert re.fullmatch(r"error: prompt (\w+) did not finish within 1 s; prompt \1 on \S+: removed it from the queue",
                        done.stderr.strip())
    assert queue_now["queue_pending"] == [] and [item[1] for item in queue_now["queue_running"]] == [blocker_id]
    assert comfy_client.get_json("/queue") == {"queue_running": [], "queue_pending": []}

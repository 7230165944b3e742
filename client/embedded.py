"""Run a private headless ComfyUI server with this pack installed, for the command line and the tests.

The server gets a temporary ``--base-directory`` (models, input, output, user, database) whose
``custom_nodes/comfyui_syncd`` is a symlink to this checkout, so nothing in the ComfyUI tree is
touched. Command line: ComfyUI's ``main.py`` flags (``comfy/cli_args.py``).
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

PACK_ROOT = pathlib.Path(__file__).resolve().parent.parent
PACK_FOLDER = "comfyui_syncd"
PROBE_NODE = "SynCDTinyDemoModel"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class EmbeddedServerError(RuntimeError):
    """The server did not start, or started without this pack; the message carries its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def import_errors(log: str) -> str:
    """The traceback ComfyUI logged for this pack (``nodes.py`` logs it before 'Cannot import ...')."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if PACK_FOLDER in line and ("Cannot import" in line or "comfy_entrypoint" in line or "Skip " in line):
            start = i
            while start > 0 and "Traceback (most recent call last)" not in lines[start]:
                start -= 1
            return "\n".join(lines[start if "Traceback" in lines[start] else i:i + 1])
    return "\n".join(lines[-40:])


def _no_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


def _default_sigint() -> None:
    """A parent started in the background ignores SIGINT, and the child would inherit that; stop() needs it.
    On Linux the server also gets SIGTERM when the thread that started it dies, even by SIGKILL (prctl
    PR_SET_PDEATHSIG), so a killed ``run``, driver or Ray actor leaves no orphan ComfyUI behind."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        except (OSError, AttributeError):
            pass


def extra_model_paths(path, name: str, base_path, folders: dict[str, str]) -> pathlib.Path:
    """Write ComfyUI's ``extra_model_paths.yaml`` for ``EmbeddedServer(extra_args=["--extra-model-paths-config",
    path])``: one section ``name`` with ``base_path`` and model folder kind -> directory (relative to ``base_path``,
    or absolute)."""
    import json

    def value(p) -> str:
        return json.dumps(str(p)) if pathlib.Path(p).is_absolute() else str(p)

    path = pathlib.Path(path)
    lines = [f"{name}:", f"  base_path: {value(pathlib.Path(base_path).resolve())}"]
    lines += [f"  {kind}: {value(d)}" for kind, d in folders.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class EmbeddedServer:
    """``with EmbeddedServer() as server: ComfyClient(server.url)``; stops the server and deletes its files on exit."""

    def __init__(self, comfyui: str | os.PathLike | None = None, extra_args: list[str] | tuple = (),
                 startup_timeout: float = 180.0, keep_base_dir: bool = False, cpu: bool | None = None):
        if comfyui is None:
            from ..comfy_path import find_comfyui

            comfyui = find_comfyui()
        self.comfyui = pathlib.Path(comfyui)
        self.extra_args = list(extra_args)
        self.cpu = _no_gpu() if cpu is None else cpu  # ComfyUI's --cpu unless a CUDA GPU is there
        self.startup_timeout = startup_timeout
        self.keep_base_dir = keep_base_dir
        self.base_dir: pathlib.Path | None = None
        self.log_path: pathlib.Path | None = None
        self.url: str | None = None
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "EmbeddedServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def start(self) -> None:
        """Start ``main.py`` in its own session (so a terminal's Ctrl-C reaches only us; :meth:`stop` signals the
        whole group) under a new temporary base dir ($TMPDIR); on any failure, stop it and remove the dir."""
        self.base_dir = pathlib.Path(tempfile.mkdtemp(prefix="comfyui-syncd-"))
        try:
            (self.base_dir / "custom_nodes").mkdir()
            (self.base_dir / "user").mkdir()
            (self.base_dir / "custom_nodes" / PACK_FOLDER).symlink_to(PACK_ROOT, target_is_directory=True)
            self.log_path = self.base_dir / "comfyui.log"
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            command = [sys.executable, "main.py", *(["--cpu"] if self.cpu else []),
                       "--listen", "127.0.0.1", "--port", str(port),
                       "--disable-auto-launch", "--base-directory", str(self.base_dir),
                       "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
                       "--disable-api-nodes", *self.extra_args]
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(command, cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=os.name == "posix",
                                                preexec_fn=_default_sigint if os.name == "posix" else None)
            self._wait_ready()
            self._check_pack_loaded()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = "\n".join(self.log().splitlines()[-40:])
                raise EmbeddedServerError(f"ComfyUI exited with code {self.process.returncode} while starting "
                                          f"(log {self.log_path}):\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        tail = "\n".join(self.log().splitlines()[-40:])
        raise EmbeddedServerError(f"ComfyUI did not answer /system_stats within {self.startup_timeout} s "
                                  f"(log {self.log_path}):\n{tail}")

    def _check_pack_loaded(self) -> None:
        with urllib.request.urlopen(f"{self.url}/object_info/{PROBE_NODE}", timeout=30) as response:
            if PROBE_NODE in response.read().decode():
                return
        raise EmbeddedServerError(f"ComfyUI started but the SynCD pack did not load ({PROBE_NODE} is not in "
                                  f"/object_info); log {self.log_path}:\n{import_errors(self.log())}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGINT to the server's process group (ComfyUI exits cleanly on KeyboardInterrupt), SIGKILL to the group
        after ``grace`` s or if anything of it is left; then remove the base dir."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                _signal_group(process, signal.SIGINT)
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            _signal_group(process, signal.SIGKILL)  # the rest of the group (and the server, if still there)
            process.wait()
        if self.base_dir is not None and not self.keep_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    """Signal the process group that ``process`` leads (``start_new_session``), or just it elsewhere."""
    try:
        if os.name == "posix":
            os.killpg(process.pid, sig)
        elif process.poll() is None:
            process.kill()
    except (ProcessLookupError, PermissionError):
        pass

"""Locate the ComfyUI checkout that the command line, the embedded server and the tests run against."""

from __future__ import annotations

import os
import pathlib

DEFAULT_COMFYUI = pathlib.Path("~/comfy/ComfyUI")


class ComfyUINotFoundError(RuntimeError):
    """No ComfyUI checkout was found; the message says how to provide one."""


def _is_comfyui(path: pathlib.Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def find_comfyui() -> pathlib.Path:
    """The ComfyUI directory: ``$COMFYUI_PATH``, else the ComfyUI this pack is installed in
    (``ComfyUI/custom_nodes/<pack>``), else ``~/comfy/ComfyUI``."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = pathlib.Path(env).expanduser().resolve()
        if not _is_comfyui(path):
            raise ComfyUINotFoundError(
                f"COMFYUI_PATH={env} is not a ComfyUI checkout (expected main.py and comfy/ in it). "
                "Point COMFYUI_PATH at the directory that contains ComfyUI's main.py.")
        return path
    pack = pathlib.Path(__file__).resolve().parent
    candidates = [pack.parent.parent] if pack.parent.name == "custom_nodes" else []
    # A symlinked pack (custom_nodes/comfyui_syncd -> checkout) resolves elsewhere; check the unresolved path too.
    unresolved = pathlib.Path(os.path.abspath(__file__)).parent
    if unresolved.parent.name == "custom_nodes":
        candidates.append(unresolved.parent.parent)
    candidates.append(DEFAULT_COMFYUI.expanduser())
    for path in candidates:
        if _is_comfyui(path):
            return path.resolve()
    raise ComfyUINotFoundError(
        "ComfyUI not found. Set COMFYUI_PATH to a ComfyUI checkout (the directory with main.py), "
        "install this pack into ComfyUI/custom_nodes/, or install ComfyUI at ~/comfy/ComfyUI "
        "(`comfy --workspace ~/comfy/ComfyUI install`, or `git clone https://github.com/comfyanonymous/ComfyUI "
        "~/comfy/ComfyUI && pip install -r ~/comfy/ComfyUI/requirements.txt`).")

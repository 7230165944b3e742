"""The pack's folders under ComfyUI's ``models/`` (``folder_paths``): registered once, by whoever comes first."""

from __future__ import annotations

import os

import folder_paths


def register(name: str, extensions) -> None:
    """``models/<name>`` listing files with ``extensions``, unless a folder of that name is registered already
    (e.g. ``ipadapter`` by ComfyUI_IPAdapter_plus, or ``extra_model_paths.yaml``)."""
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], set(extensions))

"""Shared fixtures. Nothing here imports ComfyUI, so ``pytest tests/unit`` runs without it.

Tests get the marker of their folder (unit, comfy, server, browser), e.g. ``pytest -m unit``.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
FOLDER_MARKERS = ("unit", "comfy", "server", "browser")


def pytest_collection_modifyitems(config, items):
    tests_dir = pathlib.Path(__file__).resolve().parent
    for item in items:
        path = pathlib.Path(str(item.fspath)).resolve()
        if path.is_relative_to(tests_dir) and len(path.relative_to(tests_dir).parts) > 1:
            folder = path.relative_to(tests_dir).parts[0]
            if folder in FOLDER_MARKERS:
                item.add_marker(folder)


@pytest.fixture(scope="session")
def comfy_path() -> pathlib.Path:
    """The ComfyUI checkout (``find_comfyui``); without one the whole run stops with the reason."""
    from comfyui_syncd.comfy_path import ComfyUINotFoundError, find_comfyui

    try:
        return find_comfyui()
    except ComfyUINotFoundError as exc:
        pytest.exit(f"these tests need ComfyUI: {exc}", returncode=4)


@pytest.fixture(scope="session")
def comfy_server(comfy_path):
    """One headless ComfyUI with this pack for the whole session; its log is kept in
    ``$SYNCD_TEST_ARTIFACTS`` (default ``artifacts/``) as ``comfyui-server.log``."""
    from comfyui_syncd.client.embedded import EmbeddedServer

    server = EmbeddedServer(comfy_path, keep_base_dir=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if server.base_dir is not None:
            if server.log_path is not None and server.log_path.exists():
                artifacts = pathlib.Path(os.environ.get("SYNCD_TEST_ARTIFACTS", REPO / "artifacts"))
                artifacts.mkdir(parents=True, exist_ok=True)
                shutil.copy(server.log_path, artifacts / "comfyui-server.log")
            shutil.rmtree(server.base_dir, ignore_errors=True)


@pytest.fixture
def comfy_client(comfy_server):
    """A :class:`ComfyClient` (own client id) bound to the session server."""
    from comfyui_syncd.client.api import ComfyClient

    return ComfyClient(comfy_server.url)

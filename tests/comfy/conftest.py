"""In-process ComfyUI: import its modules on the CPU and build tiny real-architecture models."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def comfy_imports(comfy_path):
    """ComfyUI on sys.path with --cpu set before anything imports comfy.model_management."""
    from comfyui_syncd.comfy_inprocess import import_comfy

    return import_comfy(cpu=True)


@pytest.fixture(scope="session")
def tiny():
    from comfyui_syncd.nodes import tiny_models

    return tiny_models

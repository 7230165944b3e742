"""In-process ComfyUI: import its modules on the CPU and build tiny real-architecture models."""

import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def comfy_imports(comfy_path):
    """Put ComfyUI on sys.path with --cpu set before anything imports comfy.model_management."""
    if str(comfy_path) not in sys.path:
        sys.path.insert(0, str(comfy_path))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (now safe on a machine without a GPU)

    return comfy_path


@pytest.fixture(scope="session")
def tiny():
    from comfyui_syncd.nodes import tiny_models

    return tiny_models

"""Importing ComfyUI in this process (benchmarks, tests): path and CLI flags set before comfy loads."""

from __future__ import annotations

import sys

from .comfy_path import find_comfyui


def import_comfy(cpu: bool = True, pytorch_attention: bool = False):
    """Put ComfyUI on ``sys.path`` and set its flags before ``comfy.model_management`` is imported
    (it picks the device and attention backend at import; without a GPU it needs ``--cpu``)."""
    path = find_comfyui()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = cpu
    if pytorch_attention:
        args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401

    return path

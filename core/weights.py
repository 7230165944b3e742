"""Reading weight files: safetensors directly, pickles only with ``torch.load(weights_only=True)``.

The official SynCD checkpoints are pickles (nupurkmr9/syncd ``method/main.py`` saves a Lightning ``.ckpt`` whose
``state_dict`` ``CUDACallback.on_save_checkpoint`` cut down to the trained keys; ``method/sample_flux.py`` loads a
flat ``pytorch_model.bin``); IP-Adapter files are ``.bin`` or ``.safetensors``. ``weights_only`` refuses arbitrary
objects.
"""

from __future__ import annotations

import pathlib

import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


def read_pickle(path) -> dict:
    """``torch.load(weights_only=True)`` on the CPU, with an error that says what to do when it refuses."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure gets the same advice
        raise ValueError(f"cannot read {path} with torch.load(weights_only=True): {exc}. Only tensor checkpoints "
                         f"are read (never arbitrary pickles); re-save it as a plain state dict or .safetensors") \
            from None


def tensor_dict(obj, path="checkpoint") -> tuple[dict[str, torch.Tensor], int]:
    """The flat tensor state dict of a loaded checkpoint: a Lightning ``{"state_dict": ...}`` is unwrapped.
    Returns (tensors, number of non-tensor entries dropped)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors, len(obj) - len(tensors)


def read_weights(path) -> dict:
    """A weights file as a dict: safetensors directly, pickles via :func:`read_pickle` (not unwrapped)."""
    path = pathlib.Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        import safetensors.torch

        return safetensors.torch.load_file(str(path), device="cpu")
    return read_pickle(path)

"""Reading weight files: safetensors directly, pickles only with ``torch.load(weights_only=True)``.

The official SynCD checkpoints are pickles (nupurkmr9/syncd ``method/main.py`` saves a Lightning ``.ckpt`` whose
``state_dict`` ``CUDACallback.on_save_checkpoint`` cut down to the trained keys; ``method/sample_flux.py`` loads a
flat ``pytorch_model.bin``); IP-Adapter files are ``.bin`` or ``.safetensors``. ``weights_only`` refuses arbitrary
objects.
"""

from __future__ import annotations

import pathlib
import pickle

import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


# How torch.save files begin: a zip archive (since torch 1.6), or the legacy format's pickle protocol opcode.
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def read_pickle(path) -> dict:
    """``torch.load(weights_only=True)`` on the CPU, with an error that says what to do when it refuses."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(TORCH_MAGIC):
        raise ValueError(f"{path} is not a PyTorch checkpoint (it is neither a torch.save zip archive nor a pickle); "
                         f"give the .ckpt/.bin/.pt file itself, or a .safetensors file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused an object
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} holds more than tensors, which torch.load(weights_only=True) refuses ({first}); "
                         f"only tensor checkpoints are read (never arbitrary pickles): re-save it as a plain state "
                         f"dict or .safetensors") from None
    except Exception as exc:  # noqa: BLE001 - truncated or damaged files fail in many ways inside torch
        raise ValueError(f"{path} is a damaged or truncated PyTorch checkpoint ({type(exc).__name__}: {exc})") \
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

        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except safetensors.SafetensorError as exc:
            raise ValueError(f"{path} is not a valid .safetensors file ({exc}); it may be damaged or incomplete") \
                from None
    return read_pickle(path)

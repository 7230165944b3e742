"""``python -m comfyui_syncd convert-checkpoint IN OUT.safetensors``: pickle checkpoints to safetensors.

The official SynCD checkpoints are pickles: ``sdxl_finetuned_20k.ckpt`` (a Lightning checkpoint whose
``state_dict`` holds only the trained ``lora``/``to_k_ip``/``to_v_ip`` tensors, nupurkmr9/syncd
``method/main.py`` ``on_save_checkpoint``) and the Flux ``pytorch_model.bin`` (a flat state dict,
``method/sample_flux.py``). They are read with ``torch.load(weights_only=True)`` only (``core.weights``), which
refuses arbitrary objects; the key names are kept, so the loaders accept the result exactly as they accept the
input. No ComfyUI import here.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from .core.weights import SAFETENSORS_SUFFIXES, read_weights, tensor_dict


def convert(src, dst) -> dict:
    """Write the tensors of ``src`` to ``dst`` (.safetensors) under their own names; returns counts."""
    dst = pathlib.Path(dst)
    if dst.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"{dst}: the output must be a .safetensors file")
    if not dst.resolve().parent.is_dir():
        raise ValueError(f"{dst}: the output folder {dst.resolve().parent} does not exist; create it first")
    if not pathlib.Path(src).is_file():
        raise ValueError(f"{src}: no such file")
    tensors, dropped = tensor_dict(read_weights(src), str(src))
    if not tensors:
        raise ValueError(f"{src}: no tensors found")
    seen: set[int] = set()
    out = {}
    for key in sorted(tensors):  # safetensors refuses shared storage: copy tensors that share it
        t = tensors[key].detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    import safetensors.torch

    safetensors.torch.save_file(out, str(dst))
    dtypes: dict[str, int] = {}
    for t in out.values():
        dtypes[str(t.dtype).removeprefix("torch.")] = dtypes.get(str(t.dtype).removeprefix("torch."), 0) + 1
    return {"tensors": len(out), "parameters": sum(t.numel() for t in out.values()), "dropped": dropped,
            "dtypes": dtypes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfyui_syncd convert-checkpoint",
                                     description="Copy the tensors of a pickle checkpoint (.bin/.ckpt/.pt) into a "
                                                 ".safetensors file, keeping their names.")
    parser.add_argument("src", type=pathlib.Path, help="input checkpoint, read with torch.load(weights_only=True)")
    parser.add_argument("dst", type=pathlib.Path, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        counts = convert(args.src, args.dst)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    dtypes = ", ".join(f"{n} {d}" for d, n in sorted(counts["dtypes"].items()))
    print(f"{args.dst}: {counts['tensors']} tensors ({dtypes}), {counts['parameters']:,} parameters")
    if counts["dropped"]:
        print(f"dropped {counts['dropped']} non-tensor entries of the state dict")
    return 0


if __name__ == "__main__":
    sys.exit(main())

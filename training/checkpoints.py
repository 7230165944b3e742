"""Checkpoints a run resumes from, and the files ComfyUI loads.

**Resume.** ``save(accelerator, run_dir, step, trainable)`` writes ``checkpoints/step_NNNNNN/``: accelerate's
``save_state`` (optimizer, gradient scaler, RNG states) plus only the *trained* tensors (``trainable.safetensors``;
the frozen base model is not copied) and ``state.json`` with the step. It is written under a ``.tmp`` name and
renamed when complete, so a run killed while saving leaves no checkpoint that looks whole. ``latest(run_dir)`` is
the newest complete one; ``restore`` loads it back (optimizer state included) and returns its step.

**Exports** (what ComfyUI loads without this pack):

- a textual-inversion embedding (``models/embeddings/NAME.safetensors``): ``emb_params`` (S, 768) for SD1.5 (the
  key A1111 writes; ComfyUI's ``sd1_clip.load_embed`` takes a file's only tensor), ``clip_l`` (S, 768) and
  ``clip_g`` (S, 1280) for SDXL (the keys ComfyUI's SDXL tokenizers look up). A prompt uses it as
  ``embedding:NAME``, which ComfyUI replaces by these S token vectors.
- weight differences for ``LoraLoaderModelOnly`` (``models/loras/NAME.safetensors``): ``<key>.diff`` per weight,
  ``key`` being ComfyUI's own UNet key without ``.weight`` (``diffusion_model.input_blocks.1.1.transformer_blocks.
  0.attn2.to_k``); ``comfy.lora.load_lora`` adds ``strength x diff`` to the weight.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from typing import Mapping, Optional

import torch

CHECKPOINTS = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# --- resume ------------------------------------------------------------------------------------------------------

def register_hooks(accelerator, trainable: Mapping[str, torch.Tensor]) -> None:
    """Make ``accelerator.save_state``/``load_state`` store ``trainable`` (name -> live parameter) instead of
    the prepared models' full state dicts."""
    import safetensors.torch

    def save_hook(models, weights, output_dir):
        weights.clear()  # accelerate would write every prepared model's full state dict
        if accelerator.is_main_process:
            tensors = {k: v.detach().float().cpu().contiguous() for k, v in trainable.items()}
            safetensors.torch.save_file(tensors, os.path.join(output_dir, TRAINABLE_FILE))

    def load_hook(models, input_dir):
        models.clear()
        saved = safetensors.torch.load_file(os.path.join(input_dir, TRAINABLE_FILE))
        missing = sorted(set(trainable) - set(saved))
        unexpected = sorted(set(saved) - set(trainable))
        if missing or unexpected:
            raise ValueError(f"checkpoint {input_dir} does not match this run's trained tensors "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}): was the config changed?")
        with torch.no_grad():
            for name, param in trainable.items():
                if saved[name].shape != param.shape:
                    raise ValueError(f"checkpoint {input_dir}: {name} has shape {tuple(saved[name].shape)}, this "
                                     f"run {tuple(param.shape)}: was the config (or the image count) changed?")
                param.copy_(saved[name].to(param.dtype))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def step_dir(run_dir, step: int) -> pathlib.Path:
    return pathlib.Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def save(accelerator, run_dir, step: int, keep: Optional[int] = None, extra: Optional[dict] = None) -> pathlib.Path:
    """Write the checkpoint of ``step`` (all processes call this), then keep only the ``keep`` newest."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its RNG state into tmp before the rename
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(extra or {})}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep:
            for old in complete(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete(run_dir) -> list[pathlib.Path]:
    """The complete checkpoints of ``run_dir``, oldest first (``.tmp`` leftovers of a kill are skipped)."""
    root = pathlib.Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file() and (p / TRAINABLE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest(run_dir) -> Optional[pathlib.Path]:
    found = complete(run_dir)
    return found[-1] if found else None


def restore(accelerator, checkpoint) -> int:
    """Load ``checkpoint`` (trained tensors, optimizer, RNG states) into the prepared objects; its step."""
    checkpoint = pathlib.Path(checkpoint)
    if not (checkpoint / STATE_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE})")
    accelerator.load_state(str(checkpoint))
    return int(json.loads((checkpoint / STATE_FILE).read_text())["step"])


# --- exports for ComfyUI -----------------------------------------------------------------------------------------

def comfy_unet_key(diffusers_name: str, layers_per_block) -> str:
    """ComfyUI's key (``diffusion_model.`` + LDM UNet name) of a diffusers ``UNet2DConditionModel`` transformer
    weight name, e.g. ``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight`` ->
    ``diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight`` (the block arithmetic of
    ComfyUI's ``comfy.utils.unet_to_diffusers``). ``layers_per_block``: the UNet config's, int or per block."""
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$", diffusers_name)
    if m is None:
        m_mid = re.match(r"^mid_block\.attentions\.0\.(.+)$", diffusers_name)
        if m_mid is None:
            raise ValueError(f"{diffusers_name} is not a transformer weight of a UNet2DConditionModel")
        return f"diffusion_model.middle_block.1.{m_mid.group(1)}"
    kind, block, layer, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    n_blocks = block + 1 if isinstance(layers_per_block, int) else len(layers_per_block)
    per_block = [layers_per_block] * n_blocks if isinstance(layers_per_block, int) else list(layers_per_block)
    if kind == "down_blocks":
        index = 1 + sum(n + 1 for n in per_block[:block]) + layer
        return f"diffusion_model.input_blocks.{index}.1.{rest}"
    up = list(reversed(per_block))
    index = sum(n + 1 for n in up[:block]) + layer
    return f"diffusion_model.output_blocks.{index}.1.{rest}"


def save_embedding(path, family: str, vectors: list[torch.Tensor], metadata: Optional[dict] = None) -> None:
    """The concept tokens as a textual-inversion file ComfyUI resolves from ``embedding:NAME``."""
    import safetensors.torch

    if family == "sdxl":
        tensors = {"clip_l": vectors[0], "clip_g": vectors[1]}
    else:
        tensors = {"emb_params": vectors[0]}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def save_weight_diffs(path, diffs: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                      metadata: Optional[dict] = None) -> None:
    """``{comfy weight key: trained - base}`` as ``<key without .weight>.diff`` entries (LoraLoaderModelOnly)."""
    import safetensors.torch

    tensors = {}
    for key, diff in diffs.items():
        if not key.endswith(".weight"):
            raise ValueError(f"{key}: weight differences are stored for '.weight' keys")
        tensors[key[:-len(".weight")] + ".diff"] = diff.detach().to(dtype).cpu().contiguous()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})

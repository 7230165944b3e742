"""The toy world's SynCD customization model in ComfyUI: its checkpoint, IP-Adapter Plus and image encoder.

One file (``toyworld/weights/toy_syncd.safetensors``, :func:`comfyui_syncd.toyworld.customization.bundle_file`)
holds what the SDXL customization workflows load from three: the SynCD checkpoint (the training script's export:
self-attention LoRA, SynCD SDXL keys), the IP-Adapter Plus it trained, and the small CLIP vision model it encoded
the references with. The nodes below stand in for SynCD Checkpoint Loader, SynCD IP-Adapter Loader and Load CLIP
Vision with the same outputs, so ``run --tiny`` swaps them in place (``client/toy_swap.py``): the checkpoint goes
through the same :func:`~comfyui_syncd.nodes.syncd_checkpoint.apply_syncd_checkpoint`, the image encoder is
ComfyUI's own ``comfy.clip_vision.ClipVisionModel`` of the file's config.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import tempfile

import torch
from comfy_api.latest import io

import comfy.clip_vision
import folder_paths

from ..core.ip_adapter_model import check_plus_layout, split_flat_state_dict
from ..nodes import choices
from ..nodes.ip_adapter import IPAdapter
from ..nodes.syncd_checkpoint import apply_syncd_checkpoint
from ..toyworld import customization as C
from .toy_model import FOLDER, available, register_folder

SHIPPED = pathlib.Path(__file__).resolve().parent.parent / "toyworld" / "weights" / "toy_syncd.safetensors"
SHIPPED_CHOICE = "toy_syncd (shipped)"
NAME = "SynCD toy-world customization model"
CLIP_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                    "patch_size", "projection_dim", "hidden_act", "layer_norm_eps", "num_channels")
FILE_TOOLTIP = ("The shipped toy SynCD model (trained on the shipped toy model's MSA sets), or a "
                "customize/syncd_msa/toy_syncd.safetensors of your own 'python -m comfyui_syncd toyworld reproduce' "
                "run copied to models/syncd_toyworld.")


def file_choices() -> list[str]:
    """The shipped customization model (when present) and the files in ``models/syncd_toyworld``."""
    return ([SHIPPED_CHOICE] if available(SHIPPED) else []) + folder_paths.get_filename_list(FOLDER)


def resolve(choice: str) -> pathlib.Path:
    return SHIPPED if choice == SHIPPED_CHOICE else pathlib.Path(folder_paths.get_full_path_or_raise(FOLDER, choice))


@functools.lru_cache(maxsize=2)
def read(path: pathlib.Path):
    """({part: state dict}, image encoder config, info) of a customization file, with an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{NAME}: {path} does not exist; train one with 'python -m comfyui_syncd toyworld "
                                f"reproduce' (stage customize)")
    try:
        return C.read_bundle(path)
    except ValueError as exc:
        raise ValueError(f"{NAME}: {exc}") from None


def clip_vision(states: dict, config: dict) -> comfy.clip_vision.ClipVisionModel:
    """ComfyUI's CLIP_VISION of the file's image encoder (float32: it is tiny)."""
    cfg = {k: config[k] for k in CLIP_VISION_KEYS if k in config} | {"model_type": "clip_vision_model"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "toy_clip_vision.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        clip = comfy.clip_vision.ClipVisionModel(path)
    clip.model.to(torch.float32)
    clip.dtype = torch.float32
    missing, unexpected = clip.load_sd(states)
    if missing or [k for k in unexpected if not k.endswith("position_ids")]:
        raise ValueError(f"{NAME}: the image encoder weights do not fit (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]})")
    return clip


def ip_adapter(states: dict) -> dict:
    adapter = split_flat_state_dict(states)
    check_plus_layout(adapter)
    return adapter


class SynCDToyWorldCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="SynCDToyWorldCheckpoint",
            display_name="SynCD Toy-World Checkpoint",
            category="SynCD/testing",
            description="SynCD Checkpoint Loader for the toy world: the toy SynCD customization model's "
                        "self-attention LoRA on the toy-world model (switched off in the reference pass, as "
                        "upstream's SDXL model). Use with SynCD Toy-World IP-Adapter and SynCD Toy-World CLIP "
                        "Vision from the same file.",
            inputs=[
                io.Model.Input("model", tooltip="The toy-world model the file was trained on (SynCD Toy-World "
                                                "Model; the shipped file: toy_sd15)."),
                io.Combo.Input("model_file", options=file_choices(), tooltip=FILE_TOOLTIP),
                io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.05,
                               tooltip="LoRA strength (1 = as trained)."),
                IPAdapter.Input("ipadapter", optional=True,
                                tooltip="SynCD Toy-World IP-Adapter; unconnected: the file's own (the same one)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), IPAdapter.Output(display_name="IPADAPTER")],
        )

    @classmethod
    def validate_inputs(cls, model_file=None):
        return choices.check(cls, model_file=model_file)

    @classmethod
    def execute(cls, model, model_file: str, strength: float, ipadapter=None) -> io.NodeOutput:
        path = resolve(model_file)
        states, _, _ = read(path)
        if ipadapter is None:  # the checkpoint's to_k_ip/to_v_ip go into the IP-Adapter it was trained from
            ipadapter = ip_adapter(states["ip_adapter"])
        patched, ipadapter, _ = apply_syncd_checkpoint(model, states["syncd"], path.name, strength, ipadapter)
        return io.NodeOutput(patched, ipadapter)


def file_schema(node_id: str, display_name: str, description: str, output) -> io.Schema:
    """The schema of a loader of one part of the customization file (its only input: the file)."""
    register_folder()
    return io.Schema(node_id=node_id, display_name=display_name, category="SynCD/testing", description=description,
                     inputs=[io.Combo.Input("model_file", options=file_choices(), tooltip=FILE_TOOLTIP)],
                     outputs=[output])


class SynCDToyWorldIPAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return file_schema("SynCDToyWorldIPAdapter", "SynCD Toy-World IP-Adapter",
                           "SynCD IP-Adapter Loader for the toy world: the IP-Adapter Plus trained with the toy SynCD "
                           "customization model, for SynCD IP-Adapter Apply.",
                           IPAdapter.Output(display_name="IPADAPTER"))

    @classmethod
    def validate_inputs(cls, model_file=None):
        return choices.check(cls, model_file=model_file)

    @classmethod
    def execute(cls, model_file: str) -> io.NodeOutput:
        return io.NodeOutput(ip_adapter(read(resolve(model_file))[0]["ip_adapter"]))


class SynCDToyWorldCLIPVision(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return file_schema("SynCDToyWorldCLIPVision", "SynCD Toy-World CLIP Vision",
                           "Load CLIP Vision for the toy world: the small frozen CLIP vision model the toy SynCD "
                           "customization model's IP-Adapter reads references with (random weights, as trained).",
                           io.ClipVision.Output(display_name="CLIP_VISION"))

    @classmethod
    def validate_inputs(cls, model_file=None):
        return choices.check(cls, model_file=model_file)

    @classmethod
    def execute(cls, model_file: str) -> io.NodeOutput:
        states, config, _ = read(resolve(model_file))
        return io.NodeOutput(clip_vision(states["clip_vision"], config))

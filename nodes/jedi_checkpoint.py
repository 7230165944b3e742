"""JeDiCheckpointLoader: the widened JeDi UNet that ``python -m comfyui_syncd.training.jedi`` exports, as a ComfyUI
SD1.5 MODEL.

The file (``output_dir/jedi/NAME.safetensors``) is the diffusers ``UNet2DConditionModel`` state dict with
``conv_in`` widened to 9 input channels, ``[noisy latent (4) ‖ reference latent (4) ‖ reference mask (1)]``, the
diffusers config in the metadata (``jedi_unet_config``) and ``jedi_input_layout`` naming that order (see
``training/jedi.py``). The loader:

* turns the diffusers config into ComfyUI's ``unet_config`` and converts the keys with ComfyUI's own map
  (``comfy.utils.unet_to_diffusers``); every key of the file must land on a weight of the model and every weight
  must come from the file, or the load fails naming them;
* builds the model as ComfyUI builds an SD1.5 checkpoint (``comfy.supported_models.SD15``, ε-prediction, the
  base model's DDPM schedule, ComfyUI's dtype choice), through a subclass in ComfyUI's own pattern for models with
  extra input channels (``SD15_instructpix2pix``, ``HunyuanVideoI2V``): the extra channels are ComfyUI's concat
  conditioning with ``concat_keys = ("concat_image", "mask_inverted")``, i.e. per latent image the sampled
  LATENT's own samples (the clean reference latents of JeDi Joint Image Set; ``concat_latent_image`` of a
  conditioning takes precedence) and ``1 − noise_mask`` (1 = reference, as training's mask, JeDi eq. 2); the
  reference latents are multiplied by that mask (training: ``reference latent · mask``), so the images to generate
  get zeros whatever their samples hold, and a LATENT without a noise_mask means no references at all;
* adds one ``APPLY_MODEL`` wrapper that zeroes the reference latents of the chunks a pack guider marks as having no
  reference access (JeDi Image Guider's ε⁰): JeDi eq. 3, ε⁰ = ε_θ(x_t, 0, M) with the mask kept.

Coupled self-attention is not a weight: put SynCD Masked Shared Attention (``mask_mode`` none,
``images_per_subject`` = the set size) on the loaded model, as training couples every image of a set.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from comfy_api.latest import io

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models
import comfy.utils
import folder_paths

from . import choices, model_folders
from . import patch_kit as kit
from .layout import UNCOND, chunk_roles

FOLDER = "jedi"
NODE = "JeDi Checkpoint Loader"
INPUT_LAYOUT = "noisy_latent:4,reference_latent:4,reference_mask:1"  # training/jedi.py INPUT_LAYOUT
LATENT_CHANNELS = 4
WRAPPER_KEY = "jedi_reference_channels"
WEIGHT_DTYPES = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register_folder() -> None:
    model_folders.register(FOLDER, {".safetensors"})


register_folder()


# --- The model classes (ComfyUI's pattern for UNets with extra input channels) ------------------------------------

class JeDiUNetModel(comfy.model_base.BaseModel):
    """SD1.5 ``BaseModel`` whose extra input channels are JeDi's [reference latent ‖ reference mask]."""

    def __init__(self, model_config, model_type=comfy.model_base.ModelType.EPS, device=None):
        super().__init__(model_config, model_type, device=device)
        self.concat_keys = ("concat_image", "mask_inverted")

    def concat_cond(self, **kwargs):
        """[reference latent · mask ‖ mask] per latent image, mask = 1 − noise_mask (JeDi eq. 2: x̂ = x ⊙ M)."""
        data = super().concat_cond(**kwargs)
        if data is None:
            return None
        mask = data[:, LATENT_CHANNELS:]
        return torch.cat([data[:, :LATENT_CHANNELS] * mask, mask], dim=1)


class JeDiSD15(comfy.supported_models.SD15):
    """The SD1.5 model config, building :class:`JeDiUNetModel` (as ``SD15_instructpix2pix`` builds its model)."""

    def get_model(self, state_dict, prefix="", device=None):
        return JeDiUNetModel(self, model_type=self.model_type(state_dict, prefix), device=device)


# --- The file -----------------------------------------------------------------------------------------------------

# Diffusers config values the SD1.5 UNet layout of ComfyUI's UNetModel reproduces (absent = diffusers' default).
SD15_LAYOUT = {"addition_embed_type": None, "class_embed_type": None, "encoder_hid_dim": None,
               "time_embedding_type": "positional", "mid_block_type": "UNetMidBlock2DCrossAttn",
               "only_cross_attention": False, "dual_cross_attention": False, "resnet_time_scale_shift": "default",
               "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
               "downsample_padding": 1, "mid_block_scale_factor": 1, "norm_num_groups": 32,
               "num_attention_heads": None}
DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_level(value, levels: int, key: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ValueError(f"{NODE}: {key} {value} does not give one value per level ({levels})")
    return [int(v) for v in values]


def comfy_unet_config(cfg: dict, dtype=None) -> dict:
    """ComfyUI's SD1.5 ``unet_config`` of a diffusers ``UNet2DConditionModel`` config (the JeDi file's metadata)."""
    for key, expected in SD15_LAYOUT.items():
        if cfg.get(key, expected) != expected:
            raise ValueError(f"{NODE}: the UNet's {key} is {cfg.get(key)!r}, not SD1.5's {expected!r}; this "
                             f"loader reads JeDi models trained from SD1.5-family UNets")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    channels = [int(c) for c in cfg["block_out_channels"]]
    levels = len(channels)
    if len(down) != levels or len(up) != levels or any(t not in DOWN_TYPES for t in down) \
            or any(t not in UP_TYPES for t in up):
        raise ValueError(f"{NODE}: unsupported UNet blocks {down} / {up}")
    heads = _per_level(cfg.get("attention_head_dim", 8), levels, "attention_head_dim")
    if any(h != 8 for h in heads):  # diffusers' SD1.5 "attention_head_dim" is the head count; ComfyUI's SD15 uses 8
        raise ValueError(f"{NODE}: the UNet has {heads} attention heads; SD1.5 (and ComfyUI's SD15 model) has 8")
    if any(c % channels[0] for c in channels):
        raise ValueError(f"{NODE}: block_out_channels {channels} are not multiples of the first")
    layers = _per_level(cfg.get("layers_per_block", 2), levels, "layers_per_block")
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    transformer_depth = [d if "CrossAttn" in t else 0 for t, d, n in zip(down, depth, layers) for _ in range(n)]
    # ComfyUI pops the output depths from the end: level 0's entries first; diffusers' up block j is level L-1-j
    transformer_depth_output = [depth[level] if "CrossAttn" in up[levels - 1 - level] else 0
                                for level in range(levels) for _ in range(layers[level] + 1)]
    return {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
            "in_channels": int(cfg["in_channels"]), "out_channels": int(cfg.get("out_channels", 4)),
            "model_channels": channels[0], "num_res_blocks": layers,
            "channel_mult": [c // channels[0] for c in channels], "transformer_depth": transformer_depth,
            "transformer_depth_output": transformer_depth_output, "transformer_depth_middle": depth[-1],
            "context_dim": int(cfg["cross_attention_dim"]),
            "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)), "adm_in_channels": None,
            "use_temporal_attention": False, "use_temporal_resblock": False, "dtype": dtype}


def read_jedi_file(path) -> tuple[dict, dict, dict]:
    """(tensors, metadata, diffusers config) of an exported JeDi UNet, checked."""
    name = os.path.basename(str(path))
    sd, meta = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    meta = meta or {}
    if "jedi_unet_config" not in meta:
        raise ValueError(f"{NODE}: {name} has no 'jedi_unet_config' metadata, so it is not a UNet exported by "
                         f"'python -m comfyui_syncd.training.jedi' (output_dir/jedi/NAME.safetensors); give that file")
    layout = meta.get("jedi_input_layout")
    if layout != INPUT_LAYOUT:
        raise ValueError(f"{NODE}: {name} has input layout {layout!r}; this loader reads {INPUT_LAYOUT!r}")
    for key, expected in (("jedi_prediction_type", "epsilon"), ("jedi_family", "sd15")):
        if meta.get(key, expected) != expected:
            raise ValueError(f"{NODE}: {name} has {key} {meta[key]!r}; this loader reads {expected!r} models")
    cfg = json.loads(meta["jedi_unet_config"])
    weight = sd.get("conv_in.weight")
    if weight is None or weight.shape[1] != LATENT_CHANNELS + 5 or int(cfg.get("in_channels", 0)) != weight.shape[1]:
        raise ValueError(f"{NODE}: {name}: conv_in must take 9 input channels ({INPUT_LAYOUT}); it has "
                         f"{None if weight is None else tuple(weight.shape)} (config in_channels "
                         f"{cfg.get('in_channels')})")
    return sd, meta, cfg


def convert_keys(sd: dict, unet_config: dict, name: str) -> dict:
    """The diffusers state dict in ComfyUI's UNet key layout (``comfy.utils.unet_to_diffusers``)."""
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    unmatched = sorted(k for k in sd if k not in mapping)
    if unmatched:
        raise ValueError(f"{NODE}: {name}: {len(unmatched)} key(s) are not part of the SD1.5 UNet its config "
                         f"describes: {', '.join(unmatched[:8])}{' ...' if len(unmatched) > 8 else ''}")
    return {mapping[k]: v for k, v in sd.items()}


def load_jedi_unet(path, weight_dtype: str = "default") -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher holding the exported JeDi UNet (see the module docstring)."""
    choices.require(NODE, "weight_dtype", weight_dtype, WEIGHT_DTYPES)
    name = os.path.basename(str(path))
    sd, meta, cfg = read_jedi_file(path)
    unet_config = comfy_unet_config(cfg)
    converted = convert_keys(sd, unet_config, name)

    mm = comfy.model_management
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    model_config = JeDiSD15(unet_config)
    dtype = WEIGHT_DTYPES[weight_dtype]
    if dtype is None:  # as comfy.sd.load_diffusion_model_state_dict chooses
        dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(converted),
                              supported_dtypes=list(model_config.supported_inference_dtypes),
                              weight_dtype=comfy.utils.weight_dtype(converted))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                model_config.supported_inference_dtypes))
    model = model_config.get_model(converted, "").to(offload_device)
    expected = set(model.diffusion_model.state_dict())
    missing, extra = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or extra:
        raise ValueError(f"{NODE}: {name} does not fill the model its config describes: missing "
                         f"{missing[:8]}, unexpected {extra[:8]}")
    model.load_model_weights(converted, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, blind_uncond_references)
    kit.add_conditioning_check(patcher, NODE)
    logging.info(f"{NODE}: {name} (step {meta.get('jedi_step', '?')}), {len(converted)} tensors, {dtype}")
    return patcher


def blind_uncond_references(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    """``APPLY_MODEL`` wrapper: the chunks a pack guider gave no reference access (JeDi Image Guider's ε⁰) get zero
    reference latents, the mask kept (JeDi eq. 3: ε⁰ = ε_θ(x_t, 0, M)); every other chunk is left as it is."""
    state = kit.forward_state(transformer_options)
    roles = state.guidance.roles if state.guidance is not None else None
    if c_concat is not None and roles:
        blind = [rows for role, rows in chunk_roles(x.shape[0], transformer_options, roles) if role == UNCOND]
        if blind:
            c_concat = c_concat.clone()
            for rows in blind:
                c_concat[rows, :LATENT_CHANNELS] = 0
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


class JeDiCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="JeDiCheckpointLoader",
            display_name=NODE,
            category="SynCD/loaders",
            description="Loads a JeDi UNet trained with 'python -m comfyui_syncd.training.jedi' (the full widened "
                        "SD1.5 UNet, models/jedi) as a MODEL. Its extra input channels take, per image of the "
                        "latent batch, the reference latent and the reference mask from the LATENT's noise_mask "
                        "(JeDi Joint Image Set). Add SynCD Masked Shared Attention (mask_mode none, "
                        "images_per_subject = set size) for coupled attention; load the SD1.5 base checkpoint "
                        "for its CLIP and VAE.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A file in models/jedi: output_dir/jedi/NAME.safetensors of the JeDi "
                                       "training script (diffusers keys, config in the metadata)."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Weight precision; default: ComfyUI's choice for the device, as Load "
                                       "Diffusion Model."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def validate_inputs(cls, unet_name=None, weight_dtype=None):
        return choices.check(cls, unet_name=unet_name, weight_dtype=weight_dtype)

    @classmethod
    def execute(cls, unet_name: str, weight_dtype: str = "default") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, unet_name)
        return io.NodeOutput(load_jedi_unet(path, weight_dtype))

"""The official SynCD checkpoints (nupurkmr9/syncd ``method/``) on ComfyUI models.

* **Flux** ``pytorch_model.bin`` (``method/sample_flux.py``, ``pipelines/flux_pipeline/model.py``): PEFT
  ``get_peft_model`` LoRA (rank 32, alpha 32, adapter ``default``) on ``FluxTransformer2DModel``; keys
  ``transformer.base_model.model.<module>.lora_{A,B}.default.weight``, modules ``attn.to_{q,k,v}``,
  ``attn.to_out.0``, ``attn.add_{q,k,v}_proj``, ``attn.to_add_out``, ``ff.net.0.proj``, ``ff.net.2``,
  ``ff_context.net.0.proj``, ``ff_context.net.2`` of ``transformer_blocks.N`` and ``attn.to_{q,k,v}`` of
  ``single_transformer_blocks.N``. Mapped with ComfyUI's own diffusers-Flux LoRA key map
  (``comfy.lora.model_lora_keys_unet``, fused qkv slices included) and applied as an ordinary weight patch.
* **SDXL** ``sdxl_finetuned_20k.ckpt`` (``method/sample.py``, ``pipelines/sdxl_pipeline/model.py``,
  ``method/main.py``): a Lightning checkpoint whose ``state_dict`` keeps only keys containing ``lora``, ``to_k_ip``
  or ``to_v_ip``: diffusers ``add_adapter`` LoRA (rank 128, alpha 128) ``unet.<...>.attn1.to_{q,k,v,out.0}
  .lora_{A,B}.default.weight`` and the IP-Adapter weights of diffusers' ``IPAdapterAttnProcessor2_0`` wrapped in
  SynCD's ``RefAttnProc``: ``unet.<...>.attn2.processor.attn_op.to_{k,v}_ip.0.weight``. The LoRA becomes
  ``add_weight_wrapper`` functions that add B·A except during the SynCD reference pass (upstream runs it at LoRA
  scale 0); the IP weights replace those of the IP-Adapter Plus they were trained from.

PEFT scales B·A by alpha/rank = 1 in both configs; the files store no alpha, so the scale is 1 · ``strength``.
Frozen base weights a checkpoint may also carry (PEFT ``base_layer`` weights, VAE, text or image encoders) are
skipped and counted; any other key is an error.
"""

from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io

import comfy.lora
import folder_paths

from ..core.checkpoint_keys import (FLUX_LORA_KEY, SDXL_IP_KEY, SDXL_LORA_KEY, CheckpointReport, check_lora_shapes,
                                    count_other_keys, detect_family, lora_pairs, raise_unmatched)
from ..core.ip_adapter_model import check_plus_layout, layer_key
from ..core.weights import read_weights, tensor_dict
from . import choices, model_folders
from .ip_adapter import IPAdapter, cross_attentions
from .patch_kit import in_reference_pass, is_flux

FOLDER = "syncd"


def register_folder() -> None:
    model_folders.register(FOLDER, folder_paths.supported_pt_extensions)


register_folder()


class ReferencePassLoRA(torch.nn.Module):
    """Weight wrapper W -> W + strength·B·A, and W unchanged inside the SynCD reference pass (upstream: LoRA scale 0
    for the reference features). ComfyUI calls it with the cast weight on every use (``comfy.ops``)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, strength: float):
        super().__init__()
        self.register_buffer("down", down.detach().clone())
        self.register_buffer("up", up.detach().clone())
        self.strength = strength

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if in_reference_pass() or self.strength == 0:
            return weight
        delta = self.up.to(weight.device, torch.float32) @ self.down.to(weight.device, torch.float32)
        return (weight.float() + self.strength * delta).to(weight.dtype)

    def passive_memory_usage(self) -> int:
        return self.down.nelement() * self.down.element_size() + self.up.nelement() * self.up.element_size()

    def move_to(self, device) -> int:
        self.to(device=device)
        return self.passive_memory_usage()


def apply_flux(model, sd: dict, strength: float) -> tuple:
    """A clone of ``model`` (Flux) with the SynCD LoRA as a ComfyUI weight patch."""
    report = CheckpointReport("flux", keys=len(sd))
    base = model.model
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    weights = base.state_dict()
    pairs = lora_pairs(sd, FLUX_LORA_KEY, report)
    lora_sd, to_load = {}, {}
    for module, pair in sorted(pairs.items()):
        target = key_map.get(f"transformer.{module}")
        if target is None:
            report.unmatched.append(f"{module} (no such module in this Flux model)")
            continue
        weight_key, (dim, offset, size) = (target, (0, 0, None)) if isinstance(target, str) else target
        shape = weights[weight_key].shape
        out_features = shape[dim] if size is None else size
        if check_lora_shapes(module, pair, out_features, shape[1], report):
            lora_sd[f"transformer.{module}.lora_A.weight"] = pair["A"]
            lora_sd[f"transformer.{module}.lora_B.weight"] = pair["B"]
            to_load[f"transformer.{module}"] = target
    count_other_keys(sd, [FLUX_LORA_KEY], report)
    raise_unmatched(report, "this Flux model")
    patches = comfy.lora.load_lora(lora_sd, to_load, log_missing=False)
    m = model.clone()
    applied = m.add_patches(patches, strength)
    if len(patches) != len(to_load) or len(applied) != len(patches):
        raise RuntimeError(f"SynCD checkpoint: ComfyUI applied {len(applied)} of {len(to_load)} LoRA patches")
    report.lora_modules = len(patches)
    return m, report


def apply_sdxl(model, sd: dict, strength: float, ipadapter) -> tuple:
    """A clone of ``model`` (SDXL UNet) with the SynCD attn1 LoRA as reference-pass-aware weight wrappers, and the
    IPADAPTER with the SynCD-trained to_k_ip/to_v_ip."""
    report = CheckpointReport("sdxl", keys=len(sd))
    base = model.model
    diffusion_model = base.diffusion_model
    if not hasattr(diffusion_model, "input_blocks"):
        raise ValueError("SynCD checkpoint: this is the SynCD SDXL checkpoint but the model is not a UNet; load it "
                         "on the SDXL model it was trained from (terminus-xl-gamma, v-prediction)")
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    weights = base.state_dict()
    wrappers = {}
    for module, pair in sorted(lora_pairs(sd, SDXL_LORA_KEY, report).items()):
        weight_key = key_map.get("lora_unet_" + module.replace(".", "_"))
        if weight_key is None:
            report.unmatched.append(f"{module} (no such module in this UNet)")
            continue
        shape = weights[weight_key].shape
        if check_lora_shapes(module, pair, shape[0], shape[1], report):
            wrappers[weight_key] = pair
    new_ip = _sdxl_ip_weights(sd, key_map, diffusion_model, ipadapter, report)
    count_other_keys(sd, [SDXL_LORA_KEY, SDXL_IP_KEY], report)
    raise_unmatched(report, "this SDXL model and IP-Adapter")
    m = model.clone()
    for weight_key, pair in wrappers.items():
        m.add_weight_wrapper(weight_key, ReferencePassLoRA(pair["A"], pair["B"], strength))
    report.lora_modules = len(wrappers)
    report.ip_layers = len(new_ip) // 2
    if new_ip:
        ipadapter = {"image_proj": ipadapter["image_proj"], "ip_adapter": {**ipadapter["ip_adapter"], **new_ip}}
    return m, ipadapter, report


def _sdxl_ip_weights(sd, key_map, diffusion_model, ipadapter, report) -> dict:
    """{ip_adapter key: SynCD-trained weight} for every to_k_ip/to_v_ip key of the checkpoint."""
    found = {k: SDXL_IP_KEY.match(k) for k in sd}
    found = {k: m for k, m in found.items() if m}
    if not found:
        return {}
    if ipadapter is None:
        raise ValueError("SynCD checkpoint: the SDXL checkpoint carries trained IP-Adapter weights (to_k_ip/to_v_ip); "
                         "connect the IP-Adapter Plus it was trained from (ip-adapter-plus_sdxl_vit-h, via SynCD "
                         "IP-Adapter Loader) to 'ipadapter'")
    check_plus_layout(ipadapter)
    index = {ca.weight_prefix: k for k, ca in enumerate(cross_attentions(diffusion_model))}
    out = {}
    for key, m in sorted(found.items()):
        target = key_map.get("lora_unet_" + m.group("attn").replace(".", "_") + "_to_k")
        k = index.get(target[:-len(".to_k.weight")]) if target else None
        if k is None:
            report.unmatched.append(f"{key} (no such cross-attention in this UNet)")
            continue
        ip_key = layer_key(k, m.group("kv"))
        old = ipadapter["ip_adapter"].get(ip_key)
        if old is None or old.shape != sd[key].shape:
            report.unmatched.append(f"{key} (shape {tuple(sd[key].shape)}; the IP-Adapter's {ip_key} is "
                                    f"{None if old is None else tuple(old.shape)})")
            continue
        out[ip_key] = sd[key].to(old.dtype)
    return out


def load_syncd_checkpoint(model, path, strength: float = 1.0, ipadapter=None):
    """(MODEL, IPADAPTER, report) for an official SynCD checkpoint file."""
    sd, _ = tensor_dict(read_weights(path), os.path.basename(str(path)))
    return apply_syncd_checkpoint(model, sd, os.path.basename(str(path)), strength, ipadapter)


def apply_syncd_checkpoint(model, sd: dict, name: str, strength: float = 1.0, ipadapter=None):
    """(MODEL, IPADAPTER, report) for the state dict ``sd`` of a SynCD checkpoint (file ``name``)."""
    family = detect_family(sd)
    flux = is_flux(model.get_model_object("diffusion_model"))
    if (family == "flux") != flux:
        raise ValueError(f"SynCD checkpoint: {name} is the SynCD {family.upper()} checkpoint "
                         f"but the model is {'Flux' if flux else 'not Flux'}; connect the matching base model "
                         f"(FLUX.1-dev for pytorch_model.bin, SDXL for sdxl_finetuned_20k.ckpt)")
    if family == "flux":
        patched, report = apply_flux(model, sd, strength)
    else:
        patched, ipadapter, report = apply_sdxl(model, sd, strength, ipadapter)
    logging.info(report.summary())
    return patched, ipadapter, report


class SynCDCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="SynCDCheckpointLoader",
            display_name="SynCD Checkpoint Loader",
            category="SynCD/loaders",
            description="Loads an official SynCD checkpoint from models/syncd onto its base model. Flux "
                        "(pytorch_model.bin): the rank-32 LoRA as a normal LoRA. SDXL (sdxl_finetuned_20k.ckpt): "
                        "the rank-128 self-attention LoRA, switched off in the SynCD reference pass as upstream, and "
                        "the trained IP-Adapter to_k_ip/to_v_ip, returned in IPADAPTER for SynCD IP-Adapter Apply.",
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1-dev for the Flux checkpoint; the SDXL base it was trained "
                                                "on (terminus-xl-gamma-v1, v-prediction) for the SDXL one."),
                io.Combo.Input("checkpoint_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A file in models/syncd (.bin/.ckpt read with weights_only, or .safetensors "
                                       "from 'python -m comfyui_syncd convert-checkpoint')."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.05,
                               tooltip="LoRA strength (1 = as trained). The IP-Adapter weights are replaced whole."),
                IPAdapter.Input("ipadapter", optional=True,
                                tooltip="SDXL: the ip-adapter-plus_sdxl_vit-h IP-Adapter; its to_k_ip/to_v_ip are "
                                        "replaced by the SynCD-trained ones."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), IPAdapter.Output(display_name="IPADAPTER")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint_name=None):
        return choices.check(cls, checkpoint_name=checkpoint_name)

    @classmethod
    def execute(cls, model, checkpoint_name: str, strength: float, ipadapter=None) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, checkpoint_name)
        patched, ipadapter, _ = load_syncd_checkpoint(model, path, strength, ipadapter)
        return io.NodeOutput(patched, ipadapter)

"""IP-Adapter Plus as ComfyUI attn2 replace patches: the SynCD SDXL model's global image feature.

Upstream (tencent-ailab/IP-Adapter ``attention_processor.IPAttnProcessor2_0``): every cross-attention adds
``scale · attention(q, to_k_ip(c), to_v_ip(c))`` to the text attention, before ``to_out``, where ``c`` are the 16
Resampler tokens of the CLIP ViT-H penultimate hidden states of the image. SynCD (nupurkmr9/syncd ``method/sample.py``,
``method/pipelines/sdxl_pipeline/pipeline.py``, ``method/configs/train_sdxl.yaml``) uses it with:

* the target: the global reference image at scale 0.6;
* the unconditional branch: the image of zeros in [-1, 1], i.e. mid-gray 0.5 in ComfyUI's [0, 1];
* the reference pass: every reference's own image at scale 1.0.

Rows are told apart by the forward pass's ``patch_kit.ForwardState``: the branch roles (branches without reference
access get the gray embedding) and the phase with ``reference_rows`` (the reference pass). Upstream
preprocessing resizes to 224² with bicubic antialiasing (kornia) and normalizes; here non-square images are
center-cropped first (as CLIPImageProcessor and ComfyUI do) and, unlike ComfyUI's ``clip_preprocess``, the
pixels are not rounded to 8 bit, so the gray image is exactly upstream's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from comfy_api.latest import io

import comfy.model_management
import folder_paths
from comfy.ldm.modules.attention import SpatialTransformer

from ..core.ip_adapter_model import Resampler, check_plus_layout, ip_layers, split_flat_state_dict
from ..core.weights import read_weights, tensor_dict
from . import choices, model_folders
from . import patch_kit as kit
from .layout import chunk_reference_access
from .references import References

IPAdapter = io.Custom("IPADAPTER")
FOLDER = "ipadapter"
GRAY = 0.5  # upstream's unconditional IP image: zeros in [-1, 1]


def register_folder() -> None:
    """``models/ipadapter`` (shared with ComfyUI_IPAdapter_plus, which registers the same name) if nobody has."""
    model_folders.register(FOLDER, folder_paths.supported_pt_extensions)


register_folder()


def load_ipadapter(path) -> dict:
    """An IP-Adapter Plus file (.safetensors with prefixes, or a .bin holding the two dicts) as IPADAPTER."""
    raw = read_weights(path)
    if isinstance(raw, dict) and isinstance(raw.get("image_proj"), dict) and isinstance(raw.get("ip_adapter"), dict):
        ipadapter = {"image_proj": dict(raw["image_proj"]), "ip_adapter": dict(raw["ip_adapter"])}
    else:
        ipadapter = split_flat_state_dict(tensor_dict(raw, str(path))[0])
    try:
        check_plus_layout(ipadapter)
    except ValueError as exc:
        raise ValueError(f"{os.path.basename(str(path))}: {exc}") from None
    return ipadapter


# --- Where the IP layers go -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CrossAttention:
    location: tuple            # (block name, block id, index inside the SpatialTransformer): ComfyUI's patch key
    weight_prefix: str         # e.g. "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2"
    shape: tuple               # attn2.to_k weight shape: (hidden size, cross-attention dim)


def cross_attentions(diffusion_model) -> list[CrossAttention]:
    """Every UNet cross-attention in diffusers' ``attn_processors`` order (down, up, mid blocks), which numbers the
    IP-Adapter layers: ComfyUI's input_blocks, output_blocks, middle_block."""
    found = []
    for name, blocks in (("input", diffusion_model.input_blocks), ("output", diffusion_model.output_blocks),
                         ("middle", [diffusion_model.middle_block])):
        for i, block in enumerate(blocks):
            for j, module in enumerate(block):
                if not isinstance(module, SpatialTransformer):
                    continue
                section = "middle_block" if name == "middle" else f"{name}_blocks.{i}"
                for t, tb in enumerate(module.transformer_blocks):
                    if tb.attn2 is None:
                        continue
                    found.append(CrossAttention(
                        (name, 0 if name == "middle" else i, t),
                        f"diffusion_model.{section}.{j}.transformer_blocks.{t}.attn2",
                        tuple(tb.attn2.to_k.weight.shape)))
    return found


def match_layers(diffusion_model, ipadapter: dict) -> dict[tuple, tuple[torch.Tensor, torch.Tensor]]:
    """{patch location: (to_k_ip, to_v_ip)}, checking count and shapes against the model."""
    if not hasattr(diffusion_model, "input_blocks"):
        raise ValueError("SynCD IP-Adapter: IP-Adapter Plus patches SD1.5/SDXL UNets; this model is not one "
                         "(the SynCD Flux model uses no IP-Adapter)")
    targets = cross_attentions(diffusion_model)
    layers = ip_layers(ipadapter["ip_adapter"])
    if len(layers) != len(targets):
        raise ValueError(f"SynCD IP-Adapter: the IP-Adapter has {len(layers)} cross-attention layers but the model "
                         f"has {len(targets)} (SDXL: 70, SD1.5: 16); use the IP-Adapter Plus of this model family "
                         f"(ip-adapter-plus_sdxl_vit-h for SDXL, ip-adapter-plus_sd15 for SD1.5)")
    out = {}
    for k, (target, (wk, wv)) in enumerate(zip(targets, layers)):
        if tuple(wk.shape) != target.shape:
            raise ValueError(f"SynCD IP-Adapter: layer {2 * k + 1} has shape {tuple(wk.shape)} but the model's "
                             f"{target.weight_prefix} expects {target.shape}; the IP-Adapter is for another model")
        out[target.location] = (wk, wv)
    return out


# --- Image embeddings -----------------------------------------------------------------------------------------

def clip_pixels(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(N, H, W, C) in [0, 1] -> normalized (N, 3, size, size): shortest side to ``size`` (bicubic, antialiased),
    center crop, no 8-bit rounding."""
    x = images[..., :3].movedim(-1, 1).float()
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                          antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size].clamp(0, 1)
    mean = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_hidden_states(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """Penultimate hidden states (N, tokens, width) of a ComfyUI CLIP_VISION, as IP-Adapter Plus reads them
    (upstream ``hidden_states[-2]``; ComfyUI ``intermediate_output=-2``)."""
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    pixels = clip_pixels(images, clip_vision.image_size, clip_vision.image_mean, clip_vision.image_std)
    with torch.no_grad():
        out = clip_vision.model(pixel_values=pixels.to(clip_vision.load_device), intermediate_output=-2)
    return out[1].float().cpu()


def image_tokens(ipadapter: dict, clip_vision, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """IP tokens (N, 16, cross dim) of every IMAGE batch in ``images``, through one Resampler."""
    resampler = Resampler.from_state_dict(ipadapter["image_proj"])
    device = comfy.model_management.get_torch_device()
    resampler.to(device)
    out = []
    with torch.no_grad():
        for batch in images:
            hidden = clip_hidden_states(clip_vision, batch)
            if hidden.shape[-1] != resampler.proj_in.in_features:
                raise ValueError(f"SynCD IP-Adapter: the CLIP vision model gives {hidden.shape[-1]}-wide features "
                                 f"but the IP-Adapter expects {resampler.proj_in.in_features}; IP-Adapter Plus "
                                 f"ViT-H models need CLIP-ViT-H-14 (e.g. CLIP-ViT-H-14-laion2B-s32B-b79K)")
            out.append(resampler(hidden.to(device)).float().cpu())
    return out


# --- The patch ------------------------------------------------------------------------------------------------

@dataclass
class IPAdapterPatch:
    """Everything the attn2 patches share: per-layer weights and the token table
    ``[image (N) | gray (1) | references (R)]``."""

    layers: dict
    table: torch.Tensor
    n_images: int
    n_references: int
    weight: float
    reference_weight: float
    _device_cache: dict = field(default_factory=dict)
    _plans: dict = field(default_factory=dict)

    @property
    def gray(self) -> int:
        return self.n_images

    def rows(self, batch_rows: int, to: dict) -> tuple[list[int], float]:
        """Table row of every batch row, and the scale of this call."""
        state = kit.forward_state(to)
        in_reference_pass = state.phase is kit.Phase.REFERENCE
        roles = state.guidance.roles if state.guidance is not None else None
        if in_reference_pass:
            refs = list(state.reference_rows)
            if self.n_references == 0:
                raise ValueError("SynCD IP-Adapter: the model runs a SynCD reference pass but SynCD IP-Adapter Apply "
                                 "has no references connected; connect the same references (SYNCD_REFERENCES) so "
                                 "each reference gets its own image feature, as upstream")
            if not refs or batch_rows % len(refs) or max(refs) >= self.n_references:
                raise RuntimeError(f"SynCD IP-Adapter: reference pass of {batch_rows} rows with reference indices "
                                   f"{refs}, but {self.n_references} references were given to SynCD IP-Adapter Apply; "
                                   f"connect the same references as to SynCD Apply References")
            own = [self.n_images + 1 + r for r in refs * (batch_rows // len(refs))]
        plan = []
        for has_access, rows in chunk_reference_access(batch_rows, to, roles):
            size = rows.stop - rows.start
            if not has_access:
                plan += [self.gray] * size
            elif in_reference_pass:
                plan += own[rows]
            elif self.n_images in (1, size):
                plan += [0] * size if self.n_images == 1 else list(range(size))
            else:
                raise ValueError(f"SynCD IP-Adapter: {self.n_images} global images for a latent batch of {size}; "
                                 f"give one image, or one per latent image")
        return plan, self.reference_weight if in_reference_pass else self.weight

    def tokens(self, batch_rows: int, to: dict, device, dtype) -> tuple[torch.Tensor, float]:
        """IP tokens of every batch row and the scale, worked out once per batch layout (not per layer)."""
        state = kit.forward_state(to)
        roles = frozenset(state.guidance.roles.items()) if state.guidance is not None else frozenset()
        key = (batch_rows, tuple(to.get("cond_or_uncond") or ()), tuple(to.get("uuids") or ()), roles, state.phase,
               state.reference_rows, device, dtype)
        if key not in self._plans:
            if len(self._plans) > 64:
                self._plans.clear()
            plan, scale = self.rows(batch_rows, to)
            self._plans[key] = (self.on(device, dtype)[torch.tensor(plan, device=device)], scale)
        return self._plans[key]

    def on(self, device, dtype, location=None):
        """The table (or a layer's weights) on ``device``/``dtype``, converted once."""
        key = (location, device, dtype)
        if key not in self._device_cache:
            value = self.table if location is None else self.layers[location]
            self._device_cache[key] = (value.to(device, dtype) if location is None
                                       else tuple(w.to(device, dtype) for w in value))
        return self._device_cache[key]


def make_attn2(patch: IPAdapterPatch):
    """attn2 chain link: text attention (or the earlier patch of this block) + scale · IP attention."""
    def attn2(q, k, v, extra_options, call_next):
        out = call_next(q, k, v)
        location = (*extra_options["block"], extra_options["block_index"])
        tokens, scale = patch.tokens(q.shape[0], extra_options, q.device, q.dtype)
        if scale == 0 or location not in patch.layers:
            return out
        wk, wv = patch.on(q.device, q.dtype, location)
        return out + scale * kit.attention(q, F.linear(tokens, wk), F.linear(tokens, wv), extra_options)
    return attn2


def apply_ip_adapter(model, ipadapter: dict, image_tokens_: torch.Tensor, gray_tokens: torch.Tensor,
                     reference_tokens: Optional[torch.Tensor], weight: float, reference_weight: float):
    """A clone of ``model`` with IP-Adapter attn2 replace patches on every cross-attention."""
    m = model.clone()
    layers = match_layers(m.get_model_object("diffusion_model"), ipadapter)
    parts = [image_tokens_, gray_tokens] + ([reference_tokens] if reference_tokens is not None else [])
    patch = IPAdapterPatch(layers, torch.cat(parts).float(), image_tokens_.shape[0],
                           0 if reference_tokens is None else reference_tokens.shape[0], weight, reference_weight)
    kit.add_attn2(m, make_attn2(patch), sorted({loc[:2] for loc in layers}, key=str))
    return m, patch


# --- Nodes ----------------------------------------------------------------------------------------------------

class SynCDIPAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="SynCDIPAdapterLoader",
            display_name="SynCD IP-Adapter Loader",
            category="SynCD/loaders",
            description="Loads an IP-Adapter Plus model (ip-adapter-plus_sdxl_vit-h for the SynCD SDXL model, or "
                        "ip-adapter-plus_sd15) from models/ipadapter, .safetensors or .bin.",
            inputs=[io.Combo.Input("ipadapter_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A file in models/ipadapter. SynCD SDXL: ip-adapter-plus_sdxl_vit-h "
                                           "(h94/IP-Adapter, sdxl_models); use it with CLIP-ViT-H-14.")],
            outputs=[IPAdapter.Output(display_name="IPADAPTER")],
        )

    @classmethod
    def validate_inputs(cls, ipadapter_name=None):
        return choices.check(cls, ipadapter_name=ipadapter_name)

    @classmethod
    def execute(cls, ipadapter_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_ipadapter(folder_paths.get_full_path_or_raise(FOLDER, ipadapter_name)))


class SynCDIPAdapterApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDIPAdapterApply",
            display_name="SynCD IP-Adapter Apply",
            category="SynCD/customization",
            description="The SynCD SDXL model's global image feature (IP-Adapter Plus): the target sees the global "
                        "reference image, branches without reference access a gray image, and the SynCD reference "
                        "pass each reference's own image. Apply it after SynCD Masked Shared Attention and the "
                        "SynCD checkpoint loader.",
            inputs=[
                io.Model.Input("model"),
                IPAdapter.Input("ipadapter", tooltip="From SynCD IP-Adapter Loader (or SynCD Checkpoint Loader, "
                                                     "which carries the SynCD-trained to_k_ip/to_v_ip)."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP-ViT-H-14 from ComfyUI's Load CLIP Vision."),
                io.Image.Input("image", tooltip="The global reference image (upstream: a random reference); one "
                                                "image, or one per latent image."),
                io.Float.Input("weight", default=0.6, min=-1.0, max=5.0, step=0.05,
                               tooltip="IP-Adapter scale of the target (upstream inference: 0.6)."),
                io.Float.Input("reference_weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="IP-Adapter scale inside the SynCD reference pass (upstream: 1.0)."),
                References.Input("references", optional=True,
                                 tooltip="The SynCD references: in the reference pass each gets the feature of its "
                                         "own image, as upstream. Needed with SynCD Apply References."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight, reference_weight,
                references=None) -> io.NodeOutput:
        check_plus_layout(ipadapter)
        size = clip_vision.image_size
        batches = [image, torch.full((1, size, size, 3), GRAY)]
        if references is not None:
            batches.append(references.images)
        tokens = image_tokens(ipadapter, clip_vision, batches)
        patched, _ = apply_ip_adapter(model, ipadapter, tokens[0], tokens[1],
                                      tokens[2] if references is not None else None, weight, reference_weight)
        return io.NodeOutput(patched)

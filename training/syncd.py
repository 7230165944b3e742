"""SynCD customization-model training (Kumari et al., "Generating Multi-Image Synthetic Data for Text-to-Image
Customization", §4.2) for SDXL (the paper's model) and SD1.5, with diffusers.

    python -m comfyui_syncd.training.syncd --config syncd_sdxl.yaml            # one process
    accelerate launch -m comfyui_syncd.training.syncd --config syncd_sdxl.yaml  # GPUs/precision from accelerate
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m comfyui_syncd.training.syncd ...
                                                          # two CPU processes (gloo); ``--cpu`` alone starts one

N processes x ``gradient_accumulation_steps`` A train what one process with accumulation N·A trains: the data and
every random draw follow the global stream of micro-batches, and the logged loss is the global batch's mean.

What is trained (upstream nupurkmr9/syncd ``method/pipelines/sdxl_pipeline/model.py``, ``method/data/data.py``,
``method/train_sdxl.yaml``):

* **Data** (:mod:`comfyui_syncd.core.dataset_format`): per sample one object, 3 of its images (index 0 the target,
  1-2 the references; an object with fewer images is completed with horizontally flipped ones), each randomly
  square-cropped around its mask's bounding box (``crop_padding`` px at least; upstream 200 at ~1 MP) and resized
  to the resolution; masks to the latent grid, dilated ``mask_dilation`` x ``mask_dilation`` (upstream 5).
* **Noise**: v-prediction with ``DDPMScheduler(rescale_betas_zero_snr=True)`` built from the base model's noise
  schedule; t ~ U{0..999}, *the same t for the target and its references*, each with its own noise.
* **Reference features**: an extra UNet pass over the noisy references (their own captions and IP-Adapter image
  embeddings) with the LoRA disabled captures every ``attn1`` input (after norm1), detached.
* **Masked shared attention**: in the target pass, every ``attn1`` attends to [own tokens ‖ the references'
  foreground tokens] (:func:`comfyui_syncd.attention.shared.gather_foreground` /
  :func:`~comfyui_syncd.attention.shared.reference_attention`, as a diffusers attention processor): Q from the
  target, K/V of all of them through the LoRA ``to_k``/``to_v``. Masks are resized (nearest) to each layer's grid;
  with probability ``drop_mask`` (0.1) they are all ones.
* **IP-Adapter Plus**: the pack's :class:`~comfyui_syncd.core.ip_adapter_model.Resampler` (frozen) over CLIP-ViT
  ``hidden_states[-2]`` of a 224 px crop, and per-``attn2`` ``to_k_ip``/``to_v_ip`` (trained, scale 1). The
  target's global image is a random reference. Own processors rather than diffusers' ``IPAdapterAttnProcessor2_0``
  + ``encoder_hid_proj``: the attn1 and attn2 processors share one per-pass state (captured features, masks, image
  tokens), the Resampler is the pack's own (the layout ComfyUI's IP-Adapter nodes load), and the weight names come
  out as upstream's (``attn2.processor.to_k_ip.0.weight``) without depending on diffusers' UNet plumbing.
* **LoRA** (peft, ``unet.add_adapter``): rank 128, alpha 128 on ``attn1.to_q/to_k/to_v/to_out.0``.
* **Condition dropout** (mutually exclusive, per sample): ``drop_both`` / ``drop_image`` / ``drop_text`` 0.05
  each. Text dropout empties every caption of the sample; image dropout feeds zero (gray) pixels to the image
  encoder (the MSA references stay).
* **Loss**: MSE of the target's v prediction only. AdamW, lr 5e-6 constant (upstream: 2 GPUs x batch 1 x
  accumulation 4, 20,100 steps, bf16).

SD1.5 keeps the same options (v-prediction with zero-terminal-SNR betas, LoRA rank 128, IP-Adapter Plus SD1.5 with
its 12-head Resampler): an epsilon SD1.5 base therefore also learns the switch to v-prediction; set
``train.prediction_type: epsilon`` / ``rescale_betas_zero_snr: false`` to keep the base's parameterisation.

Outputs (``output_dir``): ``syncd/NAME.safetensors``, the checkpoint for ComfyUI's ``models/syncd`` and the
*SynCD Checkpoint Loader* node, keys as the official ``sdxl_finetuned_20k.ckpt``:
``unet.<...>.attn1.to_{q,k,v,out.0}.lora_{A,B}.default.weight`` and ``unet.<...>.attn2.processor.to_{k,v}_ip.0
.weight``; ``ip_adapter/NAME.safetensors``, the complete IP-Adapter Plus (``image_proj.*`` + ``ip_adapter.*`` with
the trained to_k_ip/to_v_ip, h94's key layout) for the SynCD IP-Adapter Loader; ``loras/NAME.safetensors``, the
same attn1 LoRA in kohya-ss format (``lora_unet_<module>.lora_down/lora_up.weight`` + ``.alpha``; SD1.5 diffusers
module paths, SDXL LDM paths) for ComfyUI's LoRA loaders (the LoRA alone, without the reference attention).
Per-step losses go to ``losses.jsonl`` (and TensorBoard under ``logs/`` when ``tensorboard`` is installed and
``train.tensorboard`` is on). Checkpoints under ``checkpoints/`` resume automatically. With ``validation.every``
> 0, ``validation/step_NNNNNN.png`` holds samples of upstream's inference (normalized text+image guidance, references
re-noised every step, a reference pass without the LoRA; :mod:`~comfyui_syncd.training.validation`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import sys
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..attention.masks import dilate, resize_to_grid
from ..attention.shared import gather_foreground, reference_attention
from ..core import dataset_format
from ..core.ip_adapter_model import Resampler, check_plus_layout, ip_layers, split_flat_state_dict
from . import checkpoints, config as config_mod, data, loop, models, validation

DEFAULT_RESOLUTION = {"sd15": 512, "sdxl": 1024}
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- config --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelConfig:
    path: str                                           # diffusers folder, or a single-file .safetensors/.ckpt
    family: Literal["auto", "sd15", "sdxl"] = "auto"    # auto: detected from the files
    diffusers_config: Optional[str] = None              # single files: a diffusers folder / Hub id for the configs
    vae: Optional[str] = None                           # a diffusers AutoencoderKL folder replacing the model's
                                                        #   (upstream SDXL: madebyollin/sdxl-vae-fp16-fix)


@dataclasses.dataclass
class IPAdapterConfig:
    image_encoder: str                   # CLIPVisionModelWithProjection folder (IP-Adapter's ViT-H image_encoder)
    path: Optional[str] = None           # IP-Adapter Plus file (ip-adapter-plus_sdxl_vit-h / ip-adapter-plus_sd15);
                                         #   null: a fresh Resampler and to_k_ip/to_v_ip copied from to_k/to_v
    image_size: Optional[int] = None     # encoder input size; null: the encoder's (224)
    resampler_dim: int = 1280            # fresh Resampler only: width (SDXL Plus 1280, SD1.5 Plus 768) ...
    resampler_heads: int = 20            # ... heads of 64 (SDXL 20, SD1.5 12) ...
    resampler_depth: int = 4             # ... layers and ...
    num_queries: int = 16                # ... image tokens


@dataclasses.dataclass
class DataConfig:
    dirs: list[str]                      # dataset folders (core/dataset_format.py layout)
    resolution: Optional[int] = None     # square training size; null: 512 (SD1.5), 1024 (SDXL)
    num_images: int = 3                  # target + references per sample (upstream numref 3)
    crop_padding: int = 200              # random square crop keeps >= this many px around the mask box (upstream)
    mask_dilation: int = 5               # box size of the latent-grid mask dilation (upstream kernel_size 5)
    min_aesthetics: float = 0.0          # upstream filter_aesthetics (0: off; needs *metadata_with_scores.json)
    min_dino: float = 0.0                # upstream filter_dino (0: off)
    drop_text: float = 0.05              # upstream drop_txt
    drop_image: float = 0.05             # upstream drop_im
    drop_both: float = 0.05              # upstream drop_both
    drop_mask: float = 0.1               # upstream drop_mask: all-ones MSA masks
    num_workers: int = 4                 # DataLoader worker processes


@dataclasses.dataclass
class LoraConfig:
    rank: int = 128                      # upstream rank 128
    alpha: float = 128.0                 # upstream alpha 128 (scale alpha/rank = 1)


@dataclasses.dataclass(kw_only=True)
class TrainConfig(config_mod.RunConfig, config_mod.AdamConfig):
    """``train:`` — the shared keys (:class:`~.config.RunConfig`) at upstream's values, and SynCD's own."""
    name: str = "syncd"                  # export file name
    max_steps: int = 20100               # optimizer steps (upstream 20,100)
    gradient_accumulation_steps: int = 4  # upstream 4 (batch_size: objects per micro-batch, upstream 1)
    learning_rate: float = 5.0e-6        # constant (upstream 5e-6)
    prediction_type: Literal["v_prediction", "epsilon"] = "v_prediction"  # upstream v-prediction
    rescale_betas_zero_snr: bool = True  # upstream zero-terminal-SNR betas
    ip_scale: float = 1.0                # IP-Adapter scale in training (upstream 1)
    export_every_checkpoint: bool = True  # also write the ComfyUI files of each checkpoint (NAME_step000500)
    export_dtype: Literal["float32", "float16", "bfloat16"] = "float32"


@dataclasses.dataclass
class SyncdConfig:
    model: ModelConfig
    ip_adapter: IPAdapterConfig
    data: DataConfig
    train: TrainConfig
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    validation: validation.SyncdValidationConfig = dataclasses.field(
        default_factory=validation.SyncdValidationConfig)  # validation grids (off by default; see validation.py)


def check(cfg: SyncdConfig) -> None:
    config_mod.check_train(cfg.train)
    d = cfg.data
    if d.num_images < 2:
        raise config_mod.ConfigError("data.num_images: at least 2 (a target and a reference)")
    if d.drop_text + d.drop_image + d.drop_both > 1 or min(d.drop_text, d.drop_image, d.drop_both, d.drop_mask) < 0:
        raise config_mod.ConfigError("data.drop_*: probabilities in [0, 1]; text + image + both at most 1")
    if d.mask_dilation < 1 or d.mask_dilation % 2 == 0:
        raise config_mod.ConfigError("data.mask_dilation: an odd box size (1: none)")
    if not d.dirs:
        raise config_mod.ConfigError("data.dirs: at least one dataset folder")
    if cfg.lora.rank < 1:
        raise config_mod.ConfigError("lora.rank: at least 1")
    validation.check(cfg.validation)


# --- data ----------------------------------------------------------------------------------------------------

def mask_bbox(mask: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the foreground, or None when there is none (upstream ``mask_to_bbox``)."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    top, bottom = np.where(rows)[0][[0, -1]]
    left, right = np.where(cols)[0][[0, -1]]
    if right <= left or bottom <= top:
        return None
    return int(left), int(top), int(right) + 1, int(bottom) + 1


def random_square_around(bbox, width: int, height: int, padding: int, rng) -> tuple[int, int, int, int]:
    """Upstream's random crop: a box from a random upper-left corner at least ``padding`` px before the mask box
    (clamped to the image) to a random lower-right corner at least ``padding`` px after it, then the square of the
    box's shorter side about its centre (it may reach past the image; the crop pads with black)."""
    l, t, r, b = bbox
    x0 = int(rng.integers(0, max(1, l - padding)))
    y0 = int(rng.integers(0, max(1, t - padding)))
    x1 = int(rng.integers(min(r + padding, width - 1), width))
    y1 = int(rng.integers(min(b + padding, height - 1), height))
    cx, cy = round((x0 + x1) / 2), round((y0 + y1) / 2)
    s = max(1, min(x1 - x0, y1 - y0) // 2)
    return cx - s, cy - s, cx + s, cy + s


def choose_images(n: int, k: int, rng) -> list[int]:
    """``k`` image indices of an object with ``n`` images; ``-(i+1)`` is image i flipped (upstream: without
    replacement from the images, or from images and flipped images when there are fewer than k)."""
    values = list(range(n)) if n >= k else list(range(n)) + [-(i + 1) for i in range(n)]
    if len(values) < k:
        raise ValueError(f"an object with {n} images cannot give {k} (even with flips)")
    return [int(v) for v in rng.choice(values, k, replace=False)]


def global_indices(chosen: list[int], rng) -> list[int]:
    """Whose image feeds each position's IP-Adapter: the target a random reference that is not the target image
    itself (flipped or not), the references themselves (upstream ``global_ref_index``)."""
    target = chosen[0]
    same = {target, -(target + 1)} if target >= 0 else {target, -target - 1}
    others = [j for j in range(1, len(chosen)) if chosen[j] not in same]
    return [int(rng.choice(others)) if others else 1] + list(range(1, len(chosen)))


def load_image(record, i: int):
    """(RGB image, L mask (255 = subject; all 255 without a mask file), caption) of image ``i`` of a dataset object;
    ``-(i+1)`` is image i flipped horizontally (see :func:`choose_images`)."""
    flip = i < 0
    i = -i - 1 if flip else i
    with Image.open(record.images[i]) as im:
        image = im.convert("RGB")
    if record.masks[i] is not None:
        mask = Image.fromarray(dataset_format.load_mask(record.masks[i], image.size).astype(np.uint8) * 255)
    else:
        mask = Image.new("L", image.size, 255)
    if flip:
        image, mask = (x.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for x in (image, mask))
    return image, mask, record.prompts[i]


class SyncdDataset(torch.utils.data.Dataset):
    """Objects of the dataset folders; item ``(index, position)`` draws its images, crops and dropouts from a
    generator seeded with (seed, position), so a resumed run sees the same samples."""

    def __init__(self, objects: list, cfg: DataConfig, resolution: int, image_size: int, seed: int, latent_factor=8):
        self.objects, self.cfg, self.resolution, self.image_size, self.seed = objects, cfg, resolution, image_size, seed
        self.latent = resolution // latent_factor

    def __len__(self):
        return len(self.objects)

    def _load(self, record, i: int):
        return load_image(record, i)

    def _crop(self, image, mask, rng):
        box = mask_bbox(np.asarray(mask) > 0)
        if box is None:
            return image, Image.new("L", image.size, 255)
        crop = random_square_around(box, image.width, image.height, self.cfg.crop_padding, rng)
        return image.crop(crop), mask.crop(crop)

    def __getitem__(self, key):
        index, position = key
        rng = np.random.default_rng([self.seed, position])
        record = self.objects[index]
        chosen = choose_images(len(record.images), self.cfg.num_images, rng)
        glob_idx = global_indices(chosen, rng)
        pixels, refs, masks, prompts, sizes = [], [], [], [], []
        for i in chosen:
            image, mask, prompt = self._load(record, i)
            ref_image, _ = self._crop(image, mask, rng)
            image, mask = self._crop(image, mask, rng)
            sizes.append((image.height, image.width))
            pixels.append(_to_tensor(image.resize((self.resolution,) * 2, Image.Resampling.LANCZOS)))
            refs.append(_to_tensor(ref_image.resize((self.image_size,) * 2, Image.Resampling.LANCZOS)))
            m = mask.resize((self.latent,) * 2, Image.Resampling.LANCZOS)
            masks.append(torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0))
            prompts.append(prompt)
        masks = (torch.stack(masks) > 0).float()
        if self.cfg.mask_dilation > 1:
            masks = dilate(masks, self.cfg.mask_dilation)
        u = rng.uniform()
        c = self.cfg
        drop_both = u < c.drop_both
        drop_image = c.drop_both <= u < c.drop_both + c.drop_image
        drop_text = c.drop_both + c.drop_image <= u < c.drop_both + c.drop_image + c.drop_text
        if drop_text or drop_both:
            prompts = [""] * len(prompts)
        if rng.uniform() < c.drop_mask:
            masks = torch.ones_like(masks)
        refs = torch.stack(refs)[glob_idx]
        if drop_image or drop_both:
            refs = torch.zeros_like(refs)
        return {"pixel_values": torch.stack(pixels), "ref_images": refs, "masks": masks, "prompts": prompts,
                "original_size": sizes, "index": index}


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class PositionBatches(data.StepBatches):
    """:class:`~comfyui_syncd.training.data.StepBatches` yielding ``(index, stream position)`` keys."""

    def __iter__(self):
        m = self.start
        while True:
            first = (m * self.world + self.rank) * self.batch_size
            yield [(self.key(p)[0], p) for p in range(first, first + self.batch_size)]
            m += 1


def collate(examples: list[dict]) -> dict:
    """Samples of n images each, flattened sample-major: rows [s·n, (s+1)·n) are sample s (target first)."""
    out = {k: torch.cat([e[k] for e in examples]) for k in ("pixel_values", "ref_images", "masks")}
    out["prompts"] = [p for e in examples for p in e["prompts"]]
    out["original_size"] = [s for e in examples for s in e["original_size"]]
    out["index"] = [e["index"] for e in examples]
    out["num_images"] = examples[0]["pixel_values"].shape[0]
    return out


# --- attention processors ------------------------------------------------------------------------------------

class PassState:
    """What the processors of one UNet call read: ``mode`` ``"plain"`` (ordinary self-attention), ``"capture"``
    (the reference pass: store each attn1 input) or ``"shared"`` (the target pass: MSA over the captured
    references); ``ip_tokens`` (N, T, C) of the call's rows, or None."""

    def __init__(self):
        self.mode = "plain"
        self.captured: dict[str, torch.Tensor] = {}
        self.ref_masks: Optional[torch.Tensor] = None   # (B·R, h, w) latent-grid masks of the references
        self.refs_per_row = 0
        self.ip_tokens: Optional[torch.Tensor] = None
        self.ip_scale = 1.0
        self.spy = None                                 # tests: spy(name, own, key_input) in shared mode


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _check_attention(attn) -> None:
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None \
            or attn.norm_k is not None or attn.residual_connection:
        raise ValueError("SynCD training supports the SD1.5/SDXL transformer attention layout only")


class SharedSelfAttnProcessor(torch.nn.Module):
    """attn1: plain self-attention, capture of its input (reference pass), or Masked Shared Attention over
    [own tokens ‖ reference foreground tokens] (target pass)."""

    def __init__(self, name: str, state: PassState, grid: tuple[int, int]):
        super().__init__()
        self.name, self.state, self.grid = name, state, grid

    def layer_grid(self, tokens: int) -> tuple[int, int]:
        h, w = self.grid
        f = round(math.sqrt(h * w / tokens))
        gh, gw = -(-h // f), -(-w // f)
        if gh * gw != tokens:
            raise ValueError(f"{self.name}: {tokens} tokens do not fit the latent grid {h}x{w}")
        return gh, gw

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        _check_attention(attn)
        state = self.state
        if state.mode == "capture":
            state.captured[self.name] = hidden_states.detach()
        q = _heads(attn.to_q(hidden_states), attn.heads)
        if state.mode != "shared":
            k, v = _heads(attn.to_k(hidden_states), attn.heads), _heads(attn.to_v(hidden_states), attn.heads)
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            refs = state.captured[self.name]  # (B·R, L, C)
            b, n_own, _ = hidden_states.shape
            r = state.refs_per_row
            fg = resize_to_grid(state.ref_masks, *self.layer_grid(n_own)).to(refs.device)
            out = torch.empty_like(q)
            for row in range(b):
                ref_tokens = gather_foreground(refs[row * r:(row + 1) * r], fg[row * r:(row + 1) * r], token_dim=1)
                key_input = torch.cat([hidden_states[row], ref_tokens.to(hidden_states.dtype)])[None]
                if state.spy is not None:
                    state.spy(self.name, hidden_states[row], key_input[0])
                k, v = _heads(attn.to_k(key_input), attn.heads), _heads(attn.to_v(key_input), attn.heads)
                out[row:row + 1] = reference_attention(q[row:row + 1], k, v, n_own,
                                                       torch.ones(1, dtype=torch.bool, device=q.device))
        out = attn.to_out[1](attn.to_out[0](_merge(out).to(q.dtype)))
        return out / attn.rescale_output_factor


class IPCrossAttnProcessor(torch.nn.Module):
    """attn2: text cross-attention plus ``ip_scale`` x attention over the IP-Adapter image tokens through
    ``to_k_ip``/``to_v_ip`` (IP-Adapter's decoupled cross-attention)."""

    def __init__(self, state: PassState, hidden_size: int, cross_dim: int):
        super().__init__()
        self.state = state
        self.to_k_ip = torch.nn.ModuleList([torch.nn.Linear(cross_dim, hidden_size, bias=False)])
        self.to_v_ip = torch.nn.ModuleList([torch.nn.Linear(cross_dim, hidden_size, bias=False)])

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        _check_attention(attn)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = _heads(attn.to_q(hidden_states), attn.heads)
        k, v = _heads(attn.to_k(context), attn.heads), _heads(attn.to_v(context), attn.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        ip = self.state.ip_tokens
        if ip is not None and self.state.ip_scale != 0:
            ip = ip.to(hidden_states.dtype)
            k_ip = _heads(self.to_k_ip[0](ip), attn.heads)
            v_ip = _heads(self.to_v_ip[0](ip), attn.heads)
            out = out + self.state.ip_scale * F.scaled_dot_product_attention(q, k_ip, v_ip)
        out = attn.to_out[1](attn.to_out[0](_merge(out).to(q.dtype)))
        return out / attn.rescale_output_factor


def install_processors(unet, state: PassState, grid: tuple[int, int], ip_weights=None) -> dict:
    """SynCD processors on every attention of ``unet``; {processor name: IPCrossAttnProcessor}. ``ip_weights``:
    the (to_k_ip, to_v_ip) pairs in processor order, or None to copy to_k/to_v (IP-Adapter's fresh init)."""
    processors, ip = {}, {}
    modules = dict(unet.named_modules())
    attn2 = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    if ip_weights is not None and len(ip_weights) != len(attn2):
        raise ValueError(f"the IP-Adapter has {len(ip_weights)} cross-attention layers, the UNet {len(attn2)}: is it "
                         f"the IP-Adapter Plus of this model family?")
    for name in unet.attn_processors:
        attn = modules[name.removesuffix(".processor")]
        if name.endswith("attn1.processor"):
            processors[name] = SharedSelfAttnProcessor(name.removesuffix(".processor"), state, grid)
        elif name.endswith("attn2.processor"):
            proc = IPCrossAttnProcessor(state, attn.to_k.out_features, attn.to_k.in_features)
            with torch.no_grad():
                k, v = ip_weights[len(ip)] if ip_weights is not None else (attn.to_k.weight, attn.to_v.weight)
                if tuple(k.shape) != tuple(proc.to_k_ip[0].weight.shape):
                    raise ValueError(f"{name}: the IP-Adapter's to_k_ip is {tuple(k.shape)}, this layer needs "
                                     f"{tuple(proc.to_k_ip[0].weight.shape)}")
                proc.to_k_ip[0].weight.copy_(k.float())
                proc.to_v_ip[0].weight.copy_(v.float())
            processors[name] = proc
            ip[name] = proc
        else:
            raise ValueError(f"unexpected attention {name} in the UNet")
    unet.set_attn_processor(processors)
    return ip


# --- the trained model ---------------------------------------------------------------------------------------

def add_lora(unet, rank: int, alpha: float) -> None:
    """peft LoRA (adapter ``default``, diffusers ``add_adapter``) on attn1 q/k/v/out.0 (upstream)."""
    from peft import LoraConfig as PeftLoraConfig

    pattern = r".*\.(" + "|".join(re.escape(t) for t in LORA_TARGETS) + r")"
    unet.add_adapter(PeftLoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=pattern))


class SyncdModel(torch.nn.Module):
    """UNet with LoRA and SynCD processors, the frozen Resampler and image encoder; ``forward`` -> target loss."""

    def __init__(self, parts: models.Parts, image_encoder, resampler: Resampler, state: PassState, scheduler,
                 image_size: int):
        super().__init__()
        self.unet, self.image_encoder, self.resampler = parts.unet, image_encoder, resampler
        self.state, self.scheduler, self.family, self.image_size = state, scheduler, parts.family, image_size
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def image_tokens(self, ref_images: torch.Tensor) -> torch.Tensor:
        """IP-Adapter Plus image tokens of [-1, 1] images: CLIP ``hidden_states[-2]`` -> Resampler."""
        x = F.interpolate(ref_images.float(), size=(self.image_size,) * 2, mode="bilinear", antialias=True) \
            if ref_images.shape[-1] != self.image_size else ref_images.float()
        x = ((x + 1) / 2 - self.clip_mean) / self.clip_std
        enc = self.image_encoder(pixel_values=x.to(next(self.image_encoder.parameters()).dtype),
                                 output_hidden_states=True)
        return self.resampler(enc.hidden_states[-2].float())

    def _unet(self, latents, t, context, pooled, time_ids):
        added = {"text_embeds": pooled, "time_ids": time_ids} if self.family == "sdxl" else None
        return self.unet(latents, t, encoder_hidden_states=context, added_cond_kwargs=added).sample

    @torch.no_grad()
    def reference_pass(self, noisy, t, context, pooled, time_ids, ip_tokens, *,
                       ip_scale: Optional[float] = None) -> dict[str, torch.Tensor]:
        """The references through the UNet with the LoRA disabled; every attn1 input is captured (detached) in
        ``state.captured``, which this returns. ``ip_scale``: the IP-Adapter scale of this pass (None: the
        state's, i.e. the training's)."""
        state = self.state
        state.captured = {}
        saved_scale = state.ip_scale
        self.unet.disable_adapters()
        try:
            state.mode, state.ip_tokens = "capture", ip_tokens
            if ip_scale is not None:
                state.ip_scale = ip_scale
            self._unet(noisy, t, context, pooled, time_ids)
        finally:
            self.unet.enable_adapters()
            state.mode, state.ip_tokens, state.ip_scale = "plain", None, saved_scale
        return state.captured

    def target_pass(self, noisy, t, context, pooled, time_ids, ip_tokens, ref_masks, refs_per_row: int, *,
                    captured: Optional[dict] = None, ip_scale: Optional[float] = None):
        """The target rows' prediction with Masked Shared Attention over the captured references (SynCD eq. 1 as
        upstream's customization model: [own ‖ reference foreground]): row ``b`` sees references
        ``[b·refs_per_row, (b+1)·refs_per_row)`` of ``captured`` (default: what the last reference pass captured)
        through their ``ref_masks`` (latent grid; an all-zero mask row gives plain self-attention). The state is
        cleared afterwards."""
        state = self.state
        saved_scale = state.ip_scale
        try:
            if captured is not None:
                state.captured = captured
            if ip_scale is not None:
                state.ip_scale = ip_scale
            state.mode, state.ip_tokens = "shared", ip_tokens
            state.ref_masks, state.refs_per_row = ref_masks, refs_per_row
            return self._unet(noisy, t, context, pooled, time_ids)
        finally:
            state.mode, state.captured, state.ip_tokens, state.ref_masks = "plain", {}, None, None
            state.ip_scale = saved_scale

    def forward(self, latents, noise, timesteps, context, pooled, time_ids, ip_tokens, masks, n: int):
        """Rows are samples of ``n`` images (target first). ``timesteps`` (B,) per sample."""
        rows = latents.shape[0]
        b = rows // n
        is_target = torch.arange(rows, device=latents.device) % n == 0
        t = timesteps.repeat_interleave(n)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = (self.scheduler.get_velocity(latents, noise, t)
                  if self.scheduler.config.prediction_type == "v_prediction" else noise)[is_target]

        refs = ~is_target
        self.reference_pass(noisy[refs], t[refs], context[refs], _rows(pooled, refs), _rows(time_ids, refs),
                            ip_tokens[refs])
        pred = self.target_pass(noisy[is_target], t[is_target], context[is_target], _rows(pooled, is_target),
                                _rows(time_ids, is_target), ip_tokens[is_target], masks[refs], n - 1)
        assert pred.shape[0] == b
        return F.mse_loss(pred.float(), target.float())


def _rows(x, sel):
    return None if x is None else x[sel]


def load_ip_adapter(cfg: IPAdapterConfig, unet, embedding_dim: int):
    """(Resampler, [(to_k_ip, to_v_ip)] or None) from the IP-Adapter Plus file, or a fresh Resampler."""
    if cfg.path:
        from ..core.weights import read_weights, tensor_dict

        sd, _ = tensor_dict(read_weights(cfg.path), str(cfg.path))
        if not {"image_proj", "ip_adapter"} <= set(sd):
            sd = split_flat_state_dict(sd)
        check_plus_layout(sd)
        resampler = Resampler.from_state_dict(sd["image_proj"])
        if resampler.proj_in.in_features != embedding_dim:
            raise ValueError(f"the IP-Adapter expects image features of width {resampler.proj_in.in_features}, the "
                             f"image encoder gives {embedding_dim}")
        return resampler, ip_layers(sd["ip_adapter"])
    c = cfg
    resampler = Resampler(c.resampler_dim, c.resampler_depth, c.resampler_heads, c.num_queries, embedding_dim,
                          unet.config.cross_attention_dim)
    torch.nn.init.normal_(resampler.latents, std=c.resampler_dim ** -0.5)
    return resampler, None


def time_ids_of(sizes, resolution: int) -> torch.Tensor:
    """SDXL micro-conditioning as upstream feeds it: the crop's size, crop (0, 0), target size."""
    return models.sdxl_time_ids(sizes, [(0, 0)] * len(sizes), resolution)


# --- the run -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run(loop.Run):
    """A prepared run; ``model`` is the SyncdModel."""
    resolution: int
    state: PassState


def noise_scheduler(parts: models.Parts, t: TrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(parts.noise_scheduler.config, prediction_type=t.prediction_type,
                                     rescale_betas_zero_snr=t.rescale_betas_zero_snr)


def prepare(cfg: SyncdConfig, resume="auto") -> Run:
    """Load everything, build the optimizer, resume (``"auto"``: the newest checkpoint of the output dir; a path;
    or None)."""
    from transformers import CLIPVisionModelWithProjection

    check(cfg)
    t = cfg.train
    accelerator = loop.accelerator(t, tensorboard=t.tensorboard and _has_tensorboard())
    parts = models.load(cfg.model.path, cfg.model.family, cfg.model.diffusers_config,
                        prediction_types=("epsilon", "v_prediction"))
    if cfg.model.vae:
        from diffusers import AutoencoderKL

        parts.vae = AutoencoderKL.from_pretrained(cfg.model.vae).float().requires_grad_(False).eval()
    resolution = cfg.data.resolution or DEFAULT_RESOLUTION[parts.family]
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise config_mod.ConfigError(f"data.resolution: a multiple of {factor}")
    objects = []
    for folder in cfg.data.dirs:
        objects += dataset_format.read_dataset(folder, min_aesthetics=cfg.data.min_aesthetics,
                                               min_dino=cfg.data.min_dino)
    if not objects:
        raise ValueError(f"no object with at least two images in {', '.join(cfg.data.dirs)}")
    validation.check_references(cfg.validation, objects, cfg.validation.num_references or cfg.data.num_images - 1)
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(cfg.ip_adapter.image_encoder).float()
    image_encoder.requires_grad_(False).eval()
    image_size = cfg.ip_adapter.image_size or image_encoder.config.image_size
    torch.manual_seed(t.seed)  # a fresh Resampler's init (it is frozen and not checkpointed: resume rebuilds it)
    resampler, ip_weights = load_ip_adapter(cfg.ip_adapter, parts.unet, image_encoder.config.hidden_size)
    resampler.requires_grad_(False).eval()
    unet = parts.unet
    unet.requires_grad_(False)
    state = PassState()
    state.ip_scale = t.ip_scale
    latent = resolution // factor
    install_processors(unet, state, (latent, latent), ip_weights)
    torch.manual_seed(t.seed)  # LoRA init
    add_lora(unet, cfg.lora.rank, cfg.lora.alpha)
    for name, p in unet.named_parameters():
        p.requires_grad_(".lora_" in name or "_ip." in name)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if weight_dtype != torch.float32:
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(weight_dtype)
        for module in (*parts.text_encoders, image_encoder):
            module.to(weight_dtype)
    model = SyncdModel(parts, image_encoder, resampler, state, noise_scheduler(parts, t), image_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  eps=t.adam_epsilon, weight_decay=t.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    parts.vae.to(accelerator.device)
    for enc in parts.text_encoders:
        enc.to(accelerator.device)
    core = accelerator.unwrap_model(model)
    trainable = {name: p for name, p in core.named_parameters() if p.requires_grad}
    checkpoints.register_hooks(accelerator, trainable)
    dataset = SyncdDataset(objects, cfg.data, resolution, image_size, t.seed, factor)
    run = Run(cfg, accelerator, parts, model, optimizer, dataset, trainable, resolution=resolution, state=state)
    return loop.resume(run, resume)


def loader(run: Run):
    return loop.batches(run, PositionBatches, collate)


def _has_tensorboard() -> bool:
    return loop.has_tensorboard()


def validation_grid(run: Run):
    """The validation grid of the current weights (:func:`comfyui_syncd.training.validation.sample_syncd`)."""
    v = run.cfg.validation
    count = v.num_references or run.cfg.data.num_images - 1

    def sample(refs, prompt, gen):
        return validation.sample_syncd(run.core, run.parts, refs, prompt, v, run.resolution, run.accelerator.device,
                                       gen)
    return validation.sample_grid(run, v, sample, count, run.resolution)


def model_inputs(run: Run, batch: dict, gen) -> dict:
    """Frozen encodings and random draws of a micro-batch: latents, noise, timesteps, text, image tokens."""
    acc, parts = run.accelerator, run.parts
    device, vae = acc.device, parts.vae
    n = batch["num_images"]
    with torch.no_grad():
        pixels = batch["pixel_values"].to(device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        context, pooled = models.encode_text(parts, batch["prompts"])
        ip_tokens = run.core.image_tokens(batch["ref_images"].to(device))
    noise = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
    scheduler = run.core.scheduler
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0] // n,), generator=gen,
                              device=device)
    time_ids = time_ids_of(batch["original_size"], run.resolution).to(device) if parts.family == "sdxl" else None
    return {"latents": latents, "noise": noise, "timesteps": timesteps, "context": context.float(),
            "pooled": None if pooled is None else pooled.float(), "time_ids": time_ids, "ip_tokens": ip_tokens,
            "masks": batch["masks"].to(device), "n": n}


def train_step(run: Run, batches) -> float:
    return loop.accumulated_step(run, batches, model_inputs)


def checkpoint_state_dict(run: Run) -> dict[str, torch.Tensor]:
    """The trained tensors under the official SDXL checkpoint's key names (``unet.`` prefix, peft ``.default``).
    The files store no alpha (loaders apply B·A at scale 1), so lora_B carries alpha/rank when that is not 1."""
    scale = run.cfg.lora.alpha / run.cfg.lora.rank
    out = {}
    for name, p in run.core.unet.named_parameters():
        if p.requires_grad:
            value = p.detach().float().cpu()
            out["unet." + name] = (value * scale if ".lora_B." in name and scale != 1 else value).contiguous()
    return out


def kohya_lora_name(module: str, family: str, layers_per_block) -> str:
    """kohya-ss ``lora_unet_*`` name of a diffusers UNet module (``down_blocks.1.attentions.0.transformer_blocks.0
    .attn1.to_q``): SD1.5 files name the diffusers path, SDXL files the LDM/ComfyUI path (``input_blocks.4.1.
    transformer_blocks.0.attn1.to_q``), as kohya's sd-scripts write them; ComfyUI's ``comfy.lora`` maps both."""
    if family == "sdxl":
        module = checkpoints.comfy_unet_key(module + ".weight", layers_per_block)
        module = module.removeprefix("diffusion_model.").removesuffix(".weight")
    return "lora_unet_" + module.replace(".", "_")


def kohya_lora_state_dict(run: Run) -> dict[str, torch.Tensor]:
    """The attn1 LoRA as a kohya-ss LoRA (ComfyUI's *LoraLoaderModelOnly*): per module ``<name>.lora_down.weight``
    (peft lora_A), ``<name>.lora_up.weight`` (lora_B, unscaled) and ``<name>.alpha`` (loaders scale B·A by
    alpha/rank). On its own it gives the LoRA without the masked shared attention over references."""
    unet = run.core.unet
    lpb = unet.config.layers_per_block
    out = {}
    for name, module in unet.named_modules():
        if not name.endswith(LORA_TARGETS) or not hasattr(module, "lora_A"):
            continue
        key = kohya_lora_name(name, run.parts.family, lpb)
        out[f"{key}.lora_down.weight"] = module.lora_A["default"].weight.detach().float().cpu().contiguous()
        out[f"{key}.lora_up.weight"] = module.lora_B["default"].weight.detach().float().cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(run.cfg.lora.alpha))
    return out


def ip_adapter_state_dict(run: Run) -> dict[str, torch.Tensor]:
    """The complete IP-Adapter Plus (flat ``image_proj.*``/``ip_adapter.*``) with the trained to_k_ip/to_v_ip."""
    unet = run.core.unet
    out = {f"image_proj.{k}": v.detach().float().cpu().contiguous() for k, v in run.core.resampler.state_dict().items()}
    for i, (name, proc) in enumerate(unet.attn_processors.items()):
        if isinstance(proc, IPCrossAttnProcessor):
            out[f"ip_adapter.{i}.to_k_ip.weight"] = proc.to_k_ip[0].weight.detach().float().cpu().contiguous()
            out[f"ip_adapter.{i}.to_v_ip.weight"] = proc.to_v_ip[0].weight.detach().float().cpu().contiguous()
    return out


def export(run: Run, suffix: str = "") -> tuple[pathlib.Path, pathlib.Path]:
    """``syncd/NAME{suffix}.safetensors`` (SynCD Checkpoint Loader), ``ip_adapter/NAME{suffix}.safetensors`` and
    ``loras/NAME{suffix}.safetensors`` (kohya LoRA); returns the first two."""
    import safetensors.torch

    cfg = run.cfg
    name = cfg.train.name + suffix
    dtype = getattr(torch, cfg.train.export_dtype)
    meta = {"syncd_method": "syncd", "syncd_step": str(run.step), "syncd_family": run.parts.family,
            "syncd_lora_rank": str(cfg.lora.rank), "syncd_lora_alpha": str(cfg.lora.alpha),
            "syncd_prediction_type": cfg.train.prediction_type,
            "syncd_rescale_betas_zero_snr": str(cfg.train.rescale_betas_zero_snr)}
    ckpt = run.out / "syncd" / f"{name}.safetensors"
    ip = run.out / "ip_adapter" / f"{name}.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ip.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.to(dtype) for k, v in checkpoint_state_dict(run).items()}, str(ckpt), meta)
    safetensors.torch.save_file({k: v.to(dtype) for k, v in ip_adapter_state_dict(run).items()}, str(ip), meta)
    lora = run.out / "loras" / f"{name}.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    kohya_meta = {**meta, "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.lora.rank),
                  "ss_network_alpha": str(cfg.lora.alpha),
                  "ss_base_model_version": "sdxl_base_v1-0" if run.parts.family == "sdxl" else "sd_v1"}
    safetensors.torch.save_file({k: v.to(dtype) for k, v in kohya_lora_state_dict(run).items()}, str(lora),
                                kohya_meta)
    return ckpt, ip


def train(run: Run, progress: bool = True) -> Run:
    """Steps up to ``max_steps`` with the loss log, checkpoints and exports; the final exports."""
    t, acc = run.cfg.train, run.accelerator
    header = (f"SynCD: {run.parts.family}, {acc.num_processes} process(es), {len(run.dataset)} objects, "
              f"{len(run.trainable)} trained tensors, "
              f"learning rate {t.learning_rate:g}, steps {run.step}..{t.max_steps}")

    def final_message(paths) -> str:
        ckpt, ip = paths
        return (f"SynCD checkpoint: {ckpt}\nIP-Adapter: {ip}\nin ComfyUI: copy the checkpoint to models/syncd and "
                f"load it with the SynCD Checkpoint Loader on the base model, with this IP-Adapter connected")

    return loop.train_loop(run, "SynCD", train_step, export, loader=loader, header=header, final_message=final_message,
                           step_exports=t.export_every_checkpoint, trackers="syncd", progress=progress,
                           validation=run.cfg.validation, make_grid=validation_grid)


def main(argv=None) -> int:
    return loop.script_main(argv, "python -m comfyui_syncd.training.syncd", __doc__.split("\n")[0],
                            "YAML or TOML config (see training/configs/syncd_sdxl.yaml)", SyncdConfig, prepare, train,
                            errors=(dataset_format.DatasetFormatError,))


if __name__ == "__main__":
    sys.exit(main())

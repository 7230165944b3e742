"""Validation sampling of the training scripts: a PNG grid every ``validation.every`` steps (and at the last step),
sampled with the model being trained, through the same model code the training step runs.

* **SynCD** (SD1.5/SDXL customization model, :mod:`~comfyui_syncd.training.syncd`): upstream's inference
  (nupurkmr9/syncd ``method/pipelines/sdxl_pipeline/pipeline.py``): every step the references are noised to the
  current timestep with fresh noise, one reference pass with the LoRA off (IP-Adapter scale 1.0) captures their
  attn1 inputs, one target pass (IP-Adapter scale 0.6) runs the three branches of SynCD eq. 4 — unconditional
  (zeroed text, gray IP image, zero MSA mask: no reference access), image (zeroed text, IP, MSA) and full (prompt,
  IP, MSA) — combined by :func:`~comfyui_syncd.attention.guidance.normalized_guidance` with the image scale linear
  over the steps. The references' text is "photo of a {category}" in the full branch and zeroed in the image branch.
* **JeDi** (:mod:`~comfyui_syncd.training.jedi`): the set [references ‖ target] through the widened UNet with coupled
  attention (references: noised to t with fresh noise in the noisy channels, clean latents and mask 1 in the
  reference channels); ε⁰ is the target alone with the empty caption and no reference (zeros, mask 0); JeDi eq. 3
  (:func:`~comfyui_syncd.attention.guidance.jedi_image_guidance`).
* **Flux in-context** (:mod:`~comfyui_syncd.training.flux_incontext`): upstream's canvas, target left of the clean
  references (reset to their clean latents every step), FlowMatch Euler with μ of the whole canvas, the guidance
  embedding ``guidance`` (upstream 3.5), one conditional pass (upstream's defaults true_cfg = image_cfg = 1).

References come from the first ``validation.objects`` objects of the training data (their first images, a square
around the mask), one grid row per object and prompt: the references, then the sample. Sampling noise comes from
its own generator seeded with ``validation.seed``; :func:`run_validation` additionally forks the global RNGs and
puts every module back in the train/eval mode it had, so a run with validation trains exactly what one without
trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import random
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..attention.guidance import brooks_guidance, jedi_image_guidance, linear_image_scale, normalized_guidance
from ..attention.masks import dilate
from . import config as config_mod

FOLDER = "validation"


# --- config --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ValidationConfig:
    every: int = 0                       # a validation grid every N optimizer steps and at the last step (0: off)
    prompts: list[str] = dataclasses.field(default_factory=list)  # "{category}": the object's category;
                                         #   empty: ["a photo of a {category}"]
    objects: int = 1                     # references from the dataset's first N objects (a grid row per object
                                         #   and prompt)
    num_references: Optional[int] = None  # references per object; null: data.num_images - 1 (JeDi: 2)
    steps: int = 50                      # sampling steps
    seed: int = 0                        # initial and per-step noise of the samples (their own generator)


@dataclasses.dataclass
class SyncdValidationConfig(ValidationConfig):
    sampler: Literal["euler_ancestral", "ddim"] = "euler_ancestral"  # upstream EulerAncestral, 50 steps; built
                                         #   from the run's noise schedule (trailing spacing with zero-SNR betas)
    text_scale: float = 7.5              # SynCD eq. 4 text scale (upstream 7.5)
    image_scale_start: float = 8.0       # image scale, linear from start (first step) ... (upstream 8 + 5(1000-t)/1000)
    image_scale_end: float = 13.0        # ... to end (last step)
    ip_scale: float = 0.6                # IP-Adapter scale of the target pass (upstream 0.6)
    reference_ip_scale: float = 1.0      # IP-Adapter scale of the reference pass (upstream 1.0)
    reference_prompt: str = "photo of a {category}"  # the references' text in the full branch (upstream)
    mask_dilation: int = 3               # box dilation of the references' latent-grid masks (upstream inference 3)
    guidance: Literal["normalized", "brooks"] = "normalized"  # SynCD eq. 4 (upstream), or Brooks et al.'s
                                         #   un-normalized combination the paper compares against


@dataclasses.dataclass
class JediValidationConfig(ValidationConfig):
    sampler: Literal["ddim", "euler_ancestral"] = "ddim"  # from the run's noise schedule
    image_scale: float = 3.0             # JeDi eq. 3 λ (the JeDi Image Guider's default)


@dataclasses.dataclass
class FluxValidationConfig(ValidationConfig):
    steps: int = 30                      # FlowMatch Euler steps (upstream 30)
    guidance: float = 3.5                # guidance embedding when sampling (upstream 3.5)


def check(v: ValidationConfig, where: str = "validation") -> None:
    """Config errors of a validation section."""
    if v.every < 0:
        raise config_mod.ConfigError(f"{where}.every: 0 (off) or more")
    if v.steps < 1 or v.objects < 1:
        raise config_mod.ConfigError(f"{where}.steps / objects: at least 1")
    if v.num_references is not None and v.num_references < 1:
        raise config_mod.ConfigError(f"{where}.num_references: at least 1 (or null)")
    if isinstance(v, SyncdValidationConfig) and (v.mask_dilation < 1 or v.mask_dilation % 2 == 0):
        raise config_mod.ConfigError(f"{where}.mask_dilation: an odd box size (1: none)")


def check_references(v: ValidationConfig, objects: list, count: int, where: str = "validation") -> None:
    """Before training: the first ``v.objects`` objects can give ``count`` references each (images and their flips),
    so a misconfigured validation fails at the start, not at its first step."""
    if not v.every:
        return
    for record in objects[:v.objects]:
        if count > 2 * len(record.images):
            raise config_mod.ConfigError(f"{where}.num_references: {count} references need {-(-count // 2)} images "
                                         f"or more per object; {record.object_id} has {len(record.images)}")


def due(v: ValidationConfig, step: int, last: bool) -> bool:
    """Whether ``step`` gets a validation grid: every ``v.every`` steps and the last step (never when 0)."""
    return bool(v.every) and (step % v.every == 0 or last)


# --- references ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class References:
    """One object's validation references: ``pixels`` (R, 3, S, S) in [-1, 1], ``masks`` (R, S, S) 0/1, their
    captions and the object's category."""
    pixels: torch.Tensor
    masks: torch.Tensor
    prompts: list[str]
    category: str


def _square_around(mask: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """The largest square of the image centred on the mask box (clamped inside the image)."""
    from .syncd import mask_bbox

    side = min(width, height)
    box = mask_bbox(mask)
    cx, cy = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) if box else (width / 2, height / 2)
    left = int(min(max(round(cx - side / 2), 0), width - side))
    top = int(min(max(round(cy - side / 2), 0), height - side))
    return left, top, left + side, top + side


def object_references(record, count: int, resolution: int) -> References:
    """The first ``count`` images of a dataset object (then flipped copies, as training completes objects),
    square-cropped around the mask and resized to ``resolution``; masks to the same square."""
    from .syncd import load_image

    order = list(range(len(record.images))) + [-(i + 1) for i in range(len(record.images))]
    if count > len(order):
        raise ValueError(f"validation: an object with {len(record.images)} images cannot give {count} references")
    pixels, masks, prompts = [], [], []
    for i in order[:count]:
        image, mask, prompt = load_image(record, i)
        box = _square_around(np.asarray(mask) > 0, image.width, image.height)
        image = image.crop(box).resize((resolution,) * 2, Image.Resampling.LANCZOS)
        mask = mask.crop(box).resize((resolution,) * 2, Image.Resampling.NEAREST)
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        masks.append(torch.from_numpy((np.asarray(mask) > 0).astype(np.float32)))
        prompts.append(prompt)
    return References(torch.stack(pixels), torch.stack(masks), prompts, record.category)


def prompts_for(v: ValidationConfig, category: str) -> list[str]:
    return [p.replace("{category}", category) for p in (v.prompts or ["a photo of a {category}"])]


def latent_masks(masks: torch.Tensor, size: int, dilation: int) -> torch.Tensor:
    """(R, S, S) pixel masks -> (R, size, size) latent-grid masks: area-downsampled, > 0, dilated."""
    m = (F.interpolate(masks[:, None].float(), size=(size, size), mode="area")[:, 0] > 0).float()
    return dilate(m, dilation) if dilation > 1 else m


def sd_scheduler(train_scheduler, sampler: str):
    """The sampling scheduler of a run from its training noise schedule (betas, prediction type, zero-SNR):
    ``euler_ancestral`` or ``ddim``; trailing timestep spacing with zero-terminal-SNR betas (the first step at
    t = 999, as upstream's terminus configs)."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    cfg = dict(train_scheduler.config)
    spacing = "trailing" if cfg.get("rescale_betas_zero_snr") else cfg.get("timestep_spacing", "leading")
    if sampler == "ddim":
        return DDIMScheduler.from_config(cfg, timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=False)
    return EulerAncestralDiscreteScheduler.from_config(cfg, timestep_spacing=spacing)


def _encode(vae, pixels: torch.Tensor, device) -> torch.Tensor:
    """Deterministic latents (the posterior mean) times the VAE's scaling factor."""
    return vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor


def _decode(vae, latents: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    return vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()


def _train_t(t: torch.Tensor) -> torch.Tensor:
    """A sampling timestep as the training schedule's integer index (Euler's timesteps are floats), shape (1,)."""
    return t.round().long().reshape(1)


def _randn(shape, gen, device) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device)


# --- samplers ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_syncd(core, parts, refs: References, prompt: str, v: SyncdValidationConfig, resolution: int, device,
                 gen: torch.Generator) -> torch.Tensor:
    """One SynCD sample (1, 3, S, S) in [-1, 1] of ``prompt`` with ``refs`` (see the module docstring), through
    ``core`` (:class:`~comfyui_syncd.training.syncd.SyncdModel`)'s reference and target passes."""
    from . import models

    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    size = resolution // factor
    r = refs.pixels.shape[0]
    ref_latents = _encode(parts.vae, refs.pixels, device)
    masks = latent_masks(refs.masks, size, v.mask_dilation).to(device)
    ip_refs = core.image_tokens(refs.pixels.to(device))                       # each reference's own image
    ip_gray = core.image_tokens(torch.zeros_like(refs.pixels[:1]).to(device))  # upstream's zero image in [-1, 1]
    ctx_full, pooled_full = models.encode_text(parts, [prompt])
    ctx_ref, pooled_ref = models.encode_text(parts, [v.reference_prompt.replace("{category}", refs.category)])
    ctx_full, ctx_ref = ctx_full.float().to(device), ctx_ref.float().to(device)
    zeros = torch.zeros_like(ctx_full)                                         # upstream: zeroed empty prompt
    # reference pass rows: [references with zeroed text (image branch) ‖ with the reference prompt (full branch)]
    ref_ctx = torch.cat([zeros.expand(r, -1, -1), ctx_ref.expand(r, -1, -1)])
    # target pass rows: [uncond, image, full]
    tgt_ctx = torch.cat([zeros, zeros, ctx_full])
    ref_pooled = tgt_pooled = ref_time = tgt_time = None
    if parts.family == "sdxl":
        pooled_full, pooled_ref = pooled_full.float().to(device), pooled_ref.float().to(device)
        ref_pooled = torch.cat([torch.zeros_like(pooled_ref).expand(r, -1), pooled_ref.expand(r, -1)])
        tgt_pooled = torch.cat([torch.zeros_like(pooled_full), torch.zeros_like(pooled_full), pooled_full])
        ref_time = models.sdxl_time_ids([(resolution, resolution)] * 2 * r, [(0, 0)] * 2 * r, resolution).to(device)
        tgt_time = models.sdxl_time_ids([(resolution, resolution)] * 3, [(0, 0)] * 3, resolution).to(device)
    global_ip = ip_refs[:1]  # the target's global image: the first reference (upstream: a random one)
    tgt_ip = torch.cat([ip_gray, global_ip, global_ip])
    tgt_masks = torch.cat([torch.zeros_like(masks), masks, masks])  # uncond: zero MSA mask, no reference access
    keep = list(range(r)) + list(range(r)) + list(range(r, 2 * r))  # uncond rows reuse (masked-out) image refs

    scheduler = sd_scheduler(core.scheduler, v.sampler)
    scheduler.set_timesteps(v.steps, device=device)
    x = _randn((1, parts.unet.config.in_channels, size, size), gen, device) * scheduler.init_noise_sigma
    steps = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        noisy = core.scheduler.add_noise(ref_latents, _randn(ref_latents.shape, gen, device), _train_t(t))
        captured = core.reference_pass(torch.cat([noisy, noisy]), t, ref_ctx, ref_pooled, ref_time,
                                       torch.cat([ip_refs, ip_refs]), ip_scale=v.reference_ip_scale)
        x_in = scheduler.scale_model_input(x, t).expand(3, -1, -1, -1)
        pred = core.target_pass(x_in, t, tgt_ctx, tgt_pooled, tgt_time, tgt_ip, tgt_masks, r,
                                captured={k: c[keep] for k, c in captured.items()}, ip_scale=v.ip_scale).float()
        uncond, image, full = pred.chunk(3)
        combine = brooks_guidance if v.guidance == "brooks" else normalized_guidance
        guided = combine(uncond, image, full, linear_image_scale(v.image_scale_start, v.image_scale_end, i, steps),
                         v.text_scale)
        x = scheduler.step(guided, t, x, generator=gen).prev_sample
    return _decode(parts.vae, x)


@torch.no_grad()
def sample_jedi(core, parts, refs: References, prompt: str, v: JediValidationConfig, resolution: int, device,
                gen: torch.Generator) -> torch.Tensor:
    """One JeDi sample (1, 3, S, S): the set [references ‖ target] through ``core``
    (:class:`~comfyui_syncd.training.jedi.JediModel`)'s ``predict`` and JeDi eq. 3 against ε⁰ (the target alone,
    empty caption, no reference)."""
    from . import models

    size = resolution // 2 ** (len(parts.vae.config.block_out_channels) - 1)
    r = refs.pixels.shape[0]
    ref_latents = _encode(parts.vae, refs.pixels, device)
    context = models.encode_text(parts, refs.prompts + [prompt, ""])[0].float().to(device)
    # rows: [references, target | target alone]; sets [r + 1, 1]
    ref_in = torch.cat([ref_latents, ref_latents.new_zeros((2, *ref_latents.shape[1:]))])  # 1 ref: [:2] is 1 row
    ref_mask = torch.tensor([1.0] * r + [0.0, 0.0], device=device)
    scheduler = sd_scheduler(core.scheduler, v.sampler)
    scheduler.set_timesteps(v.steps, device=device)
    x = _randn((1, ref_latents.shape[1], size, size), gen, device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        noisy_refs = core.scheduler.add_noise(ref_latents, _randn(ref_latents.shape, gen, device), _train_t(t))
        x_in = scheduler.scale_model_input(x, t)
        pred = core.predict(torch.cat([noisy_refs, x_in, x_in]), ref_in, ref_mask, t, context, [r + 1, 1]).float()
        guided = jedi_image_guidance(pred[r + 1:], pred[r:r + 1], v.image_scale)
        x = scheduler.step(guided, t, x, generator=gen).prev_sample
    return _decode(parts.vae, x)


@torch.no_grad()
def sample_flux(core, parts, refs: References, prompt: str, v: FluxValidationConfig, resolution: int, device,
                gen: torch.Generator, max_sequence_length: int = 512) -> torch.Tensor:
    """One Flux in-context sample (1, 3, S, S): the canvas [target ‖ clean references] through ``core``
    (:class:`~comfyui_syncd.training.flux_incontext.FluxInContext`)'s ``predict``, FlowMatch Euler (diffusers'
    scheduler with the model's shift line, μ of the whole canvas), only the target's tokens stepped."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from . import flux_incontext as fx

    vae = parts.vae
    refs_latents = _encode(vae, refs.pixels, device)  # scaled without the shift factor, as training (upstream)
    n = refs_latents.shape[0] + 1
    c, h, w = refs_latents.shape[1:]
    text, pooled = fx.encode_text(parts, [prompt], max_sequence_length, device)
    s = parts.shift
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=s["base_shift"],
                                                max_shift=s["max_shift"], base_image_seq_len=s["base_seq_len"],
                                                max_image_seq_len=s["max_seq_len"])
    mu = fx.shift_mu((h // 2) * (n * w // 2), **s)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / v.steps, v.steps).tolist(), mu=mu, device=device)
    x = _randn((1, c, h, w), gen, device)
    keep = fx.target_tokens(h, w, n, device)
    for t in scheduler.timesteps:
        canvas = fx.canvas(torch.cat([x, refs_latents]), n)  # references reset to clean every step
        sigma = (t / scheduler.config.num_train_timesteps).reshape(1).to(device)
        pred = core.predict(canvas, sigma, text, pooled, guidance=v.guidance)[:, keep].float()
        x = scheduler.step(fx.unpack(pred, h, w), t, x).prev_sample
    return _decode(vae, x, shift=getattr(vae.config, "shift_factor", None) or 0.0)  # upstream decodes with +shift


# --- grid, schedule, logging ---------------------------------------------------------------------------------

def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(rows: list[list[np.ndarray]]) -> Image.Image:
    """Rows of (H, W, 3) uint8 tiles of one size as one image (short rows padded black)."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    out = np.zeros((len(rows) * h, cols * w, 3), np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            out[i * h:(i + 1) * h, j * w:(j + 1) * w] = tile
    return Image.fromarray(out)


def sample_grid(run, v: ValidationConfig, sample: Callable, count: int, resolution: int) -> Image.Image:
    """The grid of ``sample(refs, prompt, gen)`` for the first ``v.objects`` objects x prompts: each row the
    references, then the sample; one generator seeded ``v.seed`` for all."""
    objects = run.dataset.objects[:v.objects]
    gen = torch.Generator().manual_seed(v.seed)
    rows = []
    for record in objects:
        refs = object_references(record, count, resolution)
        for prompt in prompts_for(v, refs.category):
            image = sample(refs, prompt, gen)
            rows.append(list(to_uint8(refs.pixels)) + list(to_uint8(image)))
    return grid(rows)


@contextlib.contextmanager
def isolated(modules, device):
    """Eval mode and forked RNGs inside; every module's train/eval mode and the torch (CPU and CUDA device),
    numpy and python RNG states restored afterwards."""
    modes = [(m, m.training) for root in modules for m in root.modules()]
    np_state, py_state = np.random.get_state(), random.getstate()
    cuda = [device.index or 0] if getattr(device, "type", "cpu") == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            for root in modules:
                root.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training
        np.random.set_state(np_state)
        random.setstate(py_state)


def run_validation(run, v: ValidationConfig, make_grid: Callable, tracker=None) -> Optional[pathlib.Path]:
    """``make_grid(run)`` -> ``output_dir/validation/step_NNNNNN.png`` (main process; None elsewhere) and, with a
    TensorBoard ``tracker``, the image ``validation`` at this step. Training state is untouched (:func:`isolated`)."""
    acc = run.accelerator
    if not acc.is_main_process:
        return None
    core = run.core
    frozen = [m for m in vars(run.parts).values() if isinstance(m, torch.nn.Module)]
    frozen += [m for ms in vars(run.parts).values() if isinstance(ms, list) for m in ms
               if isinstance(m, torch.nn.Module)]
    with isolated([core, *frozen], acc.device), torch.no_grad(), acc.autocast():
        image = make_grid(run)
    folder = run.out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{run.step:06d}.png"
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    tmp.replace(path)
    if tracker is not None:
        tracker.log_images({FOLDER: np.asarray(image)[None]}, step=run.step, dataformats="NHWC")
    return path

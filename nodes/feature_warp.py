"""SynCDFeatureWarp (SynCD eq. 2 as a MODEL patch) and SynCDLoadCorrespondences.

**Where the warp happens** (``target: noisy_latents``, upstream). Upstream replaces x_t by its warped version before
the transformer, so the scheduler step that follows starts from the warped state. In ComfyUI the sampler owns x; the
patch is a ``PREDICT_NOISE`` wrapper (``comfy.patcher_extension.WrappersMP``, registered on the model clone), the
outermost per-evaluation hook that still receives the sampler's own tensor: ``KSamplerX0Inpaint`` passes the x the
k-diffusion sampler evaluates the model on unchanged to the guider when there is no noise mask, and ComfyUI's
k-diffusion samplers evaluate the model on their state x at the start of a step (``denoised = model(x, sigmas[i] *
s_in)``) and keep using that same tensor object for the step's update. The wrapper writes the warped values into
that tensor in place, so the model input **and** the sampler's update (Euler's d = (x − x̂₀)/σ, multistep
histories, ancestral noise) see the warped state, exactly as upstream's ``latents = warpcorrespondence(latents)`` before
``scheduler.step(noise_pred, t, latents)``. It runs once per model evaluation whatever the guider (CFG, the pack's
guiders) and however ComfyUI batches cond and uncond (x is shared by all branches, so every branch of a view sees the
same warp). Alternatives considered: returning a corrected x̂₀ is exact only for a known one-step sampler (the
correction depends on the next σ and breaks multistep histories); splitting the sampling around the warped steps in
a ``SAMPLER_SAMPLE`` wrapper changes multistep and SDE samplers (their state and Brownian noise span the whole
schedule). Limits, stated: the warp runs on evaluations at the schedule's sigmas, i.e. at the start of each step
(samplers whose corrector evaluates at σ_{i+1} — heun, heunpp2 — also warp that corrector's temporary input;
dpm_fast/dpm_adaptive never evaluate at the schedule's sigmas and are not warped); with a noise mask (inpainting)
ComfyUI hands the model a blended copy, so the warp reaches the model input but not the state (a warning is
logged).

``target: attention_inputs`` (SynCD eq. 2 as the paper writes it; UNet models): the features entering each
self-attention (q, k and v) are warped at that layer's token grid while σ is above the threshold; x is not touched.

**When**: on evaluations whose σ̂ > ``sigma_threshold`` (0.8 upstream), σ̂ = the model's timestep of σ over its
timestep at σ_max (Flux: σ itself, as upstream's timestep / 1000); the write masks are eroded while σ̂ < 0.9.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import torch
from comfy_api.latest import io

import comfy.patcher_extension
import folder_paths

from ..attention.warp import (ERODE_BELOW, INTERPOLATIONS, UPSTREAM_THRESHOLD, WarpPlan, build_plan,
                              erosion_active, normalized_time, warp_active, warp_latent_batch)
from ..core import correspondence_format
from ..core.correspondence_format import Correspondences, CorrespondenceFormatError
from . import choices, layout, patch_kit

log = logging.getLogger(__name__)

NODE = "SynCD Feature Warp"
KEY = "syncd_feature_warp"
CorrespondencesType = io.Custom("SYNCD_CORRESPONDENCES")
TARGETS = ("noisy_latents", "attention_inputs")
NO_FILE = "(none)"


@dataclasses.dataclass(frozen=True)
class FeatureWarpConfig:
    correspondences: tuple[Correspondences, ...]   # one (shared by every object) or one per object
    images_per_object: int = 3
    sigma_threshold: float = UPSTREAM_THRESHOLD
    alpha: float = 1.0
    interpolation: str = "bicubic"
    erosion: bool = True
    target: str = "noisy_latents"
    anchor_view: int = -1
    fill_from_second_view: bool = True


@dataclasses.dataclass
class WarpRecord:
    """One warp of one sampling run (for users' debugging and the tests)."""
    step: int
    sigma: float
    time: float          # σ̂ compared with the thresholds
    eroded: bool
    written: int         # number of tokens written (all objects, all views)


def as_correspondence_list(value) -> tuple[Correspondences, ...]:
    """A SYNCD_CORRESPONDENCES value: one Correspondences, or a list/tuple of them (one per object)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(c, Correspondences) for c in items):
        raise ValueError(f"{NODE}: 'correspondences' must be SYNCD_CORRESPONDENCES (from SynCD Load "
                         f"Correspondences or the renderer), got {type(value).__name__}")
    for c in items:
        correspondence_format.check(c)
    return tuple(items)


class WarpRun:
    """The state of one sampling run: plans per token grid, what was warped at which step."""

    def __init__(self, config: FeatureWarpConfig, flux: bool):
        self.config = config
        self.flux = flux
        self.records: list[WarpRecord] = []
        self.attention_calls = 0
        self.noise_mask = False
        self._plans: dict = {}
        self._sampling = None
        self._warned: set = set()

    # --- run lifetime (OUTER_SAMPLE) ---
    def start(self, noise, guider) -> None:
        self.records, self.attention_calls, self.noise_mask = [], 0, False
        patcher = getattr(guider, "model_patcher", None)
        self._sampling = patcher.get_model_object("model_sampling") if patcher is not None else None
        if noise.ndim != 4:
            raise ValueError(f"{NODE}: expects image latents (batch, channels, height, width), got shape "
                             f"{tuple(noise.shape)}")
        self.plans_for(noise.shape[0], tuple(noise.shape[-2:]))  # errors (batch size, views) before sampling

    def finish(self) -> None:
        self._sampling = None

    # --- plans ---
    def token_grid(self, latent: tuple[int, int]) -> tuple[int, int]:
        return patch_kit.flux_grid(*latent) if self.flux else latent

    def plans_for(self, batch: int, grid: tuple[int, int], packed_from_latent: bool = True,
                  device=None) -> list[Optional[WarpPlan]]:
        """One plan per object of a latent batch of ``batch`` images (``grid``: the latent size, or a layer's token
        grid with ``packed_from_latent`` False), kept on ``device``."""
        cfg = self.config
        if batch % cfg.images_per_object:
            raise ValueError(f"{NODE}: the latent batch of {batch} images is not a multiple of images_per_object="
                             f"{cfg.images_per_object}; the views of one object are consecutive images of the batch")
        objects = batch // cfg.images_per_object
        corrs = cfg.correspondences
        if len(corrs) not in (1, objects):
            raise ValueError(f"{NODE}: {len(corrs)} correspondence sets for {objects} objects; give one set (shared "
                             f"by every object) or one per object")
        tokens = self.token_grid(grid) if packed_from_latent else grid
        plans = []
        for k in range(objects):
            corr = corrs[k if len(corrs) > 1 else 0]
            if corr.views != cfg.images_per_object:
                raise ValueError(f"{NODE}: the correspondences describe {corr.views} views but images_per_object is "
                                 f"{cfg.images_per_object}; set images_per_object to {corr.views}")
            key = (id(corr), tokens, str(device))
            if key not in self._plans:
                plan = build_plan(corr, tokens, cfg.anchor_view, cfg.fill_from_second_view)
                if not plan.valid and key[:2] not in self._warned:
                    self._warned.add(key[:2])
                    log.warning("%s: object %d: %s", NODE, k, plan.problem)
                self._plans[key] = plan.to(device) if device is not None else plan
            plans.append(self._plans[key])
        return plans

    def time(self, sigma: float) -> float:
        sampling = self._sampling
        if sampling is None:
            return float(sigma)
        s = torch.tensor([float(sigma)])
        return normalized_time(sampling.timestep(s).float().item(),
                               sampling.timestep(torch.tensor([float(sampling.sigma_max)])).float().item())

    # --- target: noisy_latents (PREDICT_NOISE wrapper) ---
    def sampler_sample(self, executor, *args, **kwargs):
        """``SAMPLER_SAMPLE`` wrapper: notes a noise mask, with which ComfyUI evaluates the model on a blended copy
        of the state (the warp then reaches the model input only)."""
        # args: (guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        mask = kwargs.get("denoise_mask", args[6] if len(args) > 6 else None)
        if mask is not None:
            self.noise_mask = True
            log.warning("%s: the latent has a noise mask; ComfyUI then evaluates the model on a blended copy of "
                        "the sampler's state, so the warp changes the model input but not the state (sample "
                        "without a noise mask for the official behaviour)", NODE)
        return executor(*args, **kwargs)

    def predict_noise(self, executor, x, timestep, model_options, seed):
        if self._sampling is None:
            self._sampling = executor.class_obj.model_patcher.get_model_object("model_sampling")
        sigma = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        step = self.schedule_step(sigma, model_options)
        t = self.time(sigma)
        if step is not None and warp_active(t, self.config.sigma_threshold):
            self.warp_state(x, step, sigma, t)
        return executor(x, timestep, model_options, seed)

    @staticmethod
    def schedule_step(sigma: float, model_options: dict) -> Optional[int]:
        """Index of ``sigma`` in the sampling schedule, None for evaluations between the schedule's sigmas."""
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sample_sigmas is None:
            return None
        sample_sigmas = sample_sigmas.float().cpu()
        i = int((sample_sigmas - sigma).abs().argmin())
        return i if abs(float(sample_sigmas[i]) - sigma) <= 1e-5 * max(1.0, abs(sigma)) else None

    def warp_state(self, x: torch.Tensor, step: int, sigma: float, t: float) -> None:
        cfg = self.config
        plans = self.plans_for(x.shape[0], tuple(x.shape[-2:]), device=x.device)
        eroded = cfg.erosion and erosion_active(t)
        with torch.no_grad():
            warped = warp_latent_batch(x, plans, cfg.images_per_object, self.flux, cfg.alpha, cfg.interpolation,
                                       eroded)
            changed = warped != x
            written = int(changed.any(1).sum())
            if written:
                x.copy_(warped)  # the sampler's own state: its update for this step starts from the warped x_t
        self.records.append(WarpRecord(step, sigma, t, eroded, written))

    # --- target: attention_inputs (attn1 patch, UNet) ---
    def attn1_patch(self, n, context, value, extra_options):
        state = patch_kit.forward_state(extra_options)
        sigmas = extra_options.get("sigmas")
        shape = extra_options.get("original_shape")
        if state.phase is patch_kit.Phase.REFERENCE or sigmas is None or shape is None or context is not n:
            return n, context, value
        t = self.time(float(sigmas.max()))
        if not warp_active(t, self.config.sigma_threshold):
            return n, context, value
        grid = layer_grid(tuple(shape[-2:]), n.shape[1])
        chunks = layout.conditioning_chunks(n.shape[0], extra_options)
        latent_batch = n.shape[0] // len(chunks)
        plans = self.plans_for(latent_batch, grid, packed_from_latent=False, device=n.device)
        eroded = self.config.erosion and erosion_active(t)
        b, length, c = n.shape
        feats = n.transpose(1, 2).reshape(b, c, *grid)
        out = feats.clone()
        for _, rows in chunks:
            out[rows] = warp_latent_batch(feats[rows], plans, self.config.images_per_object, False,
                                          self.config.alpha, self.config.interpolation, eroded)
        self.attention_calls += 1
        n = out.reshape(b, c, length).transpose(1, 2)
        return n, n, n


def layer_grid(latent: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The token grid of a UNet layer with ``tokens`` tokens: the latent grid halved (rounding up) until it fits."""
    h, w = latent
    while h * w > tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise RuntimeError(f"{NODE}: a self-attention layer has {tokens} tokens, which is no downsampling of the "
                           f"{latent[0]}x{latent[1]} latent")
    return h, w


def apply_feature_warp(model, config: FeatureWarpConfig):
    """Clone ``model`` and register the warp (see the module docstring); returns (patched model, WarpRun)."""
    if config.interpolation not in INTERPOLATIONS:
        raise ValueError(choices.message(NODE, "interpolation", config.interpolation, INTERPOLATIONS))
    if config.target not in TARGETS:
        raise ValueError(choices.message(NODE, "target", config.target, TARGETS))
    m = model.clone()
    diffusion_model = m.get_model_object("diffusion_model")
    flux = patch_kit.is_flux(diffusion_model)
    if not flux and not hasattr(diffusion_model, "input_blocks"):
        raise ValueError(f"{NODE} supports SD1.5/SDXL-style UNets and Flux; this model is neither "
                         f"({type(diffusion_model).__name__})")
    if m.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY):
        raise ValueError(f"{NODE}: this model already has {NODE} applied; apply it once (with one set of "
                         f"correspondences per object if the batch holds several objects)")
    run = WarpRun(config, flux)
    patch_kit.add_run(m, KEY, run.start, run.finish)
    if config.target == "noisy_latents":
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, KEY, run.sampler_sample)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, KEY, run.predict_noise)
    else:
        if flux:
            raise ValueError(f"{NODE}: target 'attention_inputs' is implemented for UNet models (SD1.5/SDXL); on "
                             f"Flux use 'noisy_latents' (what the official code warps)")
        m.set_model_attn1_patch(run.attn1_patch)
    return m, run


class SynCDFeatureWarp(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDFeatureWarp",
            display_name="SynCD Feature Warp",
            category="SynCD/attention",
            description="SynCD eq. 2 for rigid objects: in the early steps the features of the anchor view are "
                        "sampled at the corresponding points and written into the other views of the same object "
                        "where the surface is visible in both. As the official code, it warps the noisy latents "
                        "(the sampler continues from the warped state). Use with SynCD Masked Shared Attention on the "
                        "same model, and the views of each object as consecutive images of the latent batch.",
            inputs=[
                io.Model.Input("model"),
                CorrespondencesType.Input("correspondences",
                                          tooltip="Cross-view correspondences of the object's views (SynCD Load "
                                                  "Correspondences, or the renderer). One set is used for every "
                                                  "object of the batch; a list gives one set per object."),
                io.Int.Input("images_per_object", default=3, min=2, max=64,
                             tooltip="Views per object: the latent batch is split into consecutive groups of this "
                                     "size, one object each (must equal the correspondences' number of views)."),
                io.Float.Input("sigma_threshold", default=UPSTREAM_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="Warp while the normalized noise level is above this (official code: 0.8; "
                                       "Flux: sigma itself, UNets: timestep / 999). 1 = never."),
                io.Float.Input("alpha", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1 = hard replacement (official code); below 1 blends the warped features "
                                       "into the view's own."),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="bicubic",
                               tooltip="How the anchor is sampled at the corresponding points: bicubic (official "
                                       "code) or bilinear (the paper's text)."),
                io.Boolean.Input("erosion", default=True,
                                 tooltip=f"Erode the write masks (3x3) while the noise level is below {ERODE_BELOW}, "
                                         "as the official code, so borders of the visible region are left alone."),
                io.Combo.Input("target", options=list(TARGETS), default="noisy_latents",
                               tooltip="noisy_latents: warp x_t before the model; the sampler continues from the "
                                       "warped state (official code; UNet and Flux). attention_inputs: warp the "
                                       "features entering every self-attention instead (the paper's eq. 2; UNet "
                                       "models only)."),
                io.Int.Input("anchor_view", default=-1, min=-1, max=63,
                             tooltip="The view whose features are copied: -1 = the last view (official code), else "
                                     "its index within the object."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def validate_inputs(cls, interpolation=None, target=None):
        return choices.check(cls, interpolation=interpolation, target=target)

    @classmethod
    def execute(cls, model, correspondences, images_per_object, sigma_threshold, alpha, interpolation, erosion,
                target, anchor_view) -> io.NodeOutput:
        choices.require(NODE, "interpolation", interpolation, INTERPOLATIONS)
        choices.require(NODE, "target", target, TARGETS)
        corrs = as_correspondence_list(correspondences)
        if anchor_view >= images_per_object:
            raise ValueError(f"{NODE}: anchor_view {anchor_view} does not exist with images_per_object="
                             f"{images_per_object}; use -1 (last view) or 0..{images_per_object - 1}")
        config = FeatureWarpConfig(corrs, images_per_object, sigma_threshold, alpha, interpolation, erosion, target,
                                   anchor_view)
        patched, _ = apply_feature_warp(model, config)
        return io.NodeOutput(patched)


# --- Loading saved correspondences ---------------------------------------------------------------------------------

def correspondence_files() -> list[str]:
    """``.safetensors`` files in ComfyUI's input folder (and its sub-folders), relative paths."""
    base = folder_paths.get_input_directory()
    found = []
    if os.path.isdir(base):
        for root, _, files in os.walk(base):
            for name in files:
                if name.endswith(".safetensors"):
                    found.append(os.path.relpath(os.path.join(root, name), base).replace(os.sep, "/"))
    return sorted(found)


def resolve_file(file: str, path: str) -> str:
    if path and path.strip():
        full = os.path.expanduser(path.strip())
        if not os.path.isfile(full):
            raise ValueError(f"SynCD Load Correspondences: no file {full!r}; give the path of a correspondence "
                             f".safetensors file, or leave 'path' empty and choose one from the input folder")
        return full
    if not file or file == NO_FILE:
        raise ValueError("SynCD Load Correspondences: no file chosen; put the object's correspondence .safetensors "
                         "into ComfyUI's input folder and choose it in 'file', or give 'path'")
    full = os.path.join(folder_paths.get_input_directory(), file)
    if not os.path.isfile(full):
        raise ValueError(f"SynCD Load Correspondences: {file!r} is not in ComfyUI's input folder "
                         f"({folder_paths.get_input_directory()})")
    return full


class SynCDLoadCorrespondences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDLoadCorrespondences",
            display_name="SynCD Load Correspondences",
            category="SynCD/loaders",
            description="Loads the cross-view correspondences of one object (a SynCD correspondence .safetensors, "
                        "as written by the pack's data generation) for SynCD Feature Warp.",
            inputs=[
                io.Combo.Input("file", options=[NO_FILE] + correspondence_files(), default=NO_FILE,
                               tooltip="A correspondence .safetensors in ComfyUI's input folder."),
                io.String.Input("path", default="", optional=True,
                                tooltip="A correspondence file anywhere on disk, instead of 'file'."),
            ],
            outputs=[CorrespondencesType.Output(display_name="correspondences"),
                     io.String.Output(display_name="info")],
        )

    @classmethod
    def validate_inputs(cls, file=None):
        return choices.check(cls, file=file)

    @classmethod
    def fingerprint_inputs(cls, file=None, path=""):
        try:
            full = resolve_file(file, path)
        except ValueError:
            return None
        stat = os.stat(full)
        return f"{full}:{stat.st_mtime_ns}:{stat.st_size}"

    @classmethod
    def execute(cls, file, path="") -> io.NodeOutput:
        full = resolve_file(file, path)
        try:
            corr = correspondence_format.load(full)
        except CorrespondenceFormatError as exc:
            raise ValueError(f"SynCD Load Correspondences: {exc}") from None
        counts = ", ".join(f"({a},{b}): {len(rows)}" for (a, b), rows in sorted(corr.pairs.items()))
        info = f"{corr.views} views on a {corr.size[0]}x{corr.size[1]} grid; matches per pair {counts or 'none'}"
        return io.NodeOutput(corr, info)

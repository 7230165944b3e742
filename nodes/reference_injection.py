"""Reference-feature injection: the SynCD customization model's Masked Shared Attention over reference images.

At every model evaluation an ``APPLY_MODEL`` wrapper makes sure the reference features of the current noise level
exist, running **one** extra forward pass over the references when they do not (upstream runs it once per guidance
branch). The pass is keyed by step and sigma; the cache holds only reference rows, and every target call expands
them to its own rows from its own ``cond_or_uncond`` and shapes, so a layout that changes between or within steps
can never mix them (the FluxKVCache failure, Comfy-Org/ComfyUI#14389, came from caching batch-shaped K/V).

* UNet (SD1.5/SDXL, ``syncd-official-code.md`` §5): references are noised to the current sigma with fresh noise
  every step. An ``attn1_patch`` records each self-attention layer's input (after norm1) in the reference pass; in
  the target pass it appends the references' foreground tokens (mask resized to the layer grid) to the keys/values
  input, so the target's own ``to_k``/``to_v`` (with any LoRA) project them, as upstream. An ``attn1`` replace
  patch lets rows of branches without reference access attend to their own tokens only.
* Flux (the repo's in-context variant, §5): references stay clean and share the target's timestep; their
  post-RoPE keys/values of every attention layer are recorded and moved, by one more rotation of the column axis,
  to positions beside the target (the upstream canvas ``[target | ref 1 | ref 2 …]``). Deviation: upstream runs
  one joint canvas, so references also attend to the target; here the references are computed on their own. The
  references are encoded with ComfyUI's ``process_in`` (scale and shift); upstream Flux training and reference
  encoding skip the shift factor (a quirk, ``syncd-official-code.md`` §7): we keep ComfyUI's latent convention.

``nodes.reference_pass`` tells other patches (the SynCD checkpoint's LoRA, IP-Adapter) that the reference pass is
running; upstream runs it with the SynCD LoRA at scale 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import comfy.ldm.modules.attention
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers

from ..attention.masks import resize_to_grid
from ..attention.rope import shift_axis
from ..attention.shared import gather_foreground, reference_attention
from .layout import check_exclusive, chunk_reference_access, mark_exclusive
from .reference_pass import REFERENCE_INDEX, REFERENCE_PASS, reference_pass
from .references import ReferenceSet
from .shared_attention import (current_step, fall_through, flux_grid, heads_first, in_sigma_window, is_flux,
                               unet_attention_blocks)

PATCH_KEY = "syncd_reference_injection"
STATE = "syncd_reference_state"      # transformer_options: the run serving the current forward pass (or None)
BLOCK = "syncd_reference_block"      # transformer_options (Flux): the block being run, set by dit block patches
ACCESS = "syncd_reference_access"    # transformer_options: (rows,) bool, which rows of this forward see references
NOISE_MODES = ("auto", "noised", "clean")


@dataclass(frozen=True)
class ReferenceConfig:
    references: ReferenceSet
    conditioning: list                 # ComfyUI CONDITIONING of the reference pass, e.g. "photo of a dog"
    noise_mode: str                    # "noised": fresh noise to the current sigma; "clean": x_t = x_0
    seed: int
    sigma_start: float                 # injection while sigma_start >= sigma >= sigma_end
    sigma_end: float


class ReferenceRun:
    """State of one sampling run: the reference features of the current noise level and a pass counter."""

    def __init__(self, config: ReferenceConfig, is_flux: bool):
        self.config = config
        self.is_flux = is_flux
        self.reset()

    def reset(self) -> None:
        self.key = None                   # (step, sigma) of the cached features
        self.features: dict = {}          # layer key -> (R, ..) reference tokens
        self.grids: dict = {}             # layer key -> (h, w) reference token grid
        self.tokens: dict = {}            # (layer, placement) -> gathered foreground tokens of the current features
        self.passes: list[int] = []       # step of every reference pass run (tests count them)
        self._encoded = None              # (device, dtype) -> reference-pass inputs
        self._foreground: dict = {}

    def active(self, transformer_options: dict) -> bool:
        return in_sigma_window(transformer_options, self.config.sigma_start, self.config.sigma_end)

    def foreground(self, grid: tuple[int, int]) -> torch.Tensor:
        """(R, h·w) bool: the references' foreground on a token grid."""
        if grid not in self._foreground:
            self._foreground[grid] = resize_to_grid(self.config.references.masks, *grid)
        return self._foreground[grid]

    # -- the reference pass --------------------------------------------------------------------------------------

    def ensure_features(self, executor, base_model, x: torch.Tensor, sigma: torch.Tensor,
                        transformer_options: dict) -> None:
        step = current_step(transformer_options)
        key = (step, float(sigma[0]))
        if key == self.key:
            return
        latents, kwargs = self._inputs(base_model, x)
        r = latents.shape[0]
        ref_sigma = sigma[:1].expand(r)
        sampling = base_model.model_sampling
        sigmas = ref_sigma.view(-1, 1, 1, 1).to(latents)
        if self.config.noise_mode == "noised":
            generator = torch.Generator().manual_seed((self.config.seed + 1000003 * step) % 2**63)
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
            latents = sampling.noise_scaling(sigmas, noise, latents)
        else:  # clean: undo the model's input scaling (1/√(σ²+σ_data²) for SD; none for Flux) so it sees x₀
            latents = latents / sampling.calculate_input(sigmas, torch.ones_like(sigmas))
        to = {k: v for k, v in transformer_options.items() if k not in (STATE, BLOCK, ACCESS)}
        to.update({"cond_or_uncond": [0], "uuids": [None], "sigmas": ref_sigma, REFERENCE_PASS: True,
                   REFERENCE_INDEX: list(range(r)), STATE: self})
        self.features, self.grids, self.tokens = {}, {}, {}
        with reference_pass():
            executor(latents, ref_sigma, kwargs.get("c_concat"), kwargs.get("c_crossattn"), None, to,
                     **{k: v for k, v in kwargs.items() if k not in ("c_concat", "c_crossattn")})
        self.key = key
        self.passes.append(step)

    def _inputs(self, base_model, x: torch.Tensor):
        """Reference latents in the model's latent space and the reference conditioning as model kwargs."""
        cache_key = (x.device, x.dtype)
        if self._encoded is None or self._encoded[0] != cache_key:
            refs = self.config.references
            if refs.latents.shape[1] != x.shape[1]:
                raise ValueError(f"SynCD Apply References: the references were encoded to {refs.latents.shape[1]} "
                                 f"latent channels but this model samples {x.shape[1]}; connect the VAE of the model "
                                 f"you sample with to SynCD Reference Images")
            latents = base_model.latent_format.process_in(refs.latents.to(x.device, torch.float32))
            conds = comfy.sampler_helpers.convert_cond(self.config.conditioning[:1])
            conds = comfy.samplers.encode_model_conds(base_model.extra_conds, conds, latents, x.device, "positive")
            kwargs = {name: cond.process_cond(batch_size=latents.shape[0], area=None, device=x.device).cond
                      for name, cond in conds[0]["model_conds"].items()}
            kwargs = {k: v.to(x.device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
            self._encoded = (cache_key, latents.to(x.dtype), kwargs)
        return self._encoded[1], self._encoded[2]


def row_access(batch_rows: int, transformer_options: dict, device) -> torch.Tensor:
    """(rows,) bool: which rows of this call may see the references."""
    access = torch.zeros(batch_rows, dtype=torch.bool)
    for ok, rows in chunk_reference_access(batch_rows, transformer_options):
        access[rows] = ok
    return access.to(device)


def make_apply_model_wrapper(run: ReferenceRun) -> Callable:
    """APPLY_MODEL wrapper: once per forward pass, work out which rows see the references (from this call's
    ``cond_or_uncond``/uuids), run the reference pass when needed, and expose both to the attention patches."""
    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        to = transformer_options
        to[STATE] = None
        if not to.get(REFERENCE_PASS) and run.active(to):
            access = row_access(x.shape[0], to, x.device)
            if access.any():
                run.ensure_features(executor, executor.class_obj, x, t, to)
                to[STATE], to[ACCESS] = run, access
                if run.is_flux:
                    to[_FLUX_TARGET] = flux_grid(*x.shape[-2:])
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    return wrapper


# --- UNet ----------------------------------------------------------------------------------------------------

def _layer(extra_options: dict) -> tuple:
    return (*extra_options["block"], extra_options["block_index"])


def make_unet_attn1_patch() -> Callable:
    def attn1_patch(n, context, value, extra_options):
        run: Optional[ReferenceRun] = extra_options.get(STATE)
        if run is None:
            return n, context, value
        layer = _layer(extra_options)
        if extra_options.get(REFERENCE_PASS):
            run.features[layer] = n.detach()
            run.grids[layer] = tuple(extra_options["activations_shape"][-2:])
            return n, context, value
        refs = run.features.get(layer)
        if refs is None or context is not n or value is not n:
            return n, context, value
        if layer not in run.tokens:  # gathered once per reference pass, reused by every target call
            run.tokens[layer] = gather_foreground(refs, run.foreground(run.grids[layer]).to(refs.device))
        tokens = run.tokens[layer]
        if tokens.shape[0] == 0:
            return n, context, value
        joint = torch.cat([n, tokens.to(n.dtype).unsqueeze(0).expand(n.shape[0], -1, -1)], dim=1)
        return n, joint, joint
    return attn1_patch


def make_unet_attn1_replace() -> Callable:
    def attn1(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        if k.shape[1] == q.shape[1]:
            return comfy.ldm.modules.attention.optimized_attention(
                q, k, v, heads, attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options)
        b, lq, _ = q.shape
        out = reference_attention(heads_first(q, heads), heads_first(k, heads), heads_first(v, heads), lq,
                                  extra_options[ACCESS])
        return out.transpose(1, 2).reshape(b, lq, -1)
    return attn1


# --- Flux ----------------------------------------------------------------------------------------------------

_FLUX_TARGET = "syncd_reference_flux_target"   # transformer_options: (grid h, grid w) of the target


def make_flux_override(axes_dim, theta, previous: Optional[Callable]) -> Callable:
    def override(func, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False,
                 transformer_options=None, **kwargs):
        to = transformer_options or {}
        run: Optional[ReferenceRun] = to.get(STATE)
        layer = to.get(BLOCK)
        if run is None or layer is None or not skip_reshape:
            return fall_through(previous, func, q, k, v, heads, mask, skip_reshape, skip_output_reshape, to, kwargs)
        if to.get(REFERENCE_PASS):
            gh, gw = flux_grid(*run.config.references.latents.shape[-2:])
            run.features[layer] = (k[:, :, -gh * gw:].detach(), v[:, :, -gh * gw:].detach())
            run.grids[layer] = (gh, gw)
            return fall_through(previous, func, q, k, v, heads, mask, skip_reshape, skip_output_reshape, to, kwargs)
        if layer not in run.features:
            return fall_through(previous, func, q, k, v, heads, mask, skip_reshape, skip_output_reshape, to, kwargs)
        if mask is not None:
            raise ValueError("SynCD reference injection cannot be combined with a Flux attention mask "
                             "(attention_mask conditioning); remove one of them")
        _, target_w = to[_FLUX_TARGET]
        if (layer, target_w) not in run.tokens:  # once per reference pass and target width
            ref_k, ref_v = run.features[layer]
            fg = run.foreground(run.grids[layer]).to(q.device)
            # References sit side by side right of the target: reference r's columns start at target_w + r·ref_w.
            ref_w = run.grids[layer][1]
            shifted = torch.stack([shift_axis(ref_k[r], target_w + r * ref_w, axes_dim, 2, theta)
                                   for r in range(ref_k.shape[0])])
            run.tokens[(layer, target_w)] = (gather_foreground(shifted, fg, token_dim=2),
                                             gather_foreground(ref_v, fg, token_dim=2))
        tokens_k, tokens_v = run.tokens[(layer, target_w)]
        if tokens_k.shape[1] == 0:  # no reference foreground on this grid: nothing to add
            return fall_through(previous, func, q, k, v, heads, mask, skip_reshape, skip_output_reshape, to, kwargs)
        b, n_own = q.shape[0], k.shape[2]
        k = torch.cat([k, tokens_k.to(k.dtype).unsqueeze(0).expand(b, -1, -1, -1)], dim=2)
        v = torch.cat([v, tokens_v.to(v.dtype).unsqueeze(0).expand(b, -1, -1, -1)], dim=2)
        out = reference_attention(q, k, v, n_own, to[ACCESS])
        if skip_output_reshape:
            return out
        return out.transpose(1, 2).reshape(b, out.shape[2], -1)
    return override


def make_flux_block_marker(layer: tuple, previous: Optional[Callable]) -> Callable:
    """A dit block-replace patch naming the block for the attention override (chaining any earlier patch)."""
    def mark(args, extra):
        to = args.get("transformer_options")
        outer = to.get(BLOCK)
        to[BLOCK] = layer
        try:
            return previous(args, extra) if previous is not None else extra["original_block"](args)
        finally:
            to[BLOCK] = outer
    return mark


# --- Putting it on a model ------------------------------------------------------------------------------------

def apply_reference_injection(model, config: ReferenceConfig):
    """A clone of ``model`` (a ModelPatcher) that injects the references' features, and its run state."""
    check_exclusive(model, PATCH_KEY)
    m = model.clone()
    diffusion_model = m.get_model_object("diffusion_model")
    flux = is_flux(diffusion_model)
    if config.noise_mode == "auto":
        config = ReferenceConfig(**{**config.__dict__, "noise_mode": "clean" if flux else "noised"})
    run = ReferenceRun(config, flux)

    def outer_sample(executor, *args, **kwargs):
        run.reset()  # features of the previous run never leak into this one
        try:
            return executor(*args, **kwargs)
        finally:
            run.features, run.grids, run.tokens = {}, {}, {}

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PATCH_KEY, outer_sample)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY, make_apply_model_wrapper(run))

    if flux:
        existing = dict(m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {}))
        for name, count in (("double_block", len(diffusion_model.double_blocks)),
                            ("single_block", len(diffusion_model.single_blocks))):
            for i in range(count):
                m.set_model_patch_replace(make_flux_block_marker((name, i), existing.get((name, i))), "dit", name, i)
        to = m.model_options["transformer_options"]  # after the replace patches: setting them copies the dict
        params = diffusion_model.params
        to["optimized_attention_override"] = make_flux_override(
            list(params.axes_dim), params.theta, to.get("optimized_attention_override"))
        mark_exclusive(m, PATCH_KEY)
        return m, run

    blocks = unet_attention_blocks(diffusion_model)
    if not blocks:
        raise ValueError("SynCD reference injection supports SD1.5/SDXL-style UNets and Flux; this model has no "
                         "UNet attention blocks")
    taken = m.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {})
    if taken:
        raise ValueError("SynCD reference injection replaces the self-attention of every UNet block, and this model "
                         "already has self-attention replace patches from another node; apply only one of them")
    m.set_model_attn1_patch(make_unet_attn1_patch())
    replace = make_unet_attn1_replace()
    for name, i in blocks:
        m.set_model_attn1_replace(replace, name, i)
    mark_exclusive(m, PATCH_KEY)
    return m, run

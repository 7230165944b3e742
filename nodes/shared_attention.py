"""Masked Shared Attention on a ComfyUI model: the patches behind SynCDSharedAttention.

UNet (SD1.5/SDXL): an ``attn1`` replace patch on every selected transformer
block; in automatic mask mode also an ``attn2`` replace patch that records the
image→subject-token attention. Flux: ``optimized_attention_override`` on the
joint attention, switched on per selected block by ``dit`` block-replace
patches that set a marker. An ``APPLY_MODEL`` wrapper works out, once per
forward pass, the step, whether sharing is on, and (Flux) the text length and
token grid; the attention hooks only read them. An ``OUTER_SAMPLE`` wrapper
validates the batch and starts a fresh :class:`SharedAttentionRun` for every
sampling.

The patch callables are closures over the run, so ``ModelPatcher.clone()``
(which deep-copies ``model_options``) shares them instead of copying state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import comfy.ldm.modules.attention
import comfy.patcher_extension
from comfy.ldm.modules.attention import SpatialTransformer

from ..attention.masks import AutomaticMaskEstimator, resize_to_grid, subject_attention
from ..attention.rope import shift_axis
from ..attention.shared import shared_attention, shared_attention_reference
from .layout import (check_exclusive, check_group_size, chunk_reference_access, conditioning_chunks,
                     latent_batch_size, mark_exclusive, subject_groups)

PATCH_KEY = "syncd_shared_attention"
SHARE_MARKER = "syncd_share"      # transformer_options flag set inside a selected Flux block
ACTIVE = "syncd_share_active"     # transformer_options: sharing is on for this forward pass
FLUX_INFO = "syncd_flux_tokens"   # transformer_options: (text tokens, grid h, grid w) of the Flux call

IMPLEMENTATIONS = {"efficient": shared_attention, "reference": shared_attention_reference}


@dataclass(frozen=True)
class SharedAttentionConfig:
    images_per_subject: int
    mask_mode: str                          # "foreground_masks" | "none" | "automatic"
    sigma_start: float                      # sharing while sigma_start >= sigma >= sigma_end
    sigma_end: float
    unmasked_first_step: bool = True
    implementation: str = "efficient"
    flux_rope_layout: str = "stacked"       # "stacked" (official) | "shared"
    foreground_masks: Optional[torch.Tensor] = None   # (B, H, W), one per latent image
    subject_tokens: tuple[int, ...] = ()    # automatic mode: positions of the subject word in the prompt


class SharedAttentionRun:
    """State of one sampling run: step index, per-grid mask caches and the automatic mask estimate."""

    def __init__(self, config: SharedAttentionConfig, is_flux: bool):
        self.config = config
        self.is_flux = is_flux
        self.reset(None)

    def reset(self, latent_shape: Optional[torch.Size]) -> None:
        self.latent_shape = latent_shape
        self.step = -1
        self._resized: dict = {}
        self.estimator: Optional[AutomaticMaskEstimator] = None
        if latent_shape is not None and self.config.mask_mode == "automatic":
            h, w = latent_shape[-2:]
            self.estimator = AutomaticMaskEstimator(flux_grid(h, w) if self.is_flux else (h, w))

    def validate(self, latent_batch: int) -> None:
        """Errors the user can fix, raised before the first step."""
        cfg = self.config
        check_group_size(latent_batch, cfg.images_per_subject)
        if cfg.mask_mode != "foreground_masks":
            return
        masks = cfg.foreground_masks
        if masks.shape[0] != latent_batch:
            raise ValueError(f"SynCD Masked Shared Attention: foreground_masks holds {masks.shape[0]} masks but the "
                             f"latent batch has {latent_batch} images; give one mask per latent image")
        for start in range(0, latent_batch, cfg.images_per_subject):
            if not (masks[start:start + cfg.images_per_subject] > 0.5).any():
                raise ValueError(f"SynCD Masked Shared Attention: every foreground mask of the subject group of "
                                 f"images {start}..{start + cfg.images_per_subject - 1} is empty, so nothing would "
                                 f"be shared; check the masks (white = subject)")

    def sync(self, transformer_options: dict, x: torch.Tensor) -> None:
        """Track the step from the current sigma (once per forward pass); closing a step updates the automatic
        masks."""
        if self.latent_shape is None:  # sampled without our OUTER_SAMPLE wrapper (e.g. a custom loop)
            self.reset(torch.Size([latent_batch_size(x.shape[0], transformer_options), *x.shape[1:]]))
        step = current_step(transformer_options)
        if step == 0 and self.step > 0:  # a new sampling run that bypassed OUTER_SAMPLE
            self.reset(self.latent_shape)
        if step != self.step:
            if self.estimator is not None and step > self.step:
                self.estimator.finish_step()
            self.step = step

    def active(self, transformer_options: dict) -> bool:
        return in_sigma_window(transformer_options, self.config.sigma_start, self.config.sigma_end)

    def foreground(self, latent_index: int, n: int, grid: tuple[int, int], n_tokens: int) -> Optional[torch.Tensor]:
        """(n, n_tokens) key-side foreground of the group starting at ``latent_index``, or None for full sharing."""
        cfg = self.config
        if cfg.mask_mode == "none" or (cfg.unmasked_first_step and self.step == 0):
            return None
        if cfg.mask_mode == "automatic":
            masks = self.estimator.masks if self.estimator is not None else None
            if masks is None:
                return None  # nothing estimated yet: share everything, as upstream's first step
            key = ("auto", self.step, grid)
        else:
            masks, key = cfg.foreground_masks, ("user", grid)
        if key not in self._resized:
            self._resized = {k: v for k, v in self._resized.items() if k[0] == "user"}
            self._resized[key] = resize_to_grid(masks, *grid)
        fg = self._resized[key][latent_index:latent_index + n]
        if fg.shape[1] < n_tokens:  # tokens beyond the grid (e.g. Flux Kontext references) stay private
            fg = torch.cat([fg, fg.new_zeros(n, n_tokens - fg.shape[1])], dim=1)
        return fg


def current_step(transformer_options: dict) -> int:
    """Index of the current sigma in the sampling schedule (nearest, for samplers evaluating between steps)."""
    sample_sigmas = transformer_options.get("sample_sigmas")
    sigmas = transformer_options.get("sigmas")
    if sample_sigmas is None or sigmas is None:
        return 0
    return int((sample_sigmas.to(sigmas.device).float() - sigmas.float().max()).abs().argmin())


def in_sigma_window(transformer_options: dict, sigma_start: float, sigma_end: float) -> bool:
    """Whether the current sigma lies in a node's start_percent..end_percent window (as sigmas)."""
    sigma = float(transformer_options["sigmas"].max()) if "sigmas" in transformer_options else 0.0
    return sigma_end <= sigma <= sigma_start


def is_flux(diffusion_model) -> bool:
    return hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks")


def flux_grid(h: int, w: int) -> tuple[int, int]:
    """Flux's token grid of an h×w latent: 2×2 patches, padded (``Flux._forward``)."""
    return (h + 1) // 2, (w + 1) // 2


def heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, l, _ = x.shape
    return x.view(b, l, heads, -1).transpose(1, 2)


def share_groups(run: SharedAttentionRun, q, k, v, transformer_options: dict, n_text: int,
                 grid: tuple[int, int], key_shift=None) -> torch.Tensor:
    """Apply the MSA core to every subject group of a (rows, heads, L, D) batch."""
    cfg = run.config
    attend = IMPLEMENTATIONS[cfg.implementation]
    out = torch.empty_like(q)
    n_tokens = q.shape[2] - n_text
    blind = [rows for ok, rows in chunk_reference_access(q.shape[0], transformer_options) if not ok]
    for group in subject_groups(q.shape[0], transformer_options, cfg.images_per_subject):
        r = group.rows
        if any(b.start <= r.start < b.stop for b in blind):  # a guidance branch without coupling (JeDi ε⁰)
            out[r] = torch.nn.functional.scaled_dot_product_attention(q[r], k[r], v[r])
            continue
        fg = run.foreground(group.latent_index, cfg.images_per_subject, grid, n_tokens)
        out[r] = attend(q[r], k[r], v[r], fg, n_text, key_shift)
    return out


# --- UNet ----------------------------------------------------------------------------------------------------

def unet_attention_blocks(diffusion_model) -> list[tuple[str, int]]:
    """(block name, number) of every UNet block holding a SpatialTransformer, as ComfyUI keys replace patches."""
    found = []
    for name, blocks in (("input", diffusion_model.input_blocks), ("output", diffusion_model.output_blocks)):
        for i, block in enumerate(blocks):
            if any(isinstance(m, SpatialTransformer) for m in block.modules()):
                found.append((name, i))
    if any(isinstance(m, SpatialTransformer) for m in diffusion_model.middle_block.modules()):
        found.append(("middle", 0))
    return found


def make_unet_attn1(run: SharedAttentionRun) -> Callable:
    def attn1(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        if not extra_options.get(ACTIVE):
            return comfy.ldm.modules.attention.optimized_attention(
                q, k, v, heads, attn_precision=extra_options.get("attn_precision"))
        _, _, h, w = extra_options["activations_shape"]
        out = share_groups(run, heads_first(q, heads), heads_first(k, heads), heads_first(v, heads),
                           extra_options, 0, (h, w))
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
    return attn1


def make_unet_attn2(run: SharedAttentionRun, previous: dict) -> Callable:
    """Cross-attention unchanged (or the block's earlier attn2 replace patch, e.g. an IP-Adapter); records the
    image→subject-token attention of positive chunks."""
    def attn2(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        _record_subject_attention(run, heads_first(q, heads), heads_first(k, heads), extra_options,
                                  tuple(extra_options["activations_shape"][-2:]))
        block = tuple(extra_options["block"])
        earlier = previous.get((*block, extra_options["block_index"])) or previous.get(block)
        if earlier is not None:
            return earlier(q, k, v, extra_options)
        return comfy.ldm.modules.attention.optimized_attention(
            q, k, v, heads, attn_precision=extra_options.get("attn_precision"))
    return attn2


def _record_subject_attention(run: SharedAttentionRun, image_vectors, text_vectors, transformer_options, grid):
    if run.estimator is None:
        return
    tokens = run.config.subject_tokens
    if max(tokens) >= text_vectors.shape[2]:
        raise ValueError(f"SynCD automatic masks: subject token position {max(tokens)} is beyond the "
                         f"{text_vectors.shape[2]} text tokens of the conditioning; is the prompt the one encoded?")
    for cond_index, rows in conditioning_chunks(image_vectors.shape[0], transformer_options):
        if cond_index == 0:
            maps = subject_attention(image_vectors[rows, :, :grid[0] * grid[1]], text_vectors[rows], tokens)
            run.estimator.add(maps, grid)


# --- Flux ----------------------------------------------------------------------------------------------------

def make_flux_override(run: SharedAttentionRun, axes_dim, theta, previous: Optional[Callable]) -> Callable:
    def override(func, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False,
                 transformer_options=None, **kwargs):
        to = transformer_options or {}
        info = to.get(FLUX_INFO)
        if info is None or not skip_reshape:
            return fall_through(previous, func, q, k, v, heads, mask, skip_reshape, skip_output_reshape, to, kwargs)
        n_text, gh, gw = info
        # Official AttentionStore: text queries × own image keys, softmaxed over the text tokens.
        _record_subject_attention(run, k[:, :, n_text:], q[:, :, :n_text], to, (gh, gw))
        if not to.get(SHARE_MARKER) or not to.get(ACTIVE):
            return fall_through(previous, func, q, k, v, heads, mask, skip_reshape, skip_output_reshape, to, kwargs)
        if mask is not None:
            raise ValueError("SynCD Masked Shared Attention cannot be combined with a Flux attention mask "
                             "(attention_mask conditioning); remove one of them")
        key_shift = None
        if run.config.flux_rope_layout == "stacked":
            def key_shift(keys, slot):
                return shift_axis(keys, slot * gh, axes_dim, 1, theta)
        out = share_groups(run, q, k, v, to, n_text, (gh, gw), key_shift)
        if skip_output_reshape:
            return out
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
    return override


def fall_through(previous, func, q, k, v, heads, mask, skip_reshape, skip_output_reshape, to, kwargs):
    if previous is not None:
        return previous(func, q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, transformer_options=to, **kwargs)
    return func(q, k, v, heads, mask=mask, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                transformer_options=to, **kwargs)


def make_apply_model_wrapper(run: SharedAttentionRun) -> Callable:
    """APPLY_MODEL wrapper (``BaseModel._apply_model(x, t, c_concat, c_crossattn, control, transformer_options)``):
    per forward pass, sync the step and decide whether sharing is on; for Flux also record the text length and
    the 2×2-patch token grid. The attention hooks read these instead of recomputing them on every call."""
    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        to = transformer_options
        run.sync(to, x)
        to[ACTIVE] = run.active(to)
        if run.is_flux:
            to[FLUX_INFO] = (c_crossattn.shape[1], *flux_grid(*x.shape[-2:]))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    return wrapper


def make_flux_block_marker(previous: Optional[Callable]) -> Callable:
    """A dit block-replace patch that switches sharing on inside the block (chaining any earlier patch)."""
    def mark(args, extra):
        to = args.get("transformer_options")
        to[SHARE_MARKER] = True
        try:
            return previous(args, extra) if previous is not None else extra["original_block"](args)
        finally:
            to[SHARE_MARKER] = False
    return mark


# --- Putting it on a model ------------------------------------------------------------------------------------

BLOCK_SELECTOR = re.compile(r"^(input|middle|output|double|single)(?:\.(\d+)(?:-(\d+))?)?$")


def select_blocks(spec: str, available: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Parse the node's ``blocks`` text ('all' or e.g. 'output, middle.0, double.0-9') against the model's blocks."""
    spec = spec.strip().lower()
    if spec in ("", "all"):
        return list(available)
    names = sorted({name for name, _ in available})
    chosen = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = BLOCK_SELECTOR.match(part)
        if not m or m.group(1) not in names:
            raise ValueError(f"SynCD Masked Shared Attention: block selector {part!r} does not match this model; "
                             f"use 'all' or a comma list of {', '.join(names)} with optional .N or .A-B")
        lo = int(m.group(2)) if m.group(2) else None
        hi = int(m.group(3)) if m.group(3) else lo
        picked = [(n, i) for n, i in available if n == m.group(1) and (lo is None or lo <= i <= hi)]
        if not picked:
            numbers = [i for n, i in available if n == m.group(1)]
            raise ValueError(f"SynCD Masked Shared Attention: {part!r} selects no block; {m.group(1)} blocks with "
                             f"attention are {numbers}")
        chosen += [b for b in picked if b not in chosen]
    return chosen


def apply_shared_attention(model, config: SharedAttentionConfig, blocks: str = "all"):
    """A clone of ``model`` (a ModelPatcher) with Masked Shared Attention patched in, and its run state."""
    check_exclusive(model, PATCH_KEY)
    m = model.clone()
    diffusion_model = m.get_model_object("diffusion_model")
    flux = is_flux(diffusion_model)
    run = SharedAttentionRun(config, flux)

    def outer_sample(executor, noise, *args, **kwargs):
        run.validate(noise.shape[0])
        run.reset(noise.shape)  # the state of the previous run never leaks into this one
        return executor(noise, *args, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PATCH_KEY, outer_sample)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY, make_apply_model_wrapper(run))

    if flux:
        available = [("double", i) for i in range(len(diffusion_model.double_blocks))]
        available += [("single", i) for i in range(len(diffusion_model.single_blocks))]
        existing = dict(m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {}))
        for name, i in select_blocks(blocks, available):
            key = (f"{name}_block", i)
            m.set_model_patch_replace(make_flux_block_marker(existing.get(key)), "dit", *key)
        to = m.model_options["transformer_options"]  # after the replace patches: setting them copies the dict
        params = diffusion_model.params
        to["optimized_attention_override"] = make_flux_override(
            run, list(params.axes_dim), params.theta, to.get("optimized_attention_override"))
        mark_exclusive(m, PATCH_KEY)
        return m, run

    available = unet_attention_blocks(diffusion_model)
    if not available:
        raise ValueError("SynCD Masked Shared Attention supports SD1.5/SDXL-style UNets and Flux; this model has "
                         "no UNet attention blocks")
    attn1 = make_unet_attn1(run)
    for name, i in select_blocks(blocks, available):
        m.set_model_attn1_replace(attn1, name, i)
    if config.mask_mode == "automatic":
        previous = dict(m.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {}))
        attn2 = make_unet_attn2(run, previous)
        for key in {(name, i) for name, i in available} | set(previous):  # per-index keys set before win lookup
            m.set_model_patch_replace(attn2, "attn2", *key)
    mark_exclusive(m, PATCH_KEY)
    return m, run

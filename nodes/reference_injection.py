"""Reference-feature injection: the SynCD customization model's Masked Shared Attention over reference images,
built from the patch kit.

At every model evaluation the ``APPLY_MODEL`` wrapper makes sure the reference features of the current noise level
exist, running **one** extra forward pass over the references when they do not (upstream runs it once per guidance
branch). The reference text follows upstream per branch (nupurkmr9/syncd ``method/sample.py``): the full branch's
references see the reference prompt ("photo of a {category}"), the text-free image branch's references see that
branch's own (zeroed or negative) text. Every reference text a step needs is computed in that one pass, batched. The
pass is keyed by step and sigma; the cache holds only reference rows, and every target call expands them to its own
rows from its own ``cond_or_uncond`` and shapes, so a layout that changes between or within steps can never mix them
(the FluxKVCache failure, Comfy-Org/ComfyUI#14389, came from caching batch-shaped K/V).

* UNet (SD1.5/SDXL, ``method/pipelines/sdxl_pipeline/pipeline.py``): references are noised to the current sigma
  with fresh noise every step. An ``attn1_patch`` records each self-attention layer's input (after norm1) in the
  reference pass; in the target pass the ``attn1`` replace patch projects the references' foreground tokens (masks
  binarized, dilated at the latent grid, nearest per layer) with the layer's own ``to_k``/``to_v`` (with any LoRA),
  as upstream, and appends them to the keys/values; rows of branches without reference access attend to their own
  tokens only.
* Flux (the repo's in-context variant, ``method/pipelines/flux_pipeline/``): references stay clean and share the
  target's timestep; their post-RoPE keys/values of every attention layer are recorded and moved, by one more
  rotation of the column axis, to positions beside the target (the upstream canvas ``[target | ref 1 | ref 2 …]``).
  In the unconditional branch the target's image tokens keep to themselves while its text tokens see the references,
  as upstream's block-diagonal negative branch. Deviation: upstream runs one joint canvas, so references also attend
  to the target; here the references are computed on their own. The references are encoded with ComfyUI's
  ``process_in`` (scale and shift); upstream Flux training and reference encoding skip the shift factor: we keep
  ComfyUI's latent convention.
* Qwen-Image (no SynCD model exists; beyond the paper): as Flux — clean references, their keys moved beside the
  target, bridging Qwen-Image's centred RoPE ids — but masked by default (SynCD eq. 1's foreground-only rule, as
  the references act as training-free "other images"). Its text conds cannot be padded to one length, so reference
  texts of different lengths run as separate batches of the step's reference computation.

The target-pass attention is the pack's one self-attention patch (:mod:`self_attention`), shared with SynCD Masked
Shared Attention: on one model the two compose (a subject group then also sees its other images' foreground).

The reference pass runs in :attr:`patch_kit.Phase.REFERENCE`: the SynCD checkpoint's LoRA is off in it (upstream:
LoRA scale 0) and the IP-Adapter gives each reference its own image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

import comfy.sampler_helpers
import comfy.samplers

from ..attention.masks import layer_foreground
from ..attention.rope import shift_axis
from ..attention.shared import gather_foreground
from . import choices
from . import patch_kit as kit
from . import self_attention
from .layout import FULL, IMAGE, UNCOND, chunk_roles
from .references import ReferenceSet

PATCH_KEY = "syncd_reference_injection"
NODE = "SynCD Apply References"
NOISE_MODES = ("auto", "noised", "clean")
REFERENCE_TEXT_MODES = ("per_branch", "reference_prompt")
MASK_USES = ("auto", "on", "off")
REFERENCE, NEGATIVE = kit.REFERENCE_TEXT, kit.NEGATIVE_TEXT


@dataclass(frozen=True)
class ReferenceConfig:
    references: ReferenceSet
    conditioning: list                 # ComfyUI CONDITIONING of the reference pass, e.g. "photo of a dog"
    noise_mode: str                    # "noised": fresh noise to the current sigma; "clean": x_t = x_0
    seed: int
    sigma_start: float                 # injection while sigma_start >= sigma >= sigma_end
    sigma_end: float
    reference_text: str = "per_branch"        # "reference_prompt": one text (the reference prompt) for every branch
    flux_uncond_text_sees_references: bool = True
    use_masks: str = "auto"                   # auto: SD1.5/SDXL/Qwen-Image yes, Flux no (upstream's Flux model)


@dataclass(frozen=True)
class ReferenceView:
    """What one target forward pass sees, worked out once per pass: the run, and per batch row whether it sees the
    references (``access``), whether its text tokens do (``text_access``, Flux's unconditional rows; None: no row)
    and the slot of the reference text whose tokens are appended to its keys (``slots``; rows without access: any,
    their extra keys are unused)."""
    run: "ReferenceRun"
    access: Optional[torch.Tensor] = None       # (B,) bool
    text_access: Optional[torch.Tensor] = None  # (B,) bool
    slots: Optional[torch.Tensor] = None        # (B,) long


class ReferenceRun:
    """State of one sampling run: the reference features of the current noise level and a pass counter."""

    def __init__(self, config: ReferenceConfig, is_flux):
        self.config = config
        self.is_flux = bool(is_flux)  # a joint-attention DiT (Flux, Qwen-Image): clean references beside the target
        self.joint = ("flux" if is_flux is True else is_flux) or None
        self.reset()

    def reset(self) -> None:
        self.key = None                   # (step, sigma) of the cached features
        self.texts: tuple[str, ...] = ()  # reference texts of the cached features, in pass order
        self.features: dict = {}          # layer -> (S·R, ..) reference tokens, S = len(texts)
        self.grids: dict = {}             # layer -> (h, w) reference token grid
        self.tokens: dict = {}            # (layer, placement) -> per-text gathered foreground tokens
        self.outputs: dict = {}           # text -> (R, C, h, w) the references' x − x̂₀ under that text
        self.passes: list[int] = []       # step of every reference pass run (tests count them)
        self._encoded: dict = {}          # (text, device, dtype) -> model kwargs of that text
        self._latents = None              # (device, dtype) -> reference latents after process_in
        self._foreground: dict = {}

    def clear_features(self) -> None:
        self.features, self.grids, self.tokens, self.outputs = {}, {}, {}, {}

    def foreground(self, grid: tuple[int, int]) -> torch.Tensor:
        """(R, h·w) bool: the references' foreground on a token grid (upstream SD: binarized, dilated at the latent
        grid, nearest per layer; upstream Flux: every token, its in-context model attends unmasked)."""
        if grid not in self._foreground:
            refs = self.config.references
            # auto: Flux unmasked (its SynCD model); Qwen-Image has no SynCD model, so eq. 1's foreground-only rule
            if self.config.use_masks == "off" or (self.config.use_masks == "auto" and self.joint == "flux"):
                self._foreground[grid] = torch.ones(len(refs), grid[0] * grid[1], dtype=torch.bool)
            else:
                self._foreground[grid] = layer_foreground(refs.masks, tuple(refs.latents.shape[-2:]),
                                                          refs.mask_dilation, grid)
        return self._foreground[grid]

    # -- which rows see which reference text ---------------------------------------------------------------------

    def text_of(self, role: str, state: kit.ForwardState) -> Optional[str]:
        """The reference text a branch's references are computed with (None: the branch sees no references)."""
        if role == UNCOND:
            return None
        if role == IMAGE and self.config.reference_text == "per_branch" and state.guidance is not None \
                and state.guidance.negative is not None:
            return NEGATIVE
        return REFERENCE

    def uncond_text_of(self, state: kit.ForwardState) -> Optional[str]:
        """Flux with the SynCD guider: the reference text the unconditional branch's text tokens see (upstream: its
        own, negative). JeDi's ε⁰ (no negative handed over) has no reference access at all."""
        if not (self.is_flux and self.config.flux_uncond_text_sees_references) or state.guidance is None \
                or state.guidance.negative is None:
            return None
        return self.text_of(IMAGE, state)

    def texts_needed(self, state: kit.ForwardState) -> tuple[str, ...]:
        """Every reference text this evaluation's branches need (all of them, so one pass serves every chunk)."""
        roles = set(state.guidance.roles.values()) if state.guidance is not None else set()
        wanted = {self.text_of(role, state) for role in roles | {FULL}}
        if UNCOND in roles:
            wanted.add(self.uncond_text_of(state))
        return tuple(t for t in (REFERENCE, NEGATIVE) if t in wanted)

    def view(self, batch_rows: int, to: dict, state: kit.ForwardState, device) -> ReferenceView:
        slots = torch.full((batch_rows,), -1, dtype=torch.long)
        text_slots = torch.full((batch_rows,), -1, dtype=torch.long)
        roles = state.guidance.roles if state.guidance is not None else None
        for role, rows in chunk_roles(batch_rows, to, roles):
            text = self.text_of(role, state)
            if text is not None:
                slots[rows] = self.texts.index(text)
            elif (uncond_text := self.uncond_text_of(state)) is not None:
                text_slots[rows] = self.texts.index(uncond_text)
        text_access = text_slots >= 0
        return ReferenceView(self, (slots >= 0).to(device), text_access.to(device) if text_access.any() else None,
                             torch.where(slots >= 0, slots, text_slots).clamp(min=0).to(device))

    # -- the reference pass --------------------------------------------------------------------------------------

    def on_forward(self, state: kit.ForwardState, executor, x, t, c_concat, c_crossattn, control, to, kwargs):
        """Per target forward pass: run the reference pass when this noise level's features are missing, and tell
        the attention patches which rows see which features."""
        if state.phase is not kit.Phase.TARGET:
            return
        if not kit.in_sigma_window(state.sigma, self.config.sigma_start, self.config.sigma_end):
            return
        roles = state.guidance.roles if state.guidance is not None else None
        chunks = chunk_roles(x.shape[0], to, roles)
        if all(self.text_of(role, state) is None for role, _ in chunks) and self.uncond_text_of(state) is None:
            return  # only branches without reference access in this pass
        self.ensure_features(executor, executor.class_obj, x, t, to, state, self.texts_needed(state))
        state.reference = self.view(x.shape[0], to, state, x.device)
        if state.guidance is not None:
            state.guidance.reference_outputs.update(self.outputs)

    def ensure_features(self, executor, base_model, x: torch.Tensor, sigma: torch.Tensor, to: dict,
                        state: kit.ForwardState, texts: tuple[str, ...]) -> None:
        key = (state.step, float(sigma[0]))
        if key == self.key and set(texts) <= set(self.texts):
            return
        latents = self._reference_latents(base_model, x)
        r = latents.shape[0]
        ref_sigma = sigma[:1].expand(r)
        sampling = base_model.model_sampling
        sigmas = ref_sigma.view(-1, *([1] * (latents.ndim - 1))).to(latents)
        if self.config.noise_mode == "noised":
            generator = torch.Generator().manual_seed((self.config.seed + 1000003 * state.step) % 2**63)
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
            latents = sampling.noise_scaling(sigmas, noise, latents)
        else:  # clean: undo the model's input scaling (1/√(σ²+σ_data²) for SD; none for Flux) so it sees x₀
            latents = latents / sampling.calculate_input(sigmas, torch.ones_like(sigmas))
        self.clear_features()
        self.texts = texts
        per_text = [self._text_kwargs(base_model, text, state, latents) for text in texts]
        collected, outputs = [], {}
        for group in _concatenable(per_text):  # one batch; Qwen-Image texts of different lengths: one batch each
            group_texts = [texts[i] for i in group]
            s = len(group)
            batch = latents.repeat(s, *([1] * (latents.ndim - 1)))
            model_kwargs = comfy.samplers.cond_cat([per_text[i] for i in group])
            model_kwargs = {k: v.to(x.device) if torch.is_tensor(v) else v for k, v in model_kwargs.items()}
            c_concat, c_crossattn = model_kwargs.pop("c_concat", None), model_kwargs.pop("c_crossattn", None)
            pass_sigma = sigma[:1].expand(s * r)
            pass_to = {k: v for k, v in to.items() if k != kit.KEY}
            pass_to.update({"cond_or_uncond": [0], "uuids": [None], "sigmas": pass_sigma,
                            kit.KEY: replace(state, phase=kit.Phase.REFERENCE, guidance=None, owner=None,
                                             sharing=False, shared=None,
                                             reference=ReferenceView(self), reference_rows=tuple(range(r)) * s)})
            kit.begin_forward(pass_to, batch, c_crossattn, self.joint)  # the pass's own token layout
            self.features = {}
            with kit.phase_scope(kit.Phase.REFERENCE):
                out = executor(batch, pass_sigma, c_concat, c_crossattn, None, pass_to, **model_kwargs)
            collected.append(self.features)
            outputs.update({text: (batch[i * r:(i + 1) * r] - out[i * r:(i + 1) * r]).detach()
                            for i, text in enumerate(group_texts)})
        self.features = _join_features(collected)
        self.outputs = outputs
        self.key = key
        self.passes.append(state.step)

    def _reference_latents(self, base_model, x: torch.Tensor) -> torch.Tensor:
        cache_key = (x.device, x.dtype)
        if self._latents is None or self._latents[0] != cache_key:
            refs = self.config.references
            if refs.latents.shape[1] != x.shape[1]:
                raise ValueError(f"{NODE}: the references were encoded to {refs.latents.shape[1]} latent channels "
                                 f"but this model samples {x.shape[1]}; connect the VAE of the model you sample "
                                 f"with to SynCD Reference Images")
            latents = refs.latents.to(x.device, torch.float32)
            while latents.ndim < x.ndim:  # an image VAE's latents for a model sampling (B, C, T, h, w) latents
                latents = latents.unsqueeze(2)
            latents = base_model.latent_format.process_in(latents)
            self._latents = (cache_key, latents.to(x.dtype))
        return self._latents[1]

    def _text_kwargs(self, base_model, text: str, state: kit.ForwardState, latents: torch.Tensor) -> dict:
        """The processed model conds (ComfyUI ``CONDRegular`` objects) of one reference text for the R references."""
        conditioning = self.config.conditioning if text == REFERENCE else state.guidance.negative
        cache_key = (text, id(conditioning), latents.device, latents.dtype)
        if cache_key not in self._encoded:
            conds = comfy.sampler_helpers.convert_cond(conditioning[:1])
            conds = comfy.samplers.encode_model_conds(base_model.extra_conds, conds, latents, latents.device,
                                                      "positive" if text == REFERENCE else "negative")
            self._encoded[cache_key] = {
                name: cond.process_cond(batch_size=latents.shape[0], area=None, device=latents.device)
                for name, cond in conds[0]["model_conds"].items()}
        return self._encoded[cache_key]

    # -- gathered reference tokens, once per reference pass -----------------------------------------------------

    def unet_tokens(self, layer: tuple) -> torch.Tensor:
        """(S, P, C): every reference text's foreground tokens of a UNet layer's recorded inputs."""
        if layer not in self.tokens:
            feats, r = self.features[layer], len(self.config.references)
            fg = self.foreground(self.grids[layer]).to(feats.device)
            self.tokens[layer] = torch.stack([gather_foreground(feats[i * r:(i + 1) * r], fg)
                                              for i in range(len(self.texts))])
        return self.tokens[layer]

    def flux_tokens(self, layer: tuple, target_w: int, axes_dim, theta, target_h: int = 0,
                    centred: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, H, P, D) keys and values: every reference text's foreground tokens of a Flux layer, the keys moved to
        the columns right of a target ``target_w`` tokens wide (reference r starts at column target_w + r·ref_w,
        counted from the target's first column). ``centred`` (Qwen-Image): positions are centred on each grid
        (``-(w // 2)`` first), so the move also bridges the target's and the reference's centring, top rows
        aligned (needs ``target_h``)."""
        cache_key = (layer, target_w, target_h if centred else 0, centred)
        if cache_key not in self.tokens:
            ref_k, ref_v = self.features[layer]
            r = len(self.config.references)
            fg = self.foreground(self.grids[layer]).to(ref_k.device)
            ref_h, ref_w = self.grids[layer]
            col0 = (ref_w // 2 - target_w // 2) if centred else 0  # reference's first column → target's
            row = (ref_h // 2 - target_h // 2) if centred else 0
            keys, values = [], []
            for i in range(len(self.texts)):
                k_i, v_i = ref_k[i * r:(i + 1) * r], ref_v[i * r:(i + 1) * r]
                shifted = []
                for j in range(r):
                    kj = shift_axis(k_i[j], col0 + target_w + j * ref_w, axes_dim, 2, theta)
                    shifted.append(shift_axis(kj, row, axes_dim, 1, theta) if row else kj)
                keys.append(gather_foreground(torch.stack(shifted), fg, token_dim=2))
                values.append(gather_foreground(v_i, fg, token_dim=2))
            self.tokens[cache_key] = (torch.stack(keys), torch.stack(values))
        return self.tokens[cache_key]


def _concatenable(per_text: list[dict]) -> list[list[int]]:
    """Consecutive runs of reference texts whose model conds ComfyUI can batch (``COND.can_concat``): all of them
    for CLIP/T5 (padded cross-attention conds), one each for Qwen-Image texts of different lengths (plain conds)."""
    groups: list[list[int]] = []
    for i, kwargs in enumerate(per_text):
        if groups:
            first = per_text[groups[-1][0]]
            if first.keys() == kwargs.keys() and all(first[k].can_concat(kwargs[k]) for k in kwargs):
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def _join_features(collected: list[dict]) -> dict:
    """The features of several reference batches, in text order, as one batch recorded them (rows text-major)."""
    if len(collected) == 1:
        return collected[0]
    joined = {}
    for layer in collected[0]:
        parts = [features[layer] for features in collected]
        joined[layer] = (tuple(torch.cat(p, 0) for p in zip(*parts)) if isinstance(parts[0], tuple)
                         else torch.cat(parts, 0))
    return joined


# --- UNet ----------------------------------------------------------------------------------------------------

def _layer(extra_options: dict) -> tuple:
    return (*extra_options["block"], extra_options["block_index"])


def make_unet_attn1_patch() -> Callable:
    """Reference pass: record every self-attention layer's input (after norm1), as upstream caches it."""
    def attn1_patch(n, context, value, extra_options):
        state = kit.forward_state(extra_options)
        if state.phase is kit.Phase.REFERENCE and state.reference is not None:
            layer = _layer(extra_options)
            state.reference.run.features[layer] = n.detach()
            state.reference.run.grids[layer] = tuple(extra_options["activations_shape"][-2:])
        return n, context, value
    return attn1_patch


# --- Putting it on a model ------------------------------------------------------------------------------------

def apply_reference_injection(model, config: ReferenceConfig):
    """A clone of ``model`` (a ModelPatcher) that injects the references' features, and its run state."""
    for name, value, options in (("reference_noise", config.noise_mode, NOISE_MODES),
                                 ("reference_text", config.reference_text, REFERENCE_TEXT_MODES),
                                 ("use_masks", config.use_masks, MASK_USES)):
        choices.require(NODE, name, value, options)
    kit.claim_self_attention(model, PATCH_KEY)
    m = model.clone()
    diffusion_model = m.get_model_object("diffusion_model")
    blocks = kit.model_blocks(diffusion_model, NODE)
    flux = kit.joint_family(diffusion_model)  # Flux or Qwen-Image: the in-context path (clean, beside the target)
    if config.noise_mode == "auto":
        config = replace(config, noise_mode="clean" if flux else "noised")
    run = ReferenceRun(config, flux)
    kit.add_run(m, PATCH_KEY, lambda noise, guider: run.reset(), run.clear_features)
    kit.add_conditioning_check(m, NODE)
    kit.add_forward_wrapper(m, PATCH_KEY, run.on_forward)
    if flux:
        self_attention.install_flux(m, diffusion_model)
        return m, run
    self_attention.install_unet(m, kit.unet_self_attentions(diffusion_model), blocks, NODE)
    m.set_model_attn1_patch(make_unet_attn1_patch())
    return m, run

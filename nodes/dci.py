"""DCI dual-branch inference (Jin et al., ECCV 2024 §3.3) on a ComfyUI model: the DBIM patch and the guider.

Inside the window (DDPM timestep fraction t/1000 > 1 − window, as upstream's ``agg_time``) every step runs
  1. the auxiliary pass: the auxiliary latent with the auxiliary prompt (phase AUXILIARY); every text
     cross-attention layer records the auxiliary map a2 and its per-head output O_Pa;
  2. the concept passes, as ComfyUI's CFG runs them (joint or separate, any order): in every cross-attention
     layer the rows of the positive (concept) conditioning blend O_P ← w1·O_P + (1 − w1)·O_Pa
     (``attention/dci.py``); the unconditional rows are left alone.
The auxiliary latent rides in the sampled batch behind the concept latents, from its own noise; its guidance
reuses the concept branch's unconditional prediction (upstream ``share_guidance``), and after the window it is
dropped: no model pass, prediction = itself. UNet: attn2 replace patches (chaining earlier ones such as an
IP-Adapter). Flux (beyond the paper): the joint attention's image-token outputs are blended, with maps from the
image-query × text-key attention softmaxed over the text keys (the analogue of a UNet cross-attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import comfy.model_sampling
import comfy.samplers

from ..attention.dci import attention_probs, blend, concept_weight, spatial_map, token_mass
from ..core.dci_prompt import DualBranchTokens
from . import patch_kit as kit
from .layout import FULL, UNCOND, chunk_roles

PATCH_KEY = "syncd_dci"
CONFIG = "syncd_dci_config"  # model_options: the DCIConfig the guider reads
NODE = "DCI Dual-Branch"


@dataclass(frozen=True)
class DCIConfig:
    tokens: DualBranchTokens
    strength: float                 # λ
    window: float                   # fraction of the 0..1000 timestep range from the start (upstream agg_time)
    token_temperature: float = 10.0
    spatial_temperature: float = 10.0
    gain: float = 500.0
    prompt_tokens: tuple = ()       # both prompts' token ids, to check against the encoded conditionings
    auxiliary_prompt_tokens: tuple = ()


def check_encoded(config: DCIConfig, positive, auxiliary) -> None:
    """Where a conditioning records the token ids it encoded (``kit.ENCODED_TOKENS``: the tiny demo encoding), the
    positive one must be the prompt and the auxiliary one the auxiliary prompt the token sets were built from."""
    for name, conditioning, expected in (("positive", positive, config.prompt_tokens),
                                         ("auxiliary", auxiliary, config.auxiliary_prompt_tokens)):
        encoded = [tuple(extras[kit.ENCODED_TOKENS]) for _, extras in conditioning if kit.ENCODED_TOKENS in extras]
        if expected and encoded and tuple(expected) not in encoded:
            what = "the prompt" if name == "positive" else f"the auxiliary prompt {config.tokens.auxiliary_prompt!r}"
            raise ValueError(f"DCI Guider: the {name} conditioning did not encode {what} that DCI Dual-Branch located "
                             f"the tokens in; encode exactly that text (connect the node's text outputs)")


class DualBranchStep:
    """One evaluation inside the window: per layer the auxiliary branch's (a2, per-head output), then the concept
    weights w1 the concept passes used (for the weight maps)."""

    def __init__(self):
        self.auxiliary: dict = {}
        self.weights: dict = {}     # layer -> (w1 (B, H, N), grid)


def concept_rows(transformer_options: dict, batch: int, state: kit.ForwardState) -> list[int]:
    """Batch rows of the concept (positive) conditioning in this pass: by the uuids ComfyUI lists per chunk, which
    the guider named (``cond_or_uncond`` only counts positions in the list a pass was given)."""
    roles = state.guidance.roles if state.guidance is not None else {}
    return [r for role, rows in chunk_roles(batch, transformer_options, roles) if role == FULL
            for r in range(rows.start, rows.stop)]


def _unet_grid(transformer_options: dict, n: int) -> tuple[int, int]:
    h, w = transformer_options["original_shape"][-2:]
    factor = math.sqrt(h * w / n)
    return round(h / factor), round(w / factor)


def _dbim(config: DCIConfig, step: DualBranchStep, phase, layer, probs, out_heads, grid):
    """Record (auxiliary pass) or blend (concept pass) one layer: ``probs`` (B, H, N, T) and ``out_heads``
    (B, H, N, d) of the image queries of the branch's rows. Returns the blended concept output, or None."""
    t = config.tokens
    if phase is kit.Phase.AUXILIARY:
        mass = token_mass(probs, t.auxiliary.window, t.auxiliary.tokens, config.token_temperature)
        step.auxiliary[layer] = (spatial_map(mass, config.spatial_temperature, config.gain), out_heads)
        return None
    a2, out_auxiliary = step.auxiliary[layer]
    if out_auxiliary.shape[0] != out_heads.shape[0]:
        raise ValueError(f"{NODE}: the auxiliary pass had {out_auxiliary.shape[0]} images but the concept pass "
                         f"{out_heads.shape[0]}; sample with the DCI Guider")
    mass = token_mass(probs, t.concept.window, t.concept.tokens, config.token_temperature)
    w1 = concept_weight(spatial_map(mass, config.spatial_temperature, config.gain), a2, config.strength)
    step.weights[layer] = (w1, grid)
    return blend(out_heads, out_auxiliary, w1)


def make_unet_attn2(config: DCIConfig):
    def handler(q, k, v, extra, call_next):
        out = call_next(q, k, v)
        state = kit.forward_state(extra)
        step = state.dual_branch
        if step is None or state.phase not in (kit.Phase.AUXILIARY, kit.Phase.TARGET):
            return out
        heads = extra["n_heads"]
        layer = (*extra["block"], extra["block_index"])
        rows = concept_rows(extra, q.shape[0], state) if state.phase is kit.Phase.TARGET else list(range(q.shape[0]))
        if state.phase is kit.Phase.TARGET and (not rows or layer not in step.auxiliary):
            return out
        probs = attention_probs(kit.heads_first(q[rows], heads), kit.heads_first(k[rows], heads))
        out_heads = kit.heads_first(out, heads)
        grid = _unet_grid(extra, q.shape[1])
        mixed = _dbim(config, step, state.phase, layer, probs, out_heads[rows], grid)
        if mixed is None:
            return out
        out = out.clone()
        out[rows] = kit.heads_last(mixed).to(out.dtype)
        return out
    return handler


def make_flux_handler(config: DCIConfig):
    def handler(q, k, v, heads, mask, state: kit.ForwardState, to: dict):
        step = state.dual_branch
        if step is None or state.flux_tokens is None or state.phase not in (kit.Phase.AUXILIARY, kit.Phase.TARGET):
            return None
        n_text, gh, gw = state.flux_tokens
        rows = concept_rows(to, q.shape[0], state) if state.phase is kit.Phase.TARGET else list(range(q.shape[0]))
        if state.phase is kit.Phase.TARGET and (not rows or state.block not in step.auxiliary):
            return None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        probs = attention_probs(q[rows, :, n_text:], k[rows, :, :n_text])
        mixed = _dbim(config, step, state.phase, state.block, probs, out[rows, :, n_text:], (gh, gw))
        if mixed is not None:
            out = out.clone()
            out[rows, :, n_text:] = mixed.to(out.dtype)
        return out
    return handler


def apply_dci(model, config: DCIConfig):
    """A clone of ``model`` with DBIM in every text cross-attention layer; sample it with :class:`DCIGuider`."""
    if config.window < 0 or config.window > 1:
        raise ValueError(f"{NODE}: window must be between 0 and 1 (a fraction of the timesteps); got {config.window}")
    m = model.clone()
    diffusion_model = m.get_model_object("diffusion_model")
    if kit.is_flux(diffusion_model):
        kit.mark_flux_blocks(m)
        kit.add_attention_override(m, make_flux_handler(config))
    else:
        kit.add_attn2(m, make_unet_attn2(config), kit.unet_attention_blocks(diffusion_model))
    kit.add_forward_wrapper(m, PATCH_KEY, lambda *args: None)  # every pass gets its ForwardState
    m.model_options[CONFIG] = config
    return m


# --- The guider -----------------------------------------------------------------------------------------------

def _with_state(model_options: dict, state: kit.ForwardState) -> dict:
    options = model_options.copy()
    to = dict(options.get("transformer_options", {}))
    to[kit.KEY] = state
    options["transformer_options"] = to
    return options


def timestep_fraction(model_sampling, sigma: float) -> float:
    """Upstream's t/1000 on the DDPM timestep (t in 0..999); flow models: their timestep over the timestep at
    σ = 1 (σ itself for Flux)."""
    t = float(model_sampling.timestep(torch.tensor([sigma])).item())
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        return t / len(model_sampling.sigmas)
    return t / float(model_sampling.timestep(torch.tensor([1.0])).item())


class DCIGuider(comfy.samplers.CFGGuider):
    """CFG with DCI's auxiliary branch (see the module docstring); ``weight_maps`` keeps, per step in the window,
    the auxiliary branch's weight 1 − w1 averaged over heads and layers, (B, h, w) on the latent grid."""

    def __init__(self, model_patcher, cfg: float):
        super().__init__(model_patcher)
        self.config: DCIConfig | None = model_patcher.model_options.get(CONFIG)
        if self.config is None:
            raise ValueError("DCI Guider: the model is not patched by DCI Dual-Branch; connect that node's MODEL")
        self.set_cfg(cfg)
        self.dual = False
        self.weight_maps: list[torch.Tensor] = []

    def set_conds(self, positive, auxiliary, negative):
        self.inner_set_conds({"positive": positive, "negative": negative, "auxiliary": auxiliary})

    def in_window(self, sigma: float) -> bool:
        return timestep_fraction(self.model_patcher.get_model_object("model_sampling"), sigma) > 1 - self.config.window

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        self.weight_maps = []
        self.dual = any(self.in_window(float(s)) for s in sigmas[:-1])
        if not self.dual:  # an empty window is the plain model
            return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        b = noise.shape[0]
        generator = torch.Generator().manual_seed(((seed or 0) + 1) % 2 ** 63)  # upstream: an independent z_T
        aux_noise = torch.randn(noise.shape, generator=generator).to(noise)
        if denoise_mask is not None and denoise_mask.shape[0] == b:
            denoise_mask = torch.cat([denoise_mask, denoise_mask])
        out = super().sample(torch.cat([noise, aux_noise]), torch.cat([latent_image, latent_image]), sampler, sigmas,
                             denoise_mask, callback, disable_pbar, seed)
        return out[:b]

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive, negative, auxiliary = (self.conds.get(k) for k in ("positive", "negative", "auxiliary"))
        if not self.dual:
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, positive, self.cfg,
                                                    model_options=model_options, seed=seed)
        b = x.shape[0] // 2
        xc, xa = x[:b], x[b:]
        tc, ta = timestep[:b], timestep[b:]
        if not self.in_window(float(timestep.max())):  # after the window the auxiliary branch is dropped
            concept = comfy.samplers.sampling_function(self.inner_model, xc, tc, negative, positive, self.cfg,
                                                       model_options=model_options, seed=seed)
            return torch.cat([concept, xa])
        step = DualBranchStep()
        (aux_out,) = comfy.samplers.calc_cond_batch(
            self.inner_model, [auxiliary], xa, ta,
            _with_state(model_options, kit.ForwardState(phase=kit.Phase.AUXILIARY, dual_branch=step)))
        captured = {}

        def capture(args):
            captured["uncond"] = args["uncond_denoised"]
            return args["denoised"]

        roles = {c["uuid"]: role for role, conds in ((FULL, positive), (UNCOND, negative)) for c in conds or ()}
        options = _with_state(model_options, kit.ForwardState(guidance=kit.GuidanceBranches(roles=roles),
                                                              dual_branch=step))
        options["sampler_post_cfg_function"] = [*options.get("sampler_post_cfg_function", []), capture]
        concept = comfy.samplers.sampling_function(self.inner_model, xc, tc, negative, positive, self.cfg,
                                                   model_options=options, seed=seed)
        aux = aux_out
        uncond = captured.get("uncond")
        if uncond is not None and not math.isclose(self.cfg, 1.0):
            # upstream share_guidance: ε'_a = ε_u + s(ε_a − ε_u) with ε_u the concept latent's unconditional ε
            sigma = ta.view(-1, *([1] * (x.dim() - 1)))
            eps_u, eps_a = (xc - uncond) / sigma, (xa - aux_out) / sigma
            aux = xa - sigma * (eps_u + self.cfg * (eps_a - eps_u))
        self.weight_maps.append(_weight_map(step, xc.shape))
        return torch.cat([concept, aux])


def _weight_map(step: DualBranchStep, latent_shape) -> torch.Tensor:
    """The auxiliary weight 1 − w1, mean over heads, each layer resized to the latent grid, mean over layers."""
    h, w = latent_shape[-2:]
    maps = []
    for w1, grid in step.weights.values():
        aux = (1 - w1.float().mean(1)).view(-1, 1, *grid)
        maps.append(F.interpolate(aux, size=(h, w), mode="bilinear", align_corners=False)[:, 0])
    if not maps:
        return torch.zeros(latent_shape[0], h, w)
    return torch.stack(maps).mean(0).cpu()

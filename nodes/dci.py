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
import comfy.utils

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


def _own_tokens(probs: torch.Tensor, length: int) -> torch.Tensor:
    """Probabilities over the branch's own ``length`` text tokens: ComfyUI repeats a shorter context to the longest
    one of a joint pass (``CONDCrossAttn.concat``), which splits each token's probability over its copies."""
    total = probs.shape[-1]
    if length and total > length and total % length == 0:
        return probs.unflatten(-1, (total // length, length)).sum(-2)
    return probs


def _dbim(config: DCIConfig, step: DualBranchStep, phase, layer, probs, out_heads, grid):
    """Record (auxiliary pass) or blend (concept pass) one layer: ``probs`` (B, H, N, T) and ``out_heads``
    (B, H, N, d) of the image queries of the branch's rows. Returns the blended concept output, or None."""
    t = config.tokens
    if phase is kit.Phase.AUXILIARY:
        probs = _own_tokens(probs, len(config.auxiliary_prompt_tokens))
        mass = token_mass(probs, t.auxiliary.window, t.auxiliary.tokens, config.token_temperature)
        step.auxiliary[layer] = (spatial_map(mass, config.spatial_temperature, config.gain), out_heads)
        return None
    a2, out_auxiliary = step.auxiliary[layer]
    if out_auxiliary.shape[0] != out_heads.shape[0] or a2.shape[-1] != out_heads.shape[-2]:
        raise ValueError(f"{NODE}: the auxiliary pass had {tuple(out_auxiliary.shape[:3])} (images, heads, tokens) "
                         f"but the concept pass {tuple(out_heads.shape[:3])}; sample with the DCI Guider, with one "
                         f"positive and one auxiliary conditioning without areas or masks")
    probs = _own_tokens(probs, len(config.prompt_tokens))
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
        mixed = _dbim(config, step, state.phase, layer, probs, out_heads[rows], _unet_grid(extra, q.shape[1]))
        if mixed is None:
            return out
        out = out.clone()
        out[rows] = kit.heads_last(mixed).to(out.dtype)
        return out
    return handler


def make_flux_handler(config: DCIConfig):
    """Joint attention [text ‖ image (‖ reference latents)]: the image tokens' outputs of the concept rows are
    blended; the maps are the image queries' attention to the text keys, softmaxed over the text keys only."""
    def handler(q, k, v, heads, mask, state: kit.ForwardState, to: dict, call_next):
        step = state.dual_branch
        if step is None or state.flux_tokens is None or state.phase not in (kit.Phase.AUXILIARY, kit.Phase.TARGET):
            return None
        n_text, gh, gw = state.flux_tokens
        image = slice(n_text, n_text + gh * gw)  # not the reference latents (Kontext) that may follow
        rows = concept_rows(to, q.shape[0], state) if state.phase is kit.Phase.TARGET else list(range(q.shape[0]))
        if state.phase is kit.Phase.TARGET and (not rows or state.block not in step.auxiliary):
            return None
        out = call_next()
        scores = q[rows, :, image].float() @ k[rows, :, :n_text].float().transpose(-1, -2) * q.shape[-1] ** -0.5
        if mask is not None:  # an attention_mask conditioning (e.g. Redux attn_bias) biases these scores too
            bias = mask if mask.ndim == 4 else mask.unsqueeze(1)
            scores = scores + bias[rows if bias.shape[0] == q.shape[0] else slice(None), :, image, :n_text].float()
        mixed = _dbim(config, step, state.phase, state.block, scores.softmax(-1), out[rows, :, image], (gh, gw))
        if mixed is None:
            return out
        out = out.clone()
        out[rows, :, image] = mixed.to(out.dtype)
        return out
    return handler


def apply_dci(model, config: DCIConfig):
    """A clone of ``model`` with DBIM in every text cross-attention layer; sample it with :class:`DCIGuider`."""
    if config.window < 0 or config.window > 1:
        raise ValueError(f"{NODE}: window must be between 0 and 1 (a fraction of the timesteps); got {config.window}")
    m = model.clone()
    diffusion_model = m.get_model_object("diffusion_model")
    kit.model_blocks(diffusion_model, NODE)  # names an architecture that is neither a UNet nor Flux
    if kit.is_flux(diffusion_model):
        kit.mark_flux_blocks(m)
        kit.add_attention_override(m, make_flux_handler(config), chained=True)
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


def in_window(model_sampling, sigma: float, window: float) -> bool:
    """Upstream's ``t/1000 > 1 − window`` on the DDPM timestep for discrete-time models (LCM's distilled schedule
    maps to the same 0..999 timesteps); other models: σ above the sigma at ``window`` of the sampling progress."""
    if window <= 0:
        return False
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete) and \
            not isinstance(model_sampling, comfy.model_sampling.StableCascadeSampling):
        return float(model_sampling.timestep(torch.tensor([sigma])).item()) / 1000 > 1 - window
    return sigma > float(model_sampling.percent_to_sigma(window))


def auxiliary_noise(noise: torch.Tensor, seed) -> torch.Tensor:
    """The auxiliary branch's own z_T (upstream: an independent torch.randn): a stream no other seed's noise uses."""
    generator = torch.Generator().manual_seed((int(seed or 0) * 6364136223846793005 + 1442695040888963407) % 2 ** 63)
    return torch.randn(noise.shape, generator=generator, dtype=torch.float32).to(noise)


class DCIGuider(comfy.samplers.CFGGuider):
    """CFG with DCI's auxiliary branch (see the module docstring). ``weight_maps`` keeps one map per sampling step in
    the window (the step's last evaluation): the auxiliary weight 1 − w1, mean over heads and layers, (B, h, w)."""

    def __init__(self, model_patcher, cfg: float):
        super().__init__(model_patcher)
        self.config: DCIConfig | None = model_patcher.model_options.get(CONFIG)
        if self.config is None:
            raise ValueError("DCI Guider: the model is not patched by DCI Dual-Branch; connect that node's MODEL")
        self.set_cfg(cfg)
        self.dual = False
        self.maps_by_step: dict[int, torch.Tensor] = {}

    @property
    def weight_maps(self) -> list[torch.Tensor]:
        return [self.maps_by_step[k] for k in sorted(self.maps_by_step)]

    def set_conds(self, positive, auxiliary, negative):
        self.inner_set_conds({"positive": positive, "negative": negative, "auxiliary": auxiliary})

    def in_window(self, sigma: float) -> bool:
        return in_window(self.model_patcher.get_model_object("model_sampling"), sigma, self.config.window)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        self.maps_by_step = {}
        self.dual = any(self.in_window(float(s)) for s in sigmas[:-1])
        if not self.dual:  # an empty window is the plain model
            return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        b = noise.shape[0]
        latent_image = latent_image.expand(b, *latent_image.shape[1:]) if latent_image.shape[0] == 1 else latent_image
        if denoise_mask is not None:
            denoise_mask = comfy.utils.reshape_mask(denoise_mask, noise.shape)
            denoise_mask = torch.cat([denoise_mask, denoise_mask])

        def concept_callback(step, x0, x, total):  # previews and denoised_output see the concept branch only
            return callback(step, x0[:b], x[:b], total)

        out = super().sample(torch.cat([noise, auxiliary_noise(noise, seed)]), torch.cat([latent_image, latent_image]),
                             sampler, sigmas, denoise_mask, concept_callback if callback else None, disable_pbar,
                             seed)
        return out[:b]

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive, negative, auxiliary = (self.conds.get(k) for k in ("positive", "negative", "auxiliary"))
        if not self.dual:
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, positive, self.cfg,
                                                    model_options=model_options, seed=seed)
        b = x.shape[0] // 2
        xc, xa = x[:b], x[b:]
        tc, ta = timestep[:b], timestep[b:]
        # The caller's post-CFG functions (CFG++ samplers, ...) run once below, on both branches together.
        post_cfg = model_options.get("sampler_post_cfg_function", [])
        captured = {}

        def capture(args):
            captured.update(args)
            return args["denoised"]

        options = {**model_options, "sampler_post_cfg_function": [capture]}
        inside = self.in_window(float(timestep.max()))
        step = DualBranchStep()
        if inside:
            (aux_cond,) = comfy.samplers.calc_cond_batch(
                self.inner_model, [auxiliary], xa, ta,
                _with_state(options, kit.ForwardState(phase=kit.Phase.AUXILIARY, dual_branch=step)))
            roles = {c["uuid"]: role for role, conds in ((FULL, positive), (UNCOND, negative)) for c in conds or ()}
            options = _with_state(options, kit.ForwardState(guidance=kit.GuidanceBranches(roles=roles),
                                                            dual_branch=step))
        concept = comfy.samplers.sampling_function(self.inner_model, xc, tc, negative, positive, self.cfg,
                                                   model_options=options, seed=seed)
        cond_c, uncond_c = captured["cond_denoised"], captured["uncond_denoised"]
        if inside:
            aux_uncond = _shared_uncond(xa, xc, uncond_c) if uncond_c is not None else None
            aux = aux_cond if aux_uncond is None else aux_uncond + self.cfg * (aux_cond - aux_uncond)
            self.maps_by_step[kit.current_step({"sample_sigmas": model_options.get("transformer_options", {})
                                               .get("sample_sigmas"), "sigmas": timestep})] = _weight_map(step, xc.shape)
        else:  # after the window the auxiliary branch is dropped: no model pass, it stays where it is
            aux = aux_cond = aux_uncond = xa
        denoised = torch.cat([concept, aux])
        if post_cfg:
            both = lambda c, a: None if c is None or a is None else torch.cat([c, a])  # noqa: E731
            for fn in post_cfg:
                denoised = fn({"denoised": denoised, "cond": positive, "uncond": negative, "cond_scale": self.cfg,
                               "model": self.inner_model, "uncond_denoised": both(uncond_c, aux_uncond),
                               "cond_denoised": both(cond_c, aux_cond), "sigma": timestep,
                               "model_options": model_options, "input": x})
        return denoised


def _shared_uncond(xa, xc, uncond_c):
    """Upstream ``share_guidance``: the auxiliary branch uses the concept latent's unconditional ε,
    ε'_a = ε_u + s(ε_a − ε_u); as a denoised prediction on the auxiliary latent, x̂_u,a = x_a − σ·ε_u
    = uncond + (x_a − x_c), so CFG on denoised predictions gives exactly that ε'_a (EPS; for V-prediction and flow
    models the same rule on their ε-like quantity (x − x̂)/σ)."""
    return uncond_c + (xa - xc)


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

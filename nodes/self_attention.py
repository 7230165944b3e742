"""The pack's one self-attention patch, shared by SynCD Masked Shared Attention and SynCD Apply References.

Both nodes change the self-attention, so both install this same patch; it reads, per forward pass, what each of
them put in the :class:`patch_kit.ForwardState`: ``state.shared`` (the Masked Shared Attention run, with
``state.sharing`` saying whether sharing is on in this pass) and ``state.reference`` (the reference features this
pass sees). Applied alone, each behaves as it always did; applied together (in either order) a subject group of
the latent batch shares attention among itself *and* sees the user's references: every image attends to
``[own ‖ the group's other images' foreground ‖ the references' foreground]`` (SynCD eq. 1 with the customization
model's references as further, one-way "other images"; :func:`attention.shared.shared_reference_attention`).

Branches keep their meaning (``layout`` roles from the pack's guiders): the unconditional branch sees neither the
other images nor the references (on Flux its text tokens may still see the references, upstream's block-diagonal
negative branch: ``flux_uncond_text_sees_references``); the image and full branches see both.

UNet (SD1.5/SDXL): one ``attn1`` replace patch, set by whichever node comes second on the union of both nodes'
blocks. Flux: one ``optimized_attention_override`` handler per model (a flag in ``transformer_options`` keeps the
second node from chaining a duplicate); Qwen-Image, whose blocks attend jointly over [text ‖ image] as Flux's
double blocks do, gets the same handler, with its centred RoPE positions).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..attention.shared import reference_attention
from . import patch_kit as kit

SELF_ATTENTION_PATCH = "syncd_self_attention"  # attribute of our attn1 replace; flag in transformer_options (Flux)


def _layer(extra_options: dict) -> tuple:
    return (*extra_options["block"], extra_options["block_index"])


class References:
    """Per-row reference keys/values (heads first) of one attention call and which rows see them."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, access: torch.Tensor,
                 text_access: Optional[torch.Tensor] = None):
        self.k, self.v, self.access, self.text_access = k, v, access, text_access  # (B, H, T, D), (B,) bool

    def blind(self, q, k, v, rows: slice, n_text: int) -> torch.Tensor:
        """Rows of a branch without reference access: their own tokens (Flux text tokens with ``text_access``:
        also the references), as :func:`reference_attention`."""
        ta = self.text_access[rows] if self.text_access is not None else None
        return reference_attention(q[rows], torch.cat([k[rows], self.k[rows]], 2),
                                   torch.cat([v[rows], self.v[rows]], 2), k.shape[2], self.access[rows], n_text, ta)


def own_attention(heads: int, transformer_options: dict) -> Callable:
    """ComfyUI's attention over heads-first rows: what an unpatched layer computes for a branch that sees nothing
    else (the unconditional branch), so that branch's output is the unpatched model's."""
    import comfy.ldm.modules.attention

    def attend(q, k, v):
        return comfy.ldm.modules.attention.optimized_attention(
            q, k, v, heads, skip_reshape=True, skip_output_reshape=True,
            attn_precision=transformer_options.get("attn_precision"))
    return attend


def sharing_run(state: kit.ForwardState, block) -> Optional[object]:
    """The Masked Shared Attention run when it shares in this pass and block."""
    run = state.shared
    if run is None or not state.sharing or state.phase is not kit.Phase.TARGET or block not in run.blocks:
        return None
    return run


# --- UNet ----------------------------------------------------------------------------------------------------

def make_unet_attn1(self_attentions: dict) -> Callable:
    """Target pass: own tokens, plus the group's others (Masked Shared Attention) and/or the references'
    foreground tokens projected by this layer's own ``to_k``/``to_v`` (with any LoRA), as upstream."""
    def attn1(q, k, v, extra_options):
        state = kit.forward_state(extra_options)
        if state.phase is not kit.Phase.TARGET:
            return kit.attention(q, k, v, extra_options)
        layer = _layer(extra_options)
        run = sharing_run(state, tuple(extra_options["block"]))
        view = state.reference
        tokens = None
        if view is not None and layer in view.run.features:
            tokens = view.run.unet_tokens(layer)  # (S, P, C)
            if tokens.shape[1] == 0:
                tokens = None
        if run is None and tokens is None:
            return kit.attention(q, k, v, extra_options)
        heads = extra_options["n_heads"]
        refs = None
        if tokens is not None:
            module = self_attentions[layer]
            tokens = tokens.to(q.dtype)
            proj_k, proj_v = module.to_k(tokens)[view.slots], module.to_v(tokens)[view.slots]
            if run is None:  # references alone: exactly SynCD Apply References
                out = reference_attention(kit.heads_first(q, heads), kit.heads_first(torch.cat([k, proj_k], 1), heads),
                                          kit.heads_first(torch.cat([v, proj_v], 1), heads), q.shape[1], view.access)
                return kit.heads_last(out)
            refs = References(kit.heads_first(proj_k, heads), kit.heads_first(proj_v, heads), view.access)
        _, _, h, w = extra_options["activations_shape"]
        out = run.share_groups(kit.heads_first(q, heads), kit.heads_first(k, heads), kit.heads_first(v, heads),
                               state, extra_options, 0, (h, w), references=refs,
                               own_attention=own_attention(heads, extra_options))
        return kit.heads_last(out)
    attn1.syncd_self_attention = True
    return attn1


def install_unet(m, self_attentions: dict, blocks: list[tuple[str, int]], node: str) -> None:
    """Put the shared attn1 replace on ``blocks`` (keeping it on blocks an earlier pack node patched); another
    node's attn1 replace patches are refused rather than silently replaced."""
    existing = m.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {})
    foreign = [key for key, fn in existing.items() if not getattr(fn, SELF_ATTENTION_PATCH, False)]
    if foreign:
        raise ValueError(f"{node} replaces the self-attention of UNet blocks, and this model already has "
                         f"self-attention replace patches from another node; apply only one of them")
    attn1 = make_unet_attn1(self_attentions)
    chosen = list(dict.fromkeys([tuple(key[:2]) for key in existing] + list(blocks)))
    kit.add_attn1_replace(m, attn1, chosen)


# --- Flux ----------------------------------------------------------------------------------------------------

def make_flux_handler(axes_dim, theta, centred: bool = False) -> Callable:
    """Attention-override handler of Flux's (and Qwen-Image's) joint attention: the reference pass records the
    references' keys and values; target passes record the automatic-mask maps and attend to own ‖ others ‖
    references. ``centred``: image RoPE positions are centred on the grid (Qwen-Image), which places references."""
    from ..attention.rope import shift_axis

    def handler(q, k, v, heads, mask, state: kit.ForwardState, to: dict):
        if state.flux_tokens is None:
            return None
        view = state.reference
        layer = state.block
        if state.phase is kit.Phase.REFERENCE:
            if view is not None and layer is not None:
                n_text, gh, gw = state.flux_tokens
                image = slice(n_text, n_text + gh * gw)  # the image's own tokens (Kontext / ref_latents follow)
                view.run.features[layer] = (k[:, :, image].detach(), v[:, :, image].detach())
                view.run.grids[layer] = (gh, gw)
            return None
        if state.phase is not kit.Phase.TARGET:
            return None
        n_text, gh, gw = state.flux_tokens
        if state.shared is not None:  # automatic masks: text queries × own image keys, every block
            state.shared.record_subject_attention(k[:, :, n_text:], q[:, :, :n_text], to, (gh, gw))
        run = sharing_run(state, layer)
        tokens_k = tokens_v = None
        if view is not None and layer is not None and layer in view.run.features:
            tokens_k, tokens_v = view.run.flux_tokens(layer, gw, axes_dim, theta, target_h=gh, centred=centred)
            if tokens_k.shape[2] == 0:  # no reference foreground on this grid: nothing to add
                tokens_k = tokens_v = None
        if run is None and tokens_k is None:
            return None
        if mask is not None:
            raise ValueError("SynCD Masked Shared Attention / SynCD Apply References cannot be combined with a Flux "
                             "attention mask (attention_mask conditioning); remove one of them")
        refs = None
        if tokens_k is not None:
            refs = References(tokens_k[view.slots].to(k.dtype), tokens_v[view.slots].to(v.dtype), view.access,
                              view.text_access)
            if run is None:  # references alone: exactly SynCD Apply References
                return reference_attention(q, torch.cat([k, refs.k], 2), torch.cat([v, refs.v], 2), k.shape[2],
                                           view.access, n_text, view.text_access)
        key_shift = None
        if run.config.flux_rope_layout == "stacked":
            def key_shift(keys, slot):
                return shift_axis(keys, slot * gh, axes_dim, 1, theta)
        return run.share_groups(q, k, v, state, to, n_text, (gh, gw), key_shift, references=refs,
                                own_attention=own_attention(heads, to))
    return handler


def install_flux(m, diffusion_model) -> None:
    """The shared attention-override handler, once per model (and the block markers it needs)."""
    kit.mark_flux_blocks(m)
    to = m.model_options["transformer_options"]
    if to.get(SELF_ATTENTION_PATCH):
        return
    axes_dim, theta = kit.rope_params(diffusion_model)
    kit.add_attention_override(m, make_flux_handler(axes_dim, theta, centred=kit.is_qwen_image(diffusion_model)))
    to[SELF_ATTENTION_PATCH] = True

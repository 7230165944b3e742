"""The patch kit: what every SynCD model patch is built from.

* **Model helpers**: Flux detection, Flux's token grid, heads-first layout, the current step, the sigma window.
* **Block walkers**: the UNet blocks holding attention, Flux's double/single blocks, the ``blocks`` selector.
* **One per-forward state record** (:class:`ForwardState`) under one ``transformer_options`` key (:data:`KEY`),
  with an explicit :class:`Phase` (target pass, reference pass), in the manner of Advanced-ControlNet's
  ``MachineState`` (Kosinkadink/ComfyUI-Advanced-ControlNet ``adv_control/control_reference.py``). The first pack
  wrapper of a forward pass (``APPLY_MODEL``) creates it from whatever template the caller put under the key (a
  guider's branch roles, a reference pass's phase); attention patches only read it.
* **One Flux block marker**, **one** ``optimized_attention_override`` **chain** with pass-through, **one attn2
  chain**, **one attention fallback** that always passes ``transformer_options`` (so another pack's attention
  override still runs).
* **The pack's self-attention patches on one model** (Masked Shared Attention and Apply References compose through
  one shared patch, :mod:`self_attention`; each may be applied once).

Everything here uses ComfyUI's official mechanisms (``model.clone()`` then ``set_model_*`` patches, wrappers,
``optimized_attention_override``); nothing is monkeypatched.
"""

from __future__ import annotations

import enum
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

import comfy.ldm.modules.attention
import comfy.patcher_extension
from comfy.ldm.modules.attention import SpatialTransformer

from . import wiring

KEY = "syncd"                  # transformer_options: the ForwardState of the current forward pass
# The reference texts a reference pass computes features with (keys of GuidanceBranches.reference_outputs): the
# reference prompt, and the text-free branches' own conditioning.
REFERENCE_TEXT, NEGATIVE_TEXT = "reference", "negative"
TOKENIZER = "syncd_tokenizer"  # model_options: tokenize(text) -> ids for models whose text has no CLIP object
ENCODED_TOKENS = "syncd_token_ids"  # conditioning dict: the token ids an encoder encoded (the tiny demo encoding)


class Phase(str, enum.Enum):
    TARGET = "target"        # the images being sampled
    REFERENCE = "reference"  # the extra pass over the reference images (SynCD §4.2)
    AUXILIARY = "auxiliary"  # DCI's auxiliary-branch pass, before the concept branch's pass of the same step


@dataclass
class GuidanceBranches:
    """What one of the pack's guiders tells the patches about its branches for one evaluation.

    ``roles`` maps each cond's uuid to its branch role (``layout.UNCOND``/``IMAGE``/``FULL``); ``negative`` is the
    CONDITIONING of the text-free branches, whose reference features are computed with that text (upstream zeroes
    the text of the image branch's references); ``reference_outputs`` is filled by the reference pass with the
    references' own predictions per reference text (x − x̂₀), for norms over the whole Flux canvas."""

    roles: dict
    negative: Optional[list] = None
    reference_outputs: dict = field(default_factory=dict)


@dataclass
class ForwardState:
    """Everything the pack's patches know about one forward pass of the model."""

    phase: Phase = Phase.TARGET
    guidance: Optional[GuidanceBranches] = None
    step: int = 0
    sigma: float = 0.0
    flux_tokens: Optional[tuple[int, int, int]] = None  # Flux, Qwen-Image: (text tokens, grid h, grid w) of the image
    joint: Optional[str] = None                         # joint-attention DiT of this pass: "flux" | "qwen_image"
    block: Optional[tuple[str, int]] = None             # Flux: the block now running, set by the block markers
    sharing: bool = False                               # Masked Shared Attention is on in this pass
    shared: object = None                               # the Masked Shared Attention run (SharedAttentionRun)
    reference: object = None                            # the reference features this pass sees (ReferenceView)
    reference_rows: tuple[int, ...] = ()                # reference pass: which reference each batch row is
    dual_branch: object = None                          # DCI: the step's auxiliary-branch record (DualBranchStep)
    owner: object = field(default=None, repr=False, compare=False)  # the transformer_options dict it belongs to


def forward_state(transformer_options: dict) -> ForwardState:
    """The ForwardState of the running forward pass (a default target state outside the pack's wrappers)."""
    state = transformer_options.get(KEY)
    return state if isinstance(state, ForwardState) else ForwardState()


def begin_forward(transformer_options: dict, x: torch.Tensor, c_crossattn, flux) -> ForwardState:
    """This forward pass's ForwardState, created by the first pack wrapper that runs (``APPLY_MODEL``): the
    template the caller left under :data:`KEY` (if any) plus the step, sigma and joint token layout of this call.
    ``flux``: the :func:`joint_family` of the model ("flux", "qwen_image"; True means Flux), or None/False for a
    UNet. Both DiTs put the text first in the joint sequence, then the 2×2-packed image tokens."""
    state = transformer_options.get(KEY)
    if isinstance(state, ForwardState) and state.owner is transformer_options:
        return state
    template = state if isinstance(state, ForwardState) else ForwardState()
    sigmas = transformer_options.get("sigmas")
    joint = ("flux" if flux is True else flux) or None
    tokens = (c_crossattn.shape[1], *flux_grid(*x.shape[-2:])) if joint and c_crossattn is not None else None
    state = replace(template, step=current_step(transformer_options),
                    sigma=float(sigmas.max()) if sigmas is not None else 0.0, flux_tokens=tokens, block=None,
                    joint=joint if tokens is not None else None, owner=transformer_options)
    transformer_options[KEY] = state
    return state


def add_forward_wrapper(m, key: str, on_forward: Callable) -> None:
    """Register an ``APPLY_MODEL`` wrapper that sets up the ForwardState, then calls
    ``on_forward(state, executor, x, t, c_concat, c_crossattn, control, transformer_options, kwargs)`` (which may
    run extra passes through ``executor`` and fill in its part of the state) before the model runs."""
    flux = joint_family(m.get_model_object("diffusion_model"))

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        state = begin_forward(transformer_options, x, c_crossattn, flux)
        on_forward(state, executor, x, t, c_concat, c_crossattn, control, transformer_options, kwargs)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, wrapper)


def add_run(m, key: str, start: Callable, finish: Optional[Callable] = None) -> None:
    """``OUTER_SAMPLE`` wrapper: ``start(noise, guider)`` before every sampling (state of a previous run never leaks
    into the next), ``finish()`` after it, also on errors."""
    def outer_sample(executor, noise, *args, **kwargs):
        start(noise, executor.class_obj)
        try:
            return executor(noise, *args, **kwargs)
        finally:
            if finish is not None:
                finish()

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, outer_sample)


CONDITIONING_CHECK = "syncd_conditioning_check"


def add_conditioning_check(m, node: str) -> None:
    """``OUTER_SAMPLE`` wrapper (once per model): before sampling, the guider's conditionings must fit the model's
    family (:mod:`wiring`), so a wrong text encoder is named instead of failing as a raw tensor error."""
    if m.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CONDITIONING_CHECK):
        return

    def outer_sample(executor, *args, **kwargs):
        wiring.check_guider(node, executor.class_obj)
        return executor(*args, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CONDITIONING_CHECK, outer_sample)


# --- The phase for code that sees no transformer_options (weight wrappers) -------------------------------------

_phase_stack: list[Phase] = []


@contextmanager
def phase_scope(phase: Phase):
    """Mark a stretch of model evaluation as ``phase`` for :func:`current_phase` (weight wrappers, which ComfyUI
    calls without transformer_options; the SynCD SDXL LoRA is off in the reference pass, as upstream)."""
    _phase_stack.append(phase)
    try:
        yield
    finally:
        _phase_stack.pop()


def current_phase() -> Phase:
    return _phase_stack[-1] if _phase_stack else Phase.TARGET


def in_reference_pass() -> bool:
    return current_phase() is Phase.REFERENCE


# --- Model helpers ---------------------------------------------------------------------------------------------

def is_flux(diffusion_model) -> bool:
    return hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks")


def is_qwen_image(diffusion_model) -> bool:
    """ComfyUI's Qwen-Image DiT (``comfy/ldm/qwen_image/model.py``): joint text+image attention in every block."""
    import comfy.ldm.qwen_image.model

    return isinstance(diffusion_model, comfy.ldm.qwen_image.model.QwenImageTransformer2DModel)


def joint_family(diffusion_model) -> Optional[str]:
    """"flux" or "qwen_image" for the DiTs whose blocks attend jointly over [text ‖ image] (the pack treats them
    alike: text count and token grid per forward, RoPE'd keys), None for UNets and other models."""
    if is_flux(diffusion_model):
        return "flux"
    if is_qwen_image(diffusion_model):
        return "qwen_image"
    return None


def is_joint(diffusion_model) -> bool:
    return joint_family(diffusion_model) is not None


def rope_params(diffusion_model) -> tuple[list[int], float]:
    """(axes_dim, theta) of a joint DiT's axial RoPE over [index, row, col] ids (Flux ``params``; Qwen-Image's
    ``pe_embedder``, the same ``EmbedND``)."""
    if is_flux(diffusion_model):
        return list(diffusion_model.params.axes_dim), diffusion_model.params.theta
    return list(diffusion_model.pe_embedder.axes_dim), diffusion_model.pe_embedder.theta


def flux_grid(h: int, w: int) -> tuple[int, int]:
    """Flux's (and Qwen-Image's) token grid of an h×w latent: 2×2 patches, padded (ComfyUI
    ``comfy/ldm/flux/model.py``, ``comfy/ldm/qwen_image/model.py``)."""
    return (h + 1) // 2, (w + 1) // 2


def heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads·D) → (B, heads, L, D)."""
    b, l, _ = x.shape
    return x.view(b, l, heads, -1).transpose(1, 2)


def heads_last(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, D) → (B, L, heads·D): the layout attention returns without ``skip_output_reshape``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def current_step(transformer_options: dict) -> int:
    """Index of the current sigma in the sampling schedule (nearest, for samplers evaluating between steps)."""
    sample_sigmas = transformer_options.get("sample_sigmas")
    sigmas = transformer_options.get("sigmas")
    if sample_sigmas is None or sigmas is None:
        return 0
    return int((sample_sigmas.to(sigmas.device).float() - sigmas.float().max()).abs().argmin())


def sampling_steps(transformer_options: dict) -> int:
    sample_sigmas = transformer_options.get("sample_sigmas")
    return len(sample_sigmas) - 1 if sample_sigmas is not None else 1


def in_sigma_window(sigma: float, sigma_start: float, sigma_end: float) -> bool:
    """Whether ``sigma`` lies in a node's start_percent..end_percent window (as sigmas)."""
    return sigma_end <= sigma <= sigma_start


def attention(q, k, v, extra_options: dict):
    """ComfyUI's attention for a UNet patch's (B, L, heads·D) q/k/v, with ``transformer_options`` passed on (so an
    ``optimized_attention_override`` of another pack still applies)."""
    return comfy.ldm.modules.attention.optimized_attention(
        q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
        transformer_options=extra_options)


# --- Block walkers ---------------------------------------------------------------------------------------------

def unet_attention_blocks(diffusion_model) -> list[tuple[str, int]]:
    """(block name, number) of every UNet block holding a SpatialTransformer, as ComfyUI keys replace patches."""
    if not hasattr(diffusion_model, "input_blocks"):
        raise ValueError(f"this feature needs an SD1.5/SDXL-style UNet (or Flux where supported); "
                         f"{type(diffusion_model).__name__} is neither")
    found = []
    for name, blocks in (("input", diffusion_model.input_blocks), ("output", diffusion_model.output_blocks)):
        for i, block in enumerate(blocks):
            if any(isinstance(m, SpatialTransformer) for m in block.modules()):
                found.append((name, i))
    if any(isinstance(m, SpatialTransformer) for m in diffusion_model.middle_block.modules()):
        found.append(("middle", 0))
    return found


def unet_self_attentions(diffusion_model) -> dict[tuple[str, int, int], torch.nn.Module]:
    """{(block name, number, index in its SpatialTransformer): attn1 module} of every UNet transformer block: the
    ``(*extra_options["block"], extra_options["block_index"])`` an attention patch is called with."""
    found = {}
    for name, number in unet_attention_blocks(diffusion_model):
        block = diffusion_model.middle_block if name == "middle" else getattr(diffusion_model, f"{name}_blocks")[number]
        for module in block.modules():
            if isinstance(module, SpatialTransformer):
                for index, transformer_block in enumerate(module.transformer_blocks):
                    found[(name, number, index)] = transformer_block.attn1
    return found


def flux_blocks(diffusion_model) -> list[tuple[str, int]]:
    """("double", i) and ("single", i) of every Flux block; ("double", i) of every Qwen-Image transformer block
    (ComfyUI patches them as ``double_block``)."""
    if is_qwen_image(diffusion_model):
        return [("double", i) for i in range(len(diffusion_model.transformer_blocks))]
    return ([("double", i) for i in range(len(diffusion_model.double_blocks))]
            + [("single", i) for i in range(len(diffusion_model.single_blocks))])


def model_blocks(diffusion_model, node: str) -> list[tuple[str, int]]:
    """The attention blocks of a UNet, Flux or Qwen-Image model, or an error naming ``node`` for other
    architectures."""
    if is_joint(diffusion_model):
        return flux_blocks(diffusion_model)
    if hasattr(diffusion_model, "input_blocks"):
        found = unet_attention_blocks(diffusion_model)
        if found:
            return found
    raise ValueError(f"{node} supports SD1.5/SDXL-style UNets, Flux and Qwen-Image; this model is none of them "
                     f"({type(diffusion_model).__name__})")


BLOCK_SELECTOR = re.compile(r"^(input|middle|output|double|single)(?:\.(\d+)(?:-(\d+))?)?$")


def select_blocks(spec: str, available: list[tuple[str, int]], node: str) -> list[tuple[str, int]]:
    """Parse a ``blocks`` text ('all' or e.g. 'output, middle.0, double.0-9') against the model's blocks."""
    spec = spec.strip().lower()
    if spec in ("", "all"):
        return list(available)
    names = sorted({name for name, _ in available})
    chosen = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = BLOCK_SELECTOR.match(part)
        if not m or m.group(1) not in names:
            raise ValueError(f"{node}: block selector {part!r} does not match this model; use 'all' or a comma "
                             f"list of {', '.join(names)} with optional .N or .A-B")
        lo = int(m.group(2)) if m.group(2) else None
        hi = int(m.group(3)) if m.group(3) else lo
        picked = [(n, i) for n, i in available if n == m.group(1) and (lo is None or lo <= i <= hi)]
        if not picked:
            numbers = [i for n, i in available if n == m.group(1)]
            raise ValueError(f"{node}: {part!r} selects no block; {m.group(1)} blocks with attention are {numbers}")
        chosen += [b for b in picked if b not in chosen]
    return chosen


# --- Patch chains ----------------------------------------------------------------------------------------------

def _replace_patches(m, name: str) -> dict:
    return dict(m.model_options["transformer_options"].get("patches_replace", {}).get(name, {}))


def mark_flux_blocks(m) -> None:
    """``dit`` block-replace patches that set ``ForwardState.block`` while a Flux (or Qwen-Image) block runs (the
    attention override has no other way to know the block), chaining any earlier patch on the block; once per
    model."""
    existing = _replace_patches(m, "dit")
    for name, i in flux_blocks(m.get_model_object("diffusion_model")):
        key = (f"{name}_block", i)
        previous = existing.get(key)
        if getattr(previous, "syncd_block_marker", False):
            continue
        m.set_model_patch_replace(_block_marker((name, i), previous), "dit", *key)


def _block_marker(block: tuple[str, int], previous: Optional[Callable]) -> Callable:
    def mark(args, extra):
        state = args["transformer_options"].get(KEY)
        outer = state.block if isinstance(state, ForwardState) else None
        if isinstance(state, ForwardState):
            state.block = block
        try:
            return previous(args, extra) if previous is not None else extra["original_block"](args)
        finally:
            if isinstance(state, ForwardState):
                state.block = outer
    mark.syncd_block_marker = True
    return mark


def add_attention_override(m, handler: Callable, chained: bool = False) -> None:
    """Put ``handler`` in front of any earlier ``optimized_attention_override``.

    ``handler(q, k, v, heads, mask, state, transformer_options)`` gets heads-first (B, heads, L, D) q/k/v of
    Flux's joint attention (calls with ``skip_reshape``) or of Qwen-Image's (its ``optimized_attention_masked``
    calls pass (B, L, heads·D), made heads-first here; recognised by ``state.joint``) and returns the heads-first
    output, or None to pass the call through, unchanged, to the earlier override or ComfyUI's attention. With
    ``chained`` it also gets ``call_next()``, which returns that pass-through output (heads-first), to modify it."""
    to = m.model_options["transformer_options"]
    previous = to.get("optimized_attention_override")

    def override(func, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False,
                 transformer_options=None, **kwargs):
        topts = transformer_options if transformer_options is not None else {}
        state = topts.get(KEY)

        def call_next(output_reshape: bool = True):
            if previous is not None:
                return previous(func, q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                                skip_output_reshape=output_reshape, transformer_options=topts, **kwargs)
            return func(q, k, v, heads, mask=mask, skip_reshape=skip_reshape, skip_output_reshape=output_reshape,
                        transformer_options=topts, **kwargs)

        out = None
        if isinstance(state, ForwardState) and (skip_reshape or state.joint == "qwen_image"):
            hq, hk, hv = (q, k, v) if skip_reshape else (heads_first(q, heads), heads_first(k, heads),
                                                         heads_first(v, heads))
            out = (handler(hq, hk, hv, heads, mask, state, topts, call_next) if chained
                   else handler(hq, hk, hv, heads, mask, state, topts))
        if out is not None:
            return out if skip_output_reshape else heads_last(out)
        return call_next(skip_output_reshape)

    to["optimized_attention_override"] = override


def add_attn2(m, handler: Callable, blocks: list[tuple[str, int]]) -> None:
    """attn2 (cross-attention) replace patches on the UNet ``blocks``, chaining each block's earlier attn2 replace
    (e.g. an IP-Adapter): ``handler(q, k, v, extra_options, call_next)`` where ``call_next(q, k, v)`` runs the
    earlier patch, or ComfyUI's attention."""
    previous = _replace_patches(m, "attn2")

    def attn2(q, k, v, extra_options):
        block = tuple(extra_options["block"])
        earlier = previous.get((*block, extra_options["block_index"])) or previous.get(block)

        def call_next(q_, k_, v_):
            if earlier is not None:
                return earlier(q_, k_, v_, extra_options)
            return attention(q_, k_, v_, extra_options)
        return handler(q, k, v, extra_options, call_next)

    chosen = set(blocks)
    keys = chosen | {key for key in previous if key[:2] in chosen}  # per-index keys set before win the lookup
    for key in sorted(keys, key=str):
        m.set_model_patch_replace(attn2, "attn2", key[0], key[1], *key[2:])


def add_attn1_replace(m, fn: Callable, blocks: list[tuple[str, int]]) -> None:
    for name, i in blocks:
        m.set_model_attn1_replace(fn, name, i)


# --- The pack's self-attention patches on one model --------------------------------------------------------------

SELF_ATTENTION_PATCHES = {"syncd_shared_attention": "SynCD Masked Shared Attention",
                          "syncd_reference_injection": "SynCD Apply References"}


def claim_self_attention(model, key: str) -> None:
    """SynCD Masked Shared Attention and SynCD Apply References compose on one model (in either order: both install
    the one self-attention patch of :mod:`self_attention`, which reads what each put in the ForwardState), but each
    may be applied only once: a second copy of the same node would silently replace the first's run. Read off the
    model's wrappers."""
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key):
        name = SELF_ATTENTION_PATCHES[key]
        raise ValueError(f"{name}: this model already has {name} applied; apply it only once to a model (to "
                         f"change its settings, change the first one)")

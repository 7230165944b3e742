"""Masked Shared Attention on a ComfyUI model: the patches behind SynCDSharedAttention, built from the patch kit.

UNet (SD1.5/SDXL): the pack's self-attention patch (:mod:`self_attention`, shared with SynCD Apply References, so
the two compose) on every selected transformer block; in automatic mask mode also an attn2 chain link that records
the image→subject-token attention. Flux and Qwen-Image: the same module's attention-override handler on the joint
attention (the kit's block markers say which block runs; only the selected blocks share). The kit's ``APPLY_MODEL`` wrapper
gives every forward pass its ForwardState; this patch adds, once per pass, whether sharing is on. An
``OUTER_SAMPLE`` wrapper validates the batch and starts a fresh :class:`SharedAttentionRun` for every sampling.

The patch callables are closures over the run, so ``ModelPatcher.clone()`` (which deep-copies ``model_options``)
shares them instead of copying state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..attention.masks import (AutomaticMaskEstimator, layer_foreground, resize_to_grid, subject_attention,
                               subject_attention_rows)
from ..attention.shared import (shared_attention, shared_attention_reference, shared_reference_attention,
                                shared_reference_attention_reference)
from ..core.tokens import rows_token_positions
from . import choices
from . import patch_kit as kit
from . import self_attention
from .layout import UNCOND, check_group_size, chunk_roles, conditioning_chunks, subject_groups

PATCH_KEY = "syncd_shared_attention"
NODE = "SynCD Masked Shared Attention"

IMPLEMENTATIONS = {"efficient": shared_attention, "reference": shared_attention_reference}
# With SynCD Apply References on the same model: [own ‖ group's others' foreground ‖ references' foreground].
WITH_REFERENCES = {"efficient": shared_reference_attention, "reference": shared_reference_attention_reference}
MASK_MODES = ("foreground_masks", "none", "automatic")
FLUX_ROPE_LAYOUTS = ("stacked", "shared")  # official: the other images' keys below the own image (Qwen-Image too)
DEFAULT_DILATION = 9  # upstream rigid data generation: 9×9 at the token grid (nupurkmr9/syncd dataset/gen_rigid.py)


@dataclass(frozen=True)
class PromptLine:
    """One line of a multi-line automatic-mode prompt, read as its own image's prompt when the positive
    conditioning has one row per line (SynCD Per-Image Prompts)."""
    text: str
    subject_tokens: Optional[tuple[int, ...]]  # positions of the subject word in this line; None: not in it
    token_ids: tuple = ()                      # the line's token ids, as tokenized for the search


@dataclass(frozen=True)
class SharedAttentionConfig:
    images_per_subject: int
    mask_mode: str                          # "foreground_masks" | "none" | "automatic"
    sigma_start: float                      # sharing while sigma_start >= sigma >= sigma_end
    sigma_end: float
    unmasked_first_step: bool = True
    first_step_shares_text: bool = True     # with unmasked_first_step: text queries share too (upstream: no mask)
    implementation: str = "efficient"
    flux_rope_layout: str = "stacked"       # "stacked" (official) | "shared"
    foreground_masks: Optional[torch.Tensor] = None   # (B, H, W), one per latent image
    mask_dilation: int = DEFAULT_DILATION   # box size at the base grid (latent grid; Flux token grid)
    subject_tokens: tuple[int, ...] = ()    # automatic mode: positions of the subject word in the prompt
    prompt_tokens: tuple[int, ...] = ()     # automatic mode: the prompt's token ids, as tokenized for the search
    prompt_lines: tuple[PromptLine, ...] = ()  # automatic mode, a prompt of several lines: each line on its own


RUN_ATTACHMENT = "syncd_shared_attention_run"


class SharedAttentionRun:
    """State of one sampling run: step index, per-grid mask caches and the automatic mask estimate."""

    def __init__(self, config: SharedAttentionConfig, is_flux: bool, blocks: list[tuple[str, int]],
                 sigma_max: float = float("inf")):
        self.config = config
        self.is_flux = is_flux
        self.blocks = frozenset(blocks)
        self.sigma_max = sigma_max
        self.prompt_rows: Optional[tuple[tuple[int, ...], ...]] = None  # per-prompt subject tokens (one per row)
        self.reset(None)

    def reset(self, latent_shape: Optional[torch.Size]) -> None:
        self.latent_shape = latent_shape
        self.step = -1
        self.sigma = 0.0
        self._resized: dict = {}
        self.estimator: Optional[AutomaticMaskEstimator] = None
        if latent_shape is not None and self.config.mask_mode == "automatic":
            self.estimator = AutomaticMaskEstimator(self.base_grid)

    @property
    def base_grid(self) -> tuple[int, int]:
        """The grid masks are prepared on: the Flux token grid, or the UNet's latent grid."""
        h, w = self.latent_shape[-2:]
        return kit.flux_grid(h, w) if self.is_flux else (h, w)

    def validate(self, latent_batch: int) -> None:
        """Errors the user can fix, raised before the first step."""
        cfg = self.config
        check_group_size(latent_batch, cfg.images_per_subject)
        if cfg.mask_mode != "foreground_masks":
            return
        masks = cfg.foreground_masks
        if masks.shape[0] != latent_batch:
            raise ValueError(f"{NODE}: foreground_masks holds {masks.shape[0]} masks but the latent batch has "
                             f"{latent_batch} images; give one mask per latent image")
        for start in range(0, latent_batch, cfg.images_per_subject):
            if not (masks[start:start + cfg.images_per_subject] > 0.5).any():
                raise ValueError(f"{NODE}: every foreground mask of the subject group of images {start}.."
                                 f"{start + cfg.images_per_subject - 1} is empty, so nothing would be shared; check "
                                 f"the masks (white = subject)")

    def on_forward(self, state: kit.ForwardState, executor, x, t, c_concat, c_crossattn, control, to, kwargs):
        """Per forward pass: follow the step (closing a step folds it into the automatic masks) and decide whether
        sharing is on."""
        if self.latent_shape is None:  # sampled without our OUTER_SAMPLE wrapper (e.g. a custom loop)
            self.reset(torch.Size([x.shape[0] // len(to.get("cond_or_uncond") or [0]), *x.shape[1:]]))
        if state.step == 0 and self.step > 0:  # a new sampling run that bypassed OUTER_SAMPLE
            self.reset(self.latent_shape)
        if state.step != self.step:
            if self.estimator is not None and state.step > self.step:
                self.estimator.finish_step()
            self.step = state.step
        self.sigma = state.sigma
        if state.phase is kit.Phase.TARGET:
            state.shared = self
        state.sharing = (state.phase is kit.Phase.TARGET
                         and kit.in_sigma_window(state.sigma, self.config.sigma_start, self.config.sigma_end))

    def first_step_unmasked(self) -> bool:
        """Upstream applies no mask while ``timestep[0] < 1`` is false, i.e. at σ = σ_max (the first step of a full
        schedule; a partial schedule starting lower is masked from its first step)."""
        return self.config.unmasked_first_step and self.sigma >= self.sigma_max * (1 - 1e-4)

    def foreground(self, latent_index: int, n: int, grid: tuple[int, int], n_tokens: int) -> Optional[torch.Tensor]:
        """(n, n_tokens) key-side foreground of the group starting at ``latent_index``, or None for full sharing."""
        cfg = self.config
        if cfg.mask_mode == "none" or self.first_step_unmasked():
            return None
        if cfg.mask_mode == "automatic":
            masks = self.estimator.masks if self.estimator is not None else None
            if masks is None:
                return None  # nothing estimated yet: share everything, as upstream's first step
            key = ("auto", self.step, grid)
            if key not in self._resized:
                self._resized = {k: v for k, v in self._resized.items() if k[0] == "user"}
                self._resized[key] = resize_to_grid(masks, *grid)
        else:
            key = ("user", grid)
            if key not in self._resized:
                self._resized[key] = layer_foreground(cfg.foreground_masks, self.base_grid, cfg.mask_dilation, grid)
        fg = self._resized[key][latent_index:latent_index + n]
        if fg.shape[1] < n_tokens:  # tokens beyond the grid (e.g. Flux Kontext references) stay private
            fg = torch.cat([fg, fg.new_zeros(n, n_tokens - fg.shape[1])], dim=1)
        return fg

    def record_subject_attention(self, image_vectors, text_vectors, to: dict, grid: tuple[int, int]) -> None:
        """Automatic masks: fold one layer's image→subject-token attention of the positive chunks into the
        estimate (upstream ``AttentionStore``, nupurkmr9/syncd ``dataset/src/editor.py``)."""
        if self.estimator is None:
            return
        per_prompt = self.prompt_rows or (self.config.subject_tokens,)
        last = max(max(tokens) for tokens in per_prompt)
        if last >= text_vectors.shape[2]:
            raise ValueError(f"SynCD automatic masks: subject token position {last} is beyond the "
                             f"{text_vectors.shape[2]} text tokens of the conditioning; is the prompt the one encoded?")
        for cond_index, rows in conditioning_chunks(image_vectors.shape[0], to):
            if cond_index != 0:
                continue
            image, text = image_vectors[rows, :, :grid[0] * grid[1]], text_vectors[rows]
            if len(per_prompt) == 1:
                maps = subject_attention(image, text, per_prompt[0])
            else:  # a chunk holds the whole latent batch: image j has prompt j mod n, as ComfyUI tiles the rows
                maps = subject_attention_rows(image, text, rows_token_positions(per_prompt, text.shape[0]))
            self.estimator.add(maps, grid)

    def share_groups(self, q, k, v, state: kit.ForwardState, to: dict, n_text: int, grid: tuple[int, int],
                     key_shift=None, references=None, own_attention=None) -> torch.Tensor:
        """Apply the MSA core to every subject group of a (rows, heads, L, D) batch; chunks of UNCOND branches
        (JeDi's ε⁰, SynCD's unconditional branch) keep to their own image. With ``references``
        (:class:`self_attention.References`, SynCD Apply References on the same model) the rows with reference
        access also see the references' foreground tokens; rows without keep to their own image, through
        ``own_attention(q, k, v)`` where given (ComfyUI's attention: exactly the unpatched model's output)."""
        cfg = self.config
        attend = IMPLEMENTATIONS[cfg.implementation]
        text_shares = cfg.first_step_shares_text and self.first_step_unmasked()
        out = torch.empty_like(q)
        roles = state.guidance.roles if state.guidance is not None else None
        uncond = [rows for role, rows in chunk_roles(q.shape[0], to, roles) if role == UNCOND]
        n_tokens = q.shape[2] - n_text
        for group in subject_groups(q.shape[0], to, cfg.images_per_subject):
            r = group.rows
            sees_references = references is not None and bool(references.access[r].all())
            if any(b.start <= r.start < b.stop for b in uncond):
                if references is not None and references.text_access is not None:
                    out[r] = references.blind(q, k, v, r, n_text)
                else:
                    out[r] = (own_attention or torch.nn.functional.scaled_dot_product_attention)(q[r], k[r], v[r])
                continue
            fg = self.foreground(group.latent_index, cfg.images_per_subject, grid, n_tokens)
            if sees_references:
                out[r] = WITH_REFERENCES[cfg.implementation](q[r], k[r], v[r], fg, references.k[r], references.v[r],
                                                             n_text=n_text, key_shift=key_shift,
                                                             text_shares=text_shares)
            else:
                out[r] = attend(q[r], k[r], v[r], fg, n_text, key_shift, text_shares=text_shares)
        return out


# --- UNet ----------------------------------------------------------------------------------------------------

def make_unet_attn2(run: SharedAttentionRun) -> Callable:
    """Cross-attention unchanged (or the block's earlier attn2 patch, e.g. an IP-Adapter), recording the
    image→subject-token attention for the automatic masks."""
    def attn2(q, k, v, extra_options, call_next):
        if kit.forward_state(extra_options).phase is kit.Phase.TARGET:
            heads = extra_options["n_heads"]
            run.record_subject_attention(kit.heads_first(q, heads), kit.heads_first(k, heads), extra_options,
                                         tuple(extra_options["activations_shape"][-2:]))
        return call_next(q, k, v)
    return attn2


# --- Which prompt each image has (automatic masks) ------------------------------------------------------------

def encoded_rows(entry: dict) -> Optional[tuple[tuple, ...]]:
    """The token ids a conditioning entry records per row (``kit.ENCODED_TOKENS``: the tiny demo encodings; one
    tuple of ids, or one per row for a per-image batch), or None."""
    ids = entry.get(kit.ENCODED_TOKENS)
    if ids is None:
        return None
    ids = tuple(ids)
    return tuple(tuple(row) for row in ids) if ids and isinstance(ids[0], (tuple, list)) else (ids,)


def subject_token_rows(config: SharedAttentionConfig, guider) -> Optional[tuple[tuple[int, ...], ...]]:
    """Automatic masks: where the subject word sits for each latent image, decided by the positive conditioning.

    A prompt of n > 1 lines with a positive conditioning of n rows (SynCD Per-Image Prompts) is one prompt per
    line: the result is each line's subject-token positions (image j uses line j mod n). Otherwise the whole text
    is one prompt for every image: None (``config.subject_tokens``). Where the conditioning records the token ids it
    encoded (``kit.ENCODED_TOKENS``: the tiny demo encodings), they must be the prompt's."""
    if config.mask_mode != "automatic":
        return None
    positive = guider.original_conds.get("positive", [])
    rows = {int(entry["cross_attn"].shape[0]) for entry in positive if torch.is_tensor(entry.get("cross_attn"))}
    lines = config.prompt_lines
    per_line = len(lines) > 1 and rows == {len(lines)}
    if len(lines) > 1 and not per_line and rows - {1}:
        raise ValueError(f"{NODE}: the prompt has {len(lines)} lines but the positive conditioning has "
                         f"{', '.join(map(str, sorted(rows)))} rows; for one prompt per image connect SynCD Per-Image "
                         f"Prompts' 'prompts' output to 'prompt' (one line per conditioning row), else the text that "
                         f"was encoded as one prompt")
    encoded = [ids for ids in map(encoded_rows, positive) if ids is not None]
    if per_line:
        missing = [i for i, line in enumerate(lines) if line.subject_tokens is None]
        if missing:
            i = missing[0]
            raise ValueError(f"{NODE}: the subject word is not in line {i + 1} of the prompt ({lines[i].text!r}); "
                             f"with one prompt per image every line must name the subject")
        expected = tuple(tuple(line.token_ids) for line in lines)
        if encoded and all(line.token_ids for line in lines) and expected not in set(encoded):
            raise ValueError(f"{NODE}: the 'prompt' lines are not the prompts the positive conditioning encoded, so "
                             f"subject_word's tokens would be located in the wrong text; connect SynCD Per-Image "
                             f"Prompts' 'prompts' output to 'prompt'")
        return tuple(line.subject_tokens for line in lines)
    if config.prompt_tokens and encoded and (tuple(config.prompt_tokens),) not in set(encoded):
        raise ValueError(f"{NODE}: the 'prompt' input is not the text the positive conditioning encoded, so "
                         f"subject_word's tokens would be located in the wrong text; give the prompt exactly as "
                         f"encoded (connect the same text to both)")
    return None


# --- Putting it on a model ------------------------------------------------------------------------------------

def apply_shared_attention(model, config: SharedAttentionConfig, blocks: str = "all"):
    """A clone of ``model`` (a ModelPatcher) with Masked Shared Attention patched in, and its run state."""
    if config.mask_dilation < 1 or config.mask_dilation % 2 == 0:
        raise ValueError(f"{NODE}: mask_dilation must be an odd box size (1 = none, 3, 5, ...); got "
                         f"{config.mask_dilation}")
    for name, value, options in (("mask_mode", config.mask_mode, MASK_MODES),
                                 ("attention_implementation", config.implementation, IMPLEMENTATIONS),
                                 ("flux_rope_layout", config.flux_rope_layout, FLUX_ROPE_LAYOUTS)):
        choices.require(NODE, name, value, options)
    kit.claim_self_attention(model, PATCH_KEY)
    m = model.clone()
    diffusion_model = m.get_model_object("diffusion_model")
    selected = kit.select_blocks(blocks, kit.model_blocks(diffusion_model, NODE), NODE)
    flux = kit.is_joint(diffusion_model)  # Flux or Qwen-Image: the joint-attention handler, stacked RoPE layout
    run = SharedAttentionRun(config, flux, selected, float(m.get_model_object("model_sampling").sigma_max))
    m.set_attachments(RUN_ATTACHMENT, run)  # SynCDAutomaticMasks reads the estimate after sampling

    def start(noise, guider):
        run.validate(noise.shape[0])
        run.prompt_rows = subject_token_rows(config, guider)
        run.reset(noise.shape)  # the state of the previous run never leaks into this one

    kit.add_run(m, PATCH_KEY, start)
    kit.add_conditioning_check(m, NODE)
    kit.add_forward_wrapper(m, PATCH_KEY, run.on_forward)
    if flux:
        self_attention.install_flux(m, diffusion_model)
        return m, run
    self_attention.install_unet(m, kit.unet_self_attentions(diffusion_model), selected, NODE)
    if config.mask_mode == "automatic":
        kit.add_attn2(m, make_unet_attn2(run), kit.unet_attention_blocks(diffusion_model))
    return m, run

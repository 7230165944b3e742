"""SynCDSharedAttention: Masked Shared Attention (SynCD eq. 1) / JeDi coupled attention as a MODEL patch."""

from __future__ import annotations

from comfy_api.latest import io

from ..core.tokens import clip_tokenizer, prompt_lines, subject_token_positions
from .patch_kit import TOKENIZER
from . import choices
from .shared_attention import (DEFAULT_DILATION, FLUX_ROPE_LAYOUTS, IMPLEMENTATIONS, MASK_MODES, PromptLine,
                               SharedAttentionConfig, apply_shared_attention)


class SynCDSharedAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDSharedAttention",
            display_name="SynCD Masked Shared Attention",
            category="SynCD/attention",
            description="Every image of a subject group attends to its own tokens and to the foreground tokens of "
                        "the other images in its group (SynCD eq. 1). With mask_mode 'none' this is JeDi's coupled "
                        "self-attention. Works on SD1.5/SDXL (self-attention), Flux and Qwen-Image (joint attention). Together with "
                        "SynCD Apply References (either order) every image also sees the references' foreground: "
                        "a consistent set of your subject.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("images_per_subject", default=3, min=1, max=64,
                             tooltip="The latent batch is split into consecutive groups of this size; each group is "
                                     "one subject and shares attention. The batch size must be a multiple of it."),
                io.Combo.Input("mask_mode", options=list(MASK_MODES), default="foreground_masks",
                               tooltip="foreground_masks: other images are seen only where their mask is set. "
                                       "none: JeDi coupled attention over all image tokens. automatic: masks "
                                       "estimated every step from the attention to subject_word (deformable subjects)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress at which sharing starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress at which sharing ends."),
                io.Boolean.Input("unmasked_first_step", default=True,
                                 tooltip="Share all image tokens (no masks) on the first sampling step, as the "
                                         "official SynCD code does at sigma = 1."),
                io.String.Input("blocks", default="all",
                                tooltip="Which blocks share attention: 'all', or a comma list of input, middle, "
                                        "output (UNet) or double, single (Flux; Qwen-Image: double), each optionally with .N or .A-B "
                                        "block numbers, e.g. 'output, middle' or 'double.0-9'."),
                io.Mask.Input("foreground_masks", optional=True,
                              tooltip="One mask per latent image, any resolution (mask_mode foreground_masks)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="automatic mode: the CLIP that encoded the prompt, to find subject_word's "
                                      "tokens. Not needed with the tiny demo text encoding."),
                io.String.Input("prompt", multiline=True, default="", optional=True,
                                tooltip="automatic mode: the positive prompt, character for character the text "
                                        "the positive conditioning encoded (connect the same text to both): "
                                        "subject_word's token positions are looked up in it, over all its 77-token "
                                        "chunks. One prompt per image: connect SynCD Per-Image Prompts' 'prompts' "
                                        "output; when the text has n > 1 lines and the positive conditioning n "
                                        "rows, each line is its own image's prompt (image j: line j mod n, as "
                                        "ComfyUI repeats the rows over the batch) and every line must contain "
                                        "subject_word; with a one-row conditioning the whole text, newlines "
                                        "included, is one prompt. A different text would point at the wrong "
                                        "tokens; with the tiny demo encoding the mismatch is refused."),
                io.String.Input("subject_word", default="", optional=True,
                                tooltip="automatic mode: the word naming the subject in the prompt, e.g. 'dog'."),
                io.Combo.Input("flux_rope_layout", options=list(FLUX_ROPE_LAYOUTS), default="stacked", optional=True,
                               tooltip="Flux and Qwen-Image: positions of the other images' keys. stacked: below the "
                                       "own image (official code). shared: at the own image's positions."),
                io.Combo.Input("attention_implementation", options=list(IMPLEMENTATIONS), default="efficient", optional=True,
                               tooltip="efficient: memory linear in the group size. reference: the official dense "
                                       "mask, memory quadratic in the group size (for verification)."),
                io.Int.Input("mask_dilation", default=DEFAULT_DILATION, min=1, max=31, step=2, optional=True,
                             tooltip="foreground_masks: the masks are binarized (> 0), brought to the token grid "
                                     "(Flux; the latent grid for UNets) by area and dilated with this box, then "
                                     "taken per layer with nearest resizing (upstream rigid data generation: 9). "
                                     "1 = no dilation."),
                io.Boolean.Input("first_step_shares_text", default=True, optional=True,
                                 tooltip="With unmasked_first_step on Flux: the text tokens also attend to the other "
                                         "images on the first step, as the official code applies no mask at all "
                                         "there. Off: text stays within its own image."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def validate_inputs(cls, mask_mode=None, flux_rope_layout=None, attention_implementation=None):
        return choices.check(cls, mask_mode=mask_mode, flux_rope_layout=flux_rope_layout,
                             attention_implementation=attention_implementation)

    @classmethod
    def execute(cls, model, images_per_subject, mask_mode, start_percent, end_percent, unmasked_first_step, blocks,
                foreground_masks=None, clip=None, prompt="", subject_word="", flux_rope_layout="stacked",
                attention_implementation="efficient", mask_dilation=DEFAULT_DILATION,
                first_step_shares_text=True) -> io.NodeOutput:
        if start_percent > end_percent:
            raise ValueError(f"SynCD Masked Shared Attention: start_percent ({start_percent}) is after "
                             f"end_percent ({end_percent})")
        masks = None
        if mask_mode == "foreground_masks":
            if foreground_masks is None:
                raise ValueError("SynCD Masked Shared Attention: mask_mode is 'foreground_masks' but no "
                                 "foreground_masks are connected; connect one MASK per latent image, or choose "
                                 "mask_mode 'none' (JeDi coupled attention) or 'automatic'")
            masks = foreground_masks if foreground_masks.ndim == 3 else foreground_masks.unsqueeze(0)
            masks = masks.float().cpu()
        tokens, prompt_tokens, lines = (), (), ()
        if mask_mode == "automatic":
            if clip is not None:
                tokenize = clip_tokenizer(clip)
            elif model.model_options.get(TOKENIZER) is not None:  # e.g. the tiny demo models' text encoding
                tokenize = model.model_options[TOKENIZER]
            else:
                raise ValueError("SynCD Masked Shared Attention: automatic masks need the CLIP that encoded the "
                                 "prompt (to find subject_word's tokens); connect it to the 'clip' input")
            tokens = subject_token_positions(tokenize, prompt, subject_word)
            prompt_tokens = tuple(tokenize(prompt))
            lines = prompt_lines(prompt)
            if len(lines) > 1:  # one prompt per image if the conditioning has a row per line (decided at sampling)
                lines = tuple(PromptLine(line, line_subject_tokens(tokenize, line, subject_word),
                                         tuple(tokenize(line))) for line in lines)
        sampling = model.get_model_object("model_sampling")
        config = SharedAttentionConfig(
            images_per_subject=images_per_subject,
            mask_mode=mask_mode,
            sigma_start=sampling.percent_to_sigma(start_percent),
            sigma_end=sampling.percent_to_sigma(end_percent),
            unmasked_first_step=unmasked_first_step,
            first_step_shares_text=first_step_shares_text,
            implementation=attention_implementation,
            flux_rope_layout=flux_rope_layout,
            foreground_masks=masks,
            mask_dilation=mask_dilation,
            subject_tokens=tokens,
            prompt_tokens=prompt_tokens,
            prompt_lines=tuple(lines) if len(lines) > 1 else (),
        )
        patched, _ = apply_shared_attention(model, config, blocks)
        return io.NodeOutput(patched)


def line_subject_tokens(tokenize, line: str, subject_word: str):
    """The subject word's positions in one line of the prompt, or None when the line does not name it (an error
    only if the lines turn out to be per-image prompts)."""
    try:
        return subject_token_positions(tokenize, line, subject_word)
    except ValueError:
        return None

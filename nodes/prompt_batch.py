"""SynCDPromptBatch: one prompt per image of a batch (SynCD data generation, §3.1).

Upstream's data generation gives each of an object's images its own prompt (its own background; nupurkmr9/syncd
``dataset/gen_deformable.py`` and ``gen_rigid.py`` sample a batch of N prompts). Core ComfyUI encodes one prompt
per CONDITIONING; this node encodes one per line and stacks them into a conditioning of one row per prompt, so
latent image i is conditioned on prompt i (ComfyUI repeats the rows over larger batches:
``comfy.utils.repeat_to_batch_size``, image j gets prompt j mod n).
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.tokens import pad_token_chunks, prompt_lines

NODE = "SynCD Per-Image Prompts"

TEXT_TOOLTIP = ("One prompt per line; line i conditions image i of the latent batch (image j: line j mod n when "
                "the batch is larger). Blank lines are skipped and each line is stripped.")
PER_IMAGE_TOOLTIP = ("On (upstream's data generation): every line is its own image's prompt. Off: only the first "
                     "line is encoded and conditions every image (one prompt for the whole set).")
PROMPTS_OUTPUT_TOOLTIP = ("The prompts that were encoded, one per line: connect it to SynCD Masked Shared "
                          "Attention's 'prompt' so automatic masks find the subject word in each image's own prompt.")


def chosen_lines(text: str, prompt_per_image: bool) -> list[str]:
    """The prompts to encode: every line, or only the first (one prompt per set); an empty text is an error."""
    lines = prompt_lines(text)
    if not lines:
        raise ValueError(f"{NODE}: the text is empty; write one prompt per line (line i is image i's prompt)")
    return lines if prompt_per_image else lines[:1]


def pad_token(clip, key: str):
    """The pad token id of ``clip``'s tokenizer for output ``key`` (``l``, ``g``, ``t5xxl``, ``qwen25_7b``, ...): the
    sub-tokenizer is the attribute ``key`` or ``clip_<key>`` (FluxTokenizer, SDXLTokenizer, SD1Tokenizer)."""
    tokenizer = getattr(clip, "tokenizer", None)
    for name in (key, f"clip_{key}"):
        pad = getattr(getattr(tokenizer, name, None), "pad_token", None)
        if pad is not None:
            return pad
    return None


def padded_tokens(clip, lines: list[str]) -> list[dict]:
    """Each line's tokens (``clip.tokenize``), padded per encoder key to the same chunks and lengths
    (:func:`core.tokens.pad_token_chunks`: missing chunks are the empty text's, short chunks end in pad tokens)."""
    tokens = [clip.tokenize(line) for line in lines]
    keys = set(tokens[0])
    if any(set(t) != keys for t in tokens):
        raise ValueError(f"{NODE}: the tokenizer gave different encoders for different lines")
    empty = clip.tokenize("")
    padded = [dict(t) for t in tokens]
    for key in keys:
        try:
            rows = pad_token_chunks([t[key] for t in tokens], empty[key][0], pad_token(clip, key))
        except ValueError as exc:
            raise ValueError(f"{NODE}: {exc} (encoder {key!r}); give prompts of similar length") from None
        for row, chunks in zip(padded, rows):
            row[key] = chunks
    return padded


def stack_conditionings(encoded: list[list]) -> list:
    """Per-prompt CONDITIONINGs (each ``[[cond (1, L, D), extras], ...]``, the same entries) → one whose cond and
    batch-1 tensors in the extras (``pooled_output``, attention masks) are concatenated along the batch."""
    entries = len(encoded[0])
    if any(len(c) != entries for c in encoded):
        raise ValueError(f"{NODE}: the prompts encoded to different numbers of conditioning entries")
    out = []
    for parts in zip(*encoded):
        conds = [cond for cond, _ in parts]
        if len({tuple(c.shape[1:]) for c in conds}) != 1:
            raise ValueError(f"{NODE}: the prompts encoded to different shapes {[tuple(c.shape) for c in conds]}")
        extras = dict(parts[0][1])
        for key, value in parts[0][1].items():
            values = [p[1].get(key) for p in parts]
            if torch.is_tensor(value) and value.ndim and all(torch.is_tensor(v) and v.shape == value.shape
                                                              for v in values):
                extras[key] = torch.cat(values)
        out.append([torch.cat(conds), extras])
    return out


def encode_prompt_batch(clip, lines: list[str]) -> list:
    """One CONDITIONING with one row per line: each line tokenized, padded to a common shape, encoded alone
    (``CLIP.encode_from_tokens_scheduled``, as CLIPTextEncode) and stacked along the batch."""
    if clip is None:
        raise ValueError(f"{NODE}: no CLIP is connected; connect the text encoder (the tiny demo models have none: "
                         f"use SynCD Tiny Demo Per-Image Prompts)")
    tokens = padded_tokens(clip, lines) if len(lines) > 1 else [clip.tokenize(lines[0])]
    return stack_conditionings([clip.encode_from_tokens_scheduled(t) for t in tokens])


class SynCDPromptBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDPromptBatch",
            display_name=NODE,
            category="SynCD/datagen",
            description="One prompt per line → one CONDITIONING with a row per prompt, so each image of the latent "
                        "batch gets its own prompt (SynCD data generation: each image of a set has its own "
                        "background). Lines of different token lengths are padded at the end with the tokenizer's "
                        "pad token.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder (e.g. DualCLIPLoader for Flux)."),
                io.String.Input("text", multiline=True, default="a photo of a dog on a beach\n"
                                "a photo of a dog in a forest\na photo of a dog in a living room",
                                tooltip=TEXT_TOOLTIP),
                io.Boolean.Input("prompt_per_image", default=True, tooltip=PER_IMAGE_TOOLTIP),
            ],
            outputs=[
                io.Conditioning.Output(display_name="CONDITIONING",
                                       tooltip="One row per prompt: row i conditions image i."),
                io.String.Output(display_name="prompts", tooltip=PROMPTS_OUTPUT_TOOLTIP),
            ],
        )

    @classmethod
    def execute(cls, clip, text: str, prompt_per_image: bool = True) -> io.NodeOutput:
        lines = chosen_lines(text, prompt_per_image)
        return io.NodeOutput(encode_prompt_batch(clip, lines), "\n".join(lines))

"""Tiny real ComfyUI text encoders for the tiny demo models: ``comfy.sd.CLIP`` of ComfyUI's own tokenizers and
encoder classes (SD1.5 CLIP-L, SDXL CLIP-L + CLIP-G, Flux CLIP-L + T5-XXL), shrunk through ComfyUI's
``<model_name>_model_config`` overrides to the tiny SD1.5 and Flux models' text widths
(``demo.tiny_models.CONTEXT_DIMS``), with seeded random weights."""

from __future__ import annotations

import torch

CLIP_SMALL = {"num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 2}
CONFIGS = {
    "sd15": {"clip_l_model_config": {**CLIP_SMALL, "hidden_size": 768}},
    # SDXL: context CLIP-L ‖ CLIP-G (both read the penultimate layer), pooled CLIP-G's (its width); the tiny SDXL
    # model's widths (context 64, pooled 64) cannot both be met, so this one is for encoding tests only
    "sdxl": {"clip_l_model_config": {**CLIP_SMALL, "num_hidden_layers": 3, "hidden_size": 32},
             "clip_g_model_config": {**CLIP_SMALL, "num_hidden_layers": 3, "hidden_size": 32}},
    # Flux: context T5 (64), pooled CLIP-L's (32)
    "flux": {"clip_l_model_config": {**CLIP_SMALL, "hidden_size": 32},
             "t5xxl_model_config": {"d_model": 64, "d_ff": 64, "d_kv": 16, "num_heads": 4, "num_layers": 2}},
}


def build_clip(family: str, seed: int = 0, std: float = 0.3):
    """A ComfyUI CLIP of ``family`` (sd15, sdxl, flux) at tiny size, weights normal(0, ``std``) from ``seed``."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base
    import comfy.text_encoders.flux

    flux = comfy.text_encoders.flux
    tokenizer, model = {"sd15": (comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                        "sdxl": (comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel),
                        "flux": (flux.FluxTokenizer, flux.FluxClipModel)}[family]
    options = {"dtype": torch.float32, **{k: dict(v) for k, v in CONFIGS[family].items()}}
    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, model), model_options=options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return clip


def encode(clip, text: str, **tokenizer_options) -> list:
    """What CLIPTextEncode gives for ``text`` (its code path: tokenize, ``encode_from_tokens_scheduled``)."""
    tokens = clip.tokenize(text, tokenizer_options=tokenizer_options) if tokenizer_options else clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)

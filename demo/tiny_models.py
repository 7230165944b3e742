"""Tiny real-architecture ComfyUI models with seeded random weights.

The pack's demo workflows and its tests run on these: ComfyUI's own model
classes (``comfy.supported_models`` configs, ``ModelPatcher``, ``comfy.sd.VAE``)
at a width small enough for a CPU, so every code path is the one a real
checkpoint takes, only the numbers are random: a ``comfy.supported_models`` config, ``get_model``, seeded
weights (ComfyUI's ops leave them uninitialized), ``ModelPatcher``.
"""

from __future__ import annotations

import hashlib

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.taesd.taesd

from ..nodes.patch_kit import ENCODED_TOKENS, TOKENIZER, add_conditioning_check

FAMILIES = ("sd15", "sdxl", "flux", "qwen_image")

# Text-conditioning sizes of the tiny families: (context dim, pooled dim or 0).
CONTEXT_DIMS = {"sd15": (768, 0), "sdxl": (64, 64), "flux": (64, 32), "qwen_image": (64, 0)}
SDXL_SIZE_EMBED_DIM = 6 * 256  # model_base.SDXL.encode_adm: six Timestep(256) size/crop embeddings
LATENT_CHANNELS = {"sd15": 4, "sdxl": 4, "flux": 16, "qwen_image": 16}
# Latent shape after the family's spatial size: Qwen-Image samples (B, 16, 1, h, w) video-style latents (Wan 2.1).
LATENT_FRAMES = {"qwen_image": (1,)}


def _unet_base(width: int) -> dict:
    if width % 32:
        raise ValueError(f"width must be a multiple of 32 for a UNet (GroupNorm of 32 groups); got {width}")
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": width,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "dtype": torch.float32,
    }


def model_config(family: str, width: int):
    """The ``comfy.supported_models`` config of a tiny model of ``family``."""
    if family == "sd15":
        unet = _unet_base(width) | {
            "num_res_blocks": [1, 1],
            "channel_mult": [1, 2],
            "transformer_depth": [1, 1],
            "transformer_depth_output": [1, 1, 1, 1],
            "transformer_depth_middle": 1,
            "context_dim": CONTEXT_DIMS["sd15"][0],
            "use_linear_in_transformer": False,
            "adm_in_channels": None,
        }
        return comfy.supported_models.SD15(unet)
    if family == "sdxl":
        # SDXL's shape: no attention at the first level, deeper transformers lower down,
        # linear projections, head size fixed (num_head_channels) instead of head count.
        unet = _unet_base(width) | {
            "num_res_blocks": [1, 1, 1],
            "channel_mult": [1, 2, 2],
            "transformer_depth": [0, 1, 2],
            "transformer_depth_output": [0, 0, 1, 1, 2, 2],
            "transformer_depth_middle": 2,
            "context_dim": CONTEXT_DIMS["sdxl"][0],
            "use_linear_in_transformer": True,
            "adm_in_channels": CONTEXT_DIMS["sdxl"][1] + SDXL_SIZE_EMBED_DIM,
            "num_classes": "sequential",
            "num_head_channels": 16,
            "num_heads": -1,
        }
        return comfy.supported_models.SDXL(unet)
    if family == "flux":
        if width % 16:
            raise ValueError(f"width must be a multiple of 16 for Flux (head size 16); got {width}")
        dit = {
            "image_model": "flux",
            "in_channels": 16,
            "out_channels": 16,
            "vec_in_dim": CONTEXT_DIMS["flux"][1],
            "context_in_dim": CONTEXT_DIMS["flux"][0],
            "hidden_size": width,
            "mlp_ratio": 2.0,
            "num_heads": width // 16,
            "depth": 2,
            "depth_single_blocks": 2,
            "axes_dim": [4, 6, 6],
            "theta": 10000,
            "qkv_bias": True,
            "guidance_embed": True,
            "patch_size": 2,
        }
        return comfy.supported_models.Flux(dit)
    if family == "qwen_image":
        if width % 16:
            raise ValueError(f"width must be a multiple of 16 for Qwen-Image (head size 16); got {width}")
        dit = {  # comfy/ldm/qwen_image/model.py: 3-axis RoPE (index, row, col) summing to the head size
            "image_model": "qwen_image",
            "patch_size": 2,
            "in_channels": 64,
            "out_channels": 16,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": width // 16,
            "joint_attention_dim": CONTEXT_DIMS["qwen_image"][0],
            "axes_dims_rope": (4, 6, 6),
        }
        return comfy.supported_models.QwenImage(dit)
    raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")


def _seeded_normal_(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """ComfyUI's ops skip weight init (they hold torch.empty): fill every parameter deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


def build_model(family: str, seed: int = 0, width: int = 32, std: float = 0.02) -> comfy.model_patcher.ModelPatcher:
    """A tiny ``family`` diffusion model with seeded random weights (normal, ``std``), wrapped like a loaded
    checkpoint; tests of an effect use a larger ``std`` so that the weights carry signal."""
    cfg = model_config(family, width)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    _seeded_normal_(model.diffusion_model, seed, std)
    patcher = comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
    patcher.model_options[TOKENIZER] = qwen_token_ids if family == "qwen_image" else token_ids  # encode_text's tokens
    add_conditioning_check(patcher, "SynCD Tiny Demo Model")  # e.g. a tiny text encoding of another family
    return patcher


def build_vae(family: str, seed: int = 0) -> comfy.sd.VAE:
    """A TAESD-architecture VAE (ComfyUI loads it from its state-dict keys) with seeded random weights; for
    Qwen-Image a tiny Wan 2.1 VAE (:func:`build_wan_vae`), as ComfyUI uses."""
    if family == "qwen_image":
        return build_wan_vae(seed)
    taesd = comfy.taesd.taesd.TAESD(latent_channels=LATENT_CHANNELS[family])
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # fan-in scaled weights, zero biases: decoded images are mid-grey textures, not clipped
        for p in taesd.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.zero_()
        taesd.taesd_decoder[-1].bias.fill_(0.5)  # TAESD decodes to [0, 1]
    sd = taesd.state_dict()
    sd["vae_scale"] = torch.tensor(1.0)
    sd["vae_shift"] = torch.tensor(0.0)
    return comfy.sd.VAE(sd=sd)


TINY_WAN_DIM = 8  # ComfyUI's Wan 2.1 VAE has dim 96 (comfy/sd.py); the tiny one keeps the architecture at dim 8


def build_wan_vae(seed: int = 0) -> comfy.sd.VAE:
    """A ComfyUI VAE of the Wan 2.1 architecture (``comfy.ldm.wan.vae.WanVAE``: 16 latent channels, 8× spatial and
    4× temporal compression, ComfyUI's Qwen-Image VAE) at width :data:`TINY_WAN_DIM`, seeded.

    ``comfy.sd.VAE`` recognises a Wan 2.1 state dict by its keys but builds it at the fixed width 96; the tiny
    model is put in its place (with its own ModelPatcher), so encode/decode run ComfyUI's Wan code paths."""
    import comfy.ldm.wan.vae

    wan = comfy.ldm.wan.vae.WanVAE(dim=TINY_WAN_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                   attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # fan-in scaled weights, RMS-norm gains 1, zero biases (ComfyUI's ops leave them empty)
        for name, p in wan.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.zero_()
    marker = {"decoder.middle.0.residual.0.gamma": torch.ones(384, 1, 1, 1)}  # ComfyUI's Wan 2.1 key (dim 96)
    wan.requires_grad_(False)
    vae = comfy.sd.VAE(sd=marker)
    vae.first_stage_model = wan.eval().to(vae.vae_dtype)
    vae.patcher = comfy.model_patcher.ModelPatcher(vae.first_stage_model, load_device=vae.device,
                                                   offload_device=comfy.model_management.vae_offload_device())
    return vae


_TOKENIZER = None
_QWEN_TOKENIZER = None


def tokenizer() -> comfy.sd1_clip.SDTokenizer:
    """ComfyUI's CLIP-L tokenizer (shipped with ComfyUI): the tiny demo text encoding's tokens."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = comfy.sd1_clip.SDTokenizer()
    return _TOKENIZER


def token_ids(text: str) -> list[int]:
    """The CLIP-L token ids of ``text`` as ComfyUI tokenizes them: 77 per chunk (start, words, end, padding), the
    chunks one after the other, as CLIPTextEncode concatenates their encodings."""
    batches = tokenizer().tokenize_with_weights(text)
    return [int(t[0]) for batch in batches for t in batch]


def qwen_token_ids(text: str) -> list[int]:
    """The Qwen2.5-VL token ids of ``text`` that condition a Qwen-Image model: ComfyUI's ``QwenImageTokenizer``
    (its tokenizer files ship with ComfyUI, so this works offline) with the chat-template prefix the text encoder
    drops removed (:func:`core.tokens.qwen_template_end`)."""
    global _QWEN_TOKENIZER
    from ..core.tokens import qwen_template_end

    if _QWEN_TOKENIZER is None:
        import comfy.text_encoders.qwen_image

        _QWEN_TOKENIZER = comfy.text_encoders.qwen_image.QwenImageTokenizer()
    batches = _QWEN_TOKENIZER.tokenize_with_weights(text)
    ids = [int(t[0]) for batch in next(iter(batches.values())) for t in batch]
    return ids[qwen_template_end(ids):]


def _vector(key: str, dim: int) -> torch.Tensor:
    digest = hashlib.sha256(key.encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randn(dim, generator=gen)


def encode_text(family: str, text: str, seed: int = 0) -> list:
    """CONDITIONING for a tiny ``family`` model without a text encoder.

    Each CLIP-L token (Qwen-Image: each Qwen2.5-VL token after the dropped template
    prefix, :func:`qwen_token_ids`) becomes a seeded random vector of its token id plus one of
    its position in its 77-token chunk, so equal prompts give equal conditioning
    and the token positions are the real tokenizer's (automatic masks find the
    subject word there, and check the ids under ``ENCODED_TOKENS``).
    """
    ctx_dim, pooled_dim = CONTEXT_DIMS[family]
    ids = qwen_token_ids(text) if family == "qwen_image" else token_ids(text)
    ctx = torch.stack([_vector(f"{seed}/tok/{t}", ctx_dim) + 0.5 * _vector(f"{seed}/pos/{i % 77}", ctx_dim)
                       for i, t in enumerate(ids)]).unsqueeze(0)
    extra = {ENCODED_TOKENS: tuple(ids)}
    if pooled_dim:
        extra["pooled_output"] = ctx[:, :, :pooled_dim].mean(1)
    if family == "flux":
        extra["guidance"] = 3.5
    return [[ctx, extra]]


# --- Tiny global-image feature: CLIP vision + IP-Adapter Plus ---------------------------------------------------

TINY_CLIP_VISION = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 32,
                    "image_size": 28, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64,
                    "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 2,
                    "num_channels": 3, "num_hidden_layers": 3, "patch_size": 14, "projection_dim": 16,
                    "torch_dtype": "float32"}


def build_clip_vision(seed: int = 0):
    """A ComfyUI CLIP_VISION (``comfy.clip_vision.ClipVisionModel``) of a tiny ViT config with seeded weights."""
    import json
    import os
    import tempfile

    import comfy.clip_vision

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny_clip_vision.json")
        with open(path, "w") as f:
            json.dump(TINY_CLIP_VISION, f)
        clip = comfy.clip_vision.ClipVisionModel(path)
    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():  # ComfyUI's ops leave weights uninitialized
        for name, p in clip.model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return clip


def build_ip_adapter(model: comfy.model_patcher.ModelPatcher, seed: int = 0, dim: int = 64,
                     num_queries: int = 4) -> dict:
    """An IP-Adapter Plus (IPADAPTER dict, upstream layout) for a tiny UNet and the tiny CLIP vision."""
    from ..nodes.ip_adapter import cross_attentions
    from ..core.ip_adapter_model import RESAMPLER_DIM_HEAD, Resampler, layer_key

    targets = cross_attentions(model.get_model_object("diffusion_model"))
    if not targets:
        raise ValueError("the tiny IP-Adapter needs a UNet model (sd15 or sdxl); Flux has no IP-Adapter")
    cross_dim = targets[0].shape[1]
    resampler = Resampler(dim, 1, dim // RESAMPLER_DIM_HEAD, num_queries, TINY_CLIP_VISION["hidden_size"], cross_dim)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in resampler.named_parameters():
            if "norm" in name or ".1.0." in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
    layers = {}
    for k, target in enumerate(targets):
        for which in ("k", "v"):
            layers[layer_key(k, which)] = torch.randn(target.shape, generator=gen) / target.shape[1] ** 0.5
    return {"image_proj": resampler.state_dict(), "ip_adapter": layers}

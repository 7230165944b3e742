"""Synthetic IP-Adapter Plus and SynCD checkpoints with the upstream key names and shapes (plain torch).

Names and shapes follow the upstream code, not ComfyUI, so matching them against ComfyUI models
(``tests/comfy/syncd_synthetic_weights.py``) tests the mapping:
tencent-ailab/IP-Adapter ``ip_adapter/resampler.py`` + ``ip_adapter.py`` (IPAdapterPlus / IPAdapterPlusXL);
nupurkmr9/syncd ``method/pipelines/sdxl_pipeline`` (diffusers UNet2DConditionModel module names, PEFT
``add_adapter`` LoRA, ``RefAttnProc.attn_op`` = diffusers IPAdapterAttnProcessor2_0) and
``method/pipelines/flux_pipeline/model.py`` (PEFT ``get_peft_model`` on FluxTransformer2DModel).
"""

from __future__ import annotations

import torch

# diffusers UNet structure: per down level (block_out_channels, transformer depth; 0 = no attention),
# layers_per_block, mid-block depth.
SDXL_UNET = ([(320, 0), (640, 2), (1280, 10)], 2, 10)
SD15_UNET = ([(320, 1), (640, 1), (1280, 1), (1280, 0)], 2, 1)
TINY_SDXL_UNET = ([(32, 0), (64, 1), (64, 2)], 1, 2)      # tiny_models.model_config("sdxl", 32)
TINY_SD15_UNET = ([(32, 1), (64, 1)], 1, 1)               # tiny_models.model_config("sd15", 32)

FLUX_DEV = {"hidden": 3072, "mlp": 12288, "double": 19, "single": 38}


def transformer_blocks(unet) -> list[tuple[str, int]]:
    """(diffusers module path, channels) of every transformer block, in ``attn_processors`` order:
    down_blocks, up_blocks, mid_block (UNet2DConditionModel registers them in that order)."""
    levels, layers, mid_depth = unet
    out = []
    for i, (ch, depth) in enumerate(levels):
        for a in range(layers if depth else 0):
            out += [(f"down_blocks.{i}.attentions.{a}.transformer_blocks.{t}", ch) for t in range(depth)]
    for u, (ch, depth) in enumerate(reversed(levels)):
        for a in range(layers + 1 if depth else 0):
            out += [(f"up_blocks.{u}.attentions.{a}.transformer_blocks.{t}", ch) for t in range(depth)]
    out += [(f"mid_block.attentions.0.transformer_blocks.{t}", levels[-1][0]) for t in range(mid_depth)]
    return out


def _t(shape, gen, device, std=0.05):
    if device == "meta":
        return torch.empty(shape, device="meta")
    return torch.randn(shape, generator=gen) * std


def ipadapter_plus(unet, cross_dim: int, embedding_dim: int, dim: int, heads: int, seed=0, device="cpu",
                   depth=4, num_queries=16) -> dict:
    """{"image_proj": Resampler weights, "ip_adapter": {"1.to_k_ip.weight", ...}} (upstream layout)."""
    gen = torch.Generator().manual_seed(seed)
    inner = heads * 64
    proj = {"latents": _t((1, num_queries, dim), gen, device, 1 / dim ** 0.5),
            "proj_in.weight": _t((dim, embedding_dim), gen, device), "proj_in.bias": _t((dim,), gen, device),
            "proj_out.weight": _t((cross_dim, dim), gen, device), "proj_out.bias": _t((cross_dim,), gen, device),
            "norm_out.weight": 1 + _t((cross_dim,), gen, device), "norm_out.bias": _t((cross_dim,), gen, device)}
    for i in range(depth):
        p = f"layers.{i}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            proj[f"{p}{norm}.weight"] = 1 + _t((dim,), gen, device)
            proj[f"{p}{norm}.bias"] = _t((dim,), gen, device)
        proj[f"{p}0.to_q.weight"] = _t((inner, dim), gen, device)
        proj[f"{p}0.to_kv.weight"] = _t((2 * inner, dim), gen, device)
        proj[f"{p}0.to_out.weight"] = _t((dim, inner), gen, device)
        proj[f"{p}1.1.weight"] = _t((4 * dim, dim), gen, device)
        proj[f"{p}1.3.weight"] = _t((dim, 4 * dim), gen, device)
    layers = {}
    for k, (_, ch) in enumerate(transformer_blocks(unet)):
        layers[f"{2 * k + 1}.to_k_ip.weight"] = _t((ch, cross_dim), gen, device, 0.2)
        layers[f"{2 * k + 1}.to_v_ip.weight"] = _t((ch, cross_dim), gen, device, 0.2)
    return {"image_proj": proj, "ip_adapter": layers}


def syncd_sdxl_checkpoint(unet, cross_dim: int, rank=128, seed=1, device="cpu", std=0.05) -> dict:
    """The Lightning ``state_dict`` SynCD saves (method/main.py keeps keys with lora / to_k_ip / to_v_ip)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for path, ch in transformer_blocks(unet):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            sd[f"unet.{path}.attn1.{proj}.lora_A.default.weight"] = _t((rank, ch), gen, device, std)
            sd[f"unet.{path}.attn1.{proj}.lora_B.default.weight"] = _t((ch, rank), gen, device, std)
        for kv in ("k", "v"):
            sd[f"unet.{path}.attn2.processor.attn_op.to_{kv}_ip.0.weight"] = _t((ch, cross_dim), gen, device, 0.2)
    return sd


FLUX_DOUBLE_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2")
FLUX_SINGLE_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v")


def syncd_flux_checkpoint(hidden: int, mlp: int, double: int, single: int, rank=32, seed=2, device="cpu",
                          std=0.05) -> dict:
    """``pytorch_model.bin``: PEFT LoRA keys of the SynCDDiffusion module (``transformer.base_model.model.``)."""
    gen = torch.Generator().manual_seed(seed)
    io_shapes = {"ff.net.0.proj": (hidden, mlp), "ff.net.2": (mlp, hidden), "ff_context.net.0.proj": (hidden, mlp),
                 "ff_context.net.2": (mlp, hidden)}
    sd = {}
    for prefix, count, modules in (("transformer_blocks", double, FLUX_DOUBLE_MODULES),
                                   ("single_transformer_blocks", single, FLUX_SINGLE_MODULES)):
        for i in range(count):
            for module in modules:
                n_in, n_out = io_shapes.get(module, (hidden, hidden))
                key = f"transformer.base_model.model.{prefix}.{i}.{module}"
                sd[f"{key}.lora_A.default.weight"] = _t((rank, n_in), gen, device, std)
                sd[f"{key}.lora_B.default.weight"] = _t((n_out, rank), gen, device, std)
    return sd

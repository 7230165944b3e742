"""IP-Adapter Plus weights in plain torch: the Resampler image projection and the per-layer ``to_k_ip``/``to_v_ip``.

Layout (tencent-ailab/IP-Adapter ``ip_adapter/ip_adapter.py``, ``IPAdapterPlus``/``IPAdapterPlusXL``): a file holds
``image_proj`` (the Resampler of ``ip_adapter/resampler.py``: depth 4, dim_head 64, 16 queries; SDXL dim 1280 with
20 heads, SD1.5 dim 768 with 12 heads) and ``ip_adapter``, the state dict of
``ModuleList(unet.attn_processors.values())``: diffusers lists every attention processor (attn1, attn2 of each
transformer block; down, up, mid blocks), only attn2 processors have weights, so the keys are
``"{2k+1}.to_k_ip.weight"`` and ``"{2k+1}.to_v_ip.weight"`` for the k-th cross-attention, shape
(hidden size, cross-attention dim).
``.safetensors`` files carry the same dicts flattened with ``image_proj.``/``ip_adapter.`` prefixes.

The IPADAPTER value passed between nodes is that dict, ``{"image_proj": {...}, "ip_adapter": {...}}``, the format
cubiq/ComfyUI_IPAdapter_plus uses for its IPADAPTER type as well.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

RESAMPLER_DIM_HEAD = 64  # fixed in upstream IPAdapterPlus / IPAdapterPlusXL
_LAYER_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")


class PerceiverAttention(nn.Module):
    """Latents attend to [image features ; latents] (upstream ``resampler.PerceiverAttention``)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # upstream: softmax(q·kᵀ/√d) in float32, the same value
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Resampler(nn.Module):
    """Perceiver resampler: ``num_queries`` learned latents read the CLIP hidden states (IP-Adapter "Plus")."""

    def __init__(self, dim: int, depth: int, heads: int, num_queries: int, embedding_dim: int, output_dim: int,
                 ff_mult: int = 4, dim_head: int = RESAMPLER_DIM_HEAD):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, dim_head, heads),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                              nn.Linear(dim * ff_mult, dim, bias=False)),
            ]) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "Resampler":
        """Build with the sizes the weights imply and load them strictly (float32)."""
        try:
            _, num_queries, dim = sd["latents"].shape
            embedding_dim = sd["proj_in.weight"].shape[1]
            output_dim = sd["proj_out.weight"].shape[0]
            inner = sd["layers.0.0.to_q.weight"].shape[0]
            ff_mult = sd["layers.0.1.1.weight"].shape[0] // dim
        except KeyError as exc:
            raise ValueError(f"IP-Adapter: image_proj has no {exc}; this is not an IP-Adapter Plus Resampler "
                             f"(use ip-adapter-plus_sdxl_vit-h or ip-adapter-plus_sd15)") from None
        depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
        if inner % RESAMPLER_DIM_HEAD:
            raise ValueError(f"IP-Adapter: Resampler inner width {inner} is not a multiple of the head size "
                             f"{RESAMPLER_DIM_HEAD}")
        model = cls(dim, depth, inner // RESAMPLER_DIM_HEAD, num_queries, embedding_dim, output_dim, ff_mult)
        try:
            model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"IP-Adapter: the image_proj weights do not fit an IP-Adapter Plus Resampler: {exc}") \
                from None
        return model.eval()


def split_flat_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``image_proj.*``/``ip_adapter.*`` keys (the .safetensors layout) -> the nested two-dict layout."""
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    unknown = []
    for key, value in sd.items():
        part, _, rest = key.partition(".")
        if part in out and rest:
            out[part][rest] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"IP-Adapter: {len(unknown)} keys are neither image_proj.* nor ip_adapter.*, e.g. "
                         f"{', '.join(sorted(unknown)[:5])}; is this an IP-Adapter file?")
    return out


def check_plus_layout(ipadapter) -> None:
    """Raise unless ``ipadapter`` is the two-dict IP-Adapter Plus layout described in the module docstring."""
    if not isinstance(ipadapter, dict) or not {"image_proj", "ip_adapter"} <= set(ipadapter):
        raise ValueError("IPADAPTER: expected a dict with 'image_proj' and 'ip_adapter' (an IP-Adapter file as the "
                         "SynCD IP-Adapter Loader returns it)")
    if "latents" not in ipadapter["image_proj"]:
        raise ValueError("IP-Adapter: this is not an IP-Adapter *Plus* model (its image projection has no Resampler "
                         "'latents'); SynCD uses ip-adapter-plus_sdxl_vit-h (SDXL) or ip-adapter-plus_sd15")
    ip_layers(ipadapter["ip_adapter"])


def ip_layers(sd: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (to_k_ip, to_v_ip) weights of every cross-attention, in the upstream order (keys 1, 3, 5, ...)."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _LAYER_KEY.match(key)
        if not m:
            raise ValueError(f"IP-Adapter: unexpected ip_adapter key {key!r} (expected N.to_k_ip.weight and "
                             f"N.to_v_ip.weight); FaceID and other variants are not supported")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    expected = [2 * k + 1 for k in range(len(found))]
    if sorted(found) != expected:
        raise ValueError(f"IP-Adapter: ip_adapter layers are numbered {sorted(found)[:6]}..., expected the odd "
                         f"numbers 1, 3, 5, ... of diffusers' attn2 processors")
    layers = []
    for n in expected:
        pair = found[n]
        if set(pair) != {"k", "v"}:
            raise ValueError(f"IP-Adapter: layer {n} lacks to_{'v' if 'k' in pair else 'k'}_ip.weight")
        if pair["k"].shape != pair["v"].shape or pair["k"].ndim != 2:
            raise ValueError(f"IP-Adapter: layer {n} has to_k_ip {tuple(pair['k'].shape)} and to_v_ip "
                             f"{tuple(pair['v'].shape)}; both must be (hidden size, cross-attention dim)")
        layers.append((pair["k"], pair["v"]))
    return layers


def layer_key(k: int, which: str) -> str:
    """ip_adapter key of the k-th cross-attention's ``to_{which}_ip`` weight."""
    return f"{2 * k + 1}.to_{which}_ip.weight"

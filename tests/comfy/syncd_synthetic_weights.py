"""Full-size ComfyUI models on the meta device, and the synthetic upstream weights to match against them.

The weights are built in plain torch by ``tests/unit/synthetic_upstream_weights.py`` (the unit tests parse them
without ComfyUI); they are re-exported here so the ComfyUI tests use one module.
"""

from __future__ import annotations

import pathlib
import sys

import torch

UNIT_TESTS = str(pathlib.Path(__file__).resolve().parents[1] / "unit")
if UNIT_TESTS not in sys.path:
    sys.path.insert(0, UNIT_TESTS)

from synthetic_upstream_weights import (FLUX_DEV, SD15_UNET, SDXL_UNET, TINY_SDXL_UNET,  # noqa: E402,F401
                                        ipadapter_plus, syncd_flux_checkpoint, syncd_sdxl_checkpoint,
                                        transformer_blocks)

# ComfyUI ``unet_config`` dicts of FLUX.1-dev, SDXL and SD1.5 at full size.
FLUX_DEV_CONFIG = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
                   "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
                   "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
                   "guidance_embed": True}
SDXL_CONFIG = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
               "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
               "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
               "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
               "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
               "use_temporal_attention": False, "use_temporal_resblock": False}
SD15_CONFIG = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
               "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
               "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
               "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
               "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
               "use_temporal_attention": False, "use_temporal_resblock": False}


def meta_model(config_cls, unet_config):
    """A full-size ComfyUI model on the meta device (no memory), wrapped in a ModelPatcher."""
    import comfy.model_patcher

    cfg = config_cls(dict(unet_config))
    cfg.set_inference_dtype(torch.float16, None)
    model = cfg.get_model({}, device="meta")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))

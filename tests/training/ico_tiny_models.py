"""Tiny SD1.5/SDXL diffusers pipelines with seeded random weights, saved as diffusers folders, and a tiny image
set: what the ICO training tests train on (CPU, seconds)."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from PIL import Image

TEXT_DIM = 32       # CLIP-L stand-in width (SD1.5 context; SDXL: + CLIP-G's)
TEXT_DIM_G = 64     # CLIP-G stand-in width (not CLIP-L's: diffusers tells the two apart by width)
TIME_EMBED = 256    # SDXL size embeddings: ComfyUI's SDXL.encode_adm uses Timestep(256) each


def tokenizer_path() -> pathlib.Path:
    """ComfyUI's CLIP-L tokenizer files (comfy/sd1_tokenizer)."""
    from comfyui_syncd.comfy_path import find_comfyui

    return find_comfyui() / "comfy" / "sd1_tokenizer"


def clip_config(dim: int, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=dim,
                          hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **kw)


def unet_sd15():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=32)


def unet_sdxl():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2), cross_attention_dim=TEXT_DIM + TEXT_DIM_G,
                                attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
                                addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
                                projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_DIM_G)


# ComfyUI unet_configs of the same UNets (comfy.supported_models SD15 / SDXL; tests build ComfyUI models from them)
def comfy_unet_config(family: str) -> dict:
    base = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
            "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
            "channel_mult": [1, 2], "use_temporal_attention": False, "use_temporal_resblock": False,
            "dtype": torch.float32}
    if family == "sd15":
        return base | {"transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
                       "transformer_depth_middle": 1, "context_dim": TEXT_DIM, "use_linear_in_transformer": False,
                       "adm_in_channels": None}
    # output blocks pop their depth from the end of the list; diffusers' mid block has the last level's depth
    return base | {"transformer_depth": [0, 2], "transformer_depth_output": [0, 0, 2, 2],
                   "transformer_depth_middle": 2, "context_dim": TEXT_DIM + TEXT_DIM_G,
                   "use_linear_in_transformer": True, "adm_in_channels": 6 * TIME_EMBED + TEXT_DIM_G,
                   "num_classes": "sequential", "num_head_channels": 16, "num_heads": -1}


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=32, sample_size=64)


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, steps_offset=1)


def save_pipeline(folder, family: str = "sd15", seed: int = 0) -> pathlib.Path:
    """A tiny ``family`` pipeline with seeded weights saved as a diffusers folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = pathlib.Path(folder)
    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(tokenizer_path(), model_max_length=77)
    text_encoder = CLIPTextModel(clip_config(TEXT_DIM)).eval()
    if family == "sd15":
        pipe = StableDiffusionPipeline(vae=vae(), text_encoder=text_encoder, tokenizer=tok, unet=unet_sd15(),
                                       scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        tok2 = CLIPTokenizer.from_pretrained(tokenizer_path(), model_max_length=77, pad_token="!")
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(TEXT_DIM_G)).eval()
        pipe = StableDiffusionXLPipeline(vae=vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tok, tokenizer_2=tok2, unet=unet_sdxl(), scheduler=scheduler())
    pipe.save_pretrained(folder)
    return folder


def save_images(folder, count: int = 3, size: int = 64, seed: int = 0, captions=None) -> pathlib.Path:
    """``count`` smooth random colour images (PNG, not square: crops matter), optionally with .txt captions."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = size, size + 16
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        colour = rng.uniform(0, 255, size=(3,))
        freq = rng.uniform(1, 4, size=(3,))
        img = np.stack([colour[c] * (0.5 + 0.5 * np.sin(freq[c] * 6.28 * (xx + yy * (c + 1)))) for c in range(3)],
                       axis=-1)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"img{i:02d}.png")
        if captions is not None:
            (folder / f"img{i:02d}.txt").write_text(captions[i % len(captions)])
    return folder


def ico_raw(model, images, reg, output_dir, **train) -> dict:
    """The raw config of the reference runs (6 steps, checkpoints every 2, validation at 3 and 6, a learning rate
    high enough for random tiny weights to move visibly)."""
    return {"model": {"path": str(model)},
            "data": {"images": str(images), "resolution": 64, "num_workers": 0, "reg_images": str(reg)},
            "concept": {"name": "myconcept", "noun": "teddy bear"},
            "train": {"output_dir": str(output_dir), "max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 0,
                      "learning_rate": 1.0e-3, **train},
            "validation": {"every": 3, "steps": 2, "prompts": ["embedding:myconcept teddy bear",
                                                               "a photo of embedding:myconcept teddy bear, sunset"]}}


def save_single_file(folder, family: str, path) -> pathlib.Path:
    """The tiny diffusers pipeline in ``folder`` as one LDM-layout checkpoint, the layout of ComfyUI's
    ``models/checkpoints`` files (UNet keys from ComfyUI's ``unet_to_diffusers``, VAE and OpenCLIP text encoder
    from ``comfy.diffusers_convert``). Needs ComfyUI imported."""
    import comfy.diffusers_convert
    import comfy.utils
    import safetensors.torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = pathlib.Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()
    unet_map = comfy.utils.unet_to_diffusers(comfy_unet_config(family))
    sd = {"model.diffusion_model." + unet_map[k]: v for k, v in unet.items()}
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").state_dict()
    sd |= {"first_stage_model." + k: v for k, v in comfy.diffusers_convert.convert_vae_state_dict(vae).items()}

    def hf_keys(model):
        return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                for k, v in model.state_dict().items()}

    clip_l = hf_keys(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"))
    prefix = "cond_stage_model.transformer." if family == "sd15" else "conditioner.embedders.0.transformer."
    sd |= {prefix + k: v for k, v in clip_l.items()}
    if family == "sdxl":  # CLIP-G in OpenCLIP's layout
        g = comfy.diffusers_convert.convert_text_enc_state_dict_v20(
            hf_keys(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")))
        g["token_embedding.weight"] = g.pop("text_model.embeddings.token_embedding.weight")
        g["positional_embedding"] = g.pop("text_model.embeddings.position_embedding.weight")
        g["ln_final.weight"] = g.pop("text_model.final_layer_norm.weight")
        g["ln_final.bias"] = g.pop("text_model.final_layer_norm.bias")
        g["text_projection"] = g.pop("text_projection.weight").T
        sd |= {"conditioner.embedders.1.model." + ("transformer." if k.startswith("resblocks.") else "") + k: v
               for k, v in g.items()}
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return pathlib.Path(path)

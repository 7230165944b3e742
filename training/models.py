"""SD1.5 and SDXL for training, with diffusers: loading, text conditioning, sampling.

``load`` reads the pieces (tokenizers, text encoders, UNet, VAE, DDPM noise schedule) from a diffusers folder or
from one single-file checkpoint as ComfyUI users have them (``models/checkpoints/*.safetensors``), through
diffusers' ``from_single_file``. Single files need the component configs of their family: diffusers fetches them
from the Hub, or ``diffusers_config`` names a local diffusers folder (or a Hub id) to take them from.

Text conditioning goes through ``conditioning(parts, input_embeds, pool_ids)``: the text encoders run from given
*input embeddings* (token + position embedding, what ``CLIPTextEmbeddings`` returns), so a training script can
build prompts in that space (ICO's learnable contexts) and still get exactly the layers the family conditions on:
SD1.5 the final-layer-normed last layer of CLIP-L; SDXL the penultimate layers of CLIP-L and CLIP-G side by side
plus CLIP-G's projected pooled output (as ComfyUI and diffusers encode them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from typing import Optional, Sequence

import torch

FAMILIES = ("sd15", "sdxl")
MAX_TOKENS = 77
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".bin", ".pth")


@dataclasses.dataclass
class Parts:
    family: str
    tokenizers: list
    text_encoders: list
    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object


def family_of_keys(keys, path="checkpoint") -> str:
    """``sd15`` or ``sdxl`` from the keys of a single-file (LDM layout) checkpoint."""
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ValueError(f"{path} is an SD2.x checkpoint (OpenCLIP-H text encoder); these scripts train SD1.5 "
                         f"and SDXL")
    raise ValueError(f"{path} is neither an SD1.5 nor an SDXL single-file checkpoint (no CLIP text encoder keys "
                     f"'cond_stage_model.transformer.*' or 'conditioner.embedders.1.*'); give a full checkpoint "
                     f"or a diffusers folder")


def _single_file_keys(path: pathlib.Path):
    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    from ..core.weights import read_pickle, tensor_dict

    return list(tensor_dict(read_pickle(path), str(path))[0])


def detect_family(path) -> str:
    """``sd15`` or ``sdxl`` for a diffusers folder (a second text encoder means SDXL) or a single file."""
    path = pathlib.Path(path)
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise ValueError(f"{path} is not a diffusers pipeline folder (no unet/ subfolder)")
        return "sdxl" if (path / "text_encoder_2").is_dir() else "sd15"
    if not path.is_file():
        raise FileNotFoundError(f"model {path} does not exist")
    return family_of_keys(_single_file_keys(path), str(path))


def load(path, family: str = "auto", diffusers_config: Optional[str] = None,
         prediction_types: Sequence[str] = ("epsilon",)) -> Parts:
    """The pieces of the SD1.5/SDXL model at ``path`` (diffusers folder or single file), in float32 on the CPU;
    a model whose scheduler predicts anything but ``prediction_types`` is refused."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = pathlib.Path(path)
    detected = detect_family(path)
    if family not in ("auto", detected):
        raise ValueError(f"{path} is an {detected} model but the config says family: {family}")
    family = detected
    if path.is_dir():
        names = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=n.replace("text_encoder", "tokenizer"))
                      for n in names]
        encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler")
    else:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        kwargs = {"config": diffusers_config} if diffusers_config else {}
        if family == "sdxl":
            pipe = StableDiffusionXLPipeline.from_single_file(str(path), **kwargs)
            tokenizers, encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
        else:
            pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None,
                                                            requires_safety_checker=False, **kwargs)
            tokenizers, encoders = [pipe.tokenizer], [pipe.text_encoder]
        unet, vae, scheduler_config = pipe.unet, pipe.vae, pipe.scheduler.config
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    if noise_scheduler.config.prediction_type not in prediction_types:
        raise ValueError(f"{path} predicts {noise_scheduler.config.prediction_type}; this script trains "
                         f"{' or '.join(prediction_types)}-prediction SD1.5/SDXL models")
    for module in (*encoders, unet, vae):
        missing = [n for n, t in module.state_dict().items() if t.is_meta]
        if missing:
            raise ValueError(f"{path}: {type(module).__name__} weights are missing from the checkpoint "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    parts = Parts(family, tokenizers, encoders, unet.float(), vae.float(), noise_scheduler)
    for module in (*encoders, unet, vae):
        module.requires_grad_(False)
        module.eval()
    return parts


# --- text conditioning ---------------------------------------------------------------------------------------

def text_model(encoder):
    """The CLIP text transformer (transformers 4.x wraps it as ``.text_model``; 5.x ``CLIPTextModel`` is it)."""
    return getattr(encoder, "text_model", encoder)


def tokenize(tokenizer, texts: Sequence[str] | str) -> torch.Tensor:
    """(B, 77) token ids, padded the tokenizer's way (CLIP-G pads with ``!``, CLIP-L with end tokens)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    return ids


def word_ids(tokenizer, text: str) -> list[int]:
    """The token ids of ``text`` without start/end tokens."""
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else []


def input_embeddings(encoder, ids: torch.Tensor) -> torch.Tensor:
    """What the encoder's embedding layer makes of ``ids``: token embedding + position embedding."""
    tm = text_model(encoder)
    return tm.embeddings(input_ids=ids.to(tm.embeddings.token_embedding.weight.device))


@contextlib.contextmanager
def _embeddings_replaced(encoder, embeds: torch.Tensor):
    handle = text_model(encoder).embeddings.register_forward_hook(lambda module, args, out: embeds.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


def run_encoder(encoder, embeds: torch.Tensor, pool_ids: torch.Tensor):
    """The encoder's outputs (hidden states included) for input embeddings ``embeds`` (B, 77, d), fed to the
    transformer layers as they are: no position embedding is added again. ``pool_ids`` are token ids whose end
    token marks where the pooled output is read (and nothing else of them is used)."""
    with _embeddings_replaced(encoder, embeds):
        return encoder(input_ids=pool_ids.to(embeds.device), output_hidden_states=True)


def conditioning(parts: Parts, embeds: Sequence[torch.Tensor], pool_ids: Sequence[torch.Tensor]):
    """(context (B, 77, C), pooled (B, P) or None) of the family from per-encoder input embeddings."""
    outs = [run_encoder(enc, e, p) for enc, e, p in zip(parts.text_encoders, embeds, pool_ids)]
    if parts.family == "sd15":
        return outs[0].last_hidden_state, None
    context = torch.cat([outs[0].hidden_states[-2], outs[1].hidden_states[-2]], dim=-1)
    return context, outs[1].text_embeds


def encode_text(parts: Parts, texts: Sequence[str] | str):
    """Plain prompts (no learned tokens): ``conditioning`` of their ordinary input embeddings."""
    ids = [tokenize(tok, texts) for tok in parts.tokenizers]
    embeds = [input_embeddings(enc, i) for enc, i in zip(parts.text_encoders, ids)]
    return conditioning(parts, embeds, ids)


def sdxl_time_ids(original_sizes, crops_top_left, resolution: int) -> torch.Tensor:
    """SDXL's micro-conditioning (original h, w, crop top, left, target h, w) per example."""
    return torch.tensor([[*o, *c, resolution, resolution] for o, c in zip(original_sizes, crops_top_left)],
                        dtype=torch.float32)


# --- sampling (validation images) ----------------------------------------------------------------------------

@torch.no_grad()
def generate(parts: Parts, unet, cond, uncond, *, resolution: int, steps: int, guidance_scale: float, eta: float,
             seed: int, device):
    """A PIL image for conditionings ``cond``/``uncond`` = (context (1, 77, C), pooled or None): DDIM with ``eta``
    and classifier-free guidance (upstream samples with DDIM, eta 1, CFG 6); initial noise from ``seed``."""
    from diffusers import DDIMScheduler
    from PIL import Image

    scheduler = DDIMScheduler.from_config(parts.noise_scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(steps, device=device)
    gen = torch.Generator().manual_seed(seed)
    size = resolution // 2 ** (len(parts.vae.config.block_out_channels) - 1)
    latents = torch.randn((1, unet.config.in_channels, size, size), generator=gen).to(device)
    latents = latents * scheduler.init_noise_sigma
    context = torch.cat([uncond[0], cond[0]]).to(device)
    added = None
    if parts.family == "sdxl":
        time_ids = sdxl_time_ids([(resolution, resolution)] * 2, [(0, 0)] * 2, resolution).to(device)
        added = {"text_embeds": torch.cat([uncond[1], cond[1]]).to(device), "time_ids": time_ids}
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps_u, eps_c = unet(model_in, t, encoder_hidden_states=context, added_cond_kwargs=added).sample.chunk(2)
        eps = eps_u + guidance_scale * (eps_c - eps_u)
        latents = scheduler.step(eps.float(), t, latents, eta=eta, generator=gen).prev_sample
    image = parts.vae.decode(latents.to(parts.vae.dtype) / parts.vae.config.scaling_factor).sample
    pixels = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)

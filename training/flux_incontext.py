"""SynCD's Flux in-context customization model (upstream nupurkmr9/syncd ``method/pipelines/flux_pipeline``,
``main_flux.py``, ``train_flux.yaml``; repo-only, not in the paper), with diffusers ``FluxTransformer2DModel``.

    python -m comfyui_syncd.training.flux_incontext --config flux_incontext.yaml
    accelerate launch -m comfyui_syncd.training.flux_incontext --config flux_incontext.yaml

* **Canvas**: the target (index 0) and its references side by side, latents ``b c h (n w)``, packed 2x2 into the
  tokens ``(h/2 · n·w/2)`` with one RoPE grid over the whole canvas; the text is the target's caption only
  (dropped to "" with probability ``drop_text``, upstream 10 %). Full, unmasked attention; no IP-Adapter.
* **Noise**: σ ~ Beta(4, 2), shifted σ' = sσ / (1 + (s-1)σ) with s = exp(μ), μ from the *whole canvas* token count
  (the scheduler's base/max shift line). Only the target is noised; the references stay clean (x_t = x0) but the
  model sees the target's timestep for every token. Guidance embedding 1.0.
* **Loss**: flow matching, MSE of the prediction against (noise - x0) on the target's tokens only.
* **LoRA** (peft): rank 32, alpha 32 on attention q/k/v/out, ``add_{q,k,v}_proj``, ``to_add_out``, ``ff`` and
  ``ff_context`` (by module-name suffix, as upstream: the single blocks' ``attn.to_{q,k,v}`` too).
* **Latents** are scaled by the VAE's ``scaling_factor`` without subtracting ``shift_factor`` (upstream).
* Optimizer: AdamW (upstream Prodigy lr 1.0 with ZeRO-3; ``train.optimizer: prodigy`` when ``prodigyopt`` is
  installed), gradient clipping 1.0, micro-batch 1 x accumulation 2.

Output: ``syncd/NAME.safetensors`` with the official Flux ``pytorch_model.bin`` key layout
(``transformer.base_model.model.<module>.lora_{A,B}.default.weight``; alpha/rank folded into B), which the
*SynCD Checkpoint Loader* applies to a ComfyUI Flux model; ``losses.jsonl`` (and TensorBoard under ``logs/`` when
``tensorboard`` is installed and ``train.tensorboard`` is on); resumable ``checkpoints/``; with ``validation.every``
> 0, ``validation/step_NNNNNN.png`` holds samples of the in-context canvas (:mod:`~comfyui_syncd.training.validation`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import sys
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..core import dataset_format
from . import checkpoints, config as config_mod, loop, syncd, validation

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


@dataclasses.dataclass
class ModelConfig:
    path: str                           # diffusers Flux folder: transformer, vae, text_encoder(_2), tokenizer(_2)


@dataclasses.dataclass
class DataConfig:
    dirs: list[str]                     # dataset folders (core/dataset_format.py layout)
    resolution: int = 512               # square size of each image on the canvas (upstream 512)
    num_images: int = 3                 # target + references per sample (upstream: all an object has; fixed here
                                        #   so batches stack; objects with fewer are completed with flips)
    crop_padding: int = 200             # random square crop around the mask box (as the SDXL model)
    drop_text: float = 0.1              # empty caption (upstream 10 % in total)
    max_sequence_length: int = 512      # T5 tokens
    min_aesthetics: float = 0.0
    min_dino: float = 0.0
    num_workers: int = 4


@dataclasses.dataclass
class LoraConfig:
    rank: int = 32                      # upstream 32
    alpha: float = 32.0                 # upstream 32


@dataclasses.dataclass(kw_only=True)
class TrainConfig(config_mod.RunConfig):
    """``train:`` — the shared keys (:class:`~.config.RunConfig`) at upstream's values, and the Flux model's own."""
    name: str = "syncd_flux"
    max_steps: int = 25100              # upstream 25,100 optimizer steps (batch_size: upstream micro-batch 1)
    gradient_accumulation_steps: int = 2  # upstream 2
    optimizer: Literal["adamw", "prodigy"] = "adamw"  # upstream prodigy (lr 1.0)
    weight_decay: float = 1.0e-4        # upstream 1e-4 (decoupled)
    max_grad_norm: float = 1.0          # upstream gradient clipping 1.0
    guidance: float = 1.0               # guidance embedding value in training (upstream 1.0)
    sigma_beta_a: float = 4.0           # σ ~ Beta(a, b) before the shift (upstream 4, 2)
    sigma_beta_b: float = 2.0
    export_dtype: Literal["float32", "float16", "bfloat16"] = "float32"


@dataclasses.dataclass
class FluxConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    validation: validation.FluxValidationConfig = dataclasses.field(
        default_factory=validation.FluxValidationConfig)  # validation grids (off by default; see validation.py)


def check(cfg: FluxConfig) -> None:
    config_mod.check_train(cfg.train)
    if cfg.data.num_images < 2:
        raise config_mod.ConfigError("data.num_images: at least 2 (a target and a reference)")
    if not 0 <= cfg.data.drop_text <= 1:
        raise config_mod.ConfigError("data.drop_text: a probability")
    if min(cfg.train.sigma_beta_a, cfg.train.sigma_beta_b) <= 0:
        raise config_mod.ConfigError("train.sigma_beta_a/b: positive")
    if not cfg.data.dirs:
        raise config_mod.ConfigError("data.dirs: at least one dataset folder")
    validation.check(cfg.validation)


# --- the canvas and the noise --------------------------------------------------------------------------------

def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C): diffusers Flux's 2x2 patch tokens, row-major."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack`: (B, h/2·w/2, 4C) -> (B, C, h, w)."""
    b, _, c4 = tokens.shape
    c = c4 // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """(H/2·W/2, 3) RoPE positions (0, row, column) of the packed canvas."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def canvas(latents: torch.Tensor, n: int) -> torch.Tensor:
    """Rows sample-major (B·n, C, h, w), target first -> side by side (B, C, h, n·w) (``b c h (n w)``)."""
    bn, c, h, w = latents.shape
    return latents.view(bn // n, n, c, h, w).permute(0, 2, 3, 1, 4).reshape(bn // n, c, h, n * w)


def target_tokens(h: int, w: int, n: int, device=None) -> torch.Tensor:
    """(h/2 · n·w/2,) bool: the packed tokens of the canvas's first (target) image."""
    cols = torch.arange(n * w // 2, device=device)
    return (cols < w // 2)[None, :].expand(h // 2, -1).reshape(-1)


def shift_mu(seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """diffusers' ``calculate_shift``: μ on the line through (base_seq_len, base_shift), (max_seq_len, max_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + base_shift - m * base_seq_len


def shifted_sigmas(u: torch.Tensor, mu: float) -> torch.Tensor:
    """σ' = sσ / (1 + (s-1)σ), s = exp(μ)."""
    s = math.exp(mu)
    return s * u / (1 + (s - 1) * u)


# --- the model -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Parts:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    clip: torch.nn.Module
    clip_tokenizer: object
    t5: torch.nn.Module
    t5_tokenizer: object
    shift: dict


def load(path: str) -> Parts:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    root = pathlib.Path(path)
    if not (root / "transformer").is_dir():
        raise FileNotFoundError(f"{path}: not a diffusers Flux folder (no transformer/)")
    shift = {"base_seq_len": 256, "max_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        s = json.loads(sched.read_text())
        shift = {"base_seq_len": s.get("base_image_seq_len", 256), "max_seq_len": s.get("max_image_seq_len", 4096),
                 "base_shift": s.get("base_shift", 0.5), "max_shift": s.get("max_shift", 1.15)}
    frozen = [AutoencoderKL.from_pretrained(root, subfolder="vae"),
              CLIPTextModel.from_pretrained(root, subfolder="text_encoder"),
              T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2")]
    for m in frozen:
        m.float().requires_grad_(False).eval()
    return Parts(FluxTransformer2DModel.from_pretrained(root, subfolder="transformer").float(), frozen[0], frozen[1],
                 AutoTokenizer.from_pretrained(root, subfolder="tokenizer"), frozen[2],
                 AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2"), shift)


def add_lora(transformer, rank: int, alpha: float) -> None:
    from peft import LoraConfig as PeftLoraConfig

    pattern = r".*\.(" + "|".join(re.escape(t) for t in LORA_TARGETS) + r")"
    transformer.add_adapter(PeftLoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                           target_modules=pattern))


class FluxInContext(torch.nn.Module):
    def __init__(self, transformer, guidance: float):
        super().__init__()
        self.transformer, self.guidance = transformer, guidance

    def predict(self, xt, sigmas, text, pooled, guidance: Optional[float] = None) -> torch.Tensor:
        """The packed velocity prediction (B, h/2·n·w/2, 4C) over canvases ``xt`` (B, C, h, n·w) at σ ``sigmas``
        (B,) with one RoPE grid over the canvas; ``guidance``: the guidance embedding (None: training's)."""
        b, c, h, nw = xt.shape
        g = self.guidance if guidance is None else guidance
        guidance_in = torch.full((b,), g, device=xt.device) if self.transformer.config.guidance_embeds else None
        return self.transformer(hidden_states=pack(xt), encoder_hidden_states=text, pooled_projections=pooled,
                                timestep=sigmas, img_ids=image_ids(h, nw, xt.device),
                                txt_ids=torch.zeros(text.shape[1], 3, device=xt.device), guidance=guidance_in,
                                return_dict=False)[0]

    def forward(self, x0, noise, sigmas, text, pooled, n: int):
        """``x0``/``noise`` (B, C, h, n·w) canvases; ``sigmas`` (B,). The flow-matching loss on target tokens."""
        h, nw = x0.shape[-2:]
        w = nw // n
        on_target = torch.zeros_like(x0[:, :1])
        on_target[..., :w] = 1
        s = sigmas.view(-1, 1, 1, 1)
        xt = torch.where(on_target.bool(), (1 - s) * x0 + s * noise, x0)  # references clean, same timestep
        pred = self.predict(xt, sigmas, text, pooled)
        keep = target_tokens(h, w, n, x0.device)
        target = pack(noise - x0)
        return F.mse_loss(pred[:, keep].float(), target[:, keep].float())


# --- the run -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run(loop.Run):
    """A prepared run; ``model`` is the FluxInContext."""


def _optimizer(params, t: TrainConfig):
    if t.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise config_mod.ConfigError("train.optimizer: prodigy needs the prodigyopt package") from None
        return Prodigy(params, lr=t.learning_rate, weight_decay=t.weight_decay, decouple=True,
                       safeguard_warmup=True, use_bias_correction=True)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def prepare(cfg: FluxConfig, resume="auto") -> Run:
    check(cfg)
    t = cfg.train
    accelerator = loop.accelerator(t, tensorboard=t.tensorboard and loop.has_tensorboard())
    parts = load(cfg.model.path)
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    if cfg.data.resolution % (2 * factor):
        raise config_mod.ConfigError(f"data.resolution: a multiple of {2 * factor}")
    objects = []
    for folder in cfg.data.dirs:
        objects += dataset_format.read_dataset(folder, min_aesthetics=cfg.data.min_aesthetics,
                                               min_dino=cfg.data.min_dino)
    if not objects:
        raise ValueError(f"no object with at least two images in {', '.join(cfg.data.dirs)}")
    validation.check_references(cfg.validation, objects, cfg.validation.num_references or cfg.data.num_images - 1)
    transformer = parts.transformer.requires_grad_(False)
    torch.manual_seed(t.seed)
    add_lora(transformer, cfg.lora.rank, cfg.lora.alpha)
    for name, p in transformer.named_parameters():
        p.requires_grad_(".lora_" in name)
    if t.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    model = FluxInContext(transformer, t.guidance)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, t)
    model, optimizer = accelerator.prepare(model, optimizer)
    for m in (parts.vae, parts.clip, parts.t5):
        m.to(accelerator.device)
    trainable = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    checkpoints.register_hooks(accelerator, trainable)
    d = cfg.data
    data_cfg = syncd.DataConfig(dirs=d.dirs, resolution=d.resolution, num_images=d.num_images,
                                crop_padding=d.crop_padding, mask_dilation=1, drop_text=d.drop_text, drop_image=0.0,
                                drop_both=0.0, drop_mask=0.0, num_workers=d.num_workers)
    dataset = syncd.SyncdDataset(objects, data_cfg, d.resolution, 8, t.seed, factor)  # IP images unused (8 px)
    return loop.resume(Run(cfg, accelerator, parts, model, optimizer, dataset, trainable), resume)


def loader(run: Run):
    return loop.batches(run, syncd.PositionBatches, syncd.collate)


@torch.no_grad()
def encode_text(parts: Parts, prompts: list[str], max_length: int, device):
    ids = parts.clip_tokenizer(prompts, padding="max_length", max_length=parts.clip_tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids.to(device)
    pooled = parts.clip(ids, output_hidden_states=False).pooler_output
    ids = parts.t5_tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt").input_ids.to(device)
    return parts.t5(ids, output_hidden_states=False)[0].float(), pooled.float()


def model_inputs(run: Run, batch: dict, gen) -> dict:
    acc, parts, t = run.accelerator, run.parts, run.cfg.train
    device, vae, n = acc.device, parts.vae, batch["num_images"]
    with torch.no_grad():
        pixels = batch["pixel_values"].to(device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=gen) * vae.config.scaling_factor  # no shift
        x0 = canvas(latents.float(), n)
        text, pooled = encode_text(parts, batch["prompts"][::n], run.cfg.data.max_sequence_length, device)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    # torch's Beta sampler takes no generator: numpy's, seeded from this micro-batch's generator
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=gen, device=device).item()))
    sig = torch.from_numpy(rng.beta(t.sigma_beta_a, t.sigma_beta_b, x0.shape[0])).float().to(device)
    seq_len = (x0.shape[2] // 2) * (x0.shape[3] // 2)
    sig = shifted_sigmas(sig, shift_mu(seq_len, **parts.shift))
    return {"x0": x0, "noise": noise, "sigmas": sig, "text": text, "pooled": pooled, "n": n}


def train_step(run: Run, batches) -> float:
    return loop.accumulated_step(run, batches, model_inputs, run.cfg.train.max_grad_norm)


def checkpoint_state_dict(run: Run) -> dict[str, torch.Tensor]:
    """The LoRA under the official Flux ``pytorch_model.bin`` names; alpha/rank folded into lora_B."""
    scale = run.cfg.lora.alpha / run.cfg.lora.rank
    out = {}
    for name, p in run.core.transformer.named_parameters():
        if p.requires_grad:
            v = p.detach().float().cpu()
            out["transformer.base_model.model." + name] = (v * scale if ".lora_B." in name and scale != 1
                                                           else v).contiguous()
    return out


def export(run: Run, suffix: str = "") -> pathlib.Path:
    import safetensors.torch

    cfg = run.cfg
    path = run.out / "syncd" / f"{cfg.train.name}{suffix}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.train.export_dtype)
    meta = {"syncd_method": "syncd_flux_incontext", "syncd_step": str(run.step), "syncd_family": "flux",
            "syncd_lora_rank": str(cfg.lora.rank), "syncd_lora_alpha": str(cfg.lora.alpha)}
    safetensors.torch.save_file({k: v.to(dtype) for k, v in checkpoint_state_dict(run).items()}, str(path), meta)
    return path


def validation_grid(run: Run):
    """The validation grid of the current weights (:func:`comfyui_syncd.training.validation.sample_flux`)."""
    v, d = run.cfg.validation, run.cfg.data

    def sample(refs, prompt, gen):
        return validation.sample_flux(run.core, run.parts, refs, prompt, v, d.resolution, run.accelerator.device, gen,
                                      d.max_sequence_length)
    return validation.sample_grid(run, v, sample, v.num_references or d.num_images - 1, d.resolution)


def train(run: Run, progress: bool = True) -> Run:
    """Steps up to ``max_steps`` with the loss log and checkpoints; the final export."""
    t, acc = run.cfg.train, run.accelerator
    header = (f"SynCD Flux in-context: {acc.num_processes} process(es), {len(run.dataset)} objects, "
              f"{len(run.trainable)} trained tensors, steps {run.step}..{t.max_steps}")

    def final_message(path) -> str:
        return f"SynCD Flux checkpoint: {path} (models/syncd, SynCD Checkpoint Loader on FLUX.1-dev)"

    return loop.train_loop(run, "SynCD Flux", train_step, export, loader=loader, header=header,
                           final_message=final_message, trackers="syncd_flux", progress=progress,
                           validation=run.cfg.validation, make_grid=validation_grid)


def main(argv=None) -> int:
    return loop.script_main(argv, "python -m comfyui_syncd.training.flux_incontext", __doc__.split("\n")[0],
                            "YAML or TOML (see training/configs/flux_incontext.yaml)", FluxConfig, prepare, train,
                            errors=(dataset_format.DatasetFormatError,))


if __name__ == "__main__":
    sys.exit(main())

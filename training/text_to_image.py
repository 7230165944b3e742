"""Text-to-image training of an SD1.5-family model on captioned images: the whole UNet, and optionally the text
encoder, trained (from scratch when the model folder holds freshly initialised weights, as the toy world's base
model does — :mod:`comfyui_syncd.toyworld.base_model`).

    python -m comfyui_syncd.training.text_to_image --config text_to_image.yaml

What is trained:

* **Data** (:mod:`.data`): a folder of images with ``<stem>.txt`` captions; a caption file may hold several
  phrasings of its image, one per line (``data.caption: random_line`` draws one per sample, ``first_line`` always
  takes the first); ``data.drop_text`` empties the caption (classifier-free guidance); centre square crop, resize to
  ``data.resolution``, horizontal flips with ``data.flip_p`` (0 by default: captions may name left and right).
* **Concat conditioning** (``data.conditioning_dir``: a folder of conditioning images, e.g. depth maps, with the
  images' names): the InstructPix2Pix recipe (Brooks et al. 2023; diffusers' ``train_instruct_pix2pix.py``), the
  layout of ComfyUI's SD1.5 instruct-pix2pix model that ``InstructPixToPixConditioning`` feeds: the UNet's input is
  the noisy latent concatenated with the conditioning image's VAE latent (the posterior mode, unscaled); a
  text-to-image UNet gets the extra input channels with zero weights, so it starts as the model it was.
* **Noise**: ε-prediction with the model's DDPM schedule, t ~ U{0..999} per image (Ho et al. 2020; Rombach et al.
  2022); the loss is the MSE of the predicted noise.
* **Trained**: every UNet weight (AdamW, ``train.learning_rate`` with a linear warm-up of ``lr_warmup_steps``);
  with ``train.text_encoder_learning_rate`` set, the CLIP text encoder too (from the same loss, through the
  conditioning); else it is frozen.

Output (``output_dir``): ``pipeline/``, a diffusers SD1.5 folder (the trained UNet and text encoder, the model's
VAE, tokenizer and scheduler) that the other training scripts take as ``model.path``; ``losses.jsonl``;
checkpoints under ``checkpoints/`` (a killed run resumes from the newest).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import sys
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from . import checkpoints, config as config_mod, data, loop, models


@dataclasses.dataclass
class ModelConfig:
    path: str                                    # diffusers SD1.5 folder (or single file)
    family: Literal["auto", "sd15"] = "auto"
    diffusers_config: Optional[str] = None


@dataclasses.dataclass
class DataConfig:
    dir: str                                     # images + <stem>.txt captions
    conditioning_dir: Optional[str] = None       # conditioning images of the same names (concat conditioning)
    resolution: int = 512
    caption: Literal["random_line", "first_line"] = "random_line"
    drop_text: float = 0.1
    flip_p: float = 0.0
    num_workers: int = 0


@dataclasses.dataclass(kw_only=True)
class TrainConfig(config_mod.RunConfig, config_mod.AdamConfig):
    """``train:`` — the shared keys (:class:`~.config.RunConfig`) and this script's own."""
    name: str = "text_to_image"
    batch_size: int = 32
    text_encoder_learning_rate: Optional[float] = None   # None: the text encoder stays frozen
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclasses.dataclass
class TextToImageConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig


def check(cfg: TextToImageConfig) -> None:
    config_mod.check_train(cfg.train)
    if not 0 <= cfg.data.drop_text <= 1 or not 0 <= cfg.data.flip_p <= 1:
        raise config_mod.ConfigError("data.drop_text / flip_p: probabilities in [0, 1]")
    if cfg.train.lr_warmup_steps < 0:
        raise config_mod.ConfigError("train.lr_warmup_steps: 0 or more")


def pick_caption(caption: str, mode: str, drop_text: float, gen: torch.Generator) -> str:
    """One phrasing of a caption file's text (a random line, or the first), or "" with probability ``drop_text``."""
    lines = [line.strip() for line in caption.splitlines() if line.strip()] or [""]
    index = int(torch.randint(len(lines), (1,), generator=gen, device=gen.device)) if mode == "random_line" else 0
    return "" if float(torch.rand((), generator=gen, device=gen.device)) < drop_text else lines[index]


class TextToImageModel(torch.nn.Module):
    """UNet + text encoder; ``forward`` -> the ε-prediction MSE (gradients reach the text encoder when trained)."""

    def __init__(self, unet, text_encoder, scheduler):
        super().__init__()
        self.unet, self.text_encoder, self.scheduler = unet, text_encoder, scheduler

    def forward(self, latents, noise, timesteps, ids, conditioning=None):
        context = self.text_encoder(input_ids=ids)[0]   # SD1.5: the final-layer-normed last hidden state
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if conditioning is not None:
            noisy = torch.cat([noisy, conditioning], 1)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        return F.mse_loss(pred.float(), noise.float())


def widen_input(unet, channels: int) -> None:
    """Give ``unet`` ``channels`` input channels, the new ones with zero weights (InstructPix2Pix's initialisation:
    the model's output is unchanged until training uses them); a UNet that has them already is left as it is."""
    conv = unet.conv_in
    if conv.in_channels == channels:
        return
    if conv.in_channels > channels:
        raise ValueError(f"the UNet takes {conv.in_channels} input channels; concat conditioning needs {channels}")
    wide = torch.nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :conv.in_channels] = conv.weight
        wide.bias.copy_(conv.bias)
    unet.conv_in = wide
    unet.register_to_config(in_channels=channels)


def prepare(cfg: TextToImageConfig, resume="auto") -> loop.Run:
    from diffusers import DDPMScheduler

    check(cfg)
    t = cfg.train
    accelerator = loop.accelerator(t, tensorboard=t.tensorboard and loop.has_tensorboard())
    parts = models.load(cfg.model.path, cfg.model.family, cfg.model.diffusers_config)
    if parts.family != "sd15":
        raise ValueError(f"{cfg.model.path}: this script trains SD1.5-family models, not {parts.family}")
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    if cfg.data.resolution % factor:
        raise config_mod.ConfigError(f"data.resolution: a multiple of {factor} (the VAE's downscale)")
    records = data.list_images(cfg.data.dir, need_captions=True, conditioning=cfg.data.conditioning_dir)
    unet, text_encoder = parts.unet, parts.text_encoders[0]
    if cfg.data.conditioning_dir:
        widen_input(unet, 2 * parts.vae.config.latent_channels)
    unet.requires_grad_(True).train()
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    groups = [{"params": list(unet.parameters()), "lr": t.learning_rate}]
    if t.text_encoder_learning_rate is not None:
        text_encoder.requires_grad_(True).train()
        groups.append({"params": list(text_encoder.parameters()), "lr": t.text_encoder_learning_rate})
    for group in groups:
        group["base_lr"] = group["lr"]
    scheduler = DDPMScheduler.from_config(parts.noise_scheduler.config)
    model = TextToImageModel(unet, text_encoder, scheduler)
    optimizer = torch.optim.AdamW(groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                  weight_decay=t.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    parts.vae.to(accelerator.device)
    core = accelerator.unwrap_model(model)
    trainable = {name: p for name, p in core.named_parameters() if p.requires_grad}
    checkpoints.register_hooks(accelerator, trainable)
    run = loop.Run(cfg, accelerator, parts, model, optimizer, data.ImageDataset(records, cfg.data.resolution),
                   trainable)
    return loop.resume(run, resume)


def loader(run: loop.Run):
    return loop.batches(run, data.StepBatches, data.collate, flip_p=run.cfg.data.flip_p)


def model_inputs(run: loop.Run, batch: dict, gen) -> dict:
    """Latents (a VAE posterior sample), noise, timesteps and token ids of one micro-batch, and with concat
    conditioning the conditioning images' latents (posterior mode, unscaled: InstructPix2Pix's, ComfyUI's)."""
    device, vae, d = run.accelerator.device, run.parts.vae, run.cfg.data
    extra = {}
    with torch.no_grad():
        pixels = batch["pixel_values"].to(device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        if "conditioning_pixel_values" in batch:
            cond = batch["conditioning_pixel_values"].to(device, dtype=vae.dtype)
            extra["conditioning"] = vae.encode(cond).latent_dist.mode().float()
    captions = [pick_caption(c, d.caption, d.drop_text, gen) for c in batch["caption"]]
    noise = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
    timesteps = torch.randint(0, run.core.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen,
                              device=device)
    ids = models.tokenize(run.parts.tokenizers[0], captions).to(device)
    return {"latents": latents.float(), "noise": noise.float(), "timesteps": timesteps, "ids": ids, **extra}


def train_step(run: loop.Run, batches) -> float:
    warmup = run.cfg.train.lr_warmup_steps
    for group in run.optimizer.param_groups:
        group["lr"] = group["base_lr"] * min(1.0, (run.step + 1) / warmup) if warmup else group["base_lr"]
    return loop.accumulated_step(run, batches, model_inputs, run.cfg.train.max_grad_norm)


def export(run: loop.Run, suffix: str = "") -> pathlib.Path:
    """``pipeline{suffix}/``: the model folder with the trained UNet and text encoder."""
    source = pathlib.Path(run.cfg.model.path)
    folder = run.out / f"pipeline{suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    core = run.core
    core.unet.save_pretrained(folder / "unet")
    core.text_encoder.save_pretrained(folder / "text_encoder")
    run.parts.vae.save_pretrained(folder / "vae")
    run.parts.noise_scheduler.save_pretrained(folder / "scheduler")
    run.parts.tokenizers[0].save_pretrained(folder / "tokenizer")
    if source.is_dir() and (source / "model_index.json").is_file():
        shutil.copyfile(source / "model_index.json", folder / "model_index.json")
    return folder


def train(run: loop.Run, progress: bool = True) -> loop.Run:
    t, acc = run.cfg.train, run.accelerator
    text = "UNet + text encoder" if t.text_encoder_learning_rate is not None else "UNet"
    header = (f"text-to-image: {acc.num_processes} process(es), {len(run.dataset)} images, training the {text}, "
              f"learning rate {t.learning_rate:g}, steps {run.step}..{t.max_steps}")
    return loop.train_loop(run, "text-to-image", train_step, export, loader=loader, header=header,
                           final_message=lambda p: f"text-to-image model: {p}", trackers="text_to_image",
                           progress=progress)


def main(argv=None) -> int:
    return loop.script_main(argv, "python -m comfyui_syncd.training.text_to_image", __doc__.split("\n")[0],
                            "YAML or TOML config (see training/configs/text_to_image_toy.yaml)", TextToImageConfig,
                            prepare, train)


if __name__ == "__main__":
    sys.exit(main())

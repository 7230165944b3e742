"""JeDi joint-image diffusion training (Zeng et al., "JeDi: Joint-Image Diffusion Models for Finetuning-Free
Personalized Text-to-Image Generation", CVPR 2024) for SD1.5 with diffusers.

    python -m comfyui_syncd.training.jedi --config jedi_sd15.yaml
    accelerate launch -m comfyui_syncd.training.jedi --config jedi_sd15.yaml   # GPUs/precision from accelerate

What is trained:

* **Data** (:mod:`comfyui_syncd.core.dataset_format`): per sample one object and a *set* of 2-4 of its images
  (``data.min_images``..``data.max_images``, the size drawn per sample; an object with fewer images is completed
  with horizontally flipped ones, as :mod:`~comfyui_syncd.training.syncd` does, so at most twice its image count),
  each centre-cropped to a square and resized to the resolution; each image has its own caption.
* **Coupled self-attention**: every ``attn1`` of the UNet attends, for each image of a set, over the tokens of all
  images of that set (own tokens first), never over another set's
  (:func:`comfyui_syncd.attention.shared.shared_attention` with no foreground mask, as a diffusers attention
  processor). Cross-attention (``attn2``) is untouched: each image sees its own caption.
* **Personalization as inpainting**: ``conv_in`` is widened from 4 to 9 input channels; per image the input is
  ``[noisy latent (4) ‖ reference latent (4) ‖ reference mask (1)]``. The new 5 input channels are zero-initialised
  and the original weights/bias copied, so at init the UNet computes what the base model computes. Each image of a
  set is a reference with probability ``data.reference_p`` (0.5): a reference gets its clean latent in the
  reference channels and mask 1, the others zeros and mask 0. A set drawn with every image a reference gets one of
  them (at random) turned into a non-reference, so every set has a loss.
* **Noise**: ε-prediction, the base model's DDPM schedule; one t ~ U{0..999} per set (the set is denoised jointly),
  independent noise per image.
* **Loss**: MSE of the predicted noise on the non-reference images only (``train.loss_on_references: true``
  takes every image of the set, as the paper's eq. 2 is written). The whole UNet is trained (AdamW, lr 5e-5 as
  the paper; its batch is 2048 sets). ``data.drop_text`` empties every caption of a set (classifier-free guidance;
  our default, not the paper's).

Mask convention: 1 = reference present, 0 = image to generate, as the paper's eq. 2 (``x̂ = x ⊙ M``, unknown
elements zero). The paper's prose says the opposite (mask 0 when the reference is used, 1 with an "empty black
image"); this module follows the equation, and a sampler must use the same convention.

Output (``output_dir``): ``jedi/NAME.safetensors``, the full widened UNet as one safetensors file: the diffusers
``UNet2DConditionModel`` state dict (keys as ``unet.state_dict()``, no prefix: ``conv_in.weight`` of shape
(C, 9, 3, 3), ``down_blocks.0.attentions.0...``), in ``train.export_dtype``; its metadata holds ``jedi_unet_config``
(the diffusers UNet config as JSON, ``in_channels`` 9), ``jedi_input_layout`` (``"noisy_latent:4,
reference_latent:4,reference_mask:1"``), ``jedi_step``, ``jedi_prediction_type`` (``epsilon``). It reloads with
``UNet2DConditionModel.from_config(json.loads(meta["jedi_unet_config"]))`` + ``load_state_dict`` (see
:func:`load_exported_unet`); coupled attention is a processor, not weights, so a sampler has to install it
(:func:`install_coupled_attention`). Per-step losses go to ``losses.jsonl`` (and TensorBoard under ``logs/`` when
``tensorboard`` is installed and ``train.tensorboard`` is on); checkpoints under ``checkpoints/`` resume
automatically; with ``validation.every`` > 0, ``validation/step_NNNNNN.png`` holds samples of the set [references ‖
target] with JeDi's image guidance (:mod:`~comfyui_syncd.training.validation`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..attention.shared import shared_attention
from ..core import dataset_format
from . import checkpoints, config as config_mod, loop, models, validation
from .syncd import PositionBatches, _heads, _merge, choose_images

INPUT_LAYOUT = "noisy_latent:4,reference_latent:4,reference_mask:1"


# --- config --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelConfig:
    path: str                                           # diffusers folder, or a single-file .safetensors/.ckpt
    family: Literal["auto", "sd15"] = "auto"
    diffusers_config: Optional[str] = None              # single files: a diffusers folder / Hub id for the configs


@dataclasses.dataclass
class DataConfig:
    dirs: list[str]                      # dataset folders (core/dataset_format.py layout)
    resolution: int = 512                # square training size
    min_images: int = 2                  # images per set: drawn uniformly in [min_images, max_images] (JeDi 2-4)
    max_images: int = 4
    reference_p: float = 0.5             # probability that an image of a set is a reference (JeDi 0.5)
    drop_text: float = 0.1               # empty all captions of a set (CFG; ours)
    min_aesthetics: float = 0.0
    min_dino: float = 0.0
    num_workers: int = 4


@dataclasses.dataclass(kw_only=True)
class TrainConfig(config_mod.RunConfig, config_mod.AdamConfig):
    """``train:`` — the shared keys (:class:`~.config.RunConfig`; batch_size counts sets) and JeDi's own."""
    name: str = "jedi"
    learning_rate: float = 5.0e-5        # the paper's 5e-5
    loss_on_references: bool = False    # true: the loss also covers the reference images (paper eq. 2 as written)
    export_every_checkpoint: bool = True
    export_dtype: Literal["float32", "float16", "bfloat16"] = "float16"


@dataclasses.dataclass
class JediConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    validation: validation.JediValidationConfig = dataclasses.field(
        default_factory=validation.JediValidationConfig)  # validation grids (off by default; see validation.py)


def check(cfg: JediConfig) -> None:
    config_mod.check_train(cfg.train)
    d = cfg.data
    if not 2 <= d.min_images <= d.max_images:
        raise config_mod.ConfigError("data.min_images/max_images: 2 <= min_images <= max_images")
    if not 0 <= d.reference_p <= 1 or not 0 <= d.drop_text <= 1:
        raise config_mod.ConfigError("data.reference_p / drop_text: probabilities in [0, 1]")
    if not d.dirs:
        raise config_mod.ConfigError("data.dirs: at least one dataset folder")
    validation.check(cfg.validation)


# --- data ----------------------------------------------------------------------------------------------------

def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def center_square(image: Image.Image, size: int) -> Image.Image:
    s = min(image.size)
    left, top = (image.width - s) // 2, (image.height - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.LANCZOS)


def draw_references(k: int, p: float, rng) -> list[bool]:
    """Which of a set's ``k`` images are references: each with probability ``p``, at least one non-reference."""
    refs = [bool(rng.uniform() < p) for _ in range(k)]
    if all(refs):
        refs[int(rng.integers(k))] = False
    return refs


class JediDataset(torch.utils.data.Dataset):
    """Objects of the dataset folders; item ``(index, position)`` draws the set (size, images, references, caption
    dropout) from a generator seeded with (seed, position), so a resumed run sees the same samples."""

    def __init__(self, objects: list, cfg: DataConfig, seed: int):
        self.objects, self.cfg, self.seed = objects, cfg, seed

    def __len__(self):
        return len(self.objects)

    def __getitem__(self, key):
        index, position = key
        rng = np.random.default_rng([self.seed, position])
        record = self.objects[index]
        c = self.cfg
        k = int(rng.integers(c.min_images, c.max_images + 1))
        k = min(k, 2 * len(record.images))
        pixels, prompts = [], []
        for i in choose_images(len(record.images), k, rng):
            flip = i < 0
            i = -i - 1 if flip else i
            with Image.open(record.images[i]) as im:
                image = im.convert("RGB")
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels.append(_to_tensor(center_square(image, c.resolution)))
            prompts.append(record.prompts[i])
        refs = draw_references(k, c.reference_p, rng)
        if rng.uniform() < c.drop_text:
            prompts = [""] * k
        return {"pixel_values": torch.stack(pixels), "is_reference": torch.tensor(refs), "prompts": prompts,
                "index": index}


def collate(examples: list[dict]) -> dict:
    """Sets flattened set-major; ``set_sizes`` gives each set's image count."""
    return {"pixel_values": torch.cat([e["pixel_values"] for e in examples]),
            "is_reference": torch.cat([e["is_reference"] for e in examples]),
            "prompts": [p for e in examples for p in e["prompts"]],
            "set_sizes": [e["pixel_values"].shape[0] for e in examples],
            "index": [e["index"] for e in examples]}


# --- the model -----------------------------------------------------------------------------------------------

def widen_conv_in(unet, extra: int = 5) -> None:
    """``conv_in`` with ``extra`` more input channels: the original weights and bias copied, the new ones zero
    (the UNet's output for the original channels plus zeros is unchanged); ``unet.config.in_channels`` follows."""
    old = unet.conv_in
    new = torch.nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding,
                          dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels + extra)


class CoupledState:
    """What the coupled attn1 processors read: ``set_sizes`` (images per set, rows set-major) or None for plain
    self-attention; ``spy(name, rows, key_tokens)`` for tests."""

    def __init__(self):
        self.set_sizes: Optional[list[int]] = None
        self.spy = None


class CoupledSelfAttnProcessor(torch.nn.Module):
    """attn1: each image's queries attend over [own tokens ‖ the other images of its set] (JeDi coupled
    self-attention, no masks); plain self-attention when the state has no set sizes."""

    def __init__(self, name: str, state: CoupledState):
        super().__init__()
        self.name, self.state = name, state

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None \
                or attn.residual_connection:
            raise ValueError("JeDi training supports the SD1.5 transformer attention layout only")
        q = _heads(attn.to_q(hidden_states), attn.heads)
        k = _heads(attn.to_k(hidden_states), attn.heads)
        v = _heads(attn.to_v(hidden_states), attn.heads)
        sizes = self.state.set_sizes
        if sizes is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            if sum(sizes) != hidden_states.shape[0]:
                raise ValueError(f"{self.name}: set sizes {sizes} do not add up to {hidden_states.shape[0]} rows")
            out = torch.empty_like(q)
            start = 0
            for n in sizes:
                rows = slice(start, start + n)
                if self.state.spy is not None:
                    self.state.spy(self.name, list(range(start, start + n)), hidden_states[rows])
                out[rows] = shared_attention(q[rows], k[rows], v[rows], None)
                start += n
        out = attn.to_out[1](attn.to_out[0](_merge(out).to(q.dtype)))
        return out / attn.rescale_output_factor


def install_coupled_attention(unet, state: CoupledState) -> None:
    """Coupled processors on every attn1; attn2 keeps diffusers' default processor."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = CoupledSelfAttnProcessor(name.removesuffix(".processor"), state)
        elif name.endswith("attn2.processor"):
            procs[name] = AttnProcessor2_0()
        else:
            raise ValueError(f"unexpected attention {name} in the UNet")
    unet.set_attn_processor(procs)


class JediModel(torch.nn.Module):
    """The widened UNet with coupled attention; ``forward`` -> loss on the non-reference images."""

    def __init__(self, unet, state: CoupledState, scheduler, loss_on_references: bool = False):
        super().__init__()
        self.unet, self.state, self.scheduler = unet, state, scheduler
        self.loss_on_references = loss_on_references

    def predict(self, noisy, ref_latents, ref_mask, t, context, set_sizes):
        """ε prediction for rows of sets (``ref_mask`` (rows,) 0/1)."""
        h, w = noisy.shape[-2:]
        mask = ref_mask.to(noisy.dtype).view(-1, 1, 1, 1).expand(-1, 1, h, w)
        x = torch.cat([noisy, ref_latents * mask, mask], dim=1)
        self.state.set_sizes = list(set_sizes)
        try:
            return self.unet(x, t, encoder_hidden_states=context).sample
        finally:
            self.state.set_sizes = None

    def forward(self, latents, noise, timesteps, context, is_reference, set_sizes):
        t = torch.repeat_interleave(timesteps, torch.tensor(set_sizes, device=timesteps.device))
        noisy = self.scheduler.add_noise(latents, noise, t)
        pred = self.predict(noisy, latents, is_reference.float(), t, context, set_sizes)
        keep = torch.ones_like(is_reference) if self.loss_on_references else ~is_reference
        return F.mse_loss(pred[keep].float(), noise[keep].float())


# --- the run -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run(loop.Run):
    state: CoupledState


def prepare(cfg: JediConfig, resume="auto") -> Run:
    from diffusers import DDPMScheduler

    check(cfg)
    t = cfg.train
    accelerator = loop.accelerator(t, tensorboard=t.tensorboard and loop.has_tensorboard())
    parts = models.load(cfg.model.path, cfg.model.family, cfg.model.diffusers_config)
    if parts.family != "sd15":
        raise ValueError(f"{cfg.model.path}: JeDi training here is for SD1.5-family models, not {parts.family}")
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    if cfg.data.resolution % factor:
        raise config_mod.ConfigError(f"data.resolution: a multiple of {factor}")
    objects = []
    for folder in cfg.data.dirs:
        objects += dataset_format.read_dataset(folder, min_aesthetics=cfg.data.min_aesthetics,
                                               min_dino=cfg.data.min_dino)
    if not objects:
        raise ValueError(f"no object with at least two images in {', '.join(cfg.data.dirs)}")
    validation.check_references(cfg.validation, objects, cfg.validation.num_references or 2)
    unet = parts.unet
    if unet.config.in_channels != 4:
        raise ValueError(f"expected a 4-channel UNet input, got {unet.config.in_channels}")
    widen_conv_in(unet)
    state = CoupledState()
    install_coupled_attention(unet, state)
    unet.requires_grad_(True).train()
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if weight_dtype != torch.float32:
        parts.text_encoders[0].to(weight_dtype)
    scheduler = DDPMScheduler.from_config(parts.noise_scheduler.config, prediction_type="epsilon")
    model = JediModel(unet, state, scheduler, t.loss_on_references)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  eps=t.adam_epsilon, weight_decay=t.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    parts.vae.to(accelerator.device)
    parts.text_encoders[0].to(accelerator.device)
    core = accelerator.unwrap_model(model)
    trainable = {name: p for name, p in core.named_parameters() if p.requires_grad}
    checkpoints.register_hooks(accelerator, trainable)
    run = Run(cfg, accelerator, parts, model, optimizer, JediDataset(objects, cfg.data, t.seed), trainable,
              state=state)
    return loop.resume(run, resume)


def loader(run: Run):
    return loop.batches(run, PositionBatches, collate)


def model_inputs(run: Run, batch: dict, gen) -> dict:
    """Frozen encodings and random draws of a micro-batch: latents, noise, one timestep per set, text."""
    device, vae = run.accelerator.device, run.parts.vae
    with torch.no_grad():
        pixels = batch["pixel_values"].to(device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        context, _ = models.encode_text(run.parts, batch["prompts"])
    noise = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
    sizes = batch["set_sizes"]
    timesteps = torch.randint(0, run.core.scheduler.config.num_train_timesteps, (len(sizes),), generator=gen,
                              device=device)
    return {"latents": latents.float(), "noise": noise.float(), "timesteps": timesteps, "context": context.float(),
            "is_reference": batch["is_reference"].to(device), "set_sizes": sizes}


def train_step(run: Run, batches) -> float:
    return loop.accumulated_step(run, batches, model_inputs)


def export(run: Run, suffix: str = "") -> pathlib.Path:
    """``jedi/NAME{suffix}.safetensors``: the full widened UNet (see the module docstring)."""
    import safetensors.torch

    cfg = run.cfg
    dtype = getattr(torch, cfg.train.export_dtype)
    unet = run.core.unet
    meta = {"jedi_method": "jedi", "jedi_step": str(run.step), "jedi_family": run.parts.family,
            "jedi_prediction_type": "epsilon", "jedi_input_layout": INPUT_LAYOUT,
            "jedi_unet_config": json.dumps({k: v for k, v in unet.config.items() if not k.startswith("_")})}
    path = run.out / "jedi" / f"{cfg.train.name}{suffix}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in unet.state_dict().items()}
    safetensors.torch.save_file(sd, str(path), meta)
    return path


def load_exported_unet(path, dtype=torch.float32):
    """The widened ``UNet2DConditionModel`` of an exported file (plain attention processors)."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    config = {k: v for k, v in json.loads(meta["jedi_unet_config"]).items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict({k: v.to(dtype) for k, v in load_file(str(path)).items()}, strict=True)
    return unet.to(dtype)


def validation_grid(run: Run):
    """The validation grid of the current weights (:func:`comfyui_syncd.training.validation.sample_jedi`)."""
    v = run.cfg.validation
    resolution = run.cfg.data.resolution

    def sample(refs, prompt, gen):
        return validation.sample_jedi(run.core, run.parts, refs, prompt, v, resolution, run.accelerator.device, gen)
    return validation.sample_grid(run, v, sample, v.num_references or 2, resolution)


def train(run: Run, progress: bool = True) -> Run:
    t, acc = run.cfg.train, run.accelerator
    header = (f"JeDi: {acc.num_processes} process(es), {len(run.dataset)} objects, {len(run.trainable)} trained "
              f"tensors, learning rate {t.learning_rate:g}, steps {run.step}..{t.max_steps}")
    return loop.train_loop(run, "JeDi", train_step, export, loader=loader, header=header,
                           final_message=lambda p: f"JeDi UNet: {p}",
                           step_exports=t.export_every_checkpoint, trackers="jedi", progress=progress,
                           validation=run.cfg.validation, make_grid=validation_grid)


def main(argv=None) -> int:
    return loop.script_main(argv, "python -m comfyui_syncd.training.jedi", __doc__.split("\n")[0],
                            "YAML or TOML config (see training/configs/jedi_sd15.yaml)", JediConfig, prepare, train,
                            errors=(dataset_format.DatasetFormatError,))


if __name__ == "__main__":
    sys.exit(main())

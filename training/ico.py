"""ICO fine-tuning (Image-specific Context Optimization, DCI/ICO, Jin et al., ECCV 2024) for SD1.5 and SDXL.

    python -m comfyui_syncd.training.ico --config my_concept.yaml          # one process
    accelerate launch -m comfyui_syncd.training.ico --config my_concept.yaml  # GPUs/precision from accelerate's config

Custom Diffusion fine-tuning of the UNet's cross-attention key/value projections (``attn2.to_k``/``to_v`` of every
transformer block) and S new concept tokens V*, where each reference image i gets its own learnable prompt instead
of a template (official code jinjianRick/DCI_ICO, ``src/custom_modules.py`` and ``src/model.py``)::

    [SOS] [I]^i_1..M  V*_1..S  <noun>  [I]^i_M+1..M+L  [EOS + padding]      (77 tokens)

built in the text encoder's *input-embedding space after the position embedding*: SOS, noun and EOS/padding are the
embeddings (token + position) of the template ``<prefix words> * * * <noun> <suffix words>`` at their positions; V*
are the new token vectors plus the position embeddings of positions 1..S (upstream lifts them from the caption
``V*_1..S <noun>``, as an inference prompt starting with ``embedding:NAME <noun>`` places them); the contexts are
initialised to the embeddings (position 1..M, resp. 1..L included) of the init words and trained with 10x the
learning rate. The sequence enters the transformer layers as it is (no second position embedding). Only V*, the
contexts and k/v are trained: the other prompt pieces are constants, the SOS keys/values are detached, the text
encoders are frozen. Regularisation images (optional) are encoded from their own captions, all constant.

Outputs (``output_dir``): ``embeddings/NAME.safetensors`` (the V* vectors; ComfyUI: ``models/embeddings``, prompt
``... embedding:NAME <noun> ...``) and ``loras/NAME.safetensors`` (k/v weight differences; ComfyUI:
``models/loras`` + ``LoraLoaderModelOnly``, strength 1). The contexts are discarded, as upstream does.
Checkpoints under ``checkpoints/`` resume automatically; ``validation/`` holds the PNGs, ``losses.jsonl`` the loss
of every step (over the main process's micro-batches).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import sys
from typing import Literal, Optional

import torch

from . import checkpoints, config as config_mod, data, loop, models

# Upstream (src/custom_modules.py add_token, Custom Diffusion's choice): the last concept token starts from token
# 42170 ("ktn"), the one before it from 47629 ("pll"), the one before that from 43514 ("ucd</w>").
UPSTREAM_INIT_TOKEN_IDS = (43514, 47629, 42170)
DEFAULT_RESOLUTION = {"sd15": 512, "sdxl": 1024}
KV_PATTERN = re.compile(r"transformer_blocks\.\d+\.attn2\.to_[kv]\.weight$")


# --- config --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelConfig:
    path: str                                           # diffusers folder, or a single-file .safetensors/.ckpt
    family: Literal["auto", "sd15", "sdxl"] = "auto"    # auto: detected from the files
    diffusers_config: Optional[str] = None              # single files: a diffusers folder / Hub id for the configs


@dataclasses.dataclass
class DataConfig:
    images: str                          # folder of the concept's reference images
    resolution: Optional[int] = None     # square training size; null: 512 (SD1.5), 1024 (SDXL)
    flip_p: float = 0.5                  # horizontal flip probability (upstream 0.5)
    reg_images: Optional[str] = None     # folder of regularisation images, each with a <stem>.txt caption
    reg_caption: Optional[str] = None    # caption of regularisation images without a .txt
    num_workers: int = 4                 # DataLoader worker processes (upstream 4)


@dataclasses.dataclass
class ConceptConfig:
    name: str                                      # embedding file name: prompts say embedding:NAME
    noun: str                                      # the class noun [E], e.g. "dog" or "teddy bear"
    num_tokens: int = 3                            # S, concept tokens V* (upstream train.sh: 3)
    init_token_ids: Optional[list[int]] = None     # V* initial token ids; null: upstream's (43514, 47629, 42170)[-S:]
    prefix_init: Optional[str] = "A"               # words initialising [I]_1..M (M = their token count); upstream "A"
    prefix_length: int = 4                         # M when prefix_init is null (random N(0, 0.02) init; upstream 4)
    suffix_init: Optional[str] = "."               # words initialising [I]_M+1..M+L; upstream "."
    suffix_length: int = 2                         # L when suffix_init is null (random init; upstream 2)


@dataclasses.dataclass
class TrainConfig:
    output_dir: str                      # run folder: checkpoints, exports, validation images
    max_steps: int = 900                 # optimizer steps (upstream max_steps 900)
    batch_size: int = 2                  # per process and micro-batch (upstream 2 per GPU)
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1.0e-5        # base LR (upstream base_learning_rate 1e-5) ...
    scale_lr: bool = True                # ... x batch_size x processes x accumulation (upstream scale_lr)
    context_lr_scale: float = 10.0       # contexts' LR multiplier (upstream 10)
    adam_beta1: float = 0.9              # AdamW with torch's defaults, as upstream
    adam_beta2: float = 0.999
    adam_epsilon: float = 1.0e-8
    weight_decay: float = 0.01
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = None  # null: accelerate's config decides
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 100          # resumable checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2            # newest checkpoints kept (0: all)
    export_every_checkpoint: bool = True  # also write the ComfyUI files of each checkpoint (NAME_step000300)
    export_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # dtype of the k/v differences


@dataclasses.dataclass
class ValidationConfig:
    every: int = 300                     # validation images every N steps and at the end (0: never)
    prompts: list[str] = dataclasses.field(default_factory=list)  # empty: ["embedding:NAME <noun>"]
    negative_prompt: str = ""
    steps: int = 50                      # DDIM steps (upstream samples with 200)
    guidance_scale: float = 6.0          # upstream CFG scale 6
    eta: float = 1.0                     # upstream DDIM eta 1
    seed: int = 0


@dataclasses.dataclass
class IcoConfig:
    model: ModelConfig
    data: DataConfig
    concept: ConceptConfig
    train: TrainConfig
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)


def check(cfg: IcoConfig) -> None:
    c = cfg.concept
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", c.name):
        raise config_mod.ConfigError(f"concept.name: {c.name!r} must be one word of letters, digits, '_', '-', "
                                     f"'.' (prompts write it as embedding:NAME)")
    if c.num_tokens < 1:
        raise config_mod.ConfigError("concept.num_tokens: at least 1")
    if c.init_token_ids is None and c.num_tokens > len(UPSTREAM_INIT_TOKEN_IDS):
        raise config_mod.ConfigError(f"concept.init_token_ids: upstream initialises at most "
                                     f"{len(UPSTREAM_INIT_TOKEN_IDS)} tokens; list {c.num_tokens} token ids")
    if c.init_token_ids is not None and len(c.init_token_ids) != c.num_tokens:
        raise config_mod.ConfigError(f"concept.init_token_ids: {len(c.init_token_ids)} ids for "
                                     f"num_tokens {c.num_tokens}")
    if c.prefix_length < 0 or c.suffix_length < 0:
        raise config_mod.ConfigError("concept.prefix_length/suffix_length: not negative")
    t = cfg.train
    config_mod.check_train(t, named=False)
    if cfg.validation.every < 0 or cfg.validation.steps < 1:
        raise config_mod.ConfigError("validation.every: 0 or more; validation.steps: at least 1")
    for prompt in cfg.validation.prompts:
        for name in re.findall(r"embedding:([^\s,]+)", prompt):
            if name.removesuffix(".safetensors") != c.name:
                raise config_mod.ConfigError(f"validation.prompts: {prompt!r} uses embedding:{name}; only this run's "
                                             f"concept (embedding:{c.name}) exists during training")


# --- the ICO prompt ------------------------------------------------------------------------------------------

class IcoPrompts(torch.nn.Module):
    """Per text encoder: V* (S, d), contexts ``ctx`` (N, M, d) and ``end_ctx`` (N, L, d) for N images, and the
    constant pieces of the template. ``forward(image_index)`` -> per encoder (B, 77, d) input embeddings."""

    def __init__(self, parts: models.Parts, concept: ConceptConfig, num_images: int, seed: int = 0):
        super().__init__()
        self.v_star = torch.nn.ParameterList()
        self.ctx = torch.nn.ParameterList()
        self.end_ctx = torch.nn.ParameterList()
        self.num_tokens = concept.num_tokens
        init_ids = list(concept.init_token_ids or UPSTREAM_INIT_TOKEN_IDS[-concept.num_tokens:])
        gen = torch.Generator().manual_seed(seed)
        self.layout = None
        for i, (tok, enc) in enumerate(zip(parts.tokenizers, parts.text_encoders)):
            tm = models.text_model(enc)
            vocab = tm.embeddings.token_embedding.weight
            if max(init_ids) >= vocab.shape[0] or min(init_ids) < 0:
                raise ValueError(f"concept.init_token_ids {init_ids} outside the vocabulary of {vocab.shape[0]}")
            prefix_ids = models.word_ids(tok, concept.prefix_init) if concept.prefix_init else None
            suffix_ids = models.word_ids(tok, concept.suffix_init) if concept.suffix_init else None
            noun_ids = models.word_ids(tok, concept.noun)
            if not noun_ids:
                raise ValueError("concept.noun is empty")
            (star,) = models.word_ids(tok, "*")
            m = len(prefix_ids) if prefix_ids is not None else concept.prefix_length
            ll = len(suffix_ids) if suffix_ids is not None else concept.suffix_length
            s, n = concept.num_tokens, len(noun_ids)
            body = (prefix_ids or [star] * m) + [star] * s + noun_ids + (suffix_ids or [star] * ll)
            if len(body) + 2 > models.MAX_TOKENS:
                raise ValueError(f"the ICO prompt has {len(body) + 2} tokens, more than {models.MAX_TOKENS}")
            ids = [tok.bos_token_id, *body, tok.eos_token_id]
            ids += [tok.pad_token_id] * (models.MAX_TOKENS - len(ids))
            ids = torch.tensor([ids])
            layout = {"M": m, "S": s, "noun": n, "L": ll}
            if self.layout not in (None, layout):
                raise ValueError(f"the two SDXL tokenizers split the ICO prompt differently: {self.layout} vs "
                                 f"{layout}")
            self.layout = layout
            with torch.no_grad():
                emb = models.input_embeddings(enc, ids)[0].float()  # (77, d): token + position embeddings
                d = emb.shape[-1]
                self.register_buffer(f"prefix_{i}", emb[:1].clone())
                self.register_buffer(f"noun_{i}", emb[1 + m + s:1 + m + s + n].clone())
                self.register_buffer(f"suffix_{i}", emb[1 + m + s + n + ll:].clone())
                self.register_buffer(f"pool_ids_{i}", ids[0].clone())  # its end token marks the pooled position
                self.register_buffer(f"v_star_pos_{i}", tm.embeddings.position_embedding.weight[1:1 + s].float()
                                     .clone())
                self.v_star.append(torch.nn.Parameter(vocab[init_ids].float().clone()))
                self.ctx.append(torch.nn.Parameter(self._context_init(tok, enc, concept.prefix_init, m, num_images,
                                                                      d, gen)))
                self.end_ctx.append(torch.nn.Parameter(self._context_init(tok, enc, concept.suffix_init, ll,
                                                                          num_images, d, gen)))

    @staticmethod
    def _context_init(tok, enc, words, length, num_images, dim, gen):
        if words:  # upstream: the embeddings (token + position 1..length) of the init words, for every image
            emb = models.input_embeddings(enc, models.tokenize(tok, words))[0, 1:1 + length].float()
            return emb.unsqueeze(0).repeat(num_images, 1, 1).clone()
        return torch.randn(num_images, length, dim, generator=gen) * 0.02

    def piece(self, name: str, i: int) -> torch.Tensor:
        return getattr(self, f"{name}_{i}")

    def forward(self, image_index: torch.Tensor) -> list[torch.Tensor]:
        out = []
        b = image_index.shape[0]
        for i in range(len(self.v_star)):
            def rows(t):
                return t.unsqueeze(0).expand(b, *t.shape)
            out.append(torch.cat([
                rows(self.piece("prefix", i)),
                self.ctx[i][image_index],
                rows(self.v_star[i] + self.piece("v_star_pos", i)),
                rows(self.piece("noun", i)),
                self.end_ctx[i][image_index],
                rows(self.piece("suffix", i)),
            ], dim=1))
        return out

    def pool_ids(self, batch: int) -> list[torch.Tensor]:
        return [self.piece("pool_ids", i).unsqueeze(0).expand(batch, -1) for i in range(len(self.v_star))]


def concept_input_embeddings(parts: models.Parts, prompts: IcoPrompts, texts: list[str], name: str):
    """Input embeddings and pool ids of prompts that write the concept as ``embedding:NAME``, the way ComfyUI
    reads them: the S concept vectors replace the word at the token level, then position embeddings are added."""
    embeds, pools = [], []
    for i, (tok, enc) in enumerate(zip(parts.tokenizers, parts.text_encoders)):
        tm = models.text_model(enc)
        rows_e, rows_p = [], []
        for text in texts:
            pieces = re.split(r"embedding:([^\s,]+)", text)
            ids, slots = [tok.bos_token_id], []
            for j, piece in enumerate(pieces):
                if j % 2 == 0:
                    ids += models.word_ids(tok, piece)
                    continue
                if piece.removesuffix(".safetensors") != name:
                    raise ValueError(f"prompt {text!r}: embedding:{piece} is not this run's concept ({name})")
                slots.append(len(ids))
                ids += [0] * prompts.num_tokens
            ids.append(tok.eos_token_id)
            if len(ids) > models.MAX_TOKENS:
                raise ValueError(f"prompt {text!r} has {len(ids)} tokens, more than {models.MAX_TOKENS}")
            ids += [tok.pad_token_id] * (models.MAX_TOKENS - len(ids))
            ids = torch.tensor(ids, device=tm.embeddings.token_embedding.weight.device)
            tokens = tm.embeddings.token_embedding(ids).float()
            for start in slots:
                tokens = torch.cat([tokens[:start], prompts.v_star[i].to(tokens), tokens[start + prompts.num_tokens:]])
            positions = tm.embeddings.position_embedding.weight[:models.MAX_TOKENS].float()
            rows_e.append(tokens + positions)
            rows_p.append(ids)
        embeds.append(torch.stack(rows_e))
        pools.append(torch.stack(rows_p))
    return embeds, pools


# --- the trained model ---------------------------------------------------------------------------------------

def mark_trainable_kv(unet) -> dict[str, torch.nn.Parameter]:
    """``attn2.to_k``/``to_v`` weights of every transformer block become trainable (upstream crossattn-kv)."""
    unet.requires_grad_(False)
    kv = {name: p for name, p in unet.named_parameters() if KV_PATTERN.search(name)}
    if not kv:
        raise ValueError("the UNet has no transformer_blocks.*.attn2.to_k/to_v weights")
    for p in kv.values():
        p.requires_grad_(True)
    return kv


def detach_sos_kv(unet) -> list:
    """Keys and values of the first text token (SOS) carry no gradient (upstream, from Custom Diffusion)."""
    def hook(module, args, out):
        return torch.cat([out[:, :1].detach(), out[:, 1:]], dim=1)

    return [m.register_forward_hook(hook) for name, m in unet.named_modules()
            if re.search(r"attn2\.to_[kv]$", name)]


class IcoModel(torch.nn.Module):
    """Everything the loss touches; ``forward`` returns the ε-MSE of one micro-batch."""

    def __init__(self, parts: models.Parts, prompts: IcoPrompts):
        super().__init__()
        self.family = parts.family
        self.unet = parts.unet
        self.text_encoders = torch.nn.ModuleList(parts.text_encoders)
        self.prompts = prompts
        self.parts = parts  # tokenizers and scheduler (plain attributes, not submodules)
        self._hooks = detach_sos_kv(parts.unet)

    def conditioning(self, image_index: torch.Tensor, captions: list):
        """(context, pooled): ICO prompts for rows with an image index >= 0, plain captions for the others."""
        b = image_index.shape[0]
        target = image_index >= 0
        embeds, pools = [], []
        if not bool(target.all()):
            plain_ids = [models.tokenize(tok, [c or "" for c in captions]).to(image_index.device)
                         for tok in self.parts.tokenizers]
            with torch.no_grad():
                plain = [models.input_embeddings(enc, ids).float() for enc, ids in
                         zip(self.text_encoders, plain_ids)]
        else:
            plain_ids = [p.clone() for p in self.prompts.pool_ids(b)]
            plain = None
        ico = self.prompts(image_index.clamp(min=0)[target]) if bool(target.any()) else None
        for i in range(len(self.text_encoders)):
            if plain is None:
                e = ico[i]
            else:
                e = plain[i].clone()
                if ico is not None:
                    e[target] = ico[i].to(e.dtype)
            p = plain_ids[i]
            p[target] = self.prompts.piece("pool_ids", i).to(p.device)
            embeds.append(e)
            pools.append(p)
        return models.conditioning(self.parts, embeds, pools)

    def forward(self, latents, noise, timesteps, image_index, captions, time_ids=None):
        context, pooled = self.conditioning(image_index, captions)
        noisy = self.parts.noise_scheduler.add_noise(latents, noise, timesteps)
        added = {"text_embeds": pooled, "time_ids": time_ids} if self.family == "sdxl" else None
        pred = self.unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
        return torch.nn.functional.mse_loss(pred.float(), noise.float())


class IcoDataset(torch.utils.data.Dataset):
    """Upstream's mix (src/finetune_data.py): with N regularisation images, 2N items: items below N are those
    images (image index -1, their captions), item i >= N is reference image i mod (reference count); without
    regularisation, the reference images. (With fewer regularisation than reference images, upstream never
    shows some reference images; here the halves are then as long as the reference set.)"""

    def __init__(self, targets: list[data.Record], regs: list[data.Record], resolution: int):
        self.targets, self.regs, self.resolution = targets, regs, resolution
        self.half = max(len(regs), len(targets)) if regs else 0

    def __len__(self):
        return 2 * self.half if self.regs else len(self.targets)

    def __getitem__(self, key):
        i, flip = key
        if i < self.half:
            example = data.load_example(self.regs[i % len(self.regs)], self.resolution, flip)
            example["image_index"] = -1
        else:
            example = data.load_example(self.targets[i % len(self.targets)], self.resolution, flip)
            example["image_index"] = i % len(self.targets)
            example["caption"] = ""
        return example


def step_seed(seed: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + micro * 7_919 + rank * 104_729) % (2 ** 62)


def micro_batch_inputs(batch: dict, vae, scheduler, gen, device, resolution: int, family: str):
    """Latents (a VAE posterior sample), noise, timesteps and SDXL time ids of a batch, drawn from ``gen``."""
    with torch.no_grad():
        pixels = batch["pixel_values"].to(device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=gen) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen, device=device)
    time_ids = None
    if family == "sdxl":
        time_ids = models.sdxl_time_ids(batch["original_size"], batch["crop_top_left"], resolution).to(device)
    return latents, noise, t, time_ids


# --- the run -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run(loop.Run):
    """A prepared run (for the script and for tests that drive steps themselves); ``model`` is the IcoModel."""
    resolution: int
    base_kv: dict
    learning_rate: float


def prepare(cfg: IcoConfig, resume="auto") -> Run:
    """Load everything, build the optimizer, resume (``"auto"``: the newest checkpoint of the output dir if any;
    a path; or None for a fresh start)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    check(cfg)
    t = cfg.train
    # a micro-batch of regularisation images only leaves V* and the contexts unused (upstream's Lightning 1.4 DDP
    # ran with find_unused_parameters=True as well)
    accelerator = Accelerator(mixed_precision=t.mixed_precision,
                              gradient_accumulation_steps=t.gradient_accumulation_steps,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    parts = models.load(cfg.model.path, cfg.model.family, cfg.model.diffusers_config)
    resolution = cfg.data.resolution or DEFAULT_RESOLUTION[parts.family]
    targets = data.list_images(cfg.data.images)
    regs = []
    if cfg.data.reg_images:
        regs = data.list_images(cfg.data.reg_images, need_captions=True, default_caption=cfg.data.reg_caption)
    prompts = IcoPrompts(parts, cfg.concept, len(targets), seed=t.seed)
    kv = mark_trainable_kv(parts.unet)
    base_kv = {name: p.detach().float().cpu().clone() for name, p in kv.items()}
    if t.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if weight_dtype != torch.float32:  # frozen weights in the autocast dtype; trained ones stay float32
        for p in parts.unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(weight_dtype)
        for enc in parts.text_encoders:
            enc.to(weight_dtype)
    model = IcoModel(parts, prompts)
    scale = t.batch_size * accelerator.num_processes * t.gradient_accumulation_steps if t.scale_lr else 1
    lr = t.learning_rate * scale
    groups = [{"params": [*kv.values(), *prompts.v_star], "lr": lr},
              {"params": list(prompts.ctx), "lr": lr * t.context_lr_scale},
              {"params": list(prompts.end_ctx), "lr": lr * t.context_lr_scale}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                  weight_decay=t.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    parts.vae.to(accelerator.device)
    core = accelerator.unwrap_model(model)
    trainable = {name: p for name, p in core.named_parameters() if p.requires_grad}
    checkpoints.register_hooks(accelerator, trainable)
    run = Run(cfg, accelerator, parts, model, optimizer, IcoDataset(targets, regs, resolution), trainable,
              resolution=resolution, base_kv=base_kv, learning_rate=lr)
    return loop.resume(run, resume)


def loader(run: Run):
    """Micro-batches from the run's current step on (one per ``next``)."""
    return loop.batches(run, data.StepBatches, data.collate, run.cfg.data.flip_p)


def train_step(run: Run, batches) -> float:
    """One optimizer step (``gradient_accumulation_steps`` micro-batches); the mean micro-batch loss."""
    t, acc = run.cfg.train, run.accelerator
    losses = []
    for k in range(t.gradient_accumulation_steps):
        micro = run.step * t.gradient_accumulation_steps + k
        batch = next(batches)
        gen = torch.Generator(device=acc.device).manual_seed(step_seed(t.seed, micro, acc.process_index))
        latents, noise, timesteps, time_ids = micro_batch_inputs(batch, run.parts.vae, run.parts.noise_scheduler,
                                                                 gen, acc.device, run.resolution, run.parts.family)
        index = torch.tensor(batch["image_index"], device=acc.device)
        with acc.accumulate(run.model), acc.autocast():
            loss = run.model(latents, noise, timesteps, index, batch["caption"], time_ids)
            acc.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=False)  # torch 1.11 + Lightning 1.4 (upstream) kept zero grads
        losses.append(loss.detach().item())
    run.step += 1
    return sum(losses) / len(losses)


def export(run: Run, suffix: str = "") -> tuple[pathlib.Path, pathlib.Path]:
    """Write the ComfyUI files: ``embeddings/NAME{suffix}.safetensors`` and ``loras/NAME{suffix}.safetensors``."""
    core, cfg = run.core, run.cfg
    name = cfg.concept.name + suffix
    meta = {"syncd_method": "ico", "syncd_concept": cfg.concept.name, "syncd_noun": cfg.concept.noun,
            "syncd_step": run.step, "syncd_family": run.parts.family}
    emb_path = run.out / "embeddings" / f"{name}.safetensors"
    lora_path = run.out / "loras" / f"{name}.safetensors"
    checkpoints.save_embedding(emb_path, run.parts.family, [v.detach() for v in core.prompts.v_star], meta)
    lpb = core.unet.config.layers_per_block
    diffs = {checkpoints.comfy_unet_key(n, lpb): run.trainable["unet." + n].detach().float().cpu() - base
             for n, base in run.base_kv.items()}
    dtype = getattr(torch, cfg.train.export_dtype)
    checkpoints.save_weight_diffs(lora_path, diffs, dtype, meta)
    return emb_path, lora_path


def validate(run: Run) -> list[pathlib.Path]:
    """PNG images of the validation prompts at the current step (main process)."""
    v, cfg = run.cfg.validation, run.cfg
    prompts = v.prompts or [f"embedding:{cfg.concept.name} {cfg.concept.noun}"]
    core, acc = run.core, run.accelerator
    folder = run.out / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with torch.no_grad(), acc.autocast():
        uncond = models.encode_text(run.parts, [v.negative_prompt])
        for k, text in enumerate(prompts):
            embeds, pools = concept_input_embeddings(run.parts, core.prompts, [text], cfg.concept.name)
            cond = models.conditioning(run.parts, embeds, pools)
            image = models.generate(run.parts, core.unet, cond, uncond, resolution=run.resolution, steps=v.steps,
                                       guidance_scale=v.guidance_scale, eta=v.eta, seed=v.seed + k,
                                       device=acc.device)
            path = folder / f"step{run.step:06d}_{k:02d}.png"
            image.save(path)
            paths.append(path)
    (folder / "prompts.json").write_text(json.dumps(prompts, indent=1))
    return paths


def validate_on_schedule(run: Run, last: bool) -> None:
    """Validation images every ``validation.every`` steps and at the last one (main process)."""
    v = run.cfg.validation
    if v.every and (run.step % v.every == 0 or last) and run.accelerator.is_main_process:
        validate(run)


def train(run: Run, progress: bool = True) -> Run:
    """Steps up to ``max_steps`` with checkpoints, exports and validation; the final exports."""
    t, concept = run.cfg.train, run.cfg.concept
    header = (f"ICO: {run.parts.family}, {len(run.dataset.targets)} reference images, "
              f"{len(run.dataset.regs)} regularisation images, learning rate {run.learning_rate:g} "
              f"(contexts x{t.context_lr_scale:g}), steps {run.step}..{t.max_steps}")

    def final_message(paths) -> str:
        emb, lora = paths
        return (f"embedding: {emb}\nk/v weights: {lora}\nin ComfyUI: copy them to models/embeddings and "
                f"models/loras, load the LoRA with LoraLoaderModelOnly (strength 1.0) and write the concept as "
                f"'embedding:{concept.name} {concept.noun}' in the prompt")

    return loop.train_loop(run, "ICO", train_step, export, loader=loader, header=header, final_message=final_message,
                           step_exports=t.export_every_checkpoint, on_step=validate_on_schedule, progress=progress)


def main(argv=None) -> int:
    return loop.script_main(argv, "python -m comfyui_syncd.training.ico", __doc__.split("\n")[0],
                            "YAML or TOML config (see training/configs/ico_sd15.yaml)", IcoConfig, prepare, train)


if __name__ == "__main__":
    sys.exit(main())

"""The toy world's text-to-image base model (issue 13 §2.1): a tiny SD1.5-architecture latent diffusion model.

Three parts, each the real architecture at a toy width (diffusers / transformers classes, so the pack's training
scripts load it as any SD1.5 diffusers folder, and ComfyUI builds the same layers through its own classes):

* **VAE** — ``AutoencoderKL``, 4 levels (8× down, as SD's: 64 px ↔ 8×8×4 latents, so ComfyUI's Empty Latent Image
  fits), widths 32-64; trained here (:func:`train_vae`) on toy renders, L1 + a small KL term, then its latent scale
  is folded into ``quant_conv``/``post_quant_conv`` so that SD1.5's scaling factor 0.18215 gives unit-variance
  latents (:func:`fold_latent_scale`);
* **text encoder** — ``CLIPTextModel`` with CLIP's real BPE vocabulary (49 408 tokens: every caption word is in it)
  at width 64, 2 layers; trained from scratch together with the UNet by ``training/text_to_image.py``;
* **UNet** — ``UNet2DConditionModel`` in SD1.5's layout (cross-attention down/up blocks, 8 heads, ε-prediction,
  SD1.5's DDPM schedule) at widths 64-128 on 8×8 latents.

:func:`corpus` writes the training folder of the text-to-image script: toy renders with a caption file holding
several phrasings per image (the full caption and ones leaving out colour, texture or placement), so the model
also generates from partial prompts ("a cube on grass"), which is what data generation asks of it.
:func:`write_pipeline` assembles the diffusers folder; :func:`export_file` / :func:`read_file` the single
safetensors file the pack ships (``toyworld/weights/toy_sd15.safetensors``).
"""

from __future__ import annotations

import itertools
import json
import pathlib
import shutil

import numpy as np
import torch

from . import scene as S

LATENT_SCALE = 0.18215   # SD1.5's VAE scaling factor (ComfyUI's latent_formats.SD15)
CONTEXT_DIM = 64

VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
              "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [32, 32, 64, 64],
              "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32, "sample_size": S.SIZE,
              "scaling_factor": LATENT_SCALE}
UNET_CONFIG = {"sample_size": S.SIZE // 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [64, 128],
               "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
               "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
               "attention_head_dim": 8, "cross_attention_dim": CONTEXT_DIM, "norm_num_groups": 32}
TEXT_CONFIG = {"vocab_size": 49408, "hidden_size": CONTEXT_DIM, "intermediate_size": 4 * CONTEXT_DIM,
               "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
               "hidden_act": "quick_gelu", "projection_dim": CONTEXT_DIM, "bos_token_id": 49406,
               "eos_token_id": 49407, "pad_token_id": 49407}
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
                    "steps_offset": 1}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")

CORPUS_SEED = 7
CORPUS_P_EMPTY = 0.05
OBJECT_WEIGHT = 4.0
CAPTIONS_PER_IMAGE = "one phrasing per line; the text-to-image script draws one per sample"


# --- the parts --------------------------------------------------------------------------------------------------

def build_vae(seed: int = 0, size: int = S.SIZE):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{**VAE_CONFIG, "sample_size": size})


def build_unet(seed: int = 0, size: int = S.SIZE):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**UNET_CONFIG, "sample_size": size // 8})


def build_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


# --- captions and the training corpus ---------------------------------------------------------------------------

def phrase(scene: S.Scene, colour: bool = True, texture: bool = True, placement: bool = True) -> str:
    """The caption of ``scene`` naming only the chosen attributes besides shape and background:
    ``phrase(s)`` is :func:`scene.caption`; ``phrase(s, False, False, False)`` 'a cube on grass'."""
    if not scene.has_object:
        return S.caption(scene)
    if colour and texture:
        obj = S.object_phrase(scene.shape, scene.colour, scene.texture)
    else:
        words = [w for w, keep in ((scene.colour, colour), (scene.texture, texture)) if keep] + [scene.shape]
        obj = f"{'an' if words[0][0] in 'aeiou' else 'a'} {' '.join(words)}"
    text = f"{obj} {S.BACKGROUND_PHRASES[scene.background]}"
    return f"{text}, {S.PLACEMENT_PHRASES[scene.placement]}" if placement else text


def phrasings(scene: S.Scene) -> list[str]:
    """Every phrasing of a scene (full caption first, twice: it is the one asked for most), deduplicated."""
    lines = list(dict.fromkeys(phrase(scene, *keep) for keep in itertools.product((True, False), repeat=3)))
    return lines[:1] + lines


def corpus(folder, count: int, seed: int = CORPUS_SEED, p_empty: float = CORPUS_P_EMPTY, chunk: int = 512,
           size: int = S.SIZE, workers: int = 1, depth: bool = False) -> pathlib.Path:
    """Write ``count`` toy renders (``size`` px) as ``NNNNNN.png`` with ``NNNNNN.txt`` phrasings (one per line) into
    ``folder``, ``workers`` (forked) processes rendering chunks side by side; with ``depth``, their depth
    conditioning images (:func:`views.depth_images`) as ``depth/NNNNNN.png``. An existing complete corpus
    (``corpus.json`` with the same settings) is kept."""
    from concurrent.futures import ProcessPoolExecutor

    folder = pathlib.Path(folder)
    stamp = folder / "corpus.json"
    wanted = {"count": count, "seed": seed, "p_empty": p_empty, "phrases": [S.BACKGROUND_PHRASES, S.PLACEMENT_PHRASES]}
    if size != S.SIZE:
        wanted["size"] = size
    if depth:
        wanted["depth"] = True
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return folder
    (folder / "depth" if depth else folder).mkdir(parents=True, exist_ok=True)
    scenes = S.sample_scenes(count, seed, p_empty=p_empty)
    jobs = [(folder, scenes[start:start + chunk], start, size, depth) for start in range(0, count, chunk)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_chunk, *zip(*jobs)))
    else:
        for job in jobs:
            _write_chunk(*job)
    stamp.write_text(json.dumps(wanted))
    return folder


def _write_chunk(folder: pathlib.Path, scenes, start: int, size: int, depth: bool = False) -> None:
    from PIL import Image

    from .views import depth_images

    render = S.render(scenes, size)
    depths = depth_images(render) if depth else [None] * len(scenes)
    for i, (scn, image, depth_image) in enumerate(zip(scenes, render.image, depths)):
        name = f"{start + i:06d}"
        Image.fromarray((image.numpy() * 255).round().astype(np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text("\n".join(phrasings(scn)) + "\n")
        if depth_image is not None:
            Image.fromarray((depth_image.numpy() * 255).round().astype(np.uint8)).save(folder / "depth" / f"{name}.png")


def corpus_masks(count: int, seed: int = CORPUS_SEED, p_empty: float = CORPUS_P_EMPTY, limit: int | None = None,
                 size: int = S.SIZE) -> torch.Tensor:
    """(N, 1, size, size) object masks of the first ``limit`` images of :func:`corpus` ``(count, seed, p_empty)``,
    rendered again (the renderer is deterministic)."""
    scenes = S.sample_scenes(count, seed, p_empty=p_empty)[:limit]
    return torch.cat([S.render(scenes[i:i + 512], size).mask for i in range(0, len(scenes), 512)]).float()[:, None]


def read_corpus_images(folder, limit: int | None = None) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] of a corpus folder, in name order."""
    from PIL import Image

    paths = sorted(pathlib.Path(folder).glob("*.png"))[:limit]
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --- the VAE ------------------------------------------------------------------------------------------------------

def vae_loss(vae, pixels: torch.Tensor, gen: torch.Generator, masks: torch.Tensor | None = None,
             object_weight: float = OBJECT_WEIGHT, kl_weight: float = 1e-6) -> torch.Tensor:
    """L1 reconstruction of a latent sample, object pixels weighted ``1 + object_weight`` (the object is a few
    percent of the image but all that identity is made of), plus ``kl_weight`` × the KL to N(0, I) (Rombach et al.
    2022, without the perceptual and adversarial terms a toy world does not need)."""
    posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample(generator=gen)).sample
    error = (recon - pixels).abs()
    if masks is not None:
        weight = 1 + object_weight * masks
        error = error * weight / weight.mean()
    return error.mean() + kl_weight * posterior.kl().mean()


def train_vae(images: torch.Tensor, out_dir, steps: int = 800, batch: int = 16, lr: float = 1e-3, seed: int = 0,
              checkpoint_every: int = 100, progress: bool = True, masks: torch.Tensor | None = None,
              device: str | torch.device = "cpu"):
    """Train the toy VAE on ``images`` ((N, 3, H, W) in [-1, 1]; ``masks`` (N, 1, H, W) weight the object pixels,
    :func:`vae_loss`); resumable from ``out_dir/vae_state.pt`` (written every ``checkpoint_every`` steps). Returns
    the trained ``AutoencoderKL`` (latent scale not folded), on ``device`` (the images stay where they are)."""
    from tqdm.auto import tqdm

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "vae_state.pt"
    vae = build_vae(seed, images.shape[-1]).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
    vae.train()
    bar = tqdm(total=steps, initial=step, desc="toy VAE", unit="step", disable=not progress)
    while step < steps:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.randint(0, images.shape[0], (batch,), generator=gen)
        for group in optimizer.param_groups:  # cosine decay to a tenth
            group["lr"] = lr * (0.55 + 0.45 * float(np.cos(np.pi * step / steps)))
        loss = vae_loss(vae, images[index].to(device), gen, None if masks is None else masks[index].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % checkpoint_every == 0 or step == steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
            tmp.replace(state_path)
    bar.close()
    return vae.eval()


@torch.no_grad()
def fold_latent_scale(vae, images: torch.Tensor, target_std: float = 1.0 / LATENT_SCALE) -> float:
    """Rescale the VAE's latent space so the posterior means of ``images`` have std ``target_std`` (then SD1.5's
    0.18215 scales them to unit variance): ``quant_conv`` mean channels × s (log-variance + 2 ln s),
    ``post_quant_conv`` inputs ÷ s; encode→decode is unchanged. Returns s."""
    means = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, images.shape[0], 256)])
    s = target_std / float(means.std())
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= s
    vae.quant_conv.bias[:c] *= s
    vae.quant_conv.bias[c:] += 2 * float(np.log(s))
    vae.post_quant_conv.weight /= s
    return s


# --- the pipeline folder and the shipped file -----------------------------------------------------------------

def write_pipeline(folder, vae, unet, text_encoder, tokenizer_dir) -> pathlib.Path:
    """A diffusers SD1.5 folder (``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that
    ``training.models.load`` reads; ``tokenizer_dir`` holds CLIP's tokenizer files (ComfyUI's
    ``comfy/sd1_tokenizer``)."""
    from diffusers import DDPMScheduler

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder / "vae")
    unet.save_pretrained(folder / "unet")
    text_encoder.save_pretrained(folder / "text_encoder")
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    (folder / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(pathlib.Path(tokenizer_dir) / name, folder / "tokenizer" / name)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}, indent=1))
    return folder


PARTS = ("unet", "vae", "text_encoder")


def _config(module) -> dict:
    config = module.config
    items = config.items() if hasattr(config, "items") else config.to_dict().items()
    return {k: v for k, v in items if not k.startswith("_") and k not in ("transformers_version", "architectures")}


def export_file(path, vae, unet, text_encoder, info: dict | None = None, dtype=torch.float16) -> pathlib.Path:
    """One safetensors file: ``unet.*``, ``vae.*``, ``text_encoder.*`` (diffusers/transformers key layouts) in
    ``dtype``, the three configs and ``info`` (training figures) as JSON metadata."""
    import safetensors.torch

    tensors = {}
    for prefix, module in zip(PARTS, (unet, vae, text_encoder)):
        for key, value in module.state_dict().items():
            if key.endswith("position_ids"):
                continue
            tensors[f"{prefix}.{key}"] = value.detach().to("cpu", dtype).contiguous()
    meta = {f"{p}_config": json.dumps(_config(m)) for p, m in zip(PARTS, (unet, vae, text_encoder))}
    meta["toyworld_info"] = json.dumps(info or {})
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), meta)
    return path


def read_file(path) -> tuple[dict[str, dict], dict[str, dict], dict]:
    """({part: state dict}, {part: config}, info) of an :func:`export_file` file (float32 tensors)."""
    from safetensors import safe_open

    states: dict[str, dict] = {p: {} for p in PARTS}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            part, _, name = key.partition(".")
            if part not in states:
                raise ValueError(f"{path}: key {key!r} belongs to none of {PARTS}")
            states[part][name] = f.get_tensor(key).float()
    missing = [p for p in PARTS if f"{p}_config" not in meta or not states[p]]
    if missing:
        raise ValueError(f"{path} is not a toy-world model file (no {', '.join(missing)}); make one with "
                         f"'python -m comfyui_syncd toyworld reproduce'")
    configs = {p: json.loads(meta[f"{p}_config"]) for p in PARTS}
    return states, configs, json.loads(meta.get("toyworld_info", "{}"))


def load_parts(path):
    """(vae, unet, text_encoder) diffusers/transformers modules of an :func:`export_file` file, float32, eval."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    states, configs, _ = read_file(path)
    vae = AutoencoderKL.from_config(configs["vae"])
    unet = UNet2DConditionModel.from_config(configs["unet"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    for module, part in ((vae, "vae"), (unet, "unet"), (text_encoder, "text_encoder")):
        missing, unexpected = module.load_state_dict(states[part], strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{path}: {part} weights do not fit its config (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]})")
    return vae.eval(), unet.eval(), text_encoder.eval()

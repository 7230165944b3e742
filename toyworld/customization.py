"""Customization models of the toy world (issue 13 §2.3–2.4): trained on generated sets with the pack's training
scripts, then evaluated on held-out objects with the attribute reader.

Models (each a run of the pack's own script on the toy base model):

* ``syncd_msa`` — :mod:`comfyui_syncd.training.syncd` on the sets generated with Masked Shared Attention and
  automatic masks (``sets/msa_masks``);
* ``syncd_no_msa`` — the same script and settings on the sets generated without MSA (``sets/msa_off``): the paper's
  headline comparison (SynCD Table 4);
* ``jedi_msa`` — :mod:`comfyui_syncd.training.jedi` on the MSA sets.

Deviations from the papers' settings, for a 64 px model trained in minutes on a CPU: the base model's ε-prediction
and schedule are kept (``prediction_type: epsilon``, no zero-terminal-SNR rescale), LoRA rank 32, a larger learning
rate, the IP-Adapter's image encoder is a small random CLIP vision model (frozen, as upstream's; the trained
``to_k_ip``/``to_v_ip`` can only use what its random features keep), and the score filter is the attribute reader's
(:func:`sets.reader_scores`: an image is kept when it shows an object and agrees with another image of its set on at
least one of shape, colour and texture).

Evaluation: for each held-out identity (:func:`views.split_identities`), true toy renders are the references (1 or 3
views) and the prompt names the shape, a background and a placement ("a cube on grass, on the left"); the reader
reads the generated image. Identity: the read (shape, colour, texture) equals the reference's; prompt following:
the read background and placement equal the prompt's; overexposure: the mean HSV saturation and value of the
images (renders as the reference).
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import torch

from . import reader as R, scene as S, views as V

MODELS = {"syncd_msa": ("syncd", "msa_masks"), "syncd_no_msa": ("syncd", "msa_off"), "jedi_msa": ("jedi", "msa_masks")}
MIN_AESTHETICS, MIN_DINO = 0.5, 0.3  # sets.reader_scores: an object, and a pair agreeing on one attribute or more
IMAGE_ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                     patch_size=8, projection_dim=64, hidden_act="quick_gelu")
EVAL_SEED = 4_000_037


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 600
    batch: int = 4
    learning_rate: float = 2e-4
    jedi_learning_rate: float = 1e-4
    lora_rank: int = 32
    eval_objects: int = 18
    sample_steps: int = 25
    size: int = S.SIZE


def image_encoder(folder) -> pathlib.Path:
    """A small random CLIP vision model (the IP-Adapter's frozen image encoder) saved to ``folder``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = pathlib.Path(folder)
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER)).save_pretrained(folder)
    return folder


def syncd_config(base, dataset, encoder, out, s: Settings):
    from ..training import config, syncd

    return config.from_dict(syncd.SyncdConfig, {
        "model": {"path": str(base)},
        "ip_adapter": {"image_encoder": str(encoder), "resampler_dim": 64, "resampler_heads": 4,
                       "resampler_depth": 2, "num_queries": 8},
        "data": {"dirs": [str(dataset)], "resolution": s.size, "crop_padding": 12 * s.size // S.SIZE, "mask_dilation": 1,
                 "min_aesthetics": MIN_AESTHETICS, "min_dino": MIN_DINO, "num_workers": 0},
        "lora": {"rank": s.lora_rank, "alpha": float(s.lora_rank)},
        "train": {"output_dir": str(out), "max_steps": s.steps, "batch_size": s.batch, "gradient_accumulation_steps": 1,
                  "learning_rate": s.learning_rate, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
                  "checkpoint_every": max(1, min(250, s.steps)), "keep_checkpoints": 1,
                  "export_every_checkpoint": False, "tensorboard": False}})


def jedi_config(base, dataset, out, s: Settings):
    from ..training import config, jedi

    return config.from_dict(jedi.JediConfig, {
        "model": {"path": str(base)},
        "data": {"dirs": [str(dataset)], "resolution": s.size, "min_images": 2, "max_images": 3,
                 "min_aesthetics": MIN_AESTHETICS, "min_dino": MIN_DINO, "num_workers": 0},
        "train": {"output_dir": str(out), "max_steps": s.steps, "batch_size": s.batch,
                  "learning_rate": s.jedi_learning_rate, "checkpoint_every": max(1, min(250, s.steps)),
                  "keep_checkpoints": 1, "export_every_checkpoint": False, "tensorboard": False}})


def prepare(kind: str, cfg):
    """The prepared run of ``kind`` (``syncd``/``jedi``), resumed from its newest checkpoint."""
    from ..training import jedi, syncd

    return (syncd if kind == "syncd" else jedi).prepare(cfg, resume="auto")


def train(kind: str, cfg, progress: bool = True) -> dict:
    from ..training import jedi, loop, syncd

    run = prepare(kind, cfg)
    (syncd if kind == "syncd" else jedi).train(run, progress=progress)
    losses = loop.read_losses(cfg.train.output_dir)
    last = [losses[k] for k in sorted(losses)[-100:]]
    return {"objects": len(run.dataset), "steps": len(losses), "loss_mean_last_100": round(sum(last) / len(last), 4)}


# --- the customization model as one file (ComfyUI: demo/toy_customization.py) ------------------------------------

BUNDLE_FORMAT = "syncd_toyworld_customization"
BUNDLE_PARTS = ("syncd", "ip_adapter", "clip_vision")  # the checkpoint's LoRA, the IP-Adapter Plus, its image encoder


def bundle_file(run_dir, encoder_dir, path, info: dict | None = None, dtype=torch.float16) -> pathlib.Path:
    """One safetensors file of a trained SynCD toy model: ``syncd.*`` (the script's checkpoint export, SynCD SDXL
    keys), ``ip_adapter.*`` (its IP-Adapter Plus, ``image_proj.``/``ip_adapter.`` keys) and ``clip_vision.*`` (the
    frozen image encoder, transformers keys, config as metadata), what the toy-world customization nodes load."""
    import json

    import safetensors.torch
    from transformers import CLIPVisionModelWithProjection

    run_dir, encoder_dir = pathlib.Path(run_dir), pathlib.Path(encoder_dir)
    name = json.loads((run_dir / "config.json").read_text())["train"]["name"]
    tensors = {}
    for part, file in (("syncd", run_dir / name / f"{name}.safetensors"),
                       ("ip_adapter", run_dir / "ip_adapter" / f"{name}.safetensors")):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: train the SynCD model to its end first (it exports there)")
        tensors.update({f"{part}.{k}": v for k, v in safetensors.torch.load_file(str(file)).items()})
    encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_dir)
    tensors.update({f"clip_vision.{k}": v for k, v in encoder.state_dict().items() if not k.endswith("position_ids")})
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    meta = {"format": BUNDLE_FORMAT, "clip_vision_config": encoder.config.to_json_string(),
            "toyworld_info": json.dumps(info or {})}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), meta)
    return path


def read_bundle(path) -> tuple[dict[str, dict], dict, dict]:
    """({part: float32 state dict}, the image encoder's transformers config, info) of a :func:`bundle_file`."""
    import json

    from safetensors import safe_open

    states: dict[str, dict] = {p: {} for p in BUNDLE_PARTS}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{path} is not a toy-world customization file (a SynCD model of 'toyworld reproduce', "
                             f"stage customize: customize/syncd_msa/toy_syncd.safetensors)")
        for key in f.keys():
            part, _, name = key.partition(".")
            if part not in states:
                raise ValueError(f"{path}: key {key!r} belongs to none of {BUNDLE_PARTS}")
            states[part][name] = f.get_tensor(key).float()
    return states, json.loads(meta["clip_vision_config"]), json.loads(meta.get("toyworld_info", "{}"))


# --- evaluation ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalCase:
    identity: V.Identity
    references: S.Render     # 3 true views
    prompt: str
    background: str
    placement: str


def eval_cases(count: int, seed: int = EVAL_SEED, size: int = S.SIZE) -> list[EvalCase]:
    """``count`` held-out identities (cycled), 3 rendered views each (``size`` px), and a prompt with another
    background."""
    _, held_out = V.split_identities()
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        identity = held_out[i % len(held_out)]
        refs = V.multi_view_set(identity, views=3, seed=seed + i, size=size)
        background = S.BACKGROUNDS[rng.integers(len(S.BACKGROUNDS))]
        placement = S.PLACEMENTS[rng.integers(len(S.PLACEMENTS))]
        prompt = (f"{'an' if identity.shape[0] in 'aeiou' else 'a'} {identity.shape} "
                  f"{S.BACKGROUND_PHRASES[background]}, {S.PLACEMENT_PHRASES[placement]}")
        cases.append(EvalCase(identity, refs, prompt, background, placement))
    return cases


def references(case: EvalCase, count: int):
    """The case's first ``count`` views as the training scripts' validation references."""
    from ..training.validation import References

    pixels = case.references.image[:count].permute(0, 3, 1, 2) * 2 - 1
    masks = case.references.mask[:count].float()
    return References(pixels, masks, [f"a {case.identity.shape}"] * count, case.identity.shape)


def saturation_value(images: torch.Tensor) -> tuple[float, float]:
    """Mean HSV saturation and value of (B, H, W, 3) images in [0, 1] (the overexposure measure)."""
    high, low = images.max(-1).values, images.min(-1).values
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-6), torch.zeros_like(high))
    return float(saturation.mean()), float(high.mean())


def score(images: torch.Tensor, cases: list[EvalCase]) -> dict[str, float]:
    """Identity, per-attribute identity, prompt following and overexposure of (B, H, W, 3) images of ``cases``."""
    reading = R.read(images)
    n = len(cases)
    out = {"identity": sum(reading.identity(i) == (c.identity.shape, c.identity.colour, c.identity.texture)
                           for i, c in enumerate(cases)) / n}
    for k in S.OBJECT_ATTRIBUTES:
        out[k] = sum(reading.labels[k][i] == getattr(c.identity, k) for i, c in enumerate(cases)) / n
    out["background"] = sum(reading.labels["background"][i] == c.background for i, c in enumerate(cases)) / n
    out["placement"] = sum(reading.labels["placement"][i] == c.placement for i, c in enumerate(cases)) / n
    out["saturation"], out["value"] = saturation_value(images)
    return out


COMFY_WORKFLOWS = {("SDXL", 1): "syncd_customization_sdxl_1ref.json", ("SDXL", 3): "syncd_customization_sdxl_3ref.json",
                   ("Flux", 1): "syncd_customization_flux_1ref.json", ("Flux", 3): "syncd_customization_flux_3ref.json"}


def comfy_case_graph(api: dict, case: EvalCase, seed: int, reference_prompt: str) -> dict:
    """A toy-swapped shipped customization workflow (API graph) for one case: its identity's views (the same renders
    as :func:`eval_cases`' references: 3 views, ``seed``) as references, the case's prompt, the reference prompt
    "photo of a <shape>" where the swap wrote ``reference_prompt``, and ``seed`` for the sampler's noise."""
    import copy

    graph = copy.deepcopy(api)
    i = case.identity
    for node in graph.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "SynCDToyWorldReferences":
            inputs.update(shape=i.shape, colour=i.colour, texture=i.texture, seed=seed, views=3)
        elif kind == "CLIPTextEncode" and isinstance(inputs.get("text"), str) and inputs["text"]:
            inputs["text"] = f"photo of a {i.shape}" if inputs["text"] == reference_prompt else case.prompt
        elif kind == "RandomNoise":
            inputs["noise_seed"] = seed
        elif kind == "SynCDCustomizationSampler":
            inputs["seed"] = seed
    return graph


METHODS = {  # name -> (model, guidance): what SynCD Table 5 / JeDi Table 4 compare, at toy scale
    "no references (base model, text guidance)": ("base", None),
    "SynCD on MSA sets, normalized guidance": ("syncd_msa", "normalized"),
    "SynCD on MSA sets, Brooks guidance": ("syncd_msa", "brooks"),
    "SynCD on no-MSA sets, normalized guidance": ("syncd_no_msa", "normalized"),
    "JeDi on MSA sets, JeDi image guidance": ("jedi_msa", "jedi"),
}


def sample_method(run, kind: str, guidance: str, case: EvalCase, count: int, s: Settings, seed: int) -> torch.Tensor:
    """One (1, H, W, 3) image in [0, 1] (on the CPU) of ``case`` with ``count`` references, by the training scripts'
    own samplers (upstream's inference: :func:`~comfyui_syncd.training.validation.sample_syncd` / ``sample_jedi``),
    on the device the run's UNet is on."""
    from ..training import validation

    gen = torch.Generator().manual_seed(seed)
    refs = references(case, count)
    device = run.parts.unet.device
    if kind == "syncd":
        v = validation.SyncdValidationConfig(steps=s.sample_steps, guidance=guidance)
        image = validation.sample_syncd(run.core, run.parts, refs, case.prompt, v, s.size, device, gen)
    else:
        v = validation.JediValidationConfig(steps=s.sample_steps)
        image = validation.sample_jedi(run.core, run.parts, refs, case.prompt, v, s.size, device, gen)
    return ((image.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()

"""``python -m comfyui_syncd toyworld reproduce [--out DIR] [--quick]``: the toy world's SynCD loop, stage by stage.

Stages (each writes its artefacts under ``--out`` and a ``done.json``; a rerun skips finished stages and resumes
the unfinished one from its last checkpoint):

1. ``corpus`` — toy renders with their phrasings (:func:`base_model.corpus`);
2. ``vae`` — the toy VAE, trained (:func:`base_model.train_vae`), its latent scale folded for SD1.5's 0.18215;
3. ``base_init`` — the diffusers SD1.5 folder of the trained VAE, a fresh UNet and text encoder, CLIP's tokenizer;
4. ``text_to_image`` — UNet and text encoder trained from scratch by the pack's
   :mod:`comfyui_syncd.training.text_to_image` script;
5. ``export`` — the single file ComfyUI loads (``toy_sd15.safetensors``, as shipped in ``toyworld/weights``);
6. ``base_eval`` — prompt following of the base model: images sampled for held-out full captions, read by the
   attribute reader; ``tables/base_model.md`` and a grid.

``--quick`` runs every stage at a few-minutes size (what CI runs): the numbers then only show the loop works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import torch

from . import base_model as B, reader as R, scene as S

STAGES = ("corpus", "vae", "base_init", "text_to_image", "export", "base_eval")


@dataclasses.dataclass(frozen=True)
class Scale:
    corpus: int = 20000
    vae_images: int = 6000
    vae_steps: int = 2000
    vae_batch: int = 16
    t2i_steps: int = 3000
    t2i_batch: int = 32
    eval_images: int = 216
    sample_steps: int = 25
    guidance: float = 5.0


FULL = Scale()
QUICK = Scale(corpus=64, vae_images=64, vae_steps=10, vae_batch=4, t2i_steps=10, t2i_batch=4, eval_images=6,
              sample_steps=3)
EVAL_SEED = 2_000_003


class Stages:
    """The run folder: one sub-folder per stage, ``done.json`` when finished (with the stage's figures)."""

    def __init__(self, out, scale: Scale, progress: bool = True):
        self.out, self.scale, self.progress = pathlib.Path(out), scale, progress
        self.out.mkdir(parents=True, exist_ok=True)
        stamp = self.out / "scale.json"
        wanted = dataclasses.asdict(scale)
        if stamp.is_file() and json.loads(stamp.read_text()) != wanted:
            raise ValueError(f"{self.out} holds a run at another scale ({stamp}); use a new --out folder")
        stamp.write_text(json.dumps(wanted, indent=1))

    def dir(self, stage: str) -> pathlib.Path:
        return self.out / stage

    def done(self, stage: str) -> dict | None:
        path = self.dir(stage) / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, stage: str, figures: dict) -> dict:
        self.dir(stage).mkdir(parents=True, exist_ok=True)
        (self.dir(stage) / "done.json").write_text(json.dumps(figures, indent=1))
        return figures

    def run(self, stage: str, fn) -> dict:
        figures = self.done(stage)
        if figures is not None:
            print(f"[{stage}] done earlier: {figures}")
            return figures
        print(f"[{stage}] ...", flush=True)
        start = time.time()
        figures = dict(fn() or {})
        figures["seconds"] = round(time.time() - start, 1)
        print(f"[{stage}] {figures}", flush=True)
        return self.finish(stage, figures)


def tokenizer_dir() -> pathlib.Path:
    """CLIP-L's tokenizer files as ComfyUI ships them (``comfy/sd1_tokenizer``)."""
    from ..comfy_path import find_comfyui

    return find_comfyui() / "comfy" / "sd1_tokenizer"


def stage_vae(st: Stages) -> dict:
    images = B.read_corpus_images(st.dir("corpus"), st.scale.vae_images)
    masks = B.corpus_masks(st.scale.corpus, limit=st.scale.vae_images)
    vae = B.train_vae(images, st.dir("vae"), steps=st.scale.vae_steps, batch=st.scale.vae_batch,
                      progress=st.progress, masks=masks)
    with torch.no_grad():
        probe = images[:256]
        l1 = float((vae.decode(vae.encode(probe).latent_dist.mean).sample - probe).abs().mean())
        scale = B.fold_latent_scale(vae, images[:1024])
        folded = float((vae.decode(vae.encode(probe).latent_dist.mean).sample - probe).abs().mean())
    vae.save_pretrained(st.dir("vae") / "model")
    return {"reconstruction_l1": round(l1, 4), "after_scale_fold_l1": round(folded, 4), "latent_scale": scale}


def stage_base_init(st: Stages) -> dict:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(st.dir("vae") / "model")
    B.write_pipeline(st.dir("base_init"), vae, B.build_unet(0), B.build_text_encoder(0), tokenizer_dir())
    return {}


def t2i_config(st: Stages):
    from ..training import text_to_image as T

    return T.TextToImageConfig(
        model=T.ModelConfig(path=str(st.dir("base_init"))),
        data=T.DataConfig(dir=str(st.dir("corpus")), resolution=S.SIZE),
        train=T.TrainConfig(output_dir=str(st.dir("text_to_image")), max_steps=st.scale.t2i_steps,
                            batch_size=st.scale.t2i_batch, learning_rate=5e-4, text_encoder_learning_rate=5e-4,
                            lr_warmup_steps=min(200, st.scale.t2i_steps // 5),
                            checkpoint_every=min(250, st.scale.t2i_steps), tensorboard=False))


def stage_text_to_image(st: Stages) -> dict:
    from ..training import loop, text_to_image as T

    run = T.prepare(t2i_config(st))
    T.train(run, progress=st.progress)
    losses = loop.read_losses(st.dir("text_to_image"))
    last = [losses[s] for s in sorted(losses)[-50:]]
    return {"steps": len(losses), "final_loss_mean_last_50": round(sum(last) / len(last), 4)}


def stage_export(st: Stages) -> dict:
    from ..training import models

    parts = models.load(st.dir("text_to_image") / "pipeline")
    info = {"vae": st.done("vae"), "text_to_image": st.done("text_to_image"), "scale": dataclasses.asdict(st.scale)}
    path = B.export_file(st.dir("export") / "toy_sd15.safetensors", parts.vae, parts.unet, parts.text_encoders[0],
                         info)
    return {"file": str(path), "megabytes": round(path.stat().st_size / 2 ** 20, 2)}


@torch.no_grad()
def sample(parts, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 64) -> torch.Tensor:
    """(N, H, W, 3) images in [0, 1] for ``prompts``: DDIM (η = 0) with classifier-free guidance, batched."""
    from diffusers import DDIMScheduler

    from ..training import models

    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        scheduler = DDIMScheduler.from_config(parts.noise_scheduler.config)
        scheduler.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed + start)
        size = S.SIZE // 8
        latents = torch.randn((len(chunk), 4, size, size), generator=gen)
        cond, _ = models.encode_text(parts, chunk)
        uncond, _ = models.encode_text(parts, [""] * len(chunk))
        context = torch.cat([uncond, cond])
        for t in scheduler.timesteps:
            eps_u, eps_c = parts.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample.chunk(2)
            latents = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
        images = parts.vae.decode(latents / parts.vae.config.scaling_factor).sample
        out.append(((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1))
    return torch.cat(out)


def read_accuracy(images: torch.Tensor, scenes, attributes=R.ATTRIBUTES) -> dict[str, float]:
    """Fraction of images whose read attribute equals the scene's, per attribute."""
    reading = R.read(images)
    hits = [reading.matches(i, s, attributes) for i, s in enumerate(scenes)]
    return {k: sum(h[k] for h in hits) / len(hits) for k in attributes}


def stage_base_eval(st: Stages) -> dict:
    from ..training import models

    parts = models.load(st.dir("text_to_image") / "pipeline")
    scenes = S.sample_scenes(st.scale.eval_images, EVAL_SEED)
    images = sample(parts, [S.caption(s) for s in scenes], EVAL_SEED, st.scale.sample_steps, st.scale.guidance)
    generated = read_accuracy(images, scenes)
    rendered = read_accuracy(S.render(scenes).image, scenes)
    folder = st.dir("base_eval")
    folder.mkdir(parents=True, exist_ok=True)
    S.contact_sheet(images[:48], columns=8).save(folder / "samples.png")
    (folder / "prompts.txt").write_text("\n".join(S.caption(s) for s in scenes[:48]) + "\n")
    table = ["| attribute | generated from the caption | toy renders of the same captions |", "|---|---|---|"]
    table += [f"| {k} | {100 * generated[k]:.1f}% | {100 * rendered[k]:.1f}% |" for k in generated]
    tables = st.out / "tables"
    tables.mkdir(exist_ok=True)
    (tables / "base_model.md").write_text(
        f"Base toy text-to-image model: prompt following on {len(scenes)} held-out captions (attribute reader; "
        f"DDIM {st.scale.sample_steps} steps, guidance {st.scale.guidance}).\n\n" + "\n".join(table) + "\n")
    return {"generated": {k: round(v, 4) for k, v in generated.items()},
            "rendered": {k: round(v, 4) for k, v in rendered.items()}}


def reproduce(out, quick: bool = False, progress: bool = True, until: str | None = None) -> dict:
    """Run the stages in order (``until``: stop after that stage); returns every stage's figures."""
    st = Stages(out, QUICK if quick else FULL, progress)
    steps = {"corpus": lambda: {"images": st.scale.corpus, "folder": str(B.corpus(st.dir("corpus"), st.scale.corpus))},
             "vae": lambda: stage_vae(st), "base_init": lambda: stage_base_init(st),
             "text_to_image": lambda: stage_text_to_image(st), "export": lambda: stage_export(st),
             "base_eval": lambda: stage_base_eval(st)}
    figures = {}
    for stage in STAGES:
        figures[stage] = st.run(stage, steps[stage])
        if stage == until:
            break
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfyui_syncd toyworld",
                                     description="The toy world: the SynCD loop at toy scale on a CPU.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rep = commands.add_parser("reproduce", help="run (or resume) the whole loop", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("--out", type=pathlib.Path, default=pathlib.Path("toyworld_run"),
                     help="run folder (default ./toyworld_run); rerunning resumes it")
    rep.add_argument("--quick", action="store_true", help="a minutes-long version (CI): shows the loop works")
    rep.add_argument("--until", choices=STAGES, help="stop after this stage")
    rep.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        reproduce(args.out, args.quick, not args.no_progress, args.until)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"done: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

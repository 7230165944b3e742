"""The toy world's attribute reader (issue 13 §1): a small CNN that reads shape, colour, texture, background,
placement and whether there is an object at all from a 64 px image, with a confidence per attribute. It stands in
for DINOv2/CLIP scores: filtering keeps sets whose images read the same identity, evaluation compares a generated
object's attributes with the reference's and the scene with the prompt's.

Training renders its own data (:mod:`.scene`, fixed seeds), so the reader and its held-out figures are
reproducible; weights are saved as safetensors with a JSON of the vocabularies next to them.

CLI::

    python -m comfyui_syncd.toyworld.reader train --out DIR [--steps N]    # prints held-out accuracy per attribute
    python -m comfyui_syncd.toyworld.reader evaluate [--weights FILE] [--images N] [--seed S]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import scene as S

PRESENCE = ("absent", "present")
# object, shape, colour, texture, background, placement
ATTRIBUTES = ("object",) + S.OBJECT_ATTRIBUTES + S.SCENE_ATTRIBUTES
VOCABULARIES = {"object": PRESENCE, **S.VOCABULARIES}
OBJECT_ONLY = ("shape", "colour", "texture", "placement")  # meaningless (not trained, not scored) without an object
WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
WEIGHTS_NAME = "attribute_reader.safetensors"
VOCAB_NAME = "attribute_reader.json"
SHIPPED = WEIGHTS_DIR / WEIGHTS_NAME

TRAIN_SEED = 1
HELD_OUT_SEED = 1_000_003
P_EMPTY = 0.1  # fraction of training / held-out renders without an object
WIDTHS = (32, 64, 96)
HIDDEN = 128


class AttributeReader(nn.Module):
    """A space-to-depth stem (2×2 pixels → 12 channels, so 1-2 px texture detail survives at half the cost), three
    conv-BN-ReLU-maxpool stages (32 → 4 px), a flatten (keeps where the object is, for placement), one hidden
    layer and a linear head per attribute."""

    def __init__(self, widths=WIDTHS, hidden: int = HIDDEN, vocabularies=None, size: int = S.SIZE):
        super().__init__()
        self.vocabularies = {k: tuple(v) for k, v in (vocabularies or VOCABULARIES).items()}
        self.size = size
        layers, c = [nn.PixelUnshuffle(2)], 12
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        cells = (size // 2 ** (len(widths) + 1)) ** 2
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(c * cells, hidden), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in self.vocabularies.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x`` (B, 3, size, size) in [0, 1] → logits per attribute."""
        h = self.hidden(self.features(x * 2 - 1))
        return {k: head(h) for k, head in self.heads.items()}


def to_input(images: torch.Tensor, size: int = S.SIZE) -> torch.Tensor:
    """ComfyUI-style (B, H, W, 3) images (or (B, 3, H, W), or one (H, W, 3)), float in [0, 1] or uint8 → the
    reader's (B, 3, size, size) float input (area-resized when the images are another size)."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise ValueError(f"images must be (B, H, W, 3) or (B, 3, H, W); got shape {tuple(x.shape)}")
    if x.shape[-1] == 3:  # channels last (ComfyUI IMAGE)
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area")
    return x.contiguous()


def targets(scenes) -> dict[str, torch.Tensor]:
    """Class indices per attribute; -100 (ignored) for object attributes of scenes without an object."""
    out = {"object": torch.tensor([int(s.has_object) for s in scenes])}
    for name in S.VOCABULARIES:
        vocab = S.VOCABULARIES[name]
        out[name] = torch.tensor([vocab.index(getattr(s, name)) if getattr(s, name) is not None else -100
                                  for s in scenes])
    return out


def loss_fn(logits: dict, target: dict) -> torch.Tensor:
    """Sum over attributes of the cross-entropy (object-only attributes on images with an object)."""
    return sum(F.cross_entropy(logits[k], target[k], ignore_index=-100) for k in logits)


# ---------------------------------------------------------------------------------------------------------------
# data

def render_dataset(count: int, seed: int, p_empty: float = P_EMPTY, chunk: int = 256, progress: bool = False,
                   desc: str = "rendering"):
    """``count`` random renders from ``seed``: (uint8 (N, 3, 64, 64) images, scenes)."""
    scenes = S.sample_scenes(count, seed, p_empty=p_empty)
    images = torch.empty(count, 3, S.SIZE, S.SIZE, dtype=torch.uint8)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=count, desc=desc, unit="img", file=sys.stderr)
    for start in range(0, count, chunk):
        r = S.render(scenes[start:start + chunk])
        images[start:start + chunk] = (r.image * 255).round().to(torch.uint8).permute(0, 3, 1, 2)
        if bar is not None:
            bar.update(len(r.scenes))
    if bar is not None:
        bar.close()
    return images, scenes


def _mirror(scenes):
    """The labels of horizontally mirrored scenes: left and right placements swap."""
    swap = {"left": "right", "right": "left", "middle": "middle", None: None}
    return [dataclasses.replace(s, placement=swap[s.placement]) for s in scenes]


# ---------------------------------------------------------------------------------------------------------------
# training and evaluation

@dataclasses.dataclass
class TrainResult:
    model: AttributeReader
    losses: list
    accuracy: dict
    seconds: float


def train(steps: int = 1000, seed: int = TRAIN_SEED, train_images: int = 12000, batch: int = 64, lr: float = 3e-3,
          eval_images: int = 1000, eval_seed: int = HELD_OUT_SEED, threads: int | None = 1, progress: bool = True,
          data=None) -> TrainResult:
    """Train a reader on ``train_images`` renders from ``seed`` (random horizontal flips with the placement label
    mirrored), AdamW with a one-cycle schedule, then measure held-out accuracy on ``eval_images`` renders from
    ``eval_seed``. ``data`` = (images, scenes) reuses renders. ``threads`` sets torch's CPU threads while it
    trains (the caller's count is restored after)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(steps, seed, train_images, batch, lr, eval_images, eval_seed, progress, data)
    finally:
        torch.set_num_threads(previous)


def _train(steps, seed, train_images, batch, lr, eval_images, eval_seed, progress, data) -> TrainResult:
    start = time.time()
    torch.manual_seed(seed)
    images, scenes = data if data is not None else render_dataset(train_images, seed, progress=progress,
                                                                  desc="rendering training images")
    target = targets(scenes)
    target_flip = targets(_mirror(scenes))
    model = AttributeReader()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training the attribute reader", unit="step", file=sys.stderr)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        flip = torch.rand(batch, generator=gen) < 0.5
        x = images[idx].float() / 255.0
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = {k: torch.where(flip, target_flip[k][idx], target[k][idx]) for k in target}
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    accuracy = evaluate(model, eval_images, eval_seed, progress=progress) if eval_images else {}
    return TrainResult(model=model, losses=losses, accuracy=accuracy, seconds=time.time() - start)


@torch.no_grad()
def predict(model: AttributeReader, images: torch.Tensor, chunk: int = 256) -> dict[str, torch.Tensor]:
    """Softmax probabilities per attribute for (B, H, W, 3) / (B, 3, H, W) images."""
    was_training = model.training
    model.eval()
    x = to_input(images, model.size)
    out = {k: [] for k in model.vocabularies}
    for start in range(0, len(x), chunk):
        for k, v in model(x[start:start + chunk]).items():
            out[k].append(v.softmax(-1))
    model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


def accuracy(probabilities: dict, scenes) -> dict[str, float]:
    """Fraction read right per attribute: object presence and background on every image, shape, colour,
    texture and placement on the images that have an object."""
    target = targets(scenes)
    out = {}
    for k in ATTRIBUTES:
        valid = target[k] != -100
        out[k] = float((probabilities[k].argmax(-1)[valid] == target[k][valid]).float().mean())
    return out


def evaluate(model: AttributeReader, count: int = 1000, seed: int = HELD_OUT_SEED, progress: bool = False) -> dict:
    """Held-out accuracy per attribute on ``count`` fresh renders from ``seed``."""
    images, scenes = render_dataset(count, seed, progress=progress, desc="rendering held-out images")
    return accuracy(predict(model, images), scenes)


# ---------------------------------------------------------------------------------------------------------------
# files

def save(model: AttributeReader, directory, info: dict | None = None) -> pathlib.Path:
    """Write ``attribute_reader.safetensors`` and ``attribute_reader.json`` (vocabularies, architecture, ``info``)
    into ``directory``; returns the weights path."""
    from safetensors.torch import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = directory / WEIGHTS_NAME
    save_file(state, str(path), metadata={"format": "syncd-toyworld-attribute-reader", "version": "1"})
    meta = {"format": "syncd-toyworld-attribute-reader", "version": 1, "size": model.size,
            "widths": [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)],
            "hidden": model.hidden[1].out_features,
            "vocabularies": {k: list(v) for k, v in model.vocabularies.items()}, **(info or {})}
    (directory / VOCAB_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load(path=None) -> AttributeReader:
    """A reader from ``path`` (the .safetensors file or its folder; default: the shipped reader), in eval mode.
    The JSON next to it gives the vocabularies and architecture."""
    from safetensors.torch import load_file

    path = pathlib.Path(path) if path is not None else SHIPPED
    if path.is_dir():
        path = path / WEIGHTS_NAME
    meta_path = path.with_name(VOCAB_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"no attribute reader at {path}: train one with "
                                f"'python -m comfyui_syncd.toyworld.reader train --out DIR'")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} (the reader's vocabularies) is missing next to {path.name}")
    meta = json.loads(meta_path.read_text())
    model = AttributeReader(widths=tuple(meta["widths"]), hidden=meta["hidden"], vocabularies=meta["vocabularies"],
                            size=meta["size"])
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path} does not match the reader described in {meta_path.name}: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.eval()


_SHIPPED_CACHE: dict = {}


def shipped() -> AttributeReader:
    """The shipped reader (``toyworld/weights``), loaded once."""
    if "model" not in _SHIPPED_CACHE:
        _SHIPPED_CACHE["model"] = load(SHIPPED)
    return _SHIPPED_CACHE["model"]


# ---------------------------------------------------------------------------------------------------------------
# reading

@dataclasses.dataclass
class Reading:
    """What the reader saw in each image. ``labels[attr][i]`` is a vocabulary word (object attributes and
    placement are None where it read no object); ``confidence[attr][i]`` the softmax probability of that word
    (for None labels: of "absent"); ``probabilities[attr]`` (B, K) in vocabulary order."""
    labels: dict
    confidence: dict
    probabilities: dict

    def __len__(self) -> int:
        return len(self.labels["object"])

    def has_object(self, i: int) -> bool:
        return self.labels["object"][i] == "present"

    def identity(self, i: int) -> tuple | None:
        """(shape, colour, texture) read from image ``i``, or None when it read no object."""
        return tuple(self.labels[k][i] for k in S.OBJECT_ATTRIBUTES) if self.has_object(i) else None

    def matches(self, i: int, scene: S.Scene, attributes=ATTRIBUTES) -> dict[str, bool]:
        """Whether image ``i`` reads as ``scene`` per attribute ("object": presence agrees)."""
        out = {}
        for k in attributes:
            out[k] = self.has_object(i) == scene.has_object if k == "object" else \
                self.labels[k][i] == getattr(scene, k)
        return out


def read(images: torch.Tensor, model: AttributeReader | None = None) -> Reading:
    """Read (B, H, W, 3) images (ComfyUI IMAGE layout; other sizes are area-resized to 64 px) with ``model``
    (default: the shipped reader)."""
    model = model if model is not None else shipped()
    probs = predict(model, images)
    present = probs["object"].argmax(-1) == 1
    labels, confidence = {}, {}
    for k, p in probs.items():
        conf, idx = p.max(-1)
        words = [model.vocabularies[k][j] for j in idx.tolist()]
        if k in OBJECT_ONLY:
            words = [w if has else None for w, has in zip(words, present.tolist())]
            conf = torch.where(present, conf, probs["object"][:, 0])
        labels[k], confidence[k] = words, conf
    return Reading(labels=labels, confidence=confidence, probabilities=probs)


def identity_features(images: torch.Tensor, model: AttributeReader | None = None) -> torch.Tensor:
    """(B, 9+) L2-normalised features of the object's identity: the read probabilities of shape, colour and texture,
    concatenated. Their cosine is the share of the three attributes two images agree on (1, 2/3, 1/3 or 0 when
    read with confidence): the toy world's MDINOv2-I."""
    probs = predict(model if model is not None else shipped(), images)
    return F.normalize(torch.cat([probs[k] for k in S.OBJECT_ATTRIBUTES], dim=-1), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# CLI

def _table(acc: dict) -> str:
    return "\n".join(f"  {k:<11} {100 * v:6.2f}%" for k, v in acc.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfyui_syncd.toyworld.reader",
                                     description="Train or evaluate the toy world's attribute reader.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on fresh renders and print held-out accuracy per attribute")
    t.add_argument("--out", required=True, help="folder for attribute_reader.safetensors and its JSON")
    t.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    t.add_argument("--train-images", type=int, default=12000, help="rendered training images (default 12000)")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=TRAIN_SEED, help="training data and initialization seed")
    t.add_argument("--eval-images", type=int, default=1000, help="held-out renders (another seed)")
    t.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a busy 2-core machine one thread ran a step 5x faster "
                        "than two)")
    e = sub.add_parser("evaluate", help="held-out accuracy per attribute of a saved reader")
    e.add_argument("--weights", default=None, help="reader .safetensors or its folder (default: the shipped one)")
    e.add_argument("--images", type=int, default=1000)
    e.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    args = parser.parse_args(argv)
    if args.command == "train":
        result = train(steps=args.steps, seed=args.seed, train_images=args.train_images, batch=args.batch,
                       lr=args.lr, eval_images=args.eval_images, threads=args.threads)
        info = {"training": {"steps": args.steps, "seed": args.seed, "train_images": args.train_images,
                             "batch": args.batch, "lr": args.lr, "threads": args.threads,
                             "seconds": round(result.seconds, 1),
                             "final_loss": round(float(np.mean(result.losses[-50:])), 4)},
                "held_out": {"images": args.eval_images, "seed": HELD_OUT_SEED,
                             "accuracy": {k: round(v, 4) for k, v in result.accuracy.items()}}}
        path = save(result.model, args.out, info)
        print(f"trained in {result.seconds:.0f} s ({args.steps} steps); saved {path}")
        print(f"held-out accuracy ({args.eval_images} renders, seed {HELD_OUT_SEED}):")
        print(_table(result.accuracy))
        low = [k for k, v in result.accuracy.items() if v < 0.95]
        if low:
            print(f"below 95%: {', '.join(low)}")
        return 0
    model = load(args.weights)
    acc = evaluate(model, args.images, args.seed, progress=True)
    print(f"held-out accuracy ({args.images} renders, seed {args.seed}):")
    print(_table(acc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

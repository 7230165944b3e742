"""Image folders for fine-tuning: images with optional captions and masks, square crops, flips.

A folder holds the images; a caption is the text file of the same stem beside the image (``dog1.jpg`` +
``dog1.txt``); a mask is the image of the same stem in a separate mask folder (white = subject); a conditioning
image (a depth map, for a concat-conditioned model) is the image of the same stem in its own folder. Preprocessing is
upstream Custom Diffusion / DCI_ICO's (``src/finetune_data.py``): centre square crop, horizontal flip, bicubic
resize to the training resolution.

Randomness is a function of the seed and the sample position only (:class:`StepBatches`), never of a generator's
running state, so a run resumed at step N sees exactly the batches an uninterrupted run sees from step N.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class Record:
    image: pathlib.Path
    caption: Optional[str] = None
    mask: Optional[pathlib.Path] = None
    conditioning: Optional[pathlib.Path] = None


def _by_stem(folder, what: str) -> dict:
    """stem -> image file of a companion folder (masks, conditioning images)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    return {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}


def _companion(files: dict, folder, path: pathlib.Path, what: str) -> pathlib.Path:
    if path.stem not in files:
        raise FileNotFoundError(f"{path.name} has no {what} in {folder} (a {what} has the image's name)")
    return files[path.stem]


def list_images(folder, masks=None, need_captions: bool = False, default_caption: Optional[str] = None,
                conditioning=None) -> list[Record]:
    """The images of ``folder`` in name order with their captions (``<stem>.txt``, else ``default_caption``)
    and, with a ``masks`` / ``conditioning`` folder, their masks / conditioning images (every image needs one)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    mask_files = _by_stem(masks, "mask") if masks is not None else None
    cond_files = _by_stem(conditioning, "conditioning image") if conditioning is not None else None
    records = []
    for path in images:
        text = path.with_suffix(".txt")
        caption = text.read_text(encoding="utf-8").strip() if text.is_file() else default_caption
        if need_captions and not caption:
            raise ValueError(f"{path} has no caption: write it to {text.name} beside the image, or set a default "
                             f"caption")
        mask = _companion(mask_files, masks, path, "mask") if mask_files is not None else None
        cond = (_companion(cond_files, conditioning, path, "conditioning image") if cond_files is not None
                else None)
        records.append(Record(path, caption, mask, cond))
    return records


def square_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centre square of a ``width`` x ``height`` image as (left, top, right, bottom)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _load_view(path, mode: str, box, flip: bool, resolution: int, resample, size=None, what: str = "image"):
    """One file of an example, square-cropped to ``box``, flipped, resized: a PIL image in ``mode``."""
    with Image.open(path) as im:
        image = im.convert(mode)
    if size is not None and image.size != size:
        raise ValueError(f"{what} {path} is {image.size[0]}x{image.size[1]} but its image is {size[0]}x{size[1]}")
    image = image.crop(box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.resize((resolution, resolution), resample=resample)


def _to_pixels(image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def load_example(record: Record, resolution: int, flip: bool) -> dict:
    """One preprocessed example: ``pixel_values`` (3, R, R) in [-1, 1], ``mask`` (1, R, R) in [0, 1] and
    ``conditioning_pixel_values`` (3, R, R) in [-1, 1] when the record has them (same crop and flip), ``caption``,
    and SDXL's size conditioning: ``original_size`` (h, w) of the file and ``crop_top_left`` of the centre crop in
    the image resized so that its short side is R."""
    with Image.open(record.image) as im:
        width, height = im.size
    box = square_crop_box(width, height)
    bicubic = Image.Resampling.BICUBIC
    pixels = _to_pixels(_load_view(record.image, "RGB", box, flip, resolution, bicubic))
    scale = resolution / min(width, height)
    crop_top_left = (round(box[1] * scale), round(box[0] * scale))
    example = {"pixel_values": pixels, "caption": record.caption, "original_size": (height, width),
               "crop_top_left": crop_top_left}
    if record.mask is not None:
        mask = _load_view(record.mask, "L", box, flip, resolution, Image.Resampling.BILINEAR, (width, height), "mask")
        example["mask"] = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0).unsqueeze(0)
    if record.conditioning is not None:
        example["conditioning_pixel_values"] = _to_pixels(_load_view(
            record.conditioning, "RGB", box, flip, resolution, bicubic, (width, height), "conditioning image"))
    return example


class ImageDataset(torch.utils.data.Dataset):
    """Records indexed by ``(index, flip)`` keys (the keys :class:`StepBatches` yields)."""

    def __init__(self, records: Sequence[Record], resolution: int):
        self.records = list(records)
        self.resolution = resolution

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        index, flip = key
        example = load_example(self.records[index], self.resolution, flip)
        example["index"] = index
        return example


class StepBatches(torch.utils.data.Sampler):
    """Batches of ``(index, flip)`` keys over ``length`` items, epoch after epoch, from micro-batch ``start`` on.

    Epoch ``e`` visits the items in a permutation drawn from ``(seed, e)``, each flipped with probability
    ``flip_p``; micro-batch ``m`` of process ``rank`` (of ``world``) takes stream positions
    ``[(m·world + rank)·batch_size, +batch_size)``. Infinite: the training loop decides when to stop."""

    def __init__(self, length: int, batch_size: int, seed: int, flip_p: float = 0.5, start: int = 0,
                 rank: int = 0, world: int = 1):
        if length < 1 or batch_size < 1:
            raise ValueError("StepBatches needs at least one item and a batch size of at least 1")
        self.length, self.batch_size, self.seed, self.flip_p = length, batch_size, seed, flip_p
        self.start, self.rank, self.world = start, rank, world
        self._epoch = None

    def _order(self, epoch: int):
        if self._epoch != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.length, generator=gen).tolist()
            flips = (torch.rand(self.length, generator=gen) < self.flip_p).tolist()
            self._epoch, self._cache = epoch, (perm, flips)
        return self._cache

    def key(self, position: int) -> tuple[int, bool]:
        perm, flips = self._order(position // self.length)
        i = position % self.length
        return perm[i], flips[i]

    def __iter__(self) -> Iterator[list]:
        m = self.start
        while True:
            first = (m * self.world + self.rank) * self.batch_size
            yield [self.key(p) for p in range(first, first + self.batch_size)]
            m += 1


def collate(examples: list[dict]) -> dict:
    """Tensors stacked, everything else as lists."""
    out = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out

"""The SynCD multi-image dataset format: read by the training scripts, written by data generation.

Layout (upstream nupurkmr9/syncd ``method/data/data.py`` ``SynCDDataset.setup_metadata``/``getdata``)::

    DIR/
      <anything>metadata.json              # one or more: a JSON list of object entries
      <anything>metadata_with_scores.json  # the same entries with scores (read instead when filtering by score)
      <filename>                           # images: each entry's filenames are relative to DIR
      masks/<stem>.jpg                     # the mask of image <filename>: <parent of the image>/masks/<stem>.jpg
      correspondences/<object>.safetensors # optional (rigid objects): core/correspondence_format.py's file

An entry (one object, i.e. one "clique" of images of the same subject)::

    {"filenames": ["a1b2_0.jpg", "a1b2_1.jpg", "a1b2_2.jpg"],   # relative to DIR
     "prompts": ["a mug on a desk", ...],                        # one caption per image (upstream: short LLM
                                                                 #   background captions)
     "category": "mug",
     "objaverse_id": "a1b2...",            # optional (rigid objects)
     "object_id": "a1b2",                  # optional (this pack's writer; the resume key)
     "aesthetics_scores": {"a1b2_0": 5.1, ...},   # optional, per image stem
     "dino_scores": [[0.0, 0.8, 0.7], ...],       # optional, pairwise image similarity (N x N; upstream stores
                                                  #   the strict upper triangle, zeros elsewhere; full works too)
     "correspondences": "correspondences/a1b2.safetensors",  # optional: the views' pixel correspondences
     ...}                                   # any other key is kept in ``extra``

A mask is read as grayscale and binarized with ``> 0`` (upstream: ``point(lambda x: 255 if x > 0 else 0)``);
white is the subject. Rigid "masks" are the black-background renders, deformable ones the Otsu attention maps.
An image without a mask file reads with ``mask=None``.

Upstream reads ``*metadata.json`` (or, when filtering by ``filter_aesthetics``/``filter_dino``,
``*metadata_with_scores.json``) of each dataset folder, keeps an entry when more than one image survives the
filters (:func:`valid_indices`, the rule of ``core/filtering.py``) and reads ``f"{DIR}/{filename}"``.
:func:`read_dataset` does the same, and falls back to the other kind of metadata file when a folder has none of
the kind it looks for (upstream would read nothing). Upstream's loader opens every image's mask file.

**Writing** (:class:`DatasetWriter`): one object at a time, atomically and resumably. The object's images and
masks are written under temporary names (``.<name>.<random>.tmp``, invisible to ``*metadata.json`` globs) and
renamed into place (then the correspondence file and, when the object has scores,
``<object_id>_metadata_with_scores.json`` for upstream's filtering loader), then its metadata file
``<object_id>_metadata.json`` (a one-entry list, so upstream's glob reads it) is written the same way, last: an
object is visible exactly when its metadata file exists, and a run killed mid-object leaves at most orphan files
that the rerun overwrites. ``write`` skips an object id whose
metadata file exists (resume). File names derive from the object id, sanitized to ``[A-Za-z0-9._-]`` with no
leading dot; the reader refuses filenames that are absolute, contain ``..``, or resolve outside the folder.

Pure Python/PIL/torch: no ComfyUI import.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import re
import uuid
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from . import filtering

MASKS_DIR = "masks"
METADATA_GLOB = "*metadata.json"
SCORED_METADATA_GLOB = "*metadata_with_scores.json"
METADATA_SUFFIX = "_metadata.json"
SCORED_METADATA_SUFFIX = "_metadata_with_scores.json"
CORRESPONDENCES_DIR = "correspondences"
KNOWN_KEYS = ("filenames", "prompts", "category", "objaverse_id", "object_id", "aesthetics_scores", "dino_scores",
              "correspondences")
DINO_MAX = filtering.NEAR_DUPLICATE  # upstream: pairs more similar than this are near-duplicates and do not count
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class DatasetFormatError(ValueError):
    """A metadata file or entry that cannot be used (the message names the file)."""


@dataclasses.dataclass
class ObjectRecord:
    """One object of a dataset: its images (absolute paths), masks (path or None per image), prompts, category;
    scores and the correspondence file (if any) index the full entry's images, also after :meth:`subset`."""
    object_id: str
    images: list[pathlib.Path]
    masks: list[Optional[pathlib.Path]]
    prompts: list[str]
    category: str
    aesthetics_scores: Optional[dict] = None   # {image stem: score}
    dino_scores: Optional[list] = None         # N x N
    objaverse_id: Optional[str] = None
    extra: dict = dataclasses.field(default_factory=dict)
    correspondences: Optional[pathlib.Path] = None  # core/correspondence_format.py file of the views
    metadata_file: Optional[pathlib.Path] = None

    def __len__(self):
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> "ObjectRecord":
        """The record restricted to ``indices`` (scores are kept as they are: they index the full entry)."""
        return dataclasses.replace(self, images=[self.images[i] for i in indices],
                                   masks=[self.masks[i] for i in indices], prompts=[self.prompts[i] for i in indices])


# --- names ---------------------------------------------------------------------------------------------------

def sanitize_name(name: str) -> str:
    """A file-name-safe form of ``name``: runs of characters outside ``[A-Za-z0-9._-]`` (path separators
    included) become ``_``, leading dots are dropped; an error if no letter or digit is left (``..``, ``/``)."""
    safe = _SAFE.sub("_", str(name)).lstrip(".")
    if not safe or set(safe) <= {".", "_", "-"}:
        raise DatasetFormatError(f"object id {name!r} has no usable file-name characters")
    return safe


def resolve_inside(root: pathlib.Path, relative: str, what: str = "filename") -> pathlib.Path:
    """``root / relative`` if that stays inside ``root``; absolute paths, ``..`` parts, backslashes and drive
    letters are refused."""
    if not isinstance(relative, str) or not relative:
        raise DatasetFormatError(f"{what} {relative!r} is not a non-empty string")
    pure = pathlib.PurePosixPath(relative)
    if pure.is_absolute() or "\\" in relative or re.match(r"^[A-Za-z]:", relative) or ".." in pure.parts \
            or "\0" in relative:
        raise DatasetFormatError(f"{what} {relative!r} is not a plain path inside the dataset folder")
    root_resolved = root.resolve()
    path = (root / pure).resolve()
    if not path.is_relative_to(root_resolved):
        raise DatasetFormatError(f"{what} {relative!r} resolves outside the dataset folder {root}")
    return root / pure


def mask_path_of(image: pathlib.Path) -> pathlib.Path:
    """Upstream's mask location of an image: ``<image's folder>/masks/<stem>.jpg``."""
    return image.parent / MASKS_DIR / f"{image.stem}.jpg"


def load_mask(path, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """(H, W) bool mask: grayscale > 0, resized (nearest) to ``size`` = (width, height) when given."""
    with Image.open(path) as im:
        mask = im.convert("L").point(lambda x: 255 if x > 0 else 0)
    if size is not None and mask.size != tuple(size):
        mask = mask.resize(tuple(size), resample=Image.Resampling.NEAREST)
    return np.asarray(mask) > 0


# --- reading -------------------------------------------------------------------------------------------------

def metadata_files(root, scored: Optional[bool] = None) -> list[pathlib.Path]:
    """The metadata files of ``root`` in name order: ``*metadata_with_scores.json`` with ``scored`` True,
    ``*metadata.json`` with False (each falling back to the other kind when a folder has none); None: the scored
    files if there are any, else the plain ones."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")

    def found(pattern):
        return sorted(pathlib.Path(p) for p in glob.glob(os.path.join(glob.escape(str(root)), pattern)))

    if scored is None or scored:
        return found(SCORED_METADATA_GLOB) or found(METADATA_GLOB)
    return found(METADATA_GLOB) or found(SCORED_METADATA_GLOB)


def parse_entry(root: pathlib.Path, entry: dict, where: str, fallback_id: str) -> ObjectRecord:
    if not isinstance(entry, dict):
        raise DatasetFormatError(f"{where}: an entry must be a mapping, found {type(entry).__name__}")
    filenames, prompts = entry.get("filenames"), entry.get("prompts")
    if not isinstance(filenames, list) or not filenames:
        raise DatasetFormatError(f"{where}: 'filenames' must be a non-empty list")
    if not isinstance(prompts, list) or len(prompts) != len(filenames) or \
            not all(isinstance(p, str) for p in prompts):
        raise DatasetFormatError(f"{where}: 'prompts' must be a list of {len(filenames)} strings (one per image)")
    images = [resolve_inside(root, f, f"{where}: filename") for f in filenames]
    masks = [m if m.is_file() else None for m in map(mask_path_of, images)]
    object_id = entry.get("object_id") or entry.get("objaverse_id") or fallback_id
    corr = entry.get("correspondences")
    return ObjectRecord(object_id=str(object_id), images=images, masks=masks, prompts=list(prompts),
                        category=str(entry.get("category", "")), aesthetics_scores=entry.get("aesthetics_scores"),
                        dino_scores=entry.get("dino_scores"), objaverse_id=entry.get("objaverse_id"),
                        extra={k: v for k, v in entry.items() if k not in KNOWN_KEYS},
                        correspondences=None if corr is None else
                        resolve_inside(root, corr, f"{where}: correspondences"))


def valid_indices(record: ObjectRecord, min_aesthetics: float = 0.0, min_dino: float = 0.0) -> list[int]:
    """Upstream's score filter: image i survives when its aesthetics score is >= ``min_aesthetics`` and it is
    in a pair whose DINO similarity lies in [``min_dino``, 0.98]. Without filters every image survives."""
    n = len(record.images)
    if min_aesthetics <= 0 and min_dino <= 0:
        return list(range(n))
    if record.aesthetics_scores is None or record.dino_scores is None:
        raise DatasetFormatError(f"object {record.object_id}: score filters need 'aesthetics_scores' and "
                                 f"'dino_scores' (a *metadata_with_scores.json file)")
    try:
        aesthetics = [float(record.aesthetics_scores[path.stem]) for path in record.images]
    except KeyError as exc:
        raise DatasetFormatError(f"object {record.object_id}: no aesthetics score for image {exc}") from None
    keep = filtering.keep_images(aesthetics, np.asarray(record.dino_scores, dtype=np.float64), min_aesthetics,
                                 min_dino)
    return [i for i, k in enumerate(keep) if k]


def iter_objects(root, scored: Optional[bool] = None, min_aesthetics: float = 0.0,
                 min_dino: float = 0.0) -> Iterator[ObjectRecord]:
    """The objects of dataset folder ``root`` (metadata files in name order, entries in file order) with more
    than one image surviving the score filters (upstream keeps those only)."""
    root = pathlib.Path(root)
    if scored is None:  # upstream: the scored files exactly when a filter is on
        scored = min_aesthetics > 0 or min_dino > 0
    for path in metadata_files(root, scored):
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetFormatError(f"{path}: not readable JSON ({exc})") from None
        if not isinstance(entries, list):
            raise DatasetFormatError(f"{path}: a metadata file holds a list of entries")
        for i, entry in enumerate(entries):
            record = parse_entry(root, entry, f"{path.name}[{i}]", f"{path.name.removesuffix('.json')}:{i}")
            record.metadata_file = path
            keep = valid_indices(record, min_aesthetics, min_dino)
            if len(keep) > 1:
                yield record if len(keep) == len(record) else record.subset(keep)


def read_dataset(root, **kwargs) -> list[ObjectRecord]:
    """``list(iter_objects(root, ...))``."""
    return list(iter_objects(root, **kwargs))


# --- writing -------------------------------------------------------------------------------------------------

def keep_views(corr, indices: Sequence[int]):
    """The correspondences among the views ``indices`` only, renumbered 0..len-1 in that order (the object's
    kept images after filtering)."""
    from .correspondence_format import Correspondences

    position = {old: new for new, old in enumerate(indices)}
    pairs = {}
    for a, b in ((a, b) for a in indices for b in indices if position[a] < position[b]):
        rows = corr.between(a, b)
        if (a, b) in corr.pairs or (b, a) in corr.pairs:
            pairs[(position[a], position[b])] = rows
    return Correspondences(len(indices), tuple(corr.size), pairs)


def _tmp_name(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _replace_atomically(path: pathlib.Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path`` (fsynced); the temporary file is removed on failure."""
    tmp = _tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class DatasetWriter:
    """Writes objects into dataset folder ``root`` (see the module docstring); ``image_format`` is the images'
    file suffix (``jpg`` as upstream, or ``png``); masks are always ``masks/<stem>.jpg``."""

    def __init__(self, root, image_format: str = "jpg", jpeg_quality: int = 95):
        if image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
        self.root = pathlib.Path(root)
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / MASKS_DIR).mkdir(exist_ok=True)

    def metadata_path(self, object_id: str) -> pathlib.Path:
        return self.root / f"{sanitize_name(object_id)}{METADATA_SUFFIX}"

    def scored_metadata_path(self, object_id: str) -> pathlib.Path:
        return self.root / f"{sanitize_name(object_id)}{SCORED_METADATA_SUFFIX}"

    def has(self, object_id: str) -> bool:
        """Whether ``object_id`` is already written (complete)."""
        return self.metadata_path(object_id).is_file()

    def _save_image(self, image: Image.Image, path: pathlib.Path, mask: bool = False) -> None:
        if mask:
            image = image if image.mode == "L" else image.convert("L")
            _replace_atomically(path, lambda p: image.save(p, format="JPEG", quality=100, subsampling=0))
        elif self.image_format == "png":
            _replace_atomically(path, lambda p: image.save(p, format="PNG"))
        else:
            rgb = image.convert("RGB")
            _replace_atomically(path, lambda p: rgb.save(p, format="JPEG", quality=self.jpeg_quality))

    def write(self, object_id: str, images: Sequence[Image.Image], prompts: Sequence[str], category: str,
              masks: Optional[Sequence[Optional[object]]] = None, aesthetics_scores: Optional[Sequence[float]] = None,
              dino_scores=None, extra: Optional[dict] = None, correspondences=None) -> Optional[pathlib.Path]:
        """Write one object; its metadata file, or None when ``object_id`` was already written (skipped).

        ``masks``: per image a PIL image or (H, W) array (> 0 = subject), or None for no mask file.
        ``aesthetics_scores``: per image (stored as {stem: score}); ``dino_scores`` N x N; ``extra``: more
        entry keys (e.g. ``objaverse_id``); ``correspondences``: a
        :class:`~comfyui_syncd.core.correspondence_format.Correspondences` of these images' views, written to
        ``correspondences/<object>.safetensors``. With scores the entry is also written to
        ``<object>_metadata_with_scores.json`` (upstream's filtering loader reads only those)."""
        meta_path = self.metadata_path(object_id)
        if meta_path.is_file():
            return None
        n = len(images)
        if n == 0 or len(prompts) != n:
            raise ValueError(f"object {object_id!r}: {n} images need as many prompts (got {len(prompts)})")
        if masks is not None and len(masks) != n:
            raise ValueError(f"object {object_id!r}: {len(masks)} masks for {n} images")
        if aesthetics_scores is not None and len(aesthetics_scores) != n:
            raise ValueError(f"object {object_id!r}: {len(aesthetics_scores)} aesthetics scores for {n} images")
        clash = set(extra or {}) & {"filenames", "prompts", "category", "aesthetics_scores", "dino_scores",
                                     "object_id", "correspondences"}
        if clash:
            raise ValueError(f"object {object_id!r}: extra keys {sorted(clash)} are set by the writer")
        stem = sanitize_name(object_id)
        filenames = []
        for k, image in enumerate(images):
            name = f"{stem}_{k}.{self.image_format}"
            self._save_image(image, self.root / name)
            filenames.append(name)
            mask = None if masks is None else masks[k]
            if mask is not None:
                if not isinstance(mask, Image.Image):
                    mask = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
                self._save_image(mask, self.root / MASKS_DIR / f"{stem}_{k}.jpg", mask=True)
        entry = {"filenames": filenames, "prompts": [str(p) for p in prompts], "category": str(category),
                 "object_id": str(object_id)}
        if aesthetics_scores is not None:
            entry["aesthetics_scores"] = {pathlib.Path(f).stem: float(s) for f, s in zip(filenames, aesthetics_scores)}
        if dino_scores is not None:
            dino = np.asarray(dino_scores, dtype=np.float64)
            if dino.shape != (n, n):
                raise ValueError(f"object {object_id!r}: dino_scores of shape {dino.shape} for {n} images")
            entry["dino_scores"] = dino.tolist()
        if correspondences is not None:
            from . import correspondence_format

            if correspondences.views != n:
                raise ValueError(f"object {object_id!r}: correspondences of {correspondences.views} views for {n} "
                                 f"images")
            (self.root / CORRESPONDENCES_DIR).mkdir(exist_ok=True)
            relative = f"{CORRESPONDENCES_DIR}/{stem}.safetensors"
            _replace_atomically(self.root / relative, lambda p: correspondence_format.save(p, correspondences))
            entry["correspondences"] = relative
        entry.update(extra or {})
        text = json.dumps([entry], indent=1)
        if aesthetics_scores is not None or dino_scores is not None:
            _replace_atomically(self.scored_metadata_path(object_id),
                                lambda p: p.write_text(text, encoding="utf-8"))
        _replace_atomically(meta_path, lambda p: p.write_text(text, encoding="utf-8"))
        return meta_path

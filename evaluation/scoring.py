"""The eval command's metric models (transformers, from local folders) and the per-image scores (:mod:`core.metrics`).

A metric whose model is not given is skipped; :meth:`MetricModels.skipped` says why, for the results table.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch

from ..core import metrics
from .dataset import Subject, fill_template
from .questions import questions_for

MODEL_FLAGS = {"dinov2": "--dinov2", "clip": "--clip", "dino": "--dino", "detector": "--detector",
               "segmenter": "--segmenter", "vqa": "--vqa"}
MASKS = ("detector", "segmenter")
NEEDS = {"MDINOv2-I": ("dinov2", *MASKS), "CLIP-I": ("clip",), "MCLIP-I": ("clip", *MASKS), "CLIP-T": ("clip",),
         "DINO": ("dino",), "MDINO": ("dino", *MASKS), "TIFA": ("vqa",), "GeometricScore": ("vqa", "dinov2", *MASKS)}
METRICS = tuple(NEEDS)
KEYS = {"MDINOv2-I": "mdinov2_i", "CLIP-I": "clip_i", "MCLIP-I": "mclip_i", "CLIP-T": "clip_t", "DINO": "dino",
        "MDINO": "mdino", "TIFA": "tifa"}  # per-image record keys (GeometricScore is of the means)


class ModelLoadError(ValueError):
    """A metric model folder that transformers cannot load; the message names the flag."""


@contextlib.contextmanager
def _quiet_transformers():
    """Loading CLIP's towers from a full CLIP folder reports the other tower's weights as unexpected: expected.
    The per-model weight-loading bars are hidden too (the command has its own)."""
    import transformers

    level = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.logging.enable_progress_bar()


@dataclasses.dataclass
class MetricModels:
    paths: dict
    device: str = "cpu"
    dinov2: object = None
    clip_vision: object = None
    clip_text: object = None
    clip_tokenizer: object = None
    dino: object = None
    detector: object = None
    detector_processor: object = None
    segmenter: object = None
    segmenter_processor: object = None
    vqa: object = None
    vqa_processor: object = None

    @property
    def masks(self) -> bool:
        return self.detector is not None and self.segmenter is not None

    def skipped(self) -> dict:
        """metric → why it is skipped (only the skipped ones)."""
        reasons = {}
        for metric, kinds in NEEDS.items():
            missing = [MODEL_FLAGS[k] for k in kinds if not self.paths.get(k)]
            if missing:
                reasons[metric] = "no " + ", ".join(missing)
            elif metric == "CLIP-T" and self.clip_text is None:
                reasons[metric] = "the --clip folder has no text model"
        return reasons


def load_models(paths: dict, device: str = "cpu") -> MetricModels:
    """Load the metric models of ``paths`` (kind → local folder or None) with ``local_files_only``."""
    import transformers as T

    models = MetricModels({k: v for k, v in paths.items() if v}, device)

    def load(kind, loader, *args, **kwargs):
        try:
            with _quiet_transformers():
                return loader(paths[kind], *args, local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{MODEL_FLAGS[kind]} {paths[kind]}: cannot load it: {exc}") from None

    def ready(model):
        return model.to(device).eval()

    if paths.get("dinov2"):
        models.dinov2 = ready(load("dinov2", T.AutoModel.from_pretrained))
    if paths.get("dino"):
        models.dino = ready(load("dino", T.AutoModel.from_pretrained))
    if paths.get("clip"):
        config = load("clip", T.AutoConfig.from_pretrained)
        projection = getattr(config, "projection_dim", None)
        extra = {"projection_dim": projection} if projection else {}
        models.clip_vision = ready(load("clip", T.CLIPVisionModelWithProjection.from_pretrained, **extra))
        if getattr(config, "model_type", "") == "clip":  # a full CLIP (both towers); a vision-only folder has none
            models.clip_text = ready(load("clip", T.CLIPTextModelWithProjection.from_pretrained, **extra))
            models.clip_tokenizer = load("clip", T.AutoTokenizer.from_pretrained)
    if paths.get("detector"):
        models.detector = ready(load("detector", T.AutoModelForZeroShotObjectDetection.from_pretrained))
        models.detector_processor = load("detector", T.AutoProcessor.from_pretrained)
    if paths.get("segmenter"):
        models.segmenter = ready(load("segmenter", T.SamModel.from_pretrained))
        models.segmenter_processor = load("segmenter", T.AutoProcessor.from_pretrained)
    if paths.get("vqa"):
        models.vqa = ready(load("vqa", T.BlipForQuestionAnswering.from_pretrained))
        models.vqa_processor = load("vqa", T.AutoProcessor.from_pretrained)
    return models


def load_image(path) -> torch.Tensor:
    """(H, W, 3) float in [0, 1]."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)


def load_mask(path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)


class Scorer:
    """Per-image metrics of generated images against a subject's photos; the photos' masks and features are
    computed once per subject."""

    def __init__(self, models: MetricModels, box_threshold: float = metrics.BOX_THRESHOLD,
                 question_file: Optional[dict] = None):
        self.models = models
        self.box_threshold = box_threshold
        self.question_file = question_file
        self._subjects: dict = {}

    def mask(self, image: torch.Tensor, phrase: str) -> Optional[torch.Tensor]:
        m = self.models
        if not m.masks:
            return None
        return metrics.object_mask(image, phrase, m.detector, m.detector_processor, m.segmenter,
                                   m.segmenter_processor, self.box_threshold)

    def reference_masks(self, subject: Subject) -> list:
        """Per photo of ``subject``: its mask file, else the detected mask, else None (the whole image)."""
        return self._subject(subject)["masks"]

    def _subject(self, subject: Subject) -> dict:
        if subject.name not in self._subjects:
            images = [load_image(p) for p in subject.images]
            masks = []
            for i, image in enumerate(images):
                path = subject.mask_for(i)
                if path is None:
                    masks.append(self.mask(image, subject.phrase))
                    continue
                mask = load_mask(path)
                if mask.shape != image.shape[:2]:
                    mask = torch.nn.functional.interpolate(mask[None, None], size=tuple(image.shape[:2]),
                                                           mode="bilinear")[0, 0]
                masks.append(mask)
            self._subjects[subject.name] = {"images": images, "masks": masks, "features": {}}
        return self._subjects[subject.name]

    def _reference_features(self, subject: Subject, kind: str, masked: bool) -> torch.Tensor:
        data = self._subject(subject)
        if (kind, masked) not in data["features"]:
            model = {"dinov2": self.models.dinov2, "clip": self.models.clip_vision, "dino": self.models.dino}[kind]
            data["features"][(kind, masked)] = metrics.image_features(model, data["images"], kind,
                                                                      data["masks"] if masked else None)
        return data["features"][(kind, masked)]

    def score(self, subject: Subject, prompt, image: torch.Tensor, against: Sequence[int]) -> dict:
        """The per-image record of one generated ``image`` for ``prompt`` (a dataset Prompt), compared with the
        subject's photos ``against`` (indices)."""
        m = self.models
        index = torch.as_tensor(list(against), dtype=torch.long)
        record: dict = {}
        mask = self.mask(image, subject.phrase) if m.masks else None
        if m.masks:
            record["detected"] = mask is not None

        def similarity(model, kind, masked):
            generated = metrics.image_features(model, [image], kind, [mask] if masked else None)
            references = self._reference_features(subject, kind, masked)[index]
            return float(metrics.similarity_to_references(generated, references)[0])

        if m.dinov2 is not None and m.masks:
            record["mdinov2_i"] = similarity(m.dinov2, "dinov2", True)
        if m.clip_vision is not None:
            record["clip_i"] = similarity(m.clip_vision, "clip", False)
            if m.masks:
                record["mclip_i"] = similarity(m.clip_vision, "clip", True)
            if m.clip_text is not None:
                caption = fill_template(prompt.template, "", subject.class_word)
                image_feats = metrics.image_features(m.clip_vision, [image], "clip")
                text_feats = metrics.text_features(m.clip_text, m.clip_tokenizer, [caption])
                record["clip_t"] = float(metrics.clip_t(image_feats, text_feats)[0])
        if m.dino is not None:
            record["dino"] = similarity(m.dino, "dino", False)
            if m.masks:
                record["mdino"] = similarity(m.dino, "dino", True)
        if m.vqa is not None:
            questions = questions_for(prompt, subject.class_word, self.question_file)
            record["tifa"], answers = metrics.tifa_score(m.vqa, m.vqa_processor, image, questions)
            record["tifa_answers"] = [{"question": q.question, "answer": q.answer, "given": g}
                                      for q, g in zip(questions, answers)]
        return record


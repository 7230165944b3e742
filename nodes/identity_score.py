"""Scoring models and scores: SynCDIdentityModelLoader, SynCDIdentityScore (MDINOv2-I, DINOv2-I, CLIP-I, DINO) and
SynCDAestheticScore (LAION). The math is ``core/identity.py`` and ``core/aesthetic.py``, shared with the dataset
filter (``core/filtering.py``)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..core.aesthetic import HEAD_FILE, aesthetic_scores, load_head
from ..core.identity import features, identity_scores
from . import choices, model_folders

FOLDER = "syncd_identity"  # models/syncd_identity/: transformers model folders + aesthetic head files
HEAD_SUFFIXES = (".pth", ".pt", ".safetensors")
NO_HEAD = "none"
NONE_INSTALLED = "(none installed)"
METRICS = {  # metric -> (feature kind, background masked)
    "mdinov2_i": ("dinov2", True),   # SynCD's MDINOv2-I: crop around the mask, background masked
    "dinov2_i": ("dinov2", False),   # crop around the mask (or the whole image), background kept
    "clip_i": ("clip", False),
    "dino": ("dino", False),         # DreamBooth's DINO (ViT-S/16 CLS)
    "toy_identity": ("toy_reader", False),  # the toy world's: shape, colour and texture as its reader reads them
}
MODEL_TYPES = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2", "clip": "clip", "clip_vision_model": "clip",
               "vit": "dino"}
KIND_NAMES = {"dinov2": "a DINOv2 model", "clip": "a CLIP vision model", "dino": "a DINO ViT model",
              "toy_reader": "the toy world's attribute reader (SynCD Toy-World Score Model)"}

ScoreModelType = io.Custom("SYNCD_SCORE_MODEL")

model_folders.register(FOLDER, ())


@dataclasses.dataclass(frozen=True)
class ScoreModel:
    """A loaded feature model: ``kind`` "dinov2", "clip" or "dino"; CLIP may carry the LAION aesthetic ``head``."""
    net: torch.nn.Module
    kind: str
    name: str
    head: Optional[torch.nn.Linear] = None


def model_folders() -> list[str]:
    """Sub-folders of ``models/syncd_identity`` that hold a transformers model."""
    found = []
    for base in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(base):
            found += sorted(d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d, "config.json")))
    return found


def head_files() -> list[str]:
    """Aesthetic head files (``.pth``/``.pt``/``.safetensors``) directly in ``models/syncd_identity``."""
    found = []
    for base in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(base):
            found += sorted(f for f in os.listdir(base) if f.endswith(HEAD_SUFFIXES)
                            and os.path.isfile(os.path.join(base, f)))
    return found


def resolve(name: str, path: str, what: str = "SynCD Identity Model Loader") -> str:
    if path.strip():
        if not os.path.isfile(os.path.join(path.strip(), "config.json")):
            raise ValueError(f"{what}: {path!r} is not a transformers model folder (no config.json)")
        return path.strip()
    for base in folder_paths.get_folder_paths(FOLDER):
        if os.path.isfile(os.path.join(base, name, "config.json")):
            return os.path.join(base, name)
    raise ValueError(f"{what}: no model {name!r}; put a transformers model folder (e.g. facebook/dinov2-large, "
                     f"facebook/dinov2-with-registers-large, openai/clip-vit-large-patch14, facebook/dino-vits16) "
                     f"into models/{FOLDER}/ or give model_path")


def kind_of(path: str) -> str:
    """The feature kind of a transformers folder, from its config's ``model_type``."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"SynCD Identity Model Loader: {path} is a {model_type!r} model; expected DINOv2 "
                         f"(dinov2, dinov2_with_registers), CLIP (clip, clip_vision_model) or DINO (vit)")
    return MODEL_TYPES[model_type]


@functools.lru_cache(maxsize=4)
def load_model(path: str):
    """(transformers feature model on ComfyUI's torch device in eval mode, its kind) from a local folder."""
    import comfy.model_management
    import transformers

    kind = kind_of(path)
    cls = transformers.CLIPVisionModelWithProjection if kind == "clip" else transformers.AutoModel
    model = cls.from_pretrained(path, local_files_only=True).eval()
    return model.to(comfy.model_management.get_torch_device()), kind


def resolve_head(name: str) -> str:
    for base in folder_paths.get_folder_paths(FOLDER):
        if os.path.isfile(os.path.join(base, name)):
            return os.path.join(base, name)
    raise ValueError(f"SynCD Identity Model Loader: no aesthetic head {name!r} in models/{FOLDER}/ (upstream: "
                     f"{HEAD_FILE} from github.com/LAION-AI/aesthetic-predictor)")


class SynCDIdentityModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDIdentityModelLoader",
            display_name="SynCD Identity Model Loader",
            category="SynCD/loaders",
            description="Loads a feature model for SynCD Identity Score, SynCD Aesthetic Score and the dataset "
                        "filter: a transformers model folder (DINOv2, CLIP vision or DINO ViT; the kind is read "
                        "from its config.json), optionally with the LAION aesthetic head for a CLIP ViT-L/14.",
            inputs=[
                io.Combo.Input("model", options=model_folders() or [NONE_INSTALLED],
                               tooltip=f"A transformers model folder in models/{FOLDER}/: DINOv2 (dinov2-large, or "
                                       "dinov2-with-registers-large = upstream's dinov2_vitl14_reg filter model) "
                                       "for the DINOv2 metrics and the filter; CLIP (clip-vit-large-patch14) for "
                                       "clip_i and the aesthetic score; DINO ViT-S/16 for dino."),
                io.Combo.Input("aesthetic_head", options=[NO_HEAD] + head_files(), default=NO_HEAD,
                               tooltip=f"The LAION aesthetic predictor head in models/{FOLDER}/ ({HEAD_FILE}, "
                                       ".pth or .safetensors), for a CLIP ViT-L/14 model; none for identity "
                                       "scores only."),
                io.String.Input("model_path", default="", optional=True,
                                tooltip="A local transformers model folder instead of 'model'."),
                io.String.Input("aesthetic_head_path", default="", optional=True,
                                tooltip="A local aesthetic head file (.pth/.safetensors) instead of "
                                        "'aesthetic_head'."),
            ],
            outputs=[ScoreModelType.Output(display_name="SCORE_MODEL")],
        )

    @classmethod
    def validate_inputs(cls, model=None, aesthetic_head=None):
        return choices.check(cls, model=model, aesthetic_head=aesthetic_head)

    @classmethod
    def execute(cls, model, aesthetic_head=NO_HEAD, model_path="", aesthetic_head_path="") -> io.NodeOutput:
        path = resolve(model, model_path or "")
        net, kind = load_model(path)
        head = None
        head_file = (aesthetic_head_path or "").strip() or (aesthetic_head if aesthetic_head != NO_HEAD else "")
        if head_file:
            if kind != "clip":
                raise ValueError(f"SynCD Identity Model Loader: the aesthetic head needs a CLIP vision model; "
                                 f"{os.path.basename(path)} is {KIND_NAMES[kind]}")
            head = load_head(aesthetic_head_path.strip() if (aesthetic_head_path or "").strip()
                             else resolve_head(aesthetic_head))
            if head.in_features != net.config.projection_dim:
                raise ValueError(f"SynCD Identity Model Loader: {os.path.basename(head_file)} takes "
                                 f"{head.in_features}-dim embeddings but {os.path.basename(path)} gives "
                                 f"{net.config.projection_dim}; the LAION ViT-L/14 head needs "
                                 f"openai/clip-vit-large-patch14")
        return io.NodeOutput(ScoreModel(net, kind, os.path.basename(os.path.normpath(path)), head))


def require_kind(node: str, score_model, kind: str, purpose: str) -> None:
    if not isinstance(score_model, ScoreModel):
        raise ValueError(f"{node}: connect a SynCD Identity Model Loader to score_model")
    if score_model.kind != kind:
        raise ValueError(f"{node}: {purpose} needs {KIND_NAMES[kind]}; {score_model.name} is "
                         f"{KIND_NAMES[score_model.kind]}. Load the matching model in SynCD Identity Model Loader")


def score_features(score_model: ScoreModel, images, masks, kind: str, mask_background: bool) -> torch.Tensor:
    """L2-normalised features of the metric's ``kind``: ``core.identity.features``, or for the toy world's reader
    its identity probabilities of the whole images (``toyworld.reader.identity_features``; masks unused)."""
    if kind == "toy_reader":
        from ..toyworld.reader import identity_features

        return identity_features(images, score_model.net)
    return features(score_model.net, images, masks, kind, mask_background)


def fit_masks(node: str, what: str, masks, batch):
    """Masks resized (nearest) to the batch's images; one per image."""
    if masks is None:
        return None
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.shape[0] != batch.shape[0]:
        raise ValueError(f"{node}: {what} holds {masks.shape[0]} masks for {batch.shape[0]} images; give one per "
                         f"image")
    return torch.nn.functional.interpolate(masks.unsqueeze(1).float(), size=batch.shape[1:3], mode="nearest")[:, 0]


class SynCDIdentityScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDIdentityScore",
            display_name="SynCD Identity Score",
            category="SynCD/evaluation",
            is_output_node=True,  # a terminal node: its table is shown on it
            description="Scores each generated image against the reference images: the mean cosine similarity of "
                        "their features. mdinov2_i is SynCD's MDINOv2-I (object crop around the mask, background "
                        "masked, DINOv2 CLS); dinov2_i keeps the background; clip_i uses CLIP image embeddings; "
                        "dino is DreamBooth's DINO; toy_identity is the toy world's (SynCD Toy-World Score Model: "
                        "the share of shape, colour and texture read alike). Higher = closer identity.",
            inputs=[
                io.Image.Input("images", tooltip="The generated images."),
                io.Image.Input("references", tooltip="The reference images of the subject."),
                ScoreModelType.Input("score_model", tooltip="From SynCD Identity Model Loader: DINOv2 for "
                                                            "mdinov2_i/dinov2_i, CLIP for clip_i, DINO for dino."),
                io.Combo.Input("metric", options=list(METRICS), default="mdinov2_i",
                               tooltip="mdinov2_i needs masks of the object in both image sets (without them "
                                       "the whole image is used, background included)."),
                io.Mask.Input("image_masks", optional=True,
                              tooltip="The object in each generated image (crop and background mask)."),
                io.Mask.Input("reference_masks", optional=True, tooltip="The object in each reference image."),
            ],
            outputs=[io.Float.Output(display_name="scores", is_output_list=True),
                     io.Float.Output(display_name="mean"),
                     io.String.Output(display_name="table")],
        )

    @classmethod
    def validate_inputs(cls, metric=None):
        return choices.check(cls, metric=metric)

    @classmethod
    def execute(cls, images, references, score_model, metric, image_masks=None,
                reference_masks=None) -> io.NodeOutput:
        node = "SynCD Identity Score"
        choices.require(node, "metric", metric, METRICS)
        kind, mask_background = METRICS[metric]
        require_kind(node, score_model, kind, f"metric {metric}")
        image_masks = fit_masks(node, "image_masks", image_masks, images)
        reference_masks = fit_masks(node, "reference_masks", reference_masks, references)
        scores = identity_scores(score_features(score_model, images, image_masks, kind, mask_background),
                                 score_features(score_model, references, reference_masks, kind, mask_background))
        values = [round(float(s), 4) for s in scores]
        mean = float(scores.mean())
        masked = [w for w, m in (("images", image_masks), ("references", reference_masks)) if m is not None]
        table = "\n".join([f"{metric} ({score_model.name}) against {references.shape[0]} reference(s); masks: "
                           f"{', '.join(masked) or 'none'}"]
                          + [f"image {i}: {v:.4f}" for i, v in enumerate(values)] + [f"mean: {mean:.4f}"])
        return io.NodeOutput(values, mean, table, ui=ui.PreviewText(table))


class SynCDAestheticScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDAestheticScore",
            display_name="SynCD Aesthetic Score",
            category="SynCD/evaluation",
            is_output_node=True,  # a terminal node: its table is shown on it
            description="The LAION aesthetic score of each image (about 1-10; SynCD keeps dataset images above 6): "
                        "the linear head on the L2-normalised CLIP ViT-L/14 embedding of the whole image, as "
                        "upstream's data filter.",
            inputs=[
                io.Image.Input("images"),
                ScoreModelType.Input("score_model", tooltip="From SynCD Identity Model Loader: a CLIP vision "
                                                            "model with aesthetic_head set."),
            ],
            outputs=[io.Float.Output(display_name="scores", is_output_list=True),
                     io.Float.Output(display_name="mean"),
                     io.String.Output(display_name="table")],
        )

    @classmethod
    def execute(cls, images, score_model) -> io.NodeOutput:
        node = "SynCD Aesthetic Score"
        require_kind(node, score_model, "clip", "the aesthetic score")
        if score_model.head is None:
            raise ValueError(f"{node}: {score_model.name} was loaded without an aesthetic head; choose "
                             f"{HEAD_FILE} as aesthetic_head in SynCD Identity Model Loader")
        scores = aesthetic_scores(score_model.net, score_model.head, images)
        values = [round(float(s), 4) for s in scores]
        mean = float(scores.mean())
        table = "\n".join([f"aesthetic ({score_model.name})"] + [f"image {i}: {v:.3f}" for i, v in enumerate(values)]
                          + [f"mean: {mean:.3f}"])
        return io.NodeOutput(values, mean, table, ui=ui.PreviewText(table))

"""SynCDIdentityScore: how well generated images keep the references' identity (``core/identity.py``)."""

from __future__ import annotations

import functools
import os

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..core.identity import features, identity_scores
from . import choices

FOLDER = "syncd_identity"  # models/syncd_identity/<name>/: transformers model folders (config.json + weights)
METRICS = {  # metric -> (feature kind, background masked)
    "mdinov2_i": ("dinov2", True),   # SynCD's MDINOv2-I: crop around the mask, background masked
    "dinov2_i": ("dinov2", False),   # crop around the mask (or the whole image), background kept
    "clip_i": ("clip", False),
    "dino": ("dino", False),         # DreamBooth's DINO (ViT-S/16 CLS)
}

if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], set())


def model_folders() -> list[str]:
    """Sub-folders of ``models/syncd_identity`` that hold a transformers model."""
    found = []
    for base in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(base):
            found += sorted(d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d, "config.json")))
    return found


def resolve(name: str, path: str) -> str:
    if path.strip():
        if not os.path.isfile(os.path.join(path.strip(), "config.json")):
            raise ValueError(f"SynCD Identity Score: {path!r} is not a transformers model folder (no config.json)")
        return path.strip()
    for base in folder_paths.get_folder_paths(FOLDER):
        if os.path.isfile(os.path.join(base, name, "config.json")):
            return os.path.join(base, name)
    raise ValueError(f"SynCD Identity Score: no model {name!r}; put a transformers model folder (e.g. "
                     f"facebook/dinov2-large, openai/clip-vit-large-patch14, facebook/dino-vits16) into "
                     f"models/{FOLDER}/ or give model_path")


@functools.lru_cache(maxsize=2)
def load_model(path: str, kind: str):
    """The transformers feature model of ``kind`` from a local folder, on ComfyUI's torch device, eval mode."""
    import comfy.model_management
    import transformers

    cls = transformers.CLIPVisionModelWithProjection if kind == "clip" else transformers.AutoModel
    model = cls.from_pretrained(path, local_files_only=True).eval()
    return model.to(comfy.model_management.get_torch_device())


class SynCDIdentityScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDIdentityScore",
            display_name="SynCD Identity Score",
            category="SynCD/evaluation",
            description="Scores each generated image against the reference images: the mean cosine similarity of "
                        "their features. mdinov2_i is SynCD's MDINOv2-I (object crop around the mask, background "
                        "masked, DINOv2 CLS); dinov2_i keeps the background; clip_i uses CLIP image embeddings; "
                        "dino is DreamBooth's DINO. Higher = closer identity.",
            inputs=[
                io.Image.Input("images", tooltip="The generated images."),
                io.Image.Input("references", tooltip="The reference images of the subject."),
                io.Combo.Input("metric", options=list(METRICS), default="mdinov2_i"),
                io.Combo.Input("model", options=model_folders() or ["(none installed)"],
                               tooltip=f"A transformers model folder in models/{FOLDER}/: DINOv2 (e.g. "
                                       "dinov2-large) for the DINOv2 metrics, CLIP (clip-vit-large-patch14) for "
                                       "clip_i, DINO ViT-S/16 for dino."),
                io.Mask.Input("image_masks", optional=True,
                              tooltip="The object in each generated image (crop and background mask)."),
                io.Mask.Input("reference_masks", optional=True, tooltip="The object in each reference image."),
                io.String.Input("model_path", default="", optional=True,
                                tooltip="A local transformers model folder instead of 'model'."),
            ],
            outputs=[io.Float.Output(display_name="scores", is_output_list=True),
                     io.Float.Output(display_name="mean"),
                     io.String.Output(display_name="table")],
        )

    @classmethod
    def validate_inputs(cls, metric=None, model=None):
        return choices.check(cls, metric=metric) if model is None or model == "(none installed)" else \
            choices.check(cls, metric=metric, model=model)

    @classmethod
    def execute(cls, images, references, metric, model, image_masks=None, reference_masks=None,
                model_path="") -> io.NodeOutput:
        kind, mask_background = METRICS[metric]
        for what, masks, batch in (("image_masks", image_masks, images), ("reference_masks", reference_masks,
                                                                         references)):
            if masks is not None and masks.shape[0] != batch.shape[0]:
                raise ValueError(f"SynCD Identity Score: {what} holds {masks.shape[0]} masks for "
                                 f"{batch.shape[0]} images; give one per image")
        net = load_model(resolve(model, model_path), kind)

        def fit(masks, batch):
            if masks is None:
                return None
            return torch.nn.functional.interpolate(masks.unsqueeze(1).float(), size=batch.shape[1:3],
                                                   mode="nearest")[:, 0]
        scores = identity_scores(features(net, images, fit(image_masks, images), kind, mask_background),
                                 features(net, references, fit(reference_masks, references), kind, mask_background))
        values = [round(float(s), 4) for s in scores]
        mean = float(scores.mean())
        table = "\n".join([f"{metric} against {references.shape[0]} reference(s)"]
                          + [f"image {i}: {v:.4f}" for i, v in enumerate(values)] + [f"mean: {mean:.4f}"])
        return io.NodeOutput(values, mean, table, ui=ui.PreviewText(table))

"""SynCDDatasetWriter: one generated object (its images, masks, prompts) scored, filtered and written into a SynCD
dataset folder (``core/dataset_format.py``; the filter is ``core/filtering.py``, the scores ``core/aesthetic.py`` and
``core/identity.py``)."""

from __future__ import annotations

import os
import pathlib

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image

from ..core import dataset_format, filtering
from ..core.aesthetic import aesthetic_scores
from . import choices
from .identity_score import ScoreModelType, fit_masks, require_kind

NODE = "SynCD Dataset Writer"
FORMATS = ("jpg", "png")
CorrespondencesType = io.Custom("SYNCD_CORRESPONDENCES")


def dataset_root(folder: str) -> pathlib.Path:
    """``folder`` inside ComfyUI's output directory (relative to it, or absolute but inside it); anything that
    leaves the output directory (``..``, another absolute path, a symlink out) is refused, as SaveImage does."""
    folder = (folder or "").strip()
    if not folder:
        raise ValueError(f"{NODE}: dataset_folder is empty; give a folder name inside ComfyUI's output folder")
    base = os.path.realpath(folder_paths.get_output_directory())
    path = os.path.realpath(os.path.join(base, folder))
    if os.path.commonpath([base, path]) != base or path == base:
        raise ValueError(f"{NODE}: dataset_folder {folder!r} is not a folder inside ComfyUI's output folder "
                         f"({base}); give a relative name such as 'syncd_dataset'")
    return pathlib.Path(path)


def split_prompts(text: str, n: int) -> list[str]:
    """One prompt per line (empty lines ignored); a single line serves every image."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * n
    if len(lines) != n:
        raise ValueError(f"{NODE}: {len(lines)} prompt line(s) for {n} images; write one prompt per line (or a "
                         f"single line for all)")
    return lines


def to_pil(image: torch.Tensor) -> Image.Image:
    """One (H, W, 3) IMAGE in [0, 1] as SaveImage stores it."""
    return Image.fromarray(np.clip(255.0 * image.cpu().float().numpy(), 0, 255).astype(np.uint8))


class SynCDDatasetWriter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDDatasetWriter",
            display_name="SynCD Dataset Writer",
            category="SynCD/datagen",
            description="Writes one object (the images generated together of one subject) into a SynCD dataset "
                        "folder in upstream's *metadata.json layout, readable by the pack's training scripts and "
                        "upstream's dataloader. With score models it applies SynCD's filter first: an image is "
                        "kept when its aesthetic score passes and it pairs with another image at a DINOv2 "
                        "similarity in [min_dinov2, 0.98]; an object needs 2 kept images, else nothing is "
                        "written. Resumable: an object id already written is skipped.",
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="The images of one object (a batch)."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="One prompt per image, one per line (a single line serves every image)."),
                io.String.Input("category", default="dog", tooltip="The object's category, e.g. 'dog', 'mug'."),
                io.String.Input("object_id", default="object-0001",
                                tooltip="Unique per object; names the files (sanitized to [A-Za-z0-9._-]) and is "
                                        "the resume key."),
                io.String.Input("dataset_folder", default="syncd_dataset",
                                tooltip="Folder inside ComfyUI's output folder (created if needed)."),
                io.Combo.Input("image_format", options=list(FORMATS), default="jpg",
                               tooltip="jpg as upstream (quality 95), or png (lossless). Masks are always "
                                       "masks/<stem>.jpg."),
                io.Mask.Input("masks", optional=True,
                              tooltip="The object's mask in each image (white = subject): written to masks/ and "
                                      "used for the DINOv2 crop. Without masks, whole-image masks are written "
                                      "(upstream's loader opens a mask for every image)."),
                ScoreModelType.Input("dinov2_model", optional=True,
                                     tooltip="A DINOv2 model (upstream: dinov2_vitl14_reg = transformers "
                                             "facebook/dinov2-with-registers-large) for the pairwise filter."),
                ScoreModelType.Input("aesthetic_model", optional=True,
                                     tooltip="CLIP ViT-L/14 with the LAION aesthetic head, for the aesthetic "
                                             "filter."),
                io.Float.Input("min_aesthetic", default=filtering.PAPER_MIN_AESTHETIC, min=-100.0, max=100.0,
                               step=0.1, optional=True,
                               tooltip="Keep images with an aesthetic score >= this (paper: 6). Needs "
                                       "aesthetic_model."),
                io.Float.Input("min_dinov2", default=filtering.PAPER_MIN_DINO, min=-1.0, max=1.0, step=0.01,
                               optional=True,
                               tooltip="Keep images that pair with another at a DINOv2 similarity in [this, "
                                       "0.98] (paper: 0.7; <= 0 turns the pair rule off). Needs dinov2_model."),
                CorrespondencesType.Input("correspondences", optional=True,
                                          tooltip="Rigid objects: the views' pixel correspondences, stored "
                                                  "beside the object (kept views only)."),
                io.String.Input("asset_id", default="", optional=True,
                                tooltip="Rigid objects: the 3D asset id (stored as objaverse_id, as upstream)."),
            ],
            outputs=[io.String.Output(display_name="report"), io.Int.Output(display_name="kept_images")],
        )

    @classmethod
    def validate_inputs(cls, image_format=None):
        return choices.check(cls, image_format=image_format)

    @classmethod
    def execute(cls, images, prompts, category, object_id, dataset_folder, image_format="jpg", masks=None,
                dinov2_model=None, aesthetic_model=None, min_aesthetic=filtering.PAPER_MIN_AESTHETIC,
                min_dinov2=filtering.PAPER_MIN_DINO, correspondences=None, asset_id="") -> io.NodeOutput:
        choices.require(NODE, "image_format", image_format, FORMATS)
        root = dataset_root(dataset_folder)
        n = images.shape[0]
        lines = split_prompts(prompts, n)
        if not category.strip():
            raise ValueError(f"{NODE}: category is empty; name the object's category (e.g. 'dog')")
        dataset_format.sanitize_name(object_id)  # refuses ids without a usable file name before any work
        masks = fit_masks(NODE, "masks", masks, images)
        if correspondences is not None and correspondences.views != n:
            raise ValueError(f"{NODE}: the correspondences have {correspondences.views} views for {n} images")
        writer = dataset_format.DatasetWriter(root, image_format=image_format)
        if writer.has(object_id):
            report = f"{object_id}: already in {root} (resume): skipped"
            return io.NodeOutput(report, 0, ui=ui.PreviewText(report))

        aesthetics = dino = None
        if aesthetic_model is not None:
            require_kind(NODE, aesthetic_model, "clip", "aesthetic_model")
            if aesthetic_model.head is None:
                raise ValueError(f"{NODE}: aesthetic_model was loaded without an aesthetic head; choose the LAION "
                                 f"head as aesthetic_head in SynCD Identity Model Loader")
            aesthetics = aesthetic_scores(aesthetic_model.net, aesthetic_model.head, images).tolist()
        if dinov2_model is not None:
            require_kind(NODE, dinov2_model, "dinov2", "dinov2_model")
            dino = filtering.dino_scores(dinov2_model.net, images, masks)
        keep = filtering.keep_images(aesthetics, dino, min_aesthetic, min_dinov2) \
            if aesthetics is not None or dino is not None else [True] * n
        kept = [i for i, k in enumerate(keep) if k]
        lines_out = [f"{object_id} ({category}): {len(kept)} of {n} images kept"]
        full = None if dino is None else (dino + dino.T)
        for i in range(n):
            parts = []
            if aesthetics is not None:
                parts.append(f"aesthetic {aesthetics[i]:.2f}" + ("" if aesthetics[i] >= min_aesthetic
                                                                  else f" < {min_aesthetic:g}"))
            if full is not None:
                others = [float(full[i, j]) for j in range(n) if j != i]
                best = max(others) if others else float("nan")
                parts.append(f"best pair {best:.3f}")
            lines_out.append(f"  image {i}: {'kept' if keep[i] else 'rejected'}"
                             + (f" ({', '.join(parts)})" if parts else ""))
        if dino is not None:
            lines_out.append(f"  mean DINOv2 over pairs: {filtering.mean_pair_score(dino):.3f}; pairs count in "
                             f"[{min_dinov2:g}, {filtering.NEAR_DUPLICATE}]" if min_dinov2 > 0 else
                             f"  mean DINOv2 over pairs: {filtering.mean_pair_score(dino):.3f}; pair rule off")
        if not filtering.object_kept(keep):
            lines_out.append(f"  rejected: fewer than {filtering.MIN_KEPT} images kept; nothing written")
            report = "\n".join(lines_out)
            return io.NodeOutput(report, 0, ui=ui.PreviewText(report))

        written_masks = [(masks[i] > 0.5).cpu().numpy() if masks is not None
                         else np.ones(images.shape[1:3], dtype=bool) for i in kept]
        meta = writer.write(
            object_id, [to_pil(images[i]) for i in kept], [lines[i] for i in kept], category.strip(),
            masks=written_masks,
            aesthetics_scores=None if aesthetics is None else [aesthetics[i] for i in kept],
            dino_scores=None if dino is None else filtering.subset_dino(dino, kept),
            extra={"objaverse_id": asset_id.strip()} if asset_id and asset_id.strip() else None,
            correspondences=None if correspondences is None else dataset_format.keep_views(correspondences, kept))
        lines_out.append(f"  written: {meta}")
        report = "\n".join(lines_out)
        return io.NodeOutput(report, len(kept), ui=ui.PreviewText(report))

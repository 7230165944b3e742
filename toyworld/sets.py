"""Multi-image sets in the toy world (issue 13 §2.2): the prompts data generation gets, and how consistent the
generated sets come out.

Data generation names only the category (the shape) and each image's background, as SynCD's prompts name the
category and a background but not the instance's look: colour and texture are left to the model, so only shared
attention can make the images of a set agree on them. :func:`prompts_file` writes such objects in the data-generation
driver's prompts format (JSON Lines: ``object_id``, ``category``, ``prompts``, ``kind``); :func:`set_consistency`
reads generated sets back with the attribute reader: a set is consistent when every image shows an object and all
read the same shape, colour and texture.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np

from . import scene as S

SET_SIZE = 3


def set_prompts(shape: str, backgrounds: Sequence[str]) -> list[str]:
    """One prompt per image: 'a cube on grass', ... (shape and background only)."""
    return [f"{'an' if shape[0] in 'aeiou' else 'a'} {shape} {S.BACKGROUND_PHRASES[b]}" for b in backgrounds]


def draw_objects(count: int, seed: int, set_size: int = SET_SIZE) -> list[dict]:
    """``count`` prompts-file entries: a shape (cycled over the vocabulary) and ``set_size`` distinct backgrounds
    drawn per object."""
    if set_size > len(S.BACKGROUNDS):
        raise ValueError(f"a set of {set_size} needs as many distinct backgrounds; there are {len(S.BACKGROUNDS)}")
    rng = np.random.default_rng(seed)
    objects = []
    for i in range(count):
        shape = S.SHAPES[i % len(S.SHAPES)]
        backgrounds = [S.BACKGROUNDS[j] for j in rng.permutation(len(S.BACKGROUNDS))[:set_size]]
        objects.append({"object_id": f"toy_{i:05d}", "category": shape, "prompts": set_prompts(shape, backgrounds),
                        "kind": "deformable", "backgrounds": backgrounds})
    return objects


def prompts_file(path, count: int, seed: int, set_size: int = SET_SIZE) -> pathlib.Path:
    """Write :func:`draw_objects` as the driver's prompts file (JSON Lines); the backgrounds stay in each line."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o) + "\n" for o in draw_objects(count, seed, set_size)))
    return path


def set_consistency(identities: Sequence[tuple | None], set_size: int = SET_SIZE) -> dict[str, float]:
    """Over consecutive sets of ``set_size`` read identities ((shape, colour, texture), None = no object read):
    the fraction of sets whose images all show an object and agree on every attribute (``all``), and per
    attribute the fraction agreeing on it (sets with a missing object count as not agreeing)."""
    if not identities or len(identities) % set_size:
        raise ValueError(f"{len(identities)} images are not whole sets of {set_size}")
    sets = [identities[i:i + set_size] for i in range(0, len(identities), set_size)]
    out = {}
    for k, name in enumerate(S.OBJECT_ATTRIBUTES):
        out[name] = sum(all(x is not None for x in s) and len({x[k] for x in s}) == 1 for s in sets) / len(sets)
    out["all"] = sum(all(x is not None for x in s) and len(set(s)) == 1 for s in sets) / len(sets)
    return out


# --- the data-generation conditions compared (SynCD Table 4's ablation at toy scale) ---------------------------

CONDITIONS = {
    "msa_off": "each image attends only to itself (images_per_subject 1): a plain batch, masks still estimated",
    "msa_no_masks": "the 3 images share all their tokens (mask_mode none, JeDi-style coupled attention)",
    "msa_masks": "the 3 images share their subject tokens (mask_mode automatic: SynCD's deformable MSA)",
}
MASK_NODES = ("SynCDAutomaticMasks", "MaskToImage")


def _one(workflow: dict, kind: str) -> dict:
    found = [n for n in workflow["nodes"] if n.get("type") == kind]
    if len(found) != 1:
        raise ValueError(f"expected one {kind} node, found {len(found)}")
    return found[0]


def condition_workflow(workflow: dict, condition: str, object_info: dict) -> dict:
    """A copy of a data-generation editor workflow (one SynCD Masked Shared Attention node) set to ``condition``.
    Without mask estimation (``msa_no_masks``) the mask outputs are muted."""
    import copy

    from ..client.ui_graph import set_widget
    from ..client.workflow_format import widget_values

    if condition not in CONDITIONS:
        raise ValueError(f"condition {condition!r}: expected one of {', '.join(CONDITIONS)}")
    workflow = copy.deepcopy(workflow)
    node, node_def = _one(workflow, "SynCDSharedAttention"), object_info["SynCDSharedAttention"]
    if condition == "msa_off":
        set_widget(node, node_def, "images_per_subject", 1)
    elif condition == "msa_no_masks":
        set_widget(node, node_def, "mask_mode", "none")
        for other in workflow["nodes"]:
            roles = (other.get("properties") or {}).get("syncd_datagen")
            if other.get("type") in MASK_NODES or roles == "masks":
                other["mode"] = 2  # muted
    else:
        set_widget(node, node_def, "mask_mode", "automatic")
    if widget_values(node, node_def).get("images_per_subject") not in (1, SET_SIZE):
        set_widget(node, node_def, "images_per_subject", SET_SIZE)
    return workflow


RIGID_CONDITIONS = {
    "depth_only": "depth-conditioned; each image attends only to itself (images_per_subject 1), no warping",
    "depth_msa_no_masks": "depth; the 3 images share all their tokens (mask_mode none), no warping",
    "depth_msa_masks": "depth; the 3 images share their rendered foreground (SynCD's rigid MSA), no warping",
    "depth_msa_masks_warp": "depth; MSA on the rendered foreground and the anchor view's latents warped into the "
                            "others while σ̂ > 0.8 (SynCD's rigid pipeline, as shipped)",
}
WARP_NODE, SOLID_NODE = "SynCDFeatureWarp", "SynCDToyWorldMeshViews"


def rigid_condition_workflow(workflow: dict, condition: str, object_info: dict) -> dict:
    """A copy of the toy-swapped rigid data-generation workflow set to ``condition`` of :data:`RIGID_CONDITIONS`
    (warping off = SynCD Feature Warp bypassed)."""
    import copy

    from ..client.ui_graph import set_widget

    if condition not in RIGID_CONDITIONS:
        raise ValueError(f"condition {condition!r}: expected one of {', '.join(RIGID_CONDITIONS)}")
    workflow = copy.deepcopy(workflow)
    shared, node_def = _one(workflow, "SynCDSharedAttention"), object_info["SynCDSharedAttention"]
    set_widget(shared, node_def, "images_per_subject", 1 if condition == "depth_only" else SET_SIZE)
    set_widget(shared, node_def, "mask_mode", "none" if condition == "depth_msa_no_masks" else "foreground_masks")
    warp = _one(workflow, WARP_NODE)
    if condition == "depth_msa_masks_warp":
        set_widget(warp, object_info[WARP_NODE], "images_per_object", SET_SIZE)
    else:
        warp["mode"] = 4  # bypassed: the model passes through unwarped
    return workflow


def solid_workflow(workflow: dict, shape: str, object_info: dict) -> dict:
    """A copy of a toy-swapped rigid workflow whose SynCD Toy-World Mesh Views renders ``shape`` (the driver gives
    it the object's seed: its poses)."""
    import copy

    from ..client.ui_graph import set_widget

    workflow = copy.deepcopy(workflow)
    set_widget(_one(workflow, SOLID_NODE), object_info[SOLID_NODE], "shape", shape)
    return workflow


def reader_scores(images, masks=None):
    """The data-generation driver's filter with the attribute reader as the toy world's DINOv2 and aesthetic
    scorer: every image is kept and scored, "aesthetics" 1 where an object is read (0 elsewhere) and the pair
    "DINO" similarity 0.98 × the fraction of (shape, colour, texture) two images agree on, so the training
    scripts' upstream filter (``min_aesthetics`` 0.5, ``min_dino`` 0.98) keeps the images that show an object and
    read the same identity as another image of their set."""
    import torch

    from . import reader as R

    pixels = torch.from_numpy(np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in images]))
    reading = R.read(pixels)
    ids = [reading.identity(i) for i in range(len(images))]
    aesthetics = [1.0 if x is not None else 0.0 for x in ids]
    pairs = [[0.0 if i == j or a is None or b is None else
              0.98 * sum(p == q for p, q in zip(a, b)) / len(S.OBJECT_ATTRIBUTES)
              for j, b in enumerate(ids)] for i, a in enumerate(ids)]
    return list(range(len(images))), aesthetics, pairs


def background_of(prompt: str) -> str | None:
    """The background a :func:`set_prompts` prompt asks for."""
    return next((b for b, phrase in S.BACKGROUND_PHRASES.items() if prompt.endswith(" " + phrase)), None)


def placement_of_mask(mask: np.ndarray) -> str | None:
    """The placement whose centre is nearest the mask's centroid (None for an empty mask)."""
    cols = np.nonzero(mask > 0.5)[1]
    if cols.size == 0:
        return None
    x = (cols.mean() + 0.5) / mask.shape[1]
    return min(S.PLACEMENTS, key=lambda p: abs(sum(S.PLACEMENT_X[p]) / 2 - x))


def anchor_colour_distance(images, silhouettes) -> float | None:
    """Mean over a rigid set's other views of the mean absolute difference (0–255 levels, averaged over RGB) between
    the view's mean colour inside its silhouette and the anchor's (the last view, which SynCD's warping copies
    from); None when a silhouette is empty."""
    if any(not m.any() for m in silhouettes):
        return None
    colours = [image[m].mean(0) * 255 for image, m in zip(images, silhouettes)]
    return float(np.mean([np.abs(c - colours[-1]).mean() for c in colours[:-1]]))


def dataset_consistency(root, depth_masks: bool = False) -> dict:
    """Set consistency (:func:`set_consistency`) of a generated dataset folder, with prompt following (the read
    shape is the object's category, the read background the prompt's) and the share of sets the score filter
    keeps whole; ``depth_masks`` (the masks are the rendered silhouettes the images were depth-conditioned on):
    also how often the read placement is the silhouette's, and :func:`anchor_colour_distance` averaged over sets."""
    import torch
    from PIL import Image

    from ..core import dataset_format
    from . import reader as R

    records = dataset_format.read_dataset(root)
    if not records:
        raise ValueError(f"{root}: no generated sets")
    images, backgrounds, categories, placements, distances = [], [], [], [], []
    for record in records:
        if len(record.images) != SET_SIZE:
            raise ValueError(f"{root}: object {record.object_id} has {len(record.images)} images, not {SET_SIZE}")
        images += [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in record.images]
        if depth_masks:
            silhouettes = [np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0 > 0.5 for p in record.masks]
            placements += [placement_of_mask(m) for m in silhouettes]
            distances.append(anchor_colour_distance(images[-SET_SIZE:], silhouettes))
        backgrounds += [background_of(prompt) for prompt in record.prompts]
        categories += [record.category] * SET_SIZE
    reading = R.read(torch.from_numpy(np.stack(images)))
    identities = [reading.identity(i) for i in range(len(images))]
    out = set_consistency(identities)
    out["shape_follows_prompt"] = sum(reading.labels["shape"][i] == c for i, c in enumerate(categories)) / len(images)
    out["background_follows_prompt"] = sum(reading.labels["background"][i] == b
                                           for i, b in enumerate(backgrounds)) / len(images)
    if depth_masks:
        out["placement_follows_depth"] = sum(reading.labels["placement"][i] == p
                                             for i, p in enumerate(placements)) / len(images)
        measured = [d for d in distances if d is not None]
        out["colour_distance_to_anchor"] = float(np.mean(measured)) if measured else float("nan")
    kept = dataset_format.read_dataset(root, min_aesthetics=0.5, min_dino=0.98)
    out["sets_kept_by_filter"] = len(kept) / len(records)
    out["sets"] = len(records)
    return out


# --- how much the toy model's images depend on self-attention ------------------------------------------------

PROBES = {
    "plain": "the base model as trained",
    "shared": "every self-attention layer shares all tokens across the set (JeDi coupled attention, MSA without "
              "masks), uncond and cond rows each in their own sets",
    "no_self_attention": "every self-attention output zeroed (the residual stream skips self-attention)",
}


class SelfAttentionProbe:
    """Switches the attn1 layers of a diffusers UNet between :data:`PROBES` (the training scripts' coupled
    processors from :mod:`comfyui_syncd.training.jedi`, and a forward hook scaling attn1's output)."""

    def __init__(self, unet):
        from ..training.jedi import CoupledState, install_coupled_attention

        self.state, self.gain = CoupledState(), 1.0
        install_coupled_attention(unet, self.state)
        self.hooks = [m.register_forward_hook(lambda module, args, out: out * self.gain)
                      for name, m in unet.named_modules() if name.endswith("attn1")]

    def set(self, probe: str, rows: int) -> None:
        """``probe`` for batches of ``rows`` rows made of whole sets of :data:`SET_SIZE`."""
        if probe not in PROBES:
            raise ValueError(f"probe {probe!r}: expected one of {', '.join(PROBES)}")
        if rows % SET_SIZE:
            raise ValueError(f"{rows} rows are not whole sets of {SET_SIZE}")
        self.state.set_sizes = [SET_SIZE] * (rows // SET_SIZE) if probe == "shared" else None
        self.gain = 0.0 if probe == "no_self_attention" else 1.0

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

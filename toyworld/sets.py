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

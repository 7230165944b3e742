"""Cross-view pixel correspondences of one rigid object: written by data generation, read by SynCDFeatureWarp.

Upstream (``gen_corresp.py``) stores, per view triplet, one (M, 4) float32 tensor per view pair (0,1), (0,2), (1,2)
with rows [y_A, x_A, y_B, x_B] in PyTorch3D NDC. This pack keeps the same sparse pair lists, in its own documented
convention, so no axis flips are needed downstream:

* coordinates are **normalized image coordinates** in [-1, 1] with ``align_corners=False`` semantics
  (``grid_sample``'s convention): pixel column c of a W-wide grid has x = (2c + 1)/W - 1, +x right, +y down;
* a row is ``[y_a, x_a, y_b, x_b]``: the point at (y_a, x_a) in view a is the same surface point as (y_b, x_b)
  in view b (both visible, depth test passed);
* ``size`` = (H, W) of the grid the correspondences were computed on (upstream: 128 x 128).

File: one ``.safetensors`` per object, tensors ``pair_<a>_<b>`` (M, 4) float32 for a < b, and metadata
``{"format": "syncd-correspondences", "version": "1", "views": "<V>", "height": "<H>", "width": "<W>"}``.
Converting from upstream NDC: x = -x_ndc, y = -y_ndc (PyTorch3D's +x left, +y up).

Pure torch + safetensors: no ComfyUI import.
"""

from __future__ import annotations

import dataclasses
import pathlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "syncd-correspondences"
VERSION = "1"


class CorrespondenceFormatError(ValueError):
    """A correspondence file or value that does not follow the documented format."""


@dataclasses.dataclass(frozen=True)
class Correspondences:
    """Sparse cross-view matches of V views on an (H, W) grid; ``pairs[(a, b)]`` is (M, 4) [y_a, x_a, y_b, x_b]."""
    views: int
    size: tuple[int, int]
    pairs: dict

    def between(self, a: int, b: int) -> torch.Tensor:
        """Matches from view a to view b as (M, 4) [y_a, x_a, y_b, x_b] (either order stored)."""
        if (a, b) in self.pairs:
            return self.pairs[(a, b)]
        if (b, a) in self.pairs:
            return self.pairs[(b, a)][:, [2, 3, 0, 1]]
        return torch.zeros(0, 4)


def check(corr: Correspondences) -> None:
    """Raise CorrespondenceFormatError unless every pair is a (M, 4) float tensor of in-range coordinates."""
    if corr.views < 2:
        raise CorrespondenceFormatError(f"correspondences need at least 2 views, got {corr.views}")
    for (a, b), rows in corr.pairs.items():
        if not (0 <= a < corr.views and 0 <= b < corr.views and a != b):
            raise CorrespondenceFormatError(f"pair ({a}, {b}) is not a pair of 2 of the {corr.views} views")
        if rows.ndim != 2 or rows.shape[1] != 4:
            raise CorrespondenceFormatError(f"pair ({a}, {b}) has shape {tuple(rows.shape)}, expected (M, 4)")
        if rows.numel() and rows.abs().max() > 1.0 + 1e-6:
            raise CorrespondenceFormatError(f"pair ({a}, {b}) has coordinates outside [-1, 1]")


def save(path, corr: Correspondences) -> None:
    """Write ``corr`` to a .safetensors file in the documented layout."""
    check(corr)
    tensors = {f"pair_{a}_{b}": rows.float().contiguous() for (a, b), rows in corr.pairs.items()}
    meta = {"format": FORMAT, "version": VERSION, "views": str(corr.views),
            "height": str(corr.size[0]), "width": str(corr.size[1])}
    save_file(tensors, str(path), metadata=meta)


def load(path) -> Correspondences:
    """Read a file written by :func:`save`; a clear error names what is wrong with any other file."""
    path = pathlib.Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CorrespondenceFormatError(f"{path.name}: not a SynCD correspondence file "
                                                f"(metadata format={meta.get('format')!r})")
            pairs = {}
            for key in f.keys():
                parts = key.split("_")
                if len(parts) != 3 or parts[0] != "pair":
                    raise CorrespondenceFormatError(f"{path.name}: unexpected tensor {key!r}")
                pairs[(int(parts[1]), int(parts[2]))] = f.get_tensor(key).float()
    except (OSError, RuntimeError) as exc:
        raise CorrespondenceFormatError(f"{path}: cannot read ({exc})") from None
    corr = Correspondences(int(meta["views"]), (int(meta["height"]), int(meta["width"])), pairs)
    check(corr)
    return corr


def from_upstream_ndc(rows: torch.Tensor) -> torch.Tensor:
    """Upstream PyTorch3D NDC rows (+x left, +y up) to this format's rows (+x right, +y down)."""
    return -rows.float()

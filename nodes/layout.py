"""Which rows of a model batch belong together: the one place that slices ComfyUI batches.

ComfyUI stacks ``len(cond_or_uncond)`` conditioning chunks of the whole latent
batch into one forward pass (``samplers._calc_cond_batch``), in any order,
or runs them in separate passes; ``cond_or_uncond[c]`` is the index into the
guider's cond list of chunk c. Inside a chunk, consecutive groups of
``images_per_subject`` latents are one subject. Sharing happens inside a group
of one chunk, never across chunks or groups. This is derived from the shapes
and ``cond_or_uncond`` on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class SubjectGroup:
    rows: slice          # rows of the model batch
    latent_index: int    # index of the group's first image in the latent batch
    cond_index: int      # cond_or_uncond value of the chunk: 0 is the guider's first cond (positive)


def check_group_size(latent_batch: int, images_per_subject: int) -> None:
    if latent_batch % images_per_subject:
        raise ValueError(f"SynCD Masked Shared Attention: the latent batch of {latent_batch} images is not divisible "
                         f"by images_per_subject={images_per_subject}; make the batch size a multiple of it")


def subject_groups(batch_rows: int, transformer_options: dict, images_per_subject: int) -> list[SubjectGroup]:
    """Split a model batch of ``batch_rows`` rows into subject groups (see the module docstring)."""
    cond_or_uncond = list(transformer_options.get("cond_or_uncond") or [0])
    chunks = len(cond_or_uncond)
    if batch_rows % chunks:
        raise RuntimeError(f"SynCD: a batch of {batch_rows} rows cannot hold {chunks} conditioning chunks "
                           f"(cond_or_uncond={cond_or_uncond})")
    latent_batch = batch_rows // chunks
    check_group_size(latent_batch, images_per_subject)
    groups = []
    for c, cond_index in enumerate(cond_or_uncond):
        for start in range(0, latent_batch, images_per_subject):
            row = c * latent_batch + start
            groups.append(SubjectGroup(slice(row, row + images_per_subject), start, cond_index))
    return groups


def conditioning_chunks(batch_rows: int, transformer_options: dict) -> list[tuple[int, slice]]:
    """(cond index, rows) of every conditioning chunk in a model batch."""
    cond_or_uncond = list(transformer_options.get("cond_or_uncond") or [0])
    size = batch_rows // len(cond_or_uncond)
    return [(c, slice(i * size, (i + 1) * size)) for i, c in enumerate(cond_or_uncond)]


# Guidance-branch roles (a guider maps each of its conds' uuids to one; ``ForwardState.guidance.roles``).
UNCOND = "uncond"   # no reference access, no coupling: SynCD's unconditional branch, JeDi's ε⁰
IMAGE = "image"     # references with the text-free conditioning: SynCD's image branch
FULL = "full"       # the prompt with references; also every chunk sampled without one of the pack's guiders


def chunk_roles(batch_rows: int, transformer_options: dict, roles: Optional[Mapping] = None) -> list[tuple[str, slice]]:
    """(branch role, rows) of every conditioning chunk: the role a guider gave the chunk's cond (by its uuid, which
    ComfyUI lists per chunk in ``transformer_options["uuids"]``), FULL for conds it did not name."""
    roles = roles or {}
    uuids = list(transformer_options.get("uuids") or [])
    chunks = conditioning_chunks(batch_rows, transformer_options)
    if len(uuids) != len(chunks):
        uuids = [None] * len(chunks)
    return [(roles.get(uuid, FULL), rows) for uuid, (_, rows) in zip(uuids, chunks)]


def chunk_reference_access(batch_rows: int, transformer_options: dict,
                           roles: Optional[Mapping] = None) -> list[tuple[bool, slice]]:
    """(has reference access, rows) of every conditioning chunk: every role but UNCOND has access."""
    return [(role != UNCOND, rows) for role, rows in chunk_roles(batch_rows, transformer_options, roles)]

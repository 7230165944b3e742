"""Masked Shared Attention (SynCD eq. 1) and JeDi coupled self-attention.

One subject group holds N images. Image i's sequence is ``[text_i | image_i]``
(``n_text`` = 0 for UNet self-attention). Queries of image i attend to

* text queries: image i's own tokens only (text never crosses images), except
  with ``text_shares`` (upstream's first step, where no mask is applied at all):
  then the same keys as the image queries;
* image queries (background included, the mask is key-side only): image i's
  own tokens plus the *foreground image tokens* of the other N-1 images.

Other images' text is never a key. With ``foreground`` = None every image
token of every other image is a key: JeDi's coupled self-attention.

Tensors are ``(N, heads, L, head_dim)``; ``foreground`` is ``(N, P)`` bool over
the P = L - n_text image tokens of each image.

``shared_attention`` never builds an (N·L)×(N·L) mask: per image, one SDPA over
``[own tokens ‖ the others' foreground tokens gathered]``, so memory grows
linearly in N. ``shared_attention_reference`` builds the dense additive mask
the way the official code does (``dataset/src/editor.py``: allowed 1, blocked
-65504, others appended in ``torch.roll`` order) and is kept for tests and the
benchmark only.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

# Moves another image's (already position-encoded) keys to where that image sits
# relative to the query image: ``shift(keys, slot)`` with slot = 1..N-1 the
# image's place in the upstream roll order. Identity when positions are shared.
KeyShift = Callable[[torch.Tensor, int], torch.Tensor]

BLOCKED = -65504.0  # the official code's bf16-safe "minus infinity"
ALLOWED = 1.0


def roll_slot(i: int, j: int, n: int) -> int:
    """Slot of image j's tokens among image i's keys: upstream appends ``torch.roll(x, s)`` for s = 1..N-1,
    which puts image (i - s) mod N in slot s."""
    return (i - j) % n


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, foreground: Optional[torch.Tensor], n_text: int):
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q, k, v of one shape (N, heads, L, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    n_image = q.shape[2] - n_text
    if n_image <= 0:
        raise ValueError(f"n_text={n_text} leaves no image tokens in sequences of length {q.shape[2]}")
    if foreground is not None and tuple(foreground.shape) != (q.shape[0], n_image):
        raise ValueError(f"foreground must be (N, image tokens) = {(q.shape[0], n_image)}; got "
                         f"{tuple(foreground.shape)}")


def _shareable(k: torch.Tensor, v: torch.Tensor, foreground: Optional[torch.Tensor], n_text: int):
    """Each image's shareable keys/values, gathered once: lists of (heads, P_j, D), P_j its foreground tokens."""
    shared_k, shared_v = [], []
    for j in range(k.shape[0]):
        kj, vj = k[j, :, n_text:], v[j, :, n_text:]
        if foreground is not None:
            idx = foreground[j].nonzero().squeeze(1)
            kj, vj = kj.index_select(1, idx), vj.index_select(1, idx)
        shared_k.append(kj)
        shared_v.append(vj)
    return shared_k, shared_v


def shared_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, foreground: Optional[torch.Tensor] = None,
                     n_text: int = 0, key_shift: Optional[KeyShift] = None, text_shares: bool = False) -> torch.Tensor:
    """SynCD eq. 1 for one group, memory linear in N (see the module docstring)."""
    _check(q, k, v, foreground, n_text)
    n = q.shape[0]
    if n == 1:
        return F.scaled_dot_product_attention(q, k, v)
    shared_k, shared_v = _shareable(k, v, foreground, n_text)
    out = torch.empty_like(q)
    for i in range(n):
        others = [j for j in range(n) if j != i and shared_k[j].shape[1]]
        keys = [k[i]] + [shared_k[j] if key_shift is None else key_shift(shared_k[j], roll_slot(i, j, n))
                         for j in others]
        values = [v[i]] + [shared_v[j] for j in others]
        first = 0 if text_shares else n_text
        if first:
            out[i, :, :first] = F.scaled_dot_product_attention(q[i, :, :first], k[i], v[i])
        out[i, :, first:] = F.scaled_dot_product_attention(q[i, :, first:], torch.cat(keys, 1), torch.cat(values, 1))
    return out


def shared_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               foreground: Optional[torch.Tensor] = None, n_text: int = 0,
                               key_shift: Optional[KeyShift] = None, text_shares: bool = False) -> torch.Tensor:
    """The official construction (``editor.py``): keys ``[own text | own image | torch.roll(images, s), s=1..N-1]``
    and one dense additive mask of shape (N, 1, L, L + (N-1)·P) for the whole group: memory quadratic in N.
    For tests and benchmarks only."""
    _check(q, k, v, foreground, n_text)
    n, _, seq, _ = q.shape
    p = seq - n_text
    fg = torch.ones(n, p, dtype=torch.bool, device=q.device) if foreground is None else foreground.bool()
    image_k, image_v = k[:, :, n_text:], v[:, :, n_text:]
    keys, values, key_fg = [k], [v], []
    for s in range(1, n):
        rolled = torch.roll(image_k, s, dims=0)
        keys.append(rolled if key_shift is None else key_shift(rolled, s))
        values.append(torch.roll(image_v, s, dims=0))
        key_fg.append(torch.roll(fg, s, dims=0))
    mask = torch.full((n, 1, seq, seq + (n - 1) * p), ALLOWED, dtype=q.dtype, device=q.device)
    if n > 1:
        others = torch.cat(key_fg, dim=1)  # (N, (N-1)·P): row i = foreground of image i's other-image keys
        mask[:, 0, :, seq:] = torch.where(others, ALLOWED, BLOCKED).to(q.dtype).unsqueeze(1)
        if not text_shares:
            mask[:, 0, :n_text, seq:] = BLOCKED  # own text never sees other images
    return F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask)


# --- Reference-feature injection (SynCD §4.2, the customization model) ----------------------------------------
#
# The target's self-attention attends to [own tokens ‖ reference foreground tokens]: eq. 1 with the references as
# the other images of the group, seen one way (references never attend to the target). The key-side mask is a
# gather: only foreground reference tokens become keys, so a reference without foreground changes nothing.


def gather_foreground(tokens: torch.Tensor, foreground: torch.Tensor, token_dim: int = 1) -> torch.Tensor:
    """The foreground tokens of every reference, concatenated along the token axis.

    ``tokens`` is (R, …, P, …) with the P token positions on ``token_dim``; ``foreground`` (R, P) bool.
    Returns the references' foreground tokens with the R axis folded into the token axis: (…, ΣP_fg, …)."""
    if foreground.shape != (tokens.shape[0], tokens.shape[token_dim]):
        raise ValueError(f"foreground must be (references, tokens) = {(tokens.shape[0], tokens.shape[token_dim])}; "
                         f"got {tuple(foreground.shape)}")
    parts = [tokens[r].index_select(token_dim - 1, foreground[r].nonzero().squeeze(1)) for r in range(tokens.shape[0])]
    return torch.cat(parts, dim=token_dim - 1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_own: int, access: torch.Tensor,
                        n_text: int = 0, text_access: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of (B, H, Lq, D) queries over keys/values (B, H, n_own + P, D) whose first ``n_own`` tokens are the
    row's own and the rest gathered reference foreground tokens. Rows with ``access[b]`` False (guidance branches
    without references) attend to their own tokens only, except that with ``text_access[b]`` their first ``n_text``
    queries (Flux text tokens) still see every key: upstream's Flux negative branch keeps image tokens to their own
    image while text sees the whole canvas (nupurkmr9/syncd ``method/pipelines/flux_pipeline/transformer.py``)."""
    if access.all():
        return F.scaled_dot_product_attention(q, k, v)
    out = torch.empty_like(q)
    blind = ~access
    out[blind] = F.scaled_dot_product_attention(q[blind], k[blind, :, :n_own], v[blind, :, :n_own])
    if access.any():
        out[access] = F.scaled_dot_product_attention(q[access], k[access], v[access])
    if n_text and text_access is not None and (text_access & blind).any():
        rows = text_access & blind
        out[rows, :, :n_text] = F.scaled_dot_product_attention(q[rows, :, :n_text], k[rows], v[rows])
    return out


def reference_attention_reference(q: torch.Tensor, k_own: torch.Tensor, v_own: torch.Tensor, k_refs: torch.Tensor,
                                  v_refs: torch.Tensor, foreground: torch.Tensor, access: torch.Tensor,
                                  n_text: int = 0, text_access: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The official construction (nupurkmr9/syncd ``method/pipelines/sdxl_pipeline/pipeline.py``): keys
    ``[own | every reference token]`` and a dense additive mask, ALLOWED on own tokens and reference foreground,
    BLOCKED (−65504) elsewhere and for rows without access (upstream's zero MSA mask), text queries of rows with
    ``text_access`` excepted (the Flux block-diagonal negative branch). ``k_refs``/``v_refs`` are (B, H, R·P, D),
    ``foreground`` (R, P). For tests."""
    b, _, lq, _ = q.shape
    ref_ok = foreground.reshape(1, -1).bool() & access.view(b, 1).bool()
    own_ok = torch.ones(b, k_own.shape[2], dtype=torch.bool, device=q.device)
    allowed = torch.cat([own_ok, ref_ok], dim=1)[:, None, :].repeat(1, lq, 1)  # (B, Lq, keys)
    if n_text and text_access is not None:
        text_ok = foreground.reshape(1, -1).bool() & text_access.view(b, 1).bool()
        allowed[:, :n_text, own_ok.shape[1]:] |= text_ok[:, None, :]
    mask = torch.where(allowed, ALLOWED, BLOCKED).to(q.dtype)[:, None]
    return F.scaled_dot_product_attention(q, torch.cat([k_own, k_refs], 2), torch.cat([v_own, v_refs], 2),
                                          attn_mask=mask)


# --- Consistent sets of the user's subject: MSA within a group plus the references (SynCD eq. 1 + §4.2) ---------
#
# The customization model applied to a batch of N new images of one subject: each image's self-attention keys are
# ``[own ‖ the group's other images' foreground ‖ the references' foreground]``, i.e. SynCD eq. 1 over the group
# with the references as further "other images" that are seen one way (they never attend to the targets, as in
# the customization model). Other images' keys carry ``key_shift`` (Flux: stacked below the own image); reference
# keys arrive already gathered and position-encoded (Flux: moved beside the target by the reference pass).


def shared_reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               foreground: Optional[torch.Tensor] = None, ref_k: Optional[torch.Tensor] = None,
                               ref_v: Optional[torch.Tensor] = None, n_text: int = 0,
                               key_shift: Optional[KeyShift] = None, text_shares: bool = False) -> torch.Tensor:
    """One subject group of N images (``(N, heads, L, D)``, ``foreground`` (N, P) or None as in
    :func:`shared_attention`) that also sees the references: ``ref_k``/``ref_v`` (N, heads, T, D) are the gathered
    reference foreground tokens each image sees (T may be 0; None: no references, which is :func:`shared_attention`).

    Image queries of image i attend to ``[own_i ‖ foreground of the other images ‖ ref_k[i]]``; text queries
    (Flux, the first ``n_text``) to ``[own_i ‖ ref_k[i]]`` (the reference model's text sees the references), plus
    the other images' foreground only with ``text_shares``. Memory is linear in N (one SDPA per image over its own
    keys, no (N·L)×(N·L) mask)."""
    _check(q, k, v, foreground, n_text)
    if ref_k is None:
        return shared_attention(q, k, v, foreground, n_text, key_shift, text_shares)
    n = q.shape[0]
    if ref_k.shape[:2] != q.shape[:2] or ref_k.shape != ref_v.shape or ref_k.shape[3] != q.shape[3]:
        raise ValueError(f"ref_k/ref_v must be (N, heads, T, head_dim) = {(*q.shape[:2], 'T', q.shape[3])}; got "
                         f"{tuple(ref_k.shape)}, {tuple(ref_v.shape)}")
    shared_k, shared_v = _shareable(k, v, foreground, n_text)
    out = torch.empty_like(q)
    for i in range(n):
        others = [j for j in range(n) if j != i and shared_k[j].shape[1]]
        group_k = [shared_k[j] if key_shift is None else key_shift(shared_k[j], roll_slot(i, j, n)) for j in others]
        group_v = [shared_v[j] for j in others]
        first = 0 if (text_shares or not others) else n_text
        if first:
            out[i, :, :first] = F.scaled_dot_product_attention(q[i, :, :first], torch.cat([k[i], ref_k[i]], 1),
                                                               torch.cat([v[i], ref_v[i]], 1))
        out[i, :, first:] = F.scaled_dot_product_attention(q[i, :, first:], torch.cat([k[i], *group_k, ref_k[i]], 1),
                                                           torch.cat([v[i], *group_v, ref_v[i]], 1))
    return out


def shared_reference_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                         foreground: Optional[torch.Tensor], ref_k: torch.Tensor, ref_v: torch.Tensor,
                                         ref_foreground: Optional[torch.Tensor] = None, n_text: int = 0,
                                         key_shift: Optional[KeyShift] = None,
                                         text_shares: bool = False) -> torch.Tensor:
    """The dense construction of :func:`shared_reference_attention`: keys ``[own | torch.roll(images, s),
    s=1..N-1 | every reference token]`` and one additive mask (N, 1, L, L + (N-1)·P + T), ALLOWED on own tokens,
    the other images' foreground (not for text queries unless ``text_shares``) and the references' foreground
    ``ref_foreground`` (N, T) bool (None: all T tokens), BLOCKED elsewhere. Memory quadratic in N; for tests."""
    _check(q, k, v, foreground, n_text)
    n, _, seq, _ = q.shape
    p = seq - n_text
    fg = torch.ones(n, p, dtype=torch.bool, device=q.device) if foreground is None else foreground.bool()
    ref_ok = (torch.ones(n, ref_k.shape[2], dtype=torch.bool, device=q.device) if ref_foreground is None
              else ref_foreground.bool())
    image_k, image_v = k[:, :, n_text:], v[:, :, n_text:]
    keys, values, key_fg = [k], [v], []
    for s in range(1, n):
        rolled = torch.roll(image_k, s, dims=0)
        keys.append(rolled if key_shift is None else key_shift(rolled, s))
        values.append(torch.roll(image_v, s, dims=0))
        key_fg.append(torch.roll(fg, s, dims=0))
    others = torch.cat(key_fg, dim=1) if n > 1 else fg.new_zeros(n, 0)
    allowed = torch.cat([torch.ones(n, seq, dtype=torch.bool, device=q.device), others, ref_ok], 1)
    allowed = allowed[:, None, :].repeat(1, seq, 1)  # (N, L, keys)
    if not text_shares:
        allowed[:, :n_text, seq:seq + others.shape[1]] = False  # own text never sees other images
    mask = torch.where(allowed, ALLOWED, BLOCKED).to(q.dtype)[:, None]
    return F.scaled_dot_product_attention(q, torch.cat([*keys, ref_k], 2), torch.cat([*values, ref_v], 2),
                                          attn_mask=mask)

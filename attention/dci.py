"""DCI's Dual-Branch Integration Module (Jin et al., ECCV 2024, §3.3 eqs. 3–5), as the official code computes it.

Per cross-attention layer and per head, on attention *probabilities* A (queries × text tokens):
  Ã = softmax_j(τ_tok·A[:, window])                 re-normalised over the word window (start token excluded)
  m1 = Σ_{j∈T(P)} Ã_P,  m2 = Σ_{j∈T(Pa)} Ã_Pa        eq. 3: T(P) = V* tokens and noun; T(Pa) = window minus noun
  a = gain·softmax_p(τ_sp·m)                        S_s: softmax over the layer's query pixels, gain 500
  w1 = σ(a1 − λ·a2), w2 = 1 − w1                    eq. 4: S_c over the stack (a1, λ·a2)
  O_P ← w1·O_P + w2·O_Pa                            eq. 5: per head, before the output projection
Upstream (jinjianRick/DCI_ICO ``src/model.py`` new_forward): τ_tok = τ_sp = 10, gain 500; λ = 0 still blends.
"""

from __future__ import annotations

from typing import Sequence

import torch

TOKEN_TEMPERATURE = 10.0
SPATIAL_TEMPERATURE = 10.0
GAIN = 500.0


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d) over the keys: (B, H, N, d) × (B, H, T, d) → (B, H, N, T), in float32."""
    scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
    return scores.softmax(-1)


def token_mass(probs: torch.Tensor, window: Sequence[int], tokens: Sequence[int],
               temperature: float = TOKEN_TEMPERATURE) -> torch.Tensor:
    """Eq. 3: Σ over ``tokens`` of softmax(τ·probs) re-normalised over the ``window`` positions → (..., N)."""
    window = list(window)
    picked = probs[..., window].mul(temperature).softmax(-1)
    inside = [window.index(t) for t in tokens]
    return picked[..., inside].sum(-1)


def spatial_map(mass: torch.Tensor, temperature: float = SPATIAL_TEMPERATURE, gain: float = GAIN) -> torch.Tensor:
    """S_s: gain·softmax of τ·mass over the query pixels (last axis)."""
    return gain * mass.mul(temperature).softmax(-1)


def concept_weight(a1: torch.Tensor, a2: torch.Tensor, strength: float) -> torch.Tensor:
    """Eq. 4's concept weight: the softmax over (a1, λ·a2) is σ(a1 − λ·a2)."""
    return torch.sigmoid(a1 - strength * a2)


def blend(out_concept: torch.Tensor, out_auxiliary: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Eq. 5 per head: (B, H, N, d) outputs, (B, H, N) concept weight; computed in float32, returned in the
    outputs' dtype (a bf16 weight would quantise small auxiliary shares away)."""
    w = w1.unsqueeze(-1).float()
    return (w * out_concept.float() + (1 - w) * out_auxiliary.float()).to(out_concept.dtype)


def dbim_weight(probs_concept: torch.Tensor, probs_auxiliary: torch.Tensor, concept_window, concept_tokens,
                auxiliary_window, auxiliary_tokens, strength: float, token_temperature: float = TOKEN_TEMPERATURE,
                spatial_temperature: float = SPATIAL_TEMPERATURE, gain: float = GAIN) -> torch.Tensor:
    """Eqs. 3–4: the concept branch's weight w1 (B, H, N) from both branches' (B, H, N, T) probabilities."""
    a1 = spatial_map(token_mass(probs_concept, concept_window, concept_tokens, token_temperature),
                     spatial_temperature, gain)
    a2 = spatial_map(token_mass(probs_auxiliary, auxiliary_window, auxiliary_tokens, token_temperature),
                     spatial_temperature, gain)
    return concept_weight(a1, a2, strength)


def dbim_reference(probs_concept, probs_auxiliary, out_concept, out_auxiliary, concept_length: int,
                   concept_tokens, auxiliary_length: int, auxiliary_noun, strength: float,
                   token_temperature=TOKEN_TEMPERATURE, spatial_temperature=SPATIAL_TEMPERATURE, gain=GAIN):
    """The official loop for tests: per sample and head, windows 1..length after the start token, m2 as the
    window's total minus the auxiliary noun's mass, and the explicit softmax over the stacked maps."""
    out = out_concept.clone()
    for b in range(probs_concept.shape[0]):
        for h in range(probs_concept.shape[1]):
            p = (probs_concept[b, h, :, 1:1 + concept_length] * token_temperature).softmax(-1)
            a = (probs_auxiliary[b, h, :, 1:1 + auxiliary_length] * token_temperature).softmax(-1)
            m1 = sum(p[:, j - 1] for j in concept_tokens)
            m2 = a.sum(-1) - sum(a[:, j - 1] for j in auxiliary_noun)
            s1 = gain * (m1 * spatial_temperature).softmax(0)
            s2 = gain * (m2 * spatial_temperature).softmax(0)
            w = torch.stack([s1, strength * s2]).softmax(0)
            out[b, h] = out_concept[b, h] * w[0, :, None] + out_auxiliary[b, h] * w[1, :, None]
    return out

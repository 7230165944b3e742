"""Family checks where the pack's nodes meet a model and its conditioning.

A conditioning encoded for another model family (SD1.5's 768-wide CLIP-L text on an SDXL model, SD conditioning
without ``pooled_output`` on Flux) otherwise fails deep inside the model with a raw tensor error. The model's
config says what it expects: the text width (UNet ``context_dim``, Flux ``context_in_dim``) and whether a pooled
vector is needed (SDXL's ``adm_in_channels``, Flux's ``vec_in_dim``).
"""

from __future__ import annotations

from typing import Iterable, Optional


def expected_text(model) -> tuple[str, Optional[int], Optional[int]]:
    """(family name, text width or None if unknown, pooled width: 0 = none needed, -1 = needed, size unknown)."""
    config = model.model.model_config
    unet = config.unet_config
    family = type(config).__name__
    if unet.get("image_model") == "flux":
        return family, unet.get("context_in_dim"), unet.get("vec_in_dim") or 0
    pooled = -1 if unet.get("adm_in_channels") and unet.get("num_classes") == "sequential" else 0
    return family, unet.get("context_dim"), pooled


def conditioning_problem(model, name: str, entries: Iterable[dict]) -> Optional[str]:
    """What is wrong with conditioning ``name`` for ``model``, or None. ``entries`` are the conditioning's dicts
    with the text under ``cross_attn`` (ComfyUI's ``convert_cond`` form, see :func:`as_entries`)."""
    family, width, pooled = expected_text(model)
    for entry in entries:
        text = entry.get("cross_attn")
        if width is not None and text is not None and text.shape[-1] != width:
            return (f"the {name} conditioning has {text.shape[-1]}-wide text features but this {family} model "
                    f"expects {width}: it was encoded for another model family. Encode the prompt with this "
                    f"model's text encoder (SynCD Tiny Demo Text Encode: the tiny model's family)")
        vector = entry.get("pooled_output")
        if pooled and vector is None:
            return (f"the {name} conditioning has no pooled_output, which this {family} model needs: it was "
                    f"encoded for another model family. Encode the prompt with this model's text encoder")
        if pooled > 0 and vector is not None and vector.shape[-1] != pooled:
            return (f"the {name} conditioning's pooled_output is {vector.shape[-1]} wide but this {family} model "
                    f"expects {pooled}: it was encoded for another model family")
    return None


def as_entries(conditioning) -> list[dict]:
    """A CONDITIONING (``[[text, extras], ...]``) as ``convert_cond`` dicts."""
    return [{**extras, "cross_attn": text} for text, extras in conditioning]


def check_conditioning(node_name: str, model, **conditionings) -> None:
    """Raise for the first CONDITIONING (by input name) that does not fit ``model``'s family."""
    for name, conditioning in conditionings.items():
        problem = None if conditioning is None else conditioning_problem(model, name, as_entries(conditioning))
        if problem:
            raise ValueError(f"{node_name}: {problem}")


def check_guider(node_name: str, guider) -> None:
    """Check a sampling guider's conditionings (``original_conds``) against its model, before the first step."""
    for name, entries in guider.original_conds.items():
        problem = conditioning_problem(guider.model_patcher, name, entries)
        if problem:
            raise ValueError(f"{node_name}: {problem}")

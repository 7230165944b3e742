"""Key names of the official SynCD checkpoints (nupurkmr9/syncd ``method/``), their LoRA pairs and the report.

* Flux ``pytorch_model.bin``: ``method/pipelines/flux_pipeline/model.py`` wraps the transformer with PEFT
  ``get_peft_model`` (rank 32, adapter ``default``), so keys read
  ``transformer.base_model.model.<module>.lora_{A,B}.default.weight`` (loaded back in ``method/sample_flux.py``).
* SDXL ``sdxl_finetuned_20k.ckpt``: ``method/pipelines/sdxl_pipeline/model.py`` adds a diffusers ``add_adapter``
  LoRA (rank 128) to ``attn1`` and trains the ``to_k_ip``/``to_v_ip`` of the IP-Adapter processor wrapped in
  ``RefAttnProc.attn_op``; ``method/main.py`` ``CUDACallback.on_save_checkpoint`` keeps only those keys.

Matching these keys against a model is the loaders' job; this module only parses and reports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

SDXL_LORA_KEY = re.compile(r"^(?:unet\.)?(?P<module>(?:down_blocks|up_blocks|mid_block)\..+\.attn1\.(?:to_q|to_k|"
                           r"to_v|to_out\.0))\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
SDXL_IP_KEY = re.compile(r"^(?:unet\.)?(?P<attn>(?:down_blocks|up_blocks|mid_block)\..+\.attn2)\.processor"
                         r"(?:\.attn_op)?\.to_(?P<kv>[kv])_ip(?:\.0)?\.weight$")
FLUX_LORA_KEY = re.compile(r"^(?:transformer\.)?(?:base_model\.model\.)?(?P<module>(?:single_)?transformer_blocks"
                           r"\.\d+\..+?)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
# Frozen base weights a full save may carry: PEFT ``base_layer`` weights, VAE, text and image encoders.
FROZEN_KEY = re.compile(r"^(?:(?:vae|text_encoder|text_encoder_2|tokenizer|image_encoder)\.|"
                        r"(?:unet|transformer)\.(?!.*lora_)(?!.*_ip\.))")


class UnmatchedKeysError(ValueError):
    pass


@dataclass
class CheckpointReport:
    family: str                    # "flux" | "sdxl"
    lora_modules: int = 0
    ip_layers: int = 0
    frozen_skipped: int = 0
    keys: int = 0
    unmatched: list = field(default_factory=list)

    def summary(self) -> str:
        text = f"SynCD {self.family} checkpoint: {self.lora_modules} LoRA modules"
        if self.family == "sdxl":
            text += f", {self.ip_layers} IP-Adapter to_k_ip/to_v_ip pairs"
        if self.frozen_skipped:
            text += f", {self.frozen_skipped} frozen base weights skipped"
        return text + f" ({self.keys} keys, 0 unmatched)"


def detect_family(sd: dict) -> str:
    """``"flux"`` or ``"sdxl"`` from the LoRA / IP key names; an error when neither or both are present."""
    flux = sum(1 for k in sd if FLUX_LORA_KEY.match(k))
    sdxl = sum(1 for k in sd if SDXL_LORA_KEY.match(k) or SDXL_IP_KEY.match(k))
    if flux and not sdxl:
        return "flux"
    if sdxl and not flux:
        return "sdxl"
    raise ValueError("SynCD checkpoint: found neither the Flux LoRA (transformer.base_model.model.*.lora_A/B) nor the "
                     "SDXL LoRA/IP-Adapter keys (unet.*.attn1.*.lora_A/B, *.attn2.processor.attn_op.to_k_ip); is "
                     "this an official SynCD checkpoint (pytorch_model.bin or sdxl_finetuned_20k.ckpt)?")


def lora_pairs(sd: dict, pattern: re.Pattern, report: CheckpointReport) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"A": down, "B": up}} of the keys ``pattern`` matches; a half pair is reported unmatched."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = pattern.match(key)
        if m:
            pairs.setdefault(m.group("module"), {})[m.group("ab")] = value
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            report.unmatched.append(f"{module}.lora_{'B' if 'A' in pair else 'A'} (missing)")
    return {k: v for k, v in pairs.items() if set(v) == {"A", "B"}}


def check_lora_shapes(module: str, pair: dict, out_features: int, in_features: int,
                      report: CheckpointReport) -> bool:
    """Whether B·A (lora_B (out, r) · lora_A (r, in)) fits an ``out_features``×``in_features`` weight; if not,
    the module is reported unmatched."""
    down, up = pair["A"], pair["B"]
    if down.ndim == 2 and up.ndim == 2 and up.shape[1] == down.shape[0] and up.shape[0] == out_features \
            and down.shape[1] == in_features:
        return True
    report.unmatched.append(f"{module} (lora_A {tuple(down.shape)}, lora_B {tuple(up.shape)} do not fit a "
                            f"{out_features}x{in_features} weight)")
    return False


def count_other_keys(sd: dict, patterns: list, report: CheckpointReport) -> None:
    """Keys no pattern took: frozen base weights are counted, anything else is unmatched."""
    for key in sd:
        if any(p.match(key) for p in patterns):
            continue
        if FROZEN_KEY.match(key):
            report.frozen_skipped += 1
        else:
            report.unmatched.append(f"{key} (unknown key)")


def raise_unmatched(report: CheckpointReport, what: str) -> None:
    """:class:`UnmatchedKeysError` listing (up to 20 of) the report's unmatched keys, if there are any."""
    if report.unmatched:
        shown = "\n  ".join(report.unmatched[:20])
        more = f"\n  ... and {len(report.unmatched) - 20} more" if len(report.unmatched) > 20 else ""
        raise UnmatchedKeysError(f"SynCD checkpoint: {len(report.unmatched)} keys do not match {what}:\n  {shown}"
                                 f"{more}\nUse the official SynCD checkpoint with its base model family.")

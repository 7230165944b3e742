"""Nodes that make the pack's workflows run on any machine: tiny seeded models (category SynCD/testing)."""

from __future__ import annotations

from comfy_api.latest import io

from ..nodes import choices
from ..nodes.patch_kit import ENCODED_TOKENS
from ..nodes.prompt_batch import NODE as PROMPT_BATCH
from ..nodes.prompt_batch import PER_IMAGE_TOOLTIP, PROMPTS_OUTPUT_TOOLTIP, TEXT_TOOLTIP, chosen_lines
from . import tiny_models
from .identity_models import SynCDTinyDemoScoreModel, SynCDToyWorldScoreModel
from .toy_customization import SynCDToyWorldCheckpoint, SynCDToyWorldCLIPVision, SynCDToyWorldIPAdapter
from .toy_model import SynCDToyWorldMeshViews, SynCDToyWorldModel, SynCDToyWorldReferences


def family_input(tooltip: str):
    return io.Combo.Input("family", options=list(tiny_models.FAMILIES), default="sd15", tooltip=tooltip)


class SynCDTinyDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDTinyDemoModel",
            display_name="SynCD Tiny Demo Model",
            category="SynCD/testing",
            description="A real SD1.5, SDXL, Flux or Qwen-Image architecture at tiny width with seeded random weights, "
                        "plus a matching tiny VAE. For trying workflows without checkpoints: images are noise-like.",
            inputs=[
                family_input("Which ComfyUI model class to build: sd15, sdxl (UNets), flux or qwen_image (DiTs; "
                             "Qwen-Image with a tiny Wan 2.1 VAE)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the random weights; the same seed gives the same model."),
                io.Int.Input("width", default=32, min=16, max=512, step=16,
                             tooltip="Channel width (UNet model_channels, multiple of 32; Flux/Qwen-Image hidden "
                                     "size, multiple of 16)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Vae.Output(display_name="VAE"),
            ],
        )

    @classmethod
    def validate_inputs(cls, family=None):
        return choices.check(cls, family=family)

    @classmethod
    def execute(cls, family: str, seed: int, width: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_models.build_model(family, seed, width), tiny_models.build_vae(family, seed))


class SynCDTinyDemoTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDTinyDemoTextEncode",
            display_name="SynCD Tiny Demo Text Encode",
            category="SynCD/testing",
            description="CONDITIONING for the tiny demo models without a text encoder: ComfyUI's CLIP-L tokens "
                        "(Qwen-Image: its Qwen2.5-VL tokens) "
                        "mapped to seeded vectors, so token positions are real.",
            inputs=[
                family_input("Must match the SynCD Tiny Demo Model's family."),
                io.String.Input("text", multiline=True, default="a photo of a dog",
                                tooltip="The prompt; an empty text gives the empty-prompt conditioning."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the token embedding table (keep it equal for positive and negative)."),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING")],
        )

    @classmethod
    def validate_inputs(cls, family=None):
        return choices.check(cls, family=family)

    @classmethod
    def execute(cls, family: str, text: str, seed: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_models.encode_text(family, text, seed))


def encode_prompt_rows(family: str, lines: list[str], seed: int = 0) -> list:
    """The tiny counterpart of SynCD Per-Image Prompts: each line through :func:`tiny_models.encode_text`, one row
    per line; a row shorter than the longest gets the empty text's 77-token chunks appended (what the real node's
    padding encodes), and ``ENCODED_TOKENS`` records each line's token ids per row, so SynCD Masked Shared
    Attention can refuse a prompt that is not the one encoded."""
    import torch

    encoded = [tiny_models.encode_text(family, line, seed)[0] for line in lines]
    if len(encoded) == 1:
        return [encoded[0]]
    ctx = [cond for cond, _ in encoded]
    longest = max(c.shape[1] for c in ctx)
    if any(c.shape[1] != longest for c in ctx):
        if family == "qwen_image":
            raise ValueError(f"SynCD Tiny Demo {PROMPT_BATCH}: the tiny Qwen-Image encoding cannot pad prompts of "
                             f"different token lengths; give prompts of equal length (or use another family)")
        empty = tiny_models.encode_text(family, "", seed)[0][0]
        ctx = [torch.cat([c] + [empty] * ((longest - c.shape[1]) // empty.shape[1]), dim=1) for c in ctx]
    extras = dict(encoded[0][1])
    extras[ENCODED_TOKENS] = tuple(tuple(e[ENCODED_TOKENS]) for _, e in encoded)
    if "pooled_output" in extras:
        extras["pooled_output"] = torch.cat([e["pooled_output"] for _, e in encoded])
    return [[torch.cat(ctx), extras]]


class SynCDTinyDemoPromptBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDTinyDemoPromptBatch",
            display_name="SynCD Tiny Demo Per-Image Prompts",
            category="SynCD/testing",
            description="SynCD Per-Image Prompts for the tiny demo models without a text encoder: one row per line "
                        "of the tiny demo text encoding (ComfyUI's CLIP-L tokens mapped to seeded vectors).",
            inputs=[
                family_input("Must match the SynCD Tiny Demo Model's family."),
                io.String.Input("text", multiline=True, default="a photo of a dog on a beach\n"
                                "a photo of a dog in a forest\na photo of a dog in a living room",
                                tooltip=TEXT_TOOLTIP),
                io.Boolean.Input("prompt_per_image", default=True, tooltip=PER_IMAGE_TOOLTIP),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the token embedding table (keep it equal for positive and negative)."),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING"),
                     io.String.Output(display_name="prompts", tooltip=PROMPTS_OUTPUT_TOOLTIP)],
        )

    @classmethod
    def validate_inputs(cls, family=None):
        return choices.check(cls, family=family)

    @classmethod
    def execute(cls, family: str, text: str, prompt_per_image: bool, seed: int) -> io.NodeOutput:
        lines = chosen_lines(text, prompt_per_image)
        return io.NodeOutput(encode_prompt_rows(family, lines, seed), "\n".join(lines))


def demo_subject_images(count: int, size: int, seed: int):
    """``count`` views of one synthetic subject (a striped disc) on different random backgrounds, with its masks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    color = torch.rand(3, generator=g)
    images, masks = [], []
    for _ in range(count):
        cy, cx = (0.3 + 0.4 * torch.rand(2, generator=g)) * size
        radius = size * (0.2 + 0.1 * float(torch.rand(1, generator=g)))
        disc = ((ys - cy) ** 2 + (xs - cx) ** 2) <= radius ** 2
        stripes = ((xs - cx + ys - cy) / (radius / 3)).floor().remainder(2)[..., None]
        subject = color * (0.6 + 0.4 * stripes)
        background = torch.rand(3, generator=g) * 0.5 + 0.1 * torch.rand(size, size, 3, generator=g)
        images.append(torch.where(disc[..., None], subject, background))
        masks.append(disc.float())
    return torch.stack(images).clamp(0, 1), torch.stack(masks)


class SynCDTinyDemoReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDTinyDemoReferences",
            display_name="SynCD Tiny Demo Reference Images",
            category="SynCD/testing",
            description="Synthetic reference views of one subject (a striped disc) with foreground masks, so the "
                        "customization workflows run without input files. Replace with Load Image + masks.",
            inputs=[
                io.Int.Input("count", default=3, min=1, max=8, tooltip="How many reference views."),
                io.Int.Input("size", default=64, min=16, max=1024, step=8, tooltip="Width and height in pixels."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the subject's colour, positions and backgrounds."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE"), io.Mask.Output(display_name="MASK")],
        )

    @classmethod
    def execute(cls, count: int, size: int, seed: int) -> io.NodeOutput:
        return io.NodeOutput(*demo_subject_images(count, size, seed))


class SynCDTinyDemoIPAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..nodes.ip_adapter import IPAdapter

        return io.Schema(
            node_id="SynCDTinyDemoIPAdapter",
            display_name="SynCD Tiny Demo IP-Adapter",
            category="SynCD/testing",
            description="A tiny CLIP vision model and an IP-Adapter Plus fitted to a tiny demo UNet (seeded random "
                        "weights), so the SynCD SDXL workflow's global image feature runs without downloads. Replace "
                        "with Load CLIP Vision + SynCD IP-Adapter Loader.",
            inputs=[io.Model.Input("model", tooltip="The tiny demo SD1.5 or SDXL model the IP-Adapter is for."),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False)],
            outputs=[IPAdapter.Output(display_name="IPADAPTER"), io.ClipVision.Output(display_name="CLIP_VISION")],
        )

    @classmethod
    def execute(cls, model, seed: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_models.build_ip_adapter(model, seed), tiny_models.build_clip_vision(seed))


DEMO_NODES = [SynCDTinyDemoModel, SynCDTinyDemoTextEncode, SynCDTinyDemoReferences, SynCDTinyDemoIPAdapter,
              SynCDTinyDemoScoreModel, SynCDTinyDemoPromptBatch, SynCDToyWorldModel,
              SynCDToyWorldReferences, SynCDToyWorldMeshViews, SynCDToyWorldCheckpoint, SynCDToyWorldIPAdapter,
              SynCDToyWorldCLIPVision, SynCDToyWorldScoreModel]

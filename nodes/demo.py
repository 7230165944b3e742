"""Nodes that make the pack's workflows run on any machine: tiny seeded models (category SynCD/testing)."""

from __future__ import annotations

from comfy_api.latest import io

from . import tiny_models


class SynCDTinyDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDTinyDemoModel",
            display_name="SynCD Tiny Demo Model",
            category="SynCD/testing",
            description="A real SD1.5, SDXL or Flux architecture at tiny width with seeded random weights, "
                        "plus a matching tiny VAE. For trying workflows without checkpoints: images are noise-like.",
            inputs=[
                io.Combo.Input("family", options=list(tiny_models.FAMILIES), default="sd15",
                               tooltip="Which ComfyUI model class to build: sd15, sdxl (UNets) or flux (DiT)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the random weights; the same seed gives the same model."),
                io.Int.Input("width", default=32, min=16, max=512, step=16,
                             tooltip="Channel width (UNet model_channels, multiple of 32; Flux hidden size, multiple of 16)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Vae.Output(display_name="VAE"),
            ],
        )

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
                        "mapped to seeded vectors, so token positions are real.",
            inputs=[
                io.Combo.Input("family", options=list(tiny_models.FAMILIES), default="sd15",
                               tooltip="Must match the SynCD Tiny Demo Model's family."),
                io.String.Input("text", multiline=True, default="a photo of a dog",
                                tooltip="The prompt; an empty text gives the empty-prompt conditioning."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the token embedding table (keep it equal for positive and negative)."),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING")],
        )

    @classmethod
    def execute(cls, family: str, text: str, seed: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_models.encode_text(family, text, seed))

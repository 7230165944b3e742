"""Tiny scoring models for ``run --tiny`` and tests: transformers' real DINOv2 / CLIP vision / DINO ViT classes at tiny
width with seeded random weights, and a random LAION-style aesthetic head (category SynCD/testing)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..nodes import choices
from ..nodes.identity_score import ScoreModel, ScoreModelType

KINDS = ("dinov2", "clip", "dino")


def build_score_model(kind: str, seed: int = 0, aesthetic: bool = False) -> ScoreModel:
    """A tiny ``kind`` feature model (real transformers class, 2 layers, width 32, 224 px input) with seeded
    weights of std 0.3; ``aesthetic`` adds a random linear head (CLIP only)."""
    import transformers

    torch.manual_seed(seed)
    if kind == "dinov2":
        net = transformers.Dinov2Model(transformers.Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224,
            patch_size=14))
    elif kind == "clip":
        net = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
            patch_size=32, projection_dim=16))
    elif kind == "dino":
        net = transformers.ViTModel(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224,
            patch_size=16), add_pooling_layer=False)
    else:
        raise ValueError(f"SynCD Tiny Demo Score Model: kind {kind!r}; choose one of {', '.join(KINDS)}")
    with torch.no_grad():  # std 0.3 (not the default 0.02): different images then get clearly different features
        for p in net.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
    head = None
    if aesthetic:
        if kind != "clip":
            raise ValueError("SynCD Tiny Demo Score Model: the aesthetic head needs kind clip")
        head = torch.nn.Linear(16, 1)
        with torch.no_grad():  # scores spread around the paper's threshold 6
            head.weight.normal_(0, 2.0)
            head.bias.fill_(6.0)
        head.eval()
    return ScoreModel(net.eval(), kind, f"tiny-{kind}", head)


class SynCDTinyDemoScoreModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDTinyDemoScoreModel",
            display_name="SynCD Tiny Demo Score Model",
            category="SynCD/testing",
            description="A tiny random DINOv2, CLIP vision or DINO ViT model (transformers' real classes, seeded) "
                        "with an optional random aesthetic head, so scoring and dataset workflows run without "
                        "downloads (the scores are meaningless). Replace with SynCD Identity Model Loader.",
            inputs=[
                io.Combo.Input("model_kind", options=list(KINDS), default="dinov2",
                               tooltip="dinov2 (identity metrics, filter), clip (clip_i, aesthetic), dino."),
                io.Boolean.Input("aesthetic_head", default=False, tooltip="Add a random aesthetic head (clip)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False),
            ],
            outputs=[ScoreModelType.Output(display_name="SCORE_MODEL")],
        )

    @classmethod
    def validate_inputs(cls, model_kind=None):
        return choices.check(cls, model_kind=model_kind)

    @classmethod
    def execute(cls, model_kind: str, aesthetic_head: bool, seed: int) -> io.NodeOutput:
        return io.NodeOutput(build_score_model(model_kind, seed, aesthetic_head))


class SynCDToyWorldScoreModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDToyWorldScoreModel",
            display_name="SynCD Toy-World Score Model",
            category="SynCD/testing",
            description="The toy world's attribute reader (shipped, trained on toy renders: ≥ 95 % held-out "
                        "accuracy per attribute) as a score model: SynCD Identity Score's metric toy_identity "
                        "gives the share of shape, colour and texture a generated toy object and the references "
                        "are read to have alike (1 = the same toy identity). The toy world's stand-in for DINOv2.",
            inputs=[],
            outputs=[ScoreModelType.Output(display_name="SCORE_MODEL")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        from ..toyworld import reader

        return io.NodeOutput(ScoreModel(reader.shipped(), "toy_reader", "toy attribute reader"))

"""DCI nodes: DCIDualBranch (MODEL patch + the two prompts), DCIGuider (GUIDER), DCIWeightMaps (MASK)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..attention.dci import GAIN, SPATIAL_TEMPERATURE, TOKEN_TEMPERATURE
from ..core.dci_prompt import dual_branch_tokens
from ..core.tokens import clip_tokenizer
from . import wiring
from .dci import DCIConfig, DCIGuider as Guider, apply_dci, check_encoded
from .patch_kit import TOKENIZER

UPSTREAM_WINDOW = 0.3  # official code --agg_time (the paper's Ta = 0.15T)


class DCIDualBranch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCIDualBranch",
            display_name="DCI Dual-Branch",
            category="SynCD/dci",
            description="DCI (Jin et al., ECCV 2024): in the early steps a concept branch (your prompt with the "
                        "learned concept) and an auxiliary branch (the same prompt with an auxiliary noun instead) "
                        "are integrated in every text cross-attention layer, so the concept keeps its fidelity and "
                        "the scene follows the prompt. Builds the auxiliary prompt and both token sets from the "
                        "text. Sample with the DCI Guider; encode 'prompt' and 'auxiliary_prompt' for it.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.5, SDXL or Flux; usually fine-tuned on the concept (ICO)."),
                io.String.Input("prompt", multiline=True, default="a photo of a V* dog in times square",
                                tooltip="The concept prompt, exactly as encoded for the positive conditioning "
                                        "(the concept's tokens are located in it)."),
                io.String.Input("concept", default="V* dog",
                                tooltip="'V* <noun>' as written in the prompt: the concept token(s) and its noun, "
                                        "e.g. 'sks dog' or 'embedding:my_dog dog'. These tokens are T(P)."),
                io.String.Input("auxiliary_noun", default="dog",
                                tooltip="The noun that replaces the concept phrase in the auxiliary prompt, e.g. "
                                        "'dog' (may be several words, e.g. 'teddy bear')."),
                io.Float.Input("strength", default=0.0, min=-10.0, max=10.0, step=0.1,
                               tooltip="λ (typically −2 to 2): higher gives the auxiliary branch (prompt "
                                       "following) more weight, lower the concept (fidelity). 0 still blends, "
                                       "as upstream; to switch DCI off set window to 0."),
                io.Float.Input("window", default=UPSTREAM_WINDOW, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the 0..1000 timesteps, from the start, during which the "
                                       "branches are integrated (official code: 0.3; the paper: 0.15). The "
                                       "auxiliary branch costs one extra model pass per step inside it."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The CLIP that encodes the prompts, for the token positions. Not needed "
                                      "with the tiny demo text encoding."),
                io.Boolean.Input("include_end_tokens", default=False, optional=True,
                                 tooltip="Also re-softmax over the end token and the padding (upstream: only when "
                                         "its length arguments are set past the last word)."),
                io.Float.Input("token_temperature", default=TOKEN_TEMPERATURE, min=0.0, max=1000.0, step=0.1,
                               optional=True,
                               tooltip="Temperature of the re-softmax over the word window (upstream 10)."),
                io.Float.Input("spatial_temperature", default=SPATIAL_TEMPERATURE, min=0.0, max=1000.0, step=0.1,
                               optional=True,
                               tooltip="Temperature of the spatial softmax (upstream 10)."),
                io.Float.Input("gain", default=GAIN, min=0.0, max=100000.0, step=1.0, optional=True,
                               tooltip="Gain of the spatial maps (upstream 500)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.String.Output(display_name="prompt"),
                     io.String.Output(display_name="auxiliary_prompt")],
        )

    @classmethod
    def execute(cls, model, prompt, concept, auxiliary_noun, strength, window, clip=None, include_end_tokens=False,
                token_temperature=TOKEN_TEMPERATURE, spatial_temperature=SPATIAL_TEMPERATURE,
                gain=GAIN) -> io.NodeOutput:
        if clip is not None:
            tokenize = clip_tokenizer(clip)
        elif model.model_options.get(TOKENIZER) is not None:
            tokenize = model.model_options[TOKENIZER]
        else:
            raise ValueError("DCI Dual-Branch needs the CLIP that encodes the prompts (to find the concept's "
                             "tokens); connect it to the 'clip' input")
        tokens = dual_branch_tokens(tokenize, prompt, concept, auxiliary_noun, include_end_tokens)
        config = DCIConfig(tokens, strength, window, token_temperature, spatial_temperature, gain,
                           prompt_tokens=tuple(tokenize(prompt)),
                           auxiliary_prompt_tokens=tuple(tokenize(tokens.auxiliary_prompt)))
        return io.NodeOutput(apply_dci(model, config), prompt, tokens.auxiliary_prompt)


class DCIGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCIGuider",
            display_name="DCI Guider",
            category="SynCD/dci",
            description="CFG for a DCI Dual-Branch model (SamplerCustomAdvanced): inside the window the auxiliary "
                        "branch runs from its own noise with the auxiliary prompt, shares the concept branch's "
                        "unconditional prediction (as upstream) and is dropped afterwards.",
            inputs=[io.Model.Input("model", tooltip="The MODEL of DCI Dual-Branch."),
                    io.Conditioning.Input("positive", tooltip="The concept prompt, encoded."),
                    io.Conditioning.Input("auxiliary", tooltip="The auxiliary prompt of DCI Dual-Branch, encoded."),
                    io.Conditioning.Input("negative"),
                    io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1, round=0.01,
                                   tooltip="Guidance scale of both branches (upstream 6).")],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, auxiliary, negative, cfg) -> io.NodeOutput:
        wiring.check_conditioning("DCI Guider", model, positive=positive, auxiliary=auxiliary, negative=negative)
        for name, conditioning in (("positive", positive), ("auxiliary", auxiliary)):
            spatial = [k for k in ("area", "mask") for _, extras in conditioning if k in extras]
            if len(conditioning) != 1 or spatial:
                raise ValueError(f"DCI Guider: the {name} conditioning must be one plain text encoding (it has "
                                 f"{len(conditioning)} entries{', with ' + '/'.join(spatial) if spatial else ''}); "
                                 f"DCI blends one concept prompt with one auxiliary prompt over the whole image")
        guider = Guider(model, cfg)
        check_encoded(guider.config, positive, auxiliary)
        guider.set_conds(positive, auxiliary, negative)
        return io.NodeOutput(guider)


class DCIWeightMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCIWeightMaps",
            display_name="DCI Weight Maps",
            category="SynCD/dci",
            description="The auxiliary branch's weight (1 − w1, mean over heads and cross-attention layers) at every "
                        "step inside the window, as in the paper's Fig. 11: white = taken from the auxiliary "
                        "branch. One mask per step and image, step-major (samplers that evaluate the model "
                        "several times per step: the step's last evaluation).",
            inputs=[io.Guider.Input("guider", tooltip="The DCI Guider that sampled."),
                    io.Latent.Input("samples", tooltip="The sampler's output, so this runs after sampling."),
                    io.Int.Input("scale", default=8, min=1, max=16,
                                 tooltip="Upscaling from the latent grid (8 = image size for SD and Flux).")],
            outputs=[io.Mask.Output(display_name="MASK")],
        )

    @classmethod
    def execute(cls, guider, samples, scale) -> io.NodeOutput:
        maps = getattr(guider, "weight_maps", None)
        if maps is None:
            raise ValueError("DCI Weight Maps: connect the DCI Guider that sampled")
        if not maps:
            h, w = samples["samples"].shape[-2:]
            return io.NodeOutput(torch.zeros(1, h * scale, w * scale))
        stacked = torch.cat(maps).unsqueeze(1)
        return io.NodeOutput(F.interpolate(stacked, scale_factor=scale, mode="nearest")[:, 0].clamp(0, 1))

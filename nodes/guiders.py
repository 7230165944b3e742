"""Guiders for SamplerCustomAdvanced: SynCD's normalized text + image guidance (eq. 4) and JeDi's image guidance
(eq. 3), plus one all-in-one sampler node.

Each guider evaluates its branches with one ``calc_cond_batch`` call (ComfyUI batches them into as few forward
passes as memory allows) and tells the patches each branch's role (``layout.UNCOND``/``IMAGE``/``FULL``, by cond
uuid) through a ``patch_kit.ForwardState`` template in the model options. ComfyUI's pre-CFG and post-CFG hooks run as in
``sampling_function``, with the positive branch first and the negative second, as they expect. Eq. 4, Brooks et al.
and JeDi eq. 3 are computed on x − x̂₀ (noise-like, as ComfyUI's cfg functions do): their coefficients sum to 1, so
this equals combining ε or v. Guidance rescale is not affine-invariant and runs on v (see ``_rescale``).
"""

from __future__ import annotations

import math

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import node_helpers
from comfy_api.latest import io

from ..attention.guidance import (brooks_guidance, guidance_rescale, jedi_image_guidance, linear_image_scale,
                                  normalized_guidance)
from . import choices, wiring
from . import patch_kit as kit
from .layout import FULL, IMAGE, UNCOND

COMBINATIONS = {"normalized": normalized_guidance, "brooks": brooks_guidance}
AUTO_ON_OFF = ("auto", "on", "off")


def _branch_options(model_options: dict, branches: dict, negative=None) -> tuple[dict, kit.GuidanceBranches]:
    """Model options that tell the patches each cond's branch role: {role: conds} -> roles by uuid."""
    guidance = kit.GuidanceBranches(roles={c["uuid"]: role for role, conds in branches.items() for c in conds or ()},
                                    negative=negative)
    options = model_options.copy()
    to = dict(options.get("transformer_options", {}))
    to[kit.KEY] = kit.ForwardState(guidance=guidance)
    options["transformer_options"] = to
    return options, guidance


def _calc(inner_model, conds, x, timestep, model_options):
    """``calc_cond_batch``; for a (cond, uncond) pair the model's ``sampler_calc_cond_batch_function`` hook instead,
    as ``sampling_function`` does (hooks such as SkipLayerGuidanceDiTSimple unpack exactly two conds; ComfyUI's own
    three-cond guider calls ``calc_cond_batch`` directly too)."""
    if "sampler_calc_cond_batch_function" in model_options and len(conds) == 2:
        return model_options["sampler_calc_cond_batch_function"](
            {"conds": conds, "input": x, "sigma": timestep, "model": inner_model, "model_options": model_options})
    return comfy.samplers.calc_cond_batch(inner_model, conds, x, timestep, model_options)


def _pre_cfg(model_options, conds, outs, scale, x, timestep, inner_model):
    for fn in model_options.get("sampler_pre_cfg_function", []):
        outs = fn({"conds": conds, "conds_out": outs, "cond_scale": scale, "timestep": timestep, "input": x,
                   "sigma": timestep, "model": inner_model, "model_options": model_options})
    return outs


def _post_cfg(model_options, denoised, cond, uncond, cond_out, uncond_out, scale, x, timestep, inner_model):
    for fn in model_options.get("sampler_post_cfg_function", []):
        denoised = fn({"denoised": denoised, "cond": cond, "uncond": uncond, "cond_scale": scale,
                       "model": inner_model, "uncond_denoised": uncond_out, "cond_denoised": cond_out,
                       "sigma": timestep, "model_options": model_options, "input": x})
    return denoised


def check_scale(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (got {value}); a negative guidance scale pushes away from the "
                         f"condition")


class NormalizedGuider(comfy.samplers.CFGGuider):
    """SynCD eq. 4: branches unconditional (negative text, no references), image (negative text with references)
    and full (positive text with references); image scale linear from ``image_scale_start`` to ``image_scale_end``
    over the steps.

    Flux follows the official Flux pipeline (nupurkmr9/syncd ``method/pipelines/flux_pipeline/pipeline.py``) by
    default: no guidance on the first step (the full branch alone), and the norms taken over the whole canvas, the
    references' tokens included (their predictions come from the reference pass)."""

    def __init__(self, model_patcher, text_scale: float, image_scale_start: float, image_scale_end: float,
                 combination: str = "normalized", rescale: float = 0.0, first_step_guidance: str = "auto",
                 norm_includes_references: str = "auto"):
        super().__init__(model_patcher)
        for name, value in (("text_scale", text_scale), ("image_scale_start", image_scale_start),
                            ("image_scale_end", image_scale_end), ("guidance_rescale", rescale)):
            check_scale(name, value)
        for name, value, options in (("combination", combination, COMBINATIONS),
                                     ("first_step_guidance", first_step_guidance, AUTO_ON_OFF),
                                     ("norm_includes_references", norm_includes_references, AUTO_ON_OFF)):
            choices.require("SynCD Normalized Text+Image Guider", name, value, options)
        self.text_scale, self.image_scale_start, self.image_scale_end = text_scale, image_scale_start, image_scale_end
        self.combination, self.rescale = combination, rescale
        flux = kit.is_joint(model_patcher.get_model_object("diffusion_model"))  # Qwen-Image follows Flux's in-context
        self.first_step_guidance = first_step_guidance == "on" or (first_step_guidance == "auto" and not flux)
        self.norm_includes_references = norm_includes_references == "on" or (norm_includes_references == "auto"
                                                                             and flux)
        self.image_scales: list[tuple[int, float]] = []  # (step, image scale) of every evaluation, for inspection
        self.negative = None

    def set_conds(self, positive, negative):
        self.negative = negative
        image = node_helpers.conditioning_set_values(negative, {"prompt_type": "negative"})
        self.inner_set_conds({"positive": positive, "image": image, "negative": negative})

    def image_scale(self, step: int, steps: int) -> float:
        scale = linear_image_scale(self.image_scale_start, self.image_scale_end, step, steps)
        self.image_scales.append((step, scale))
        return scale

    def sample(self, *args, **kwargs):
        self.image_scales = []  # a guider cached by ComfyUI is sampled again
        return super().sample(*args, **kwargs)

    def unguided(self, timestep) -> bool:
        """Upstream Flux guides from its second step: the first step of a full schedule (σ = σ_max) is unguided."""
        sigma_max = float(self.inner_model.model_sampling.sigma_max)
        return not self.first_step_guidance and float(timestep.max()) >= sigma_max * (1 - 1e-4)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        to = model_options.get("transformer_options", {})
        step = kit.current_step({"sample_sigmas": to.get("sample_sigmas"), "sigmas": timestep})
        positive, negative, image = (self.conds.get(k) for k in ("positive", "negative", "image"))
        if self.unguided(timestep):  # the text+image branch alone, as ComfyUI's cfg-1 path
            keep_uncond = model_options.get("disable_cfg1_optimization", False)
            conds = [positive, negative if keep_uncond else None]
            options, _ = _branch_options(model_options, {FULL: positive, UNCOND: conds[1]}, self.negative)
            outs = _pre_cfg(options, conds, _calc(self.inner_model, conds, x, timestep, options), 1.0, x, timestep,
                            self.inner_model)
            return _post_cfg(options, outs[0], conds[0], conds[1], outs[0], outs[1], 1.0, x, timestep,
                             self.inner_model)
        # [positive, negative, …]: the order ComfyUI's pre-CFG hooks (APG, TCFG, FreSca) read as (cond, uncond).
        conds = [positive, negative, image]
        options, guidance = _branch_options(model_options, {FULL: positive, UNCOND: negative, IMAGE: image},
                                            self.negative)
        outs = _calc(self.inner_model, conds, x, timestep, options)
        outs = _pre_cfg(options, conds, outs, self.text_scale, x, timestep, self.inner_model)
        full, uncond, image_out = (x - o for o in outs)
        canvas = None
        refs = guidance.reference_outputs
        if self.norm_includes_references and refs:
            # Every sample shares the references, so their differences add the same amount to each sample's norm.
            text_free = refs.get(kit.NEGATIVE_TEXT, refs.get(kit.REFERENCE_TEXT))
            canvas = (text_free, text_free, refs.get(kit.REFERENCE_TEXT, text_free))  # refs' uncond, image, full
        guided = COMBINATIONS[self.combination](uncond, image_out, full, self.image_scale(step, kit.sampling_steps(to)),
                                                self.text_scale, canvas=canvas)
        if self.rescale:
            guided = self._rescale(x, timestep, guided, full)
        return _post_cfg(options, x - guided, conds[0], conds[1], outs[0], outs[1], self.text_scale, x, timestep,
                         self.inner_model)

    def _rescale(self, x, sigma, guided, full):
        """Guidance rescale on the model's own prediction: v for SD-style models (as ComfyUI's RescaleCFG; the
        official SynCD SDXL model is v-prediction), x − x̂₀ = σ·v for flow models."""
        sampling = self.inner_model.model_sampling
        if isinstance(sampling, comfy.model_sampling.CONST):
            return guidance_rescale(guided, full, self.rescale)
        s = sigma.view(-1, *([1] * (x.dim() - 1)))
        scale = (s ** 2 + sampling.sigma_data ** 2) ** 0.5
        x_in = x * sampling.sigma_data ** 2 / scale ** 2

        def to_v(noise_like):
            return (x_in - (x - noise_like)) * scale / (s * sampling.sigma_data)

        v = guidance_rescale(to_v(guided), to_v(full), self.rescale)
        return x - (x_in - v * s * sampling.sigma_data / scale)


class JeDiGuider(comfy.samplers.CFGGuider):
    """JeDi eq. 3: ε̃ = ε⁰ + λ(ε − ε⁰) with ε⁰ from the negative text and no reference access (coupled attention or
    reference features off)."""

    def __init__(self, model_patcher, image_scale: float):
        super().__init__(model_patcher)
        check_scale("image_scale", image_scale)
        self.image_scale = image_scale

    def set_conds(self, positive, negative):
        self.inner_set_conds({"positive": positive, "negative": negative})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        conds = [self.conds.get("positive"), self.conds.get("negative")]  # (cond, uncond), as pre-CFG hooks expect
        if math.isclose(self.image_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
            conds[1] = None  # λ = 1 returns ε: skip ε⁰, as CFGGuider skips the uncond at cfg 1
        options, _ = _branch_options(model_options, {FULL: conds[0], UNCOND: conds[1]})
        outs = _calc(self.inner_model, conds, x, timestep, options)
        outs = _pre_cfg(options, conds, outs, self.image_scale, x, timestep, self.inner_model)
        if conds[1] is None:
            outs[1] = outs[0]
        guided = jedi_image_guidance(x - outs[1], x - outs[0], self.image_scale)
        return _post_cfg(options, x - guided, conds[0], conds[1], outs[0], outs[1], self.image_scale, x, timestep,
                         self.inner_model)


# --- Nodes -------------------------------------------------------------------------------------------------------

COMBINATION_TOOLTIP = ("normalized: SynCD eq. 4, the larger guidance vector shrunk to the norm of the smaller "
                       "(avoids overexposure). brooks: the un-normalized InstructPix2Pix combination, to compare.")


def _normalized_inputs() -> list:
    return [
        io.Float.Input("text_scale", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="s_txt: strength of the text guidance (upstream 7.5)."),
        io.Float.Input("image_scale_start", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="s_img on the first step (upstream SDXL: 8 for background changes, lower for "
                               "property/shape changes)."),
        io.Float.Input("image_scale_end", default=13.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="s_img on the last step; linear in between (upstream: start + 5). May be below start."),
        io.Combo.Input("combination", options=list(COMBINATIONS), default="normalized", tooltip=COMBINATION_TOOLTIP),
        io.Float.Input("guidance_rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Guidance rescale φ (Lin et al.): 0 is off; SynCD compares 0.7 with Brooks et al."),
        io.Combo.Input("first_step_guidance", options=list(AUTO_ON_OFF), default="auto",
                       tooltip="Guidance on the first step. auto: as upstream, on for SD1.5/SDXL, off for Flux (the "
                               "official Flux pipeline guides from step 1; step 0 is the text+image branch alone)."),
        io.Combo.Input("norm_includes_references", options=list(AUTO_ON_OFF), default="auto",
                       tooltip="Whether eq. 4's norms also count the references' tokens. auto: as upstream, on for "
                               "Flux (norms over the whole packed canvas), off for SD1.5/SDXL (target only)."),
    ]


class SynCDNormalizedGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDNormalizedGuider",
            display_name="SynCD Normalized Text+Image Guider",
            category="SynCD/sampling",
            description="SynCD eq. 4 for SamplerCustomAdvanced: three evaluations per step (negative text without "
                        "references, negative text with references, positive text with references). Use a model "
                        "patched by SynCD Apply References (or SynCD Masked Shared Attention).",
            inputs=[io.Model.Input("model", tooltip="A model with SynCD reference injection applied."),
                    io.Conditioning.Input("positive", tooltip="The prompt for the target image."),
                    io.Conditioning.Input("negative", tooltip="The empty/negative text, used by the unconditional "
                                                              "and the image branch."),
                    *_normalized_inputs()],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def validate_inputs(cls, combination=None, first_step_guidance=None, norm_includes_references=None):
        return choices.check(cls, combination=combination, first_step_guidance=first_step_guidance,
                             norm_includes_references=norm_includes_references)

    @classmethod
    def execute(cls, model, positive, negative, text_scale, image_scale_start, image_scale_end, combination,
                guidance_rescale, first_step_guidance="auto", norm_includes_references="auto") -> io.NodeOutput:
        wiring.check_conditioning(cls.define_schema().display_name, model, positive=positive, negative=negative)
        guider = NormalizedGuider(model, text_scale, image_scale_start, image_scale_end, combination, guidance_rescale,
                                  first_step_guidance, norm_includes_references)
        guider.set_conds(positive, negative)
        return io.NodeOutput(guider)


class JeDiImageGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JeDiImageGuider",
            display_name="JeDi Image Guider",
            category="SynCD/sampling",
            description="JeDi eq. 3 for SamplerCustomAdvanced: ε⁰ + λ(ε − ε⁰), where ε⁰ uses the negative text and "
                        "no reference access (coupled attention or reference features switched off for it).",
            inputs=[io.Model.Input("model", tooltip="A model patched by SynCD Masked Shared Attention (coupled "
                                                    "attention over the joint image set) or SynCD Apply References."),
                    io.Conditioning.Input("positive"),
                    io.Conditioning.Input("negative", tooltip="Null text for ε⁰ (encode an empty prompt)."),
                    io.Float.Input("image_scale", default=3.0, min=0.0, max=100.0, step=0.1, round=0.01,
                                   tooltip="λ: guidance towards both text and references.")],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, image_scale) -> io.NodeOutput:
        wiring.check_conditioning("JeDi Image Guider", model, positive=positive, negative=negative)
        guider = JeDiGuider(model, image_scale)
        guider.set_conds(positive, negative)
        return io.NodeOutput(guider)


class SynCDCustomizationSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDCustomizationSampler",
            display_name="SynCD Customization Sampler",
            category="SynCD/sampling",
            description="KSampler-like all-in-one node: samples with SynCD's normalized text+image guidance.",
            inputs=[io.Model.Input("model", tooltip="A model with SynCD reference injection applied."),
                    io.Conditioning.Input("positive"),
                    io.Conditioning.Input("negative", tooltip="The empty/negative text."),
                    io.Latent.Input("latent_image"),
                    io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                    io.Int.Input("steps", default=50, min=1, max=10000),
                    io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler_ancestral"),
                    io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal"),
                    *_normalized_inputs()],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, scheduler=None, combination=None, first_step_guidance=None,
                        norm_includes_references=None):
        return choices.check(cls, sampler_name=sampler_name, scheduler=scheduler, combination=combination,
                             first_step_guidance=first_step_guidance, norm_includes_references=norm_includes_references)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, sampler_name, scheduler, text_scale,
                image_scale_start, image_scale_end, combination, guidance_rescale, first_step_guidance="auto",
                norm_includes_references="auto") -> io.NodeOutput:
        wiring.check_conditioning(cls.define_schema().display_name, model, positive=positive, negative=negative)
        guider = NormalizedGuider(model, text_scale, image_scale_start, image_scale_end, combination, guidance_rescale,
                                  first_step_guidance, norm_includes_references)
        guider.set_conds(positive, negative)
        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
        callback = latent_preview.prepare_callback(model, steps)
        out = guider.sample(noise, samples, comfy.samplers.sampler_object(sampler_name), sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        latent["samples"] = out.to(comfy.model_management.intermediate_device())
        return io.NodeOutput(latent)

"""SynCD reference-feature injection and the guiders on tiny real SD1.5, SDXL and Flux models inside ComfyUI."""

import pytest
import torch

pytestmark = pytest.mark.comfy



@pytest.fixture(scope="module")
def models(tiny, families):
    return {f: tiny.build_model(f, seed=3, width=32) for f in families}


@pytest.fixture(scope="module")
def vaes(tiny, families):
    return {f: tiny.build_vae(f, seed=1) for f in families}


def upstream_layer_mask(masks, latent_grid, dilation, layer_grid):
    """Upstream's reference masks, computed independently (nupurkmr9/syncd method/data/data.py and the SDXL
    processor): binarize > 0, bring to the latent grid (a cell with any foreground pixel), conv with a ones box
    (padding 'same') clamped to [0, 1], nearest to the layer grid; a token is a key where the value is > 0."""
    import torch.nn.functional as F

    binary = (masks > 0).float()[:, None]
    h, w = latent_grid
    cells = binary.unfold(2, 64 // h, 64 // h).unfold(3, 64 // w, 64 // w).amax((-1, -2))
    grown = F.conv2d(cells, torch.ones(1, 1, dilation, dilation), padding="same").clamp(0, 1)
    return (F.interpolate(grown, size=layer_grid, mode="nearest") > 0).flatten(1)


def ref_images(n=2, seed=0):
    return torch.rand(n, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def references(vae, n=2, masks=None):
    from comfyui_syncd.nodes.reference_nodes import encode_references

    return encode_references(vae, ref_images(n), masks)


def inject(tiny, family, model, refs, mode="auto", start=0.0, end=1.0, **kw):
    """(patched model, run) through the node's own path (percent → sigma) and the run for counting passes."""
    from comfyui_syncd.nodes.reference_injection import ReferenceConfig, apply_reference_injection

    sampling = model.get_model_object("model_sampling")
    config = ReferenceConfig(refs, tiny.encode_text(family, "photo of a dog"), mode, 0,
                             sampling.percent_to_sigma(start), sampling.percent_to_sigma(end), **kw)
    return apply_reference_injection(model, config)


def noise_for(tiny, family, n=2, seed=0):
    return torch.randn(n, tiny.LATENT_CHANNELS[family], 8, 8, generator=torch.Generator().manual_seed(seed))


def conds(tiny, family):
    return tiny.encode_text(family, "a photo of a dog on the beach"), tiny.encode_text(family, "")


def ksample(model, tiny, family, noise, steps=2, cfg=4.0, model_options=None):
    import comfy.sample

    if model_options:
        model = model.clone()
        model.model_options.update(model_options)
    pos, neg = conds(tiny, family)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, torch.zeros_like(noise),
                               seed=0, disable_pbar=True)


def guided_sample(guider, model, noise, steps=3, model_options=None):
    import comfy.samplers

    if model_options:
        guider.model_options = {**guider.model_options, **model_options}
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()
    return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                         disable_pbar=True)


def normalized(model, tiny, family, **kw):
    from comfyui_syncd.nodes.guiders import NormalizedGuider

    args = {"text_scale": 7.5, "image_scale_start": 8.0, "image_scale_end": 13.0, **kw}
    guider = NormalizedGuider(model, args.pop("text_scale"), args.pop("image_scale_start"),
                              args.pop("image_scale_end"), **args)
    guider.set_conds(*conds(tiny, family))
    return guider






# --- Injection ---------------------------------------------------------------------------------------------------

def test_references_change_the_output(tiny, models, vaes, family):
    noise = noise_for(tiny, family)
    plain = ksample(models[family], tiny, family, noise)
    patched, run = inject(tiny, family, models[family], references(vaes[family]))
    out = ksample(patched, tiny, family, noise)
    assert (out - plain).abs().amax(dim=(1, 2, 3)).min() > 1e-6  # every target image of the batch is affected
    assert run.passes == [0, 1]


def test_zero_mask_references_change_nothing(tiny, models, vaes, family):
    """With masks in use (the SD default; on for Flux) references without foreground are invisible."""
    noise = noise_for(tiny, family)
    plain = ksample(models[family], tiny, family, noise)
    refs = references(vaes[family], masks=torch.zeros(2, 64, 64))
    patched, _ = inject(tiny, family, models[family], refs, use_masks="on")
    assert torch.equal(ksample(patched, tiny, family, noise), plain)
    default, _ = inject(tiny, family, models[family], refs)
    # upstream's Flux model attends to the whole references, unmasked: by default Flux ignores the masks
    assert torch.equal(ksample(default, tiny, family, noise), plain) == (family != "flux")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_keys_are_the_reference_foreground_tokens_of_each_layer(tiny, models, vaes, family):
    """Every self-attention layer's extra keys are the references' tokens under upstream's mask on this layer's grid
    (the key-side mask of eq. 1)."""
    masks = torch.zeros(2, 64, 64)
    masks[0, :32, :48] = 1
    masks[1, 17:, :] = 1
    masks[1, 40, 5] = 0.1  # a stray pixel: foreground once binarized (> 0), grown by the dilation
    patched, run = inject(tiny, family, models[family], references(vaes[family], masks=masks))
    captured = []
    patched = patched.clone()
    patched.set_model_sampler_post_cfg_function(  # after the step's evaluation, while its features exist
        lambda a: captured.append({layer: (run.unet_tokens(layer).shape[1], run.grids[layer])
                                   for layer in run.features}) or a["denoised"])
    ksample(patched, tiny, family, noise_for(tiny, family), steps=1)
    (tokens,) = captured
    assert tokens and any(count > 0 for count, _ in tokens.values())
    for layer, (count, grid) in tokens.items():
        assert count == int(upstream_layer_mask(masks, (8, 8), 3, grid).sum()), layer


def test_one_reference_pass_per_step_for_all_branches_and_layouts(tiny, models, vaes, family, separate_passes,
                                                                 alternating_passes):
    patched, run = inject(tiny, family, models[family], references(vaes[family], n=3))
    for layout in (patched, separate_passes(patched, reverse=True), alternating_passes(patched)):
        guided_sample(normalized(layout, tiny, family), layout, noise_for(tiny, family), steps=3)
        assert run.passes == [0, 1, 2]


def test_layouts_give_the_same_result(tiny, models, vaes, family, separate_passes, alternating_passes):
    patched, _ = inject(tiny, family, models[family], references(vaes[family]))
    noise = noise_for(tiny, family)
    joint = guided_sample(normalized(patched, tiny, family), patched, noise)
    for layout in (separate_passes(patched, reverse=True), alternating_passes(patched)):
        other = guided_sample(normalized(layout, tiny, family), layout, noise)
        torch.testing.assert_close(other, joint, rtol=1e-4, atol=1e-4)
    # plain CFG (every branch sees the references): one pass vs separate passes
    torch.testing.assert_close(ksample(separate_passes(patched, reverse=True), tiny, family, noise),
                               ksample(patched, tiny, family, noise), rtol=1e-4, atol=1e-4)


def test_cfg1_equals_the_conditional_branch_of_a_guided_run(tiny, models, vaes, family):
    """KSampler at cfg 1 evaluates only the positive chunk; JeDi's guider at λ = 1 evaluates [ε⁰ (blind), ε] in one
    batch and returns ε: both must give the same sample."""
    from comfyui_syncd.nodes.guiders import JeDiGuider

    patched, _ = inject(tiny, family, models[family], references(vaes[family]))
    noise = noise_for(tiny, family)
    batches = []
    probe = patched.clone()
    probe.set_model_unet_function_wrapper(lambda apply, a: batches.append(list(a["cond_or_uncond"]))
                                          or apply(a["input"], a["timestep"], **a["c"]))
    guider = JeDiGuider(probe, 1.0)
    guider.set_conds(*conds(tiny, family))
    joint = guided_sample(guider, probe, noise, steps=2, model_options={"disable_cfg1_optimization": True})
    assert batches == [[1, 0], [1, 0]]  # both branches in one forward pass
    torch.testing.assert_close(joint, ksample(patched, tiny, family, noise, steps=2, cfg=1.0), rtol=1e-4, atol=1e-4)
    # without disable_cfg1_optimization λ = 1 skips ε⁰
    batches.clear()
    guider = JeDiGuider(probe, 1.0)
    guider.set_conds(*conds(tiny, family))
    guided_sample(guider, probe, noise, steps=2)
    assert batches == [[0], [0]]


def test_injection_window(tiny, models, vaes, family):
    patched, run = inject(tiny, family, models[family], references(vaes[family]), start=0.5, end=1.0)
    ksample(patched, tiny, family, noise_for(tiny, family), steps=4)
    assert run.passes and run.passes[0] > 0  # no reference pass before start_percent


def test_reference_pass_sees_the_reference_conditioning_and_runs_without_grad_state(tiny, models, vaes):
    """The reference pass marks itself for other patches (the SynCD LoRA is off during it)."""
    import comfy.patcher_extension

    from comfyui_syncd.nodes.patch_kit import Phase, forward_state, in_reference_pass

    patched, _ = inject(tiny, "sd15", models["sd15"], references(vaes["sd15"], n=3))
    seen = []

    def probe(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kw):
        state = forward_state(transformer_options)
        seen.append((state.phase is Phase.REFERENCE, in_reference_pass(), x.shape[0], state.reference_rows))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    patched = patched.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "probe", probe)
    ksample(patched, tiny, "sd15", noise_for(tiny, "sd15"), steps=1)
    assert (True, True, 3, (0, 1, 2)) in seen          # the reference pass: one row per reference
    assert (False, False, 4, ()) in seen               # the target pass: cond + uncond of 2 latents


# --- Guiders -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("combination", ["normalized", "brooks"])
def test_guider_equals_the_formula_on_its_branch_outputs(tiny, models, vaes, family, combination):
    """Capture the three branch outputs with ComfyUI's pre-CFG hook, the references' own outputs of the step and the
    result with the post-CFG hook; recompute upstream's rule independently in float64: eq. 4 with per-sample norms
    (SD: over the target; Flux: over the whole canvas, the references' tokens included) and, for Flux, no guidance on
    the first step (the text+image branch alone)."""
    patched, run = inject(tiny, family, models[family], references(vaes[family]))
    patched = patched.clone()
    seen = []
    patched.set_model_sampler_pre_cfg_function(lambda a: seen.append({"outs": a["conds_out"], "x": a["input"]})
                                               or a["conds_out"])

    def post(a):
        seen[-1]["denoised"] = a["denoised"]
        seen[-1]["refs"] = {k: v.double() for k, v in run.outputs.items()}
        return a["denoised"]

    patched.set_model_sampler_post_cfg_function(post)
    guider = normalized(patched, tiny, family, combination=combination, rescale=0.0)
    guided_sample(guider, patched, noise_for(tiny, family), steps=3)
    assert len(seen) == 3
    flux = family == "flux"
    if flux:  # step 0 is the full branch alone
        torch.testing.assert_close(seen[0]["denoised"], seen[0]["outs"][0])
        seen = seen[1:]
    assert len(seen) == len(guider.image_scales)
    for (step, s_img), record in zip(guider.image_scales, seen):
        x = record["x"].double()
        full, unc, img = (x - o.double() for o in record["outs"])  # positive first, as pre-CFG hooks expect
        d_img, d_txt = img - unc, full - img
        if combination == "normalized":
            # the references' outputs: text-free branches see them under the negative text, the full branch under
            # the reference prompt
            ref_img = 0.0  # the uncond and image branches' references are alike (same text, no target): Δ = 0
            ref_txt = (record["refs"]["reference"] - record["refs"]["negative"]).pow(2).sum() if flux else 0.0
            for b in range(x.shape[0]):
                n_img = (d_img[b].pow(2).sum() + ref_img).sqrt()
                n_txt = (d_txt[b].pow(2).sum() + ref_txt).sqrt()
                m = min(n_img, n_txt)
                d_img[b] *= min(1.0, float(m / n_img))
                d_txt[b] *= min(1.0, float(m / n_txt))
            want = img + s_img * d_img + 7.5 * d_txt
        else:
            want = unc + s_img * d_img + 7.5 * d_txt
        torch.testing.assert_close((x - record["denoised"].double()), want, rtol=1e-4, atol=1e-4)
    if flux:
        assert guider.image_scales == [(1, 10.5), (2, 13.0)]
    else:
        assert guider.image_scales == [(0, 8.0), (1, 10.5), (2, 13.0)]


def test_flux_norms_count_the_reference_tokens_and_step_zero_is_unguided_by_default(tiny, models, vaes):
    """The Flux defaults differ from the target-only, every-step rule (they are not no-ops), and 'off'/'on' give it."""
    patched, _ = inject(tiny, "flux", models["flux"], references(vaes["flux"]))
    noise = noise_for(tiny, "flux")
    default = guided_sample(normalized(patched, tiny, "flux"), patched, noise)
    sd_rules = guided_sample(normalized(patched, tiny, "flux", first_step_guidance="on",
                                        norm_includes_references="off"), patched, noise)
    assert (default - sd_rules).abs().max() > 1e-5
    for kw in ({"first_step_guidance": "on"}, {"norm_includes_references": "off"}):
        assert (guided_sample(normalized(patched, tiny, "flux", **kw), patched, noise) - default).abs().max() > 1e-6


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_unconditional_branch_has_no_reference_access(tiny, models, vaes, family):
    """The uncond branch of the patched model equals the unpatched model's and the image branch differs from it; on
    Flux only without upstream's text access (by default the uncond branch's text tokens see the references)."""
    from dataclasses import replace

    from comfyui_syncd.nodes.reference_injection import apply_reference_injection

    def branch_outputs(model):
        outs = {}
        model = model.clone()
        model.set_model_sampler_pre_cfg_function(lambda a: outs.setdefault("o", a["conds_out"]))
        guided_sample(normalized(model, tiny, family, first_step_guidance="on"), model, noise_for(tiny, family),
                      steps=1)
        return outs["o"]

    model = tiny.build_model(family, seed=3, width=32, std=0.1)  # weights that carry signal through the blocks
    plain = branch_outputs(model)
    patched, run = inject(tiny, family, model, references(vaes[family]))
    default = branch_outputs(patched)
    no_text = branch_outputs(apply_reference_injection(
        model, replace(run.config, flux_uncond_text_sees_references=False))[0])
    torch.testing.assert_close(no_text[1], plain[1])                    # negative, no references at all
    assert (no_text[2] - plain[2]).abs().max() > 1e-6                  # the image branch sees them
    if family == "flux":
        assert (default[1] - plain[1]).abs().max() > 1e-6              # upstream: text sees the whole canvas
    else:
        torch.testing.assert_close(default[1], plain[1])


def test_guidance_rescale_changes_the_result(tiny, models, vaes):
    patched, _ = inject(tiny, "sd15", models["sd15"], references(vaes["sd15"]))
    noise = noise_for(tiny, "sd15")
    a = guided_sample(normalized(patched, tiny, "sd15", combination="brooks"), patched, noise, steps=2)
    b = guided_sample(normalized(patched, tiny, "sd15", combination="brooks", rescale=0.7), patched, noise, steps=2)
    assert (a - b).abs().max() > 1e-6


# --- Bad inputs --------------------------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors(tiny, models, vaes):
    from comfyui_syncd.nodes.guiders import JeDiGuider, NormalizedGuider, SynCDNormalizedGuider
    from comfyui_syncd.nodes.reference_nodes import SynCDApplyReferences, SynCDReferenceImages

    with pytest.raises(ValueError, match="no VAE connected"):
        SynCDReferenceImages.execute(ref_images(2), None)
    with pytest.raises(ValueError, match="3 foreground mask\\(s\\) for 2 reference"):
        SynCDReferenceImages.execute(ref_images(2), vaes["sd15"], torch.ones(3, 64, 64))
    with pytest.raises(ValueError, match="1 to 8 reference images"):
        SynCDReferenceImages.execute(torch.rand(9, 64, 64, 3), vaes["sd15"])
    from comfyui_syncd.nodes.jedi import joint_image_set

    with pytest.raises(ValueError, match="JeDi Joint Image Set: 1 foreground mask\\(s\\) for 2 reference"):
        joint_image_set(vaes["sd15"], ref_images(2), 1, torch.ones(1, 64, 64))
    with pytest.raises(ValueError, match="JeDi Joint Image Set: no VAE connected"):
        joint_image_set(None, ref_images(2), 1)
    with pytest.raises(ValueError, match="image_scale_end must be >= 0"):
        NormalizedGuider(models["sd15"], 7.5, 8.0, -1.0)
    with pytest.raises(ValueError, match="text_scale must be >= 0"):
        SynCDNormalizedGuider.execute(models["sd15"], [], [], -2.0, 8.0, 13.0, "normalized", 0.0)
    with pytest.raises(ValueError, match="image_scale must be >= 0"):
        JeDiGuider(models["sd15"], -1.0)
    refs = SynCDReferenceImages.execute(ref_images(2), vaes["sd15"]).args[0]
    with pytest.raises(ValueError, match="start_percent"):
        SynCDApplyReferences.execute(models["sd15"], refs, tiny.encode_text("sd15", "x"), "auto", 0, 0.8, 0.2)
    mismatched, _ = inject(tiny, "flux", models["flux"], references(vaes["sd15"]))  # a 4-channel VAE for Flux
    with pytest.raises(ValueError, match="connect the VAE of the model you sample with"):
        ksample(mismatched, tiny, "flux", noise_for(tiny, "flux"), steps=1)
    # end below start is a valid schedule
    guider = SynCDNormalizedGuider.execute(models["sd15"], tiny.encode_text("sd15", "a"), tiny.encode_text("sd15", ""),
                                           7.5, 13.0, 8.0, "normalized", 0.0).args[0]
    assert guider.image_scale_end < guider.image_scale_start


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_shared_attention_and_reference_injection_compose_but_each_applies_once(tiny, models, vaes, family):
    """The two compose on one model in either order (tests/comfy/test_consistent_sets.py); a second copy of the
    same node is refused with a clear error instead of silently replacing the first's run."""
    from comfyui_syncd.nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    config = SharedAttentionConfig(2, "none", 1e9, 0.0)
    refs = references(vaes[family])
    shared = apply_shared_attention(models[family], config)[0]
    injected = inject(tiny, family, models[family], refs)[0]
    inject(tiny, family, shared, refs)
    apply_shared_attention(injected, config)
    with pytest.raises(ValueError, match="already has SynCD Masked Shared Attention applied; apply it only once"):
        apply_shared_attention(shared, config)
    with pytest.raises(ValueError, match="already has SynCD Apply References applied; apply it only once"):
        inject(tiny, family, injected, refs)


# --- JeDi personalization as inpainting --------------------------------------------------------------------------

def test_jedi_inpainting_keeps_references_and_couples_the_generated_image(tiny, models, vaes, family):
    import comfy.samplers

    from comfyui_syncd.nodes.guiders import JeDiGuider
    from comfyui_syncd.nodes.jedi import joint_image_set
    from comfyui_syncd.nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    latent, fg = joint_image_set(vaes[family], ref_images(2), 1)
    assert latent["samples"].shape[0] == 3 and fg.shape[0] == 3
    assert latent["noise_mask"][:2].eq(0).all() and latent["noise_mask"][2].eq(1).all()
    coupled, _ = apply_shared_attention(models[family], SharedAttentionConfig(3, "none", 1e9, 0.0,
                                                                              unmasked_first_step=False))

    def run(model, refs_latent):
        guider = JeDiGuider(model, 3.0)
        guider.set_conds(*conds(tiny, family))
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3).cpu()
        noise = noise_for(tiny, family, n=3)
        return guider.sample(noise, refs_latent["samples"], comfy.samplers.sampler_object("euler"), sigmas,
                             denoise_mask=refs_latent["noise_mask"], seed=0, disable_pbar=True)

    out = run(coupled, latent)
    # replacement trick: the known images come back as the references
    torch.testing.assert_close(out[:2], latent["samples"][:2], rtol=1e-5, atol=1e-5)
    # the generated image depends on the references through coupled attention, not without it
    other = dict(latent, samples=latent["samples"].clone())
    other["samples"][:2] = torch.flip(other["samples"][:2], dims=[-1])
    assert (run(coupled, other)[2] - out[2]).abs().max() > 1e-6
    assert torch.equal(run(models[family], other)[2], run(models[family], latent)[2])


@pytest.mark.parametrize("family,mode", [("sdxl", "auto"), ("flux", "auto"), ("sd15", "clean"), ("flux", "noised")])
def test_references_are_brought_to_the_current_noise_level(tiny, models, vaes, family, mode):
    """noised (SD default): fresh noise to the current sigma every step; clean (Flux default): the model sees x_0."""
    import comfy.patcher_extension

    from comfyui_syncd.nodes.patch_kit import Phase, forward_state

    refs = references(vaes[family], n=2)
    patched, _ = inject(tiny, family, models[family], refs, mode=mode)
    patched = patched.clone()
    seen = []

    def probe(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kw):
        if forward_state(transformer_options).phase is Phase.REFERENCE:
            seen.append((x.clone(), t.clone()))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "probe", probe)
    ksample(patched, tiny, family, noise_for(tiny, family), steps=3)
    base = patched.model
    clean = base.latent_format.process_in(refs.latents)
    assert len(seen) == 3
    noises = []
    for x, sigma in seen:
        if mode == "clean" or (mode == "auto" and family == "flux"):  # the model's input (after its scaling) is x₀
            torch.testing.assert_close(base.model_sampling.calculate_input(sigma.view(-1, 1, 1, 1), x), clean)
            continue
        s = sigma.view(-1, 1, 1, 1)
        if family == "flux":  # rectified flow: x = σ·n + (1 − σ)·x0
            noises.append((x - (1 - s) * clean) / s)
        else:                 # k-diffusion scale: x = x0 + σ·n
            noises.append((x - clean) / s)
    for a, b in zip(noises, noises[1:]):
        assert 0.8 < a.std() < 1.2 and not torch.allclose(a, b)  # unit noise, fresh every step
    assert [float(t[0]) for _, t in seen] == sorted((float(t[0]) for _, t in seen), reverse=True)


@pytest.mark.parametrize("prediction", ["v", "eps", "flow"])
def test_guidance_rescale_runs_on_the_model_prediction(prediction):
    """Rescale is not affine-invariant: for SD-style models it must act on v (the official SynCD SDXL model is
    v-prediction), for flow models on σ·v = x − x̂₀; compare with doing exactly that through ComfyUI's own
    ``calculate_denoised``."""
    from types import SimpleNamespace

    import comfy.model_sampling as ms

    from comfyui_syncd.attention.guidance import brooks_guidance, guidance_rescale
    from comfyui_syncd.nodes.guiders import NormalizedGuider

    mixin = {"v": ms.V_PREDICTION, "eps": ms.V_PREDICTION, "flow": ms.CONST}[prediction]
    base = ms.ModelSamplingDiscreteFlow if prediction == "flow" else ms.ModelSamplingDiscrete
    sampling = type("Sampling", (base, mixin), {})(None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * 3
    sigma = torch.tensor([5.0, 0.4], dtype=torch.float64) if prediction != "flow" else torch.tensor([0.9, 0.3])
    sigma = sigma.double()
    v_full, v_unc, v_img = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    denoised = [sampling.calculate_denoised(sigma, v, x) for v in (v_full, v_unc, v_img)]
    guider = NormalizedGuider.__new__(NormalizedGuider)
    guider.inner_model, guider.rescale = SimpleNamespace(model_sampling=sampling), 0.7
    full, unc, img = (x - d for d in denoised)
    got = x - guider._rescale(x, sigma, brooks_guidance(unc, img, full, 3.0, 5.0), full)
    v = guidance_rescale(brooks_guidance(v_unc, v_img, v_full, 3.0, 5.0), v_full, 0.7)
    torch.testing.assert_close(got, sampling.calculate_denoised(sigma, v, x))


def test_customization_sampler_equals_the_guider_with_sampler_custom_advanced(tiny, models, vaes):
    """The all-in-one node is the normalized guider sampled like SamplerCustomAdvanced with the same seed."""
    import comfy.sample
    import comfy.samplers

    from comfyui_syncd.nodes.guiders import SynCDCustomizationSampler

    patched, run = inject(tiny, "sdxl", models["sdxl"], references(vaes["sdxl"]))
    pos, neg = conds(tiny, "sdxl")
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    out = SynCDCustomizationSampler.execute(patched, pos, neg, latent, 7, 3, "euler", "simple", 7.5, 8.0, 13.0,
                                            "normalized", 0.0).args[0]["samples"]
    assert run.passes == [0, 1, 2]
    guider = normalized(patched, tiny, "sdxl")
    sigmas = comfy.samplers.calculate_sigmas(patched.get_model_object("model_sampling"), "simple", 3).cpu()
    noise = comfy.sample.prepare_noise(latent["samples"], 7)
    want = guider.sample(noise, latent["samples"], comfy.samplers.sampler_object("euler"), sigmas, seed=7,
                         disable_pbar=True)
    torch.testing.assert_close(out, want)


def test_perturbed_attention_guidance_runs_on_a_model_with_references(tiny, models, vaes):
    """PAG replaces the middle block's self-attention in its extra pass; that pass must see an ordinary block (the
    references are projected inside our attn1 replace, the block's input is untouched)."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    patched, _ = inject(tiny, "sdxl", models["sdxl"], references(vaes["sdxl"]))
    pag = PerturbedAttentionGuidance.execute(patched, 3.0).args[0]
    noise = noise_for(tiny, "sdxl")
    out = ksample(pag, tiny, "sdxl", noise)
    assert torch.isfinite(out).all() and (out - ksample(patched, tiny, "sdxl", noise)).abs().max() > 1e-6

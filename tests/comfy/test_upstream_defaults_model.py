"""Upstream-faithful defaults on tiny real models, each checked against an independent computation of upstream's
rule (nupurkmr9/syncd): the reference text of each guidance branch and Masked Shared Attention's first step."""


import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def vaes(tiny, families):
    return {f: tiny.build_vae(f, seed=1) for f in families}


def references(vae, n=2):
    from comfyui_syncd.nodes.reference_nodes import encode_references

    images = torch.rand(n, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(n, 64, 64)
    masks[:, 8:56, 16:48] = 1
    return encode_references(vae, images, masks)


def apply(model, refs, conditioning, **kw):
    from comfyui_syncd.nodes.reference_injection import ReferenceConfig, apply_reference_injection

    return apply_reference_injection(model, ReferenceConfig(refs, conditioning, "auto", 0, 1e9, 0.0, **kw))


def branch_outputs(tiny, family, model, positive, negative, steps=2):
    """The [full, uncond, image] outputs of every evaluation, via ComfyUI's pre-CFG hook."""
    import comfy.samplers

    from comfyui_syncd.nodes.guiders import NormalizedGuider

    seen = []
    model = model.clone()
    model.set_model_sampler_pre_cfg_function(lambda a: seen.append([o.clone() for o in a["conds_out"]])
                                             or a["conds_out"])
    guider = NormalizedGuider(model, 7.5, 8.0, 13.0, first_step_guidance="on")
    guider.set_conds(positive, negative)
    noise = torch.randn(1, tiny.LATENT_CHANNELS[family], 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()
    guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                  disable_pbar=True)
    return seen


def test_each_branch_sees_references_computed_with_its_own_text(tiny, vaes, family):
    """Upstream (method/sample.py, sdxl_pipeline/pipeline.py): one reference pass covers the branches; the image
    branch's references carry the branch's (zeroed) text, the full branch's 'photo of a {category}'. Independent
    check: each branch equals the same branch of a run whose single reference text is that branch's text."""
    model = tiny.build_model(family, seed=3, width=32, std=0.1)
    refs = references(vaes[family])
    positive = tiny.encode_text(family, "a photo of a dog on the beach")
    negative = tiny.encode_text(family, "")
    ref_text = tiny.encode_text(family, "photo of a dog")
    patched, run = apply(model, refs, ref_text)
    per_branch = branch_outputs(tiny, family, patched, positive, negative)
    assert run.passes == [0, 1] and run.texts == ("reference", "negative")   # both texts, one pass per step
    with_ref_text = branch_outputs(tiny, family, apply(model, refs, ref_text, reference_text="reference_prompt")[0],
                                   positive, negative)
    with_neg_text = branch_outputs(tiny, family, apply(model, refs, negative, reference_text="reference_prompt")[0],
                                   positive, negative)
    # the first evaluation (later ones start from different latents, since the image branch differs)
    got, ref_run, neg_run = per_branch[0], with_ref_text[0], with_neg_text[0]
    torch.testing.assert_close(got[0], ref_run[0], rtol=1e-5, atol=1e-5)   # full branch: the reference prompt
    torch.testing.assert_close(got[2], neg_run[2], rtol=1e-5, atol=1e-5)   # image branch: its own text
    torch.testing.assert_close(got[1], neg_run[1], rtol=1e-5, atol=1e-5)   # uncond: none (Flux text: its own)
    assert (got[2] - ref_run[2]).abs().max() > 1e-6                        # the image branch's is not the prompt


@pytest.mark.parametrize("family", ["sdxl"])
def test_the_reference_pass_batches_both_texts(tiny, vaes, family):
    """The one pass per step holds R rows per text, [reference prompt | negative], same noise for both."""
    import comfy.patcher_extension

    from comfyui_syncd.nodes.patch_kit import Phase, forward_state

    model = tiny.build_model(family, seed=3, width=32)
    refs = references(vaes[family], n=3)
    positive, negative = tiny.encode_text(family, "a dog"), tiny.encode_text(family, "")
    ref_text = tiny.encode_text(family, "photo of a dog")
    patched, _ = apply(model, refs, ref_text)
    patched = patched.clone()
    seen = []

    def probe(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kw):
        if forward_state(transformer_options).phase is Phase.REFERENCE:
            seen.append((x.clone(), c_crossattn.clone(), forward_state(transformer_options).reference_rows))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "probe", probe)
    branch_outputs(tiny, family, patched, positive, negative, steps=1)
    (x, context, rows), = seen
    assert rows == (0, 1, 2, 0, 1, 2)
    torch.testing.assert_close(x[:3], x[3:])
    torch.testing.assert_close(context[:3], ref_text[0][0].expand(3, -1, -1))
    torch.testing.assert_close(context[3:], negative[0][0].expand(3, -1, -1))


def test_flux_first_step_shares_text_tokens_too(tiny):
    """SynCDSharedAttention on Flux: upstream applies no mask at σ = 1, so the text queries also see the other
    images; sd15 has no text tokens in its self-attention, so the option changes nothing there."""
    from comfyui_syncd.nodes.shared_attention_node import SynCDSharedAttention

    for family, differs in (("flux", True), ("sd15", False)):
        model = tiny.build_model(family, seed=3, width=32, std=0.1)
        masks = torch.zeros(3, 64, 64)
        masks[:, 16:48, 16:48] = 1
        pos, neg = tiny.encode_text(family, "a photo of a dog"), tiny.encode_text(family, "")
        noise = torch.randn(3, tiny.LATENT_CHANNELS[family], 8, 8, generator=torch.Generator().manual_seed(0))
        outs = []
        for shares_text in (True, False):
            patched = SynCDSharedAttention.execute(model, 3, "foreground_masks", 0.0, 1.0, True, "all",
                                                   foreground_masks=masks, first_step_shares_text=shares_text).args[0]
            import comfy.sample
            outs.append(comfy.sample.sample(patched, noise, 1, 1.0, "euler", "simple", pos, neg,
                                            torch.zeros_like(noise), seed=0, disable_pbar=True))
        assert ((outs[0] - outs[1]).abs().max() > 1e-6) == differs, family


def test_first_step_rules_follow_sigma_max_not_the_step_index(tiny):
    """Upstream masks while timestep < 1 and guides Flux from its second step: a schedule that starts below σ_max
    (img2img, a later KSamplerAdvanced segment) is masked and guided from its first step."""
    import comfy.samplers

    from comfyui_syncd.nodes.guiders import NormalizedGuider
    from comfyui_syncd.nodes.shared_attention_node import SynCDSharedAttention

    family = "flux"
    model = tiny.build_model(family, seed=3, width=32, std=0.1)
    sampling = model.get_model_object("model_sampling")
    full = comfy.samplers.calculate_sigmas(sampling, "simple", 4).cpu()
    partial = full[1:]
    masks = torch.zeros(3, 64, 64)
    masks[:, 16:48, 16:48] = 1
    pos, neg = tiny.encode_text(family, "a photo of a dog"), tiny.encode_text(family, "")
    noise = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def msa(unmasked_first_step, sigmas):
        patched = SynCDSharedAttention.execute(model, 3, "foreground_masks", 0.0, 1.0, unmasked_first_step, "all",
                                               foreground_masks=masks).args[0]
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(pos, neg)
        guider.set_cfg(1.0)
        return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                             disable_pbar=True)

    assert (msa(True, full) - msa(False, full)).abs().max() > 1e-6          # σ_max: the first step is unmasked
    torch.testing.assert_close(msa(True, partial), msa(False, partial))    # below it: masked from the start

    def guided_steps(sigmas):
        guider = NormalizedGuider(model, 1.5, 1.0, 1.0)
        guider.set_conds(pos, neg)
        guider.sample(noise[:1], torch.zeros_like(noise[:1]), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                      disable_pbar=True)
        return [step for step, _ in guider.image_scales]

    assert guided_steps(full) == [1, 2, 3]        # upstream Flux: no guidance at σ = 1
    assert guided_steps(partial) == [0, 1, 2]     # a partial schedule is guided from its first step


def test_unguided_first_step_calls_the_cfg_hooks_like_comfyui_at_cfg_1(tiny):
    """The unguided Flux step runs ComfyUI's cfg-1 path: pre-CFG hooks get (cond, None) at scale 1, post-CFG hooks
    get no uncond; with disable_cfg1_optimization the uncond branch is evaluated all the same."""
    import comfy.samplers

    from comfyui_syncd.nodes.guiders import NormalizedGuider

    model = tiny.build_model("flux", seed=3, width=32).clone()
    calls = []
    model.set_model_sampler_pre_cfg_function(
        lambda a: calls.append(("pre", len(a["conds"]), a["conds"][1] is None, a["cond_scale"])) or a["conds_out"])
    model.set_model_sampler_post_cfg_function(
        lambda a: calls.append(("post", a["uncond"] is None, a["cond_scale"])) or a["denoised"])
    pos, neg = tiny.encode_text("flux", "a dog"), tiny.encode_text("flux", "")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 2).cpu()
    noise = torch.randn(1, 16, 8, 8)
    for disable in (False, True):
        calls.clear()
        guider = NormalizedGuider(model, 1.5, 1.0, 1.0)
        guider.set_conds(pos, neg)
        if disable:
            guider.model_options = {**guider.model_options, "disable_cfg1_optimization": True}
        guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                      disable_pbar=True)
        assert calls[:2] == [("pre", 2, not disable, 1.0), ("post", not disable, 1.0)]
        assert calls[2] == ("pre", 3, False, 1.5)   # the next step is guided, three branches


def test_jedi_guider_null_branch_sees_no_references_on_flux(tiny, vaes):
    """JeDi's ε⁰ has no reference access, also on Flux (the SynCD guider's text access is SynCD's negative branch)."""
    import comfy.samplers

    from comfyui_syncd.nodes.guiders import JeDiGuider

    model = tiny.build_model("flux", seed=3, width=32, std=0.1)
    outs = {}
    for name, m in (("plain", model), ("patched", apply(model, references(vaes["flux"]),
                                                        tiny.encode_text("flux", "a dog"))[0])):
        m = m.clone()
        m.set_model_sampler_pre_cfg_function(lambda a, name=name: outs.setdefault(name, a["conds_out"]))
        guider = JeDiGuider(m, 3.0)
        guider.set_conds(tiny.encode_text("flux", "a dog"), tiny.encode_text("flux", ""))
        noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 1).cpu()
        guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                      disable_pbar=True)
    torch.testing.assert_close(outs["patched"][1], outs["plain"][1])
    assert (outs["patched"][0] - outs["plain"][0]).abs().max() > 1e-6


def test_bad_options_of_the_new_inputs_name_the_fix(tiny, vaes):
    """Unknown option values and even dilation boxes are refused when the node runs, naming the input."""
    from comfyui_syncd.nodes.reference_nodes import encode_references
    from comfyui_syncd.nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    model = tiny.build_model("sd15")
    refs = references(vaes["sd15"])
    cond = tiny.encode_text("sd15", "a dog")
    for kw, name in (({"reference_text": "both"}, "reference_text"), ({"use_masks": "yes"}, "use_masks")):
        with pytest.raises(ValueError, match=f"SynCD Apply References: {name} .* is not an option; choose one of"):
            apply(model, refs, cond, **kw)
    with pytest.raises(ValueError, match="mask_dilation must be an odd box size"):
        apply_shared_attention(model, SharedAttentionConfig(1, "none", 1e9, 0.0, mask_dilation=4))
    with pytest.raises(ValueError, match="mask_dilation must be an odd box size"):
        encode_references(vaes["sd15"], torch.rand(1, 64, 64, 3), mask_dilation=2)

"""Consistent sets of the user's subject: SynCD Apply References and SynCD Masked Shared Attention on one model.

Each image of a subject group attends to [own ‖ its group's other images' foreground ‖ the references'
foreground]; groups stay apart; the unconditional branch of the SynCD guider sees neither. Tiny real SD1.5, SDXL
and Flux models with weights of std 0.3, so that every path carries signal."""

import pytest
import torch

pytestmark = pytest.mark.comfy

ORDERS = ["references_first", "shared_first"]


@pytest.fixture(scope="module")
def models(tiny, families):
    return {f: tiny.build_model(f, seed=5, std=0.3) for f in families}


@pytest.fixture(scope="module")
def vaes(tiny, families):
    return {f: tiny.build_vae(f, seed=1) for f in families}


def ref_masks(n=2):
    masks = torch.zeros(n, 64, 64)
    masks[:, 8:40, 8:40] = 1
    return masks


def references(vae, masks=None, seed=0):
    from comfyui_syncd.nodes.reference_nodes import encode_references

    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(seed))
    return encode_references(vae, images, ref_masks() if masks is None else masks)


def with_references(tiny, family, model, refs, **kw):
    from comfyui_syncd.nodes.reference_injection import ReferenceConfig, apply_reference_injection

    sampling = model.get_model_object("model_sampling")
    kw.setdefault("use_masks", "on")  # Flux's default ignores the masks (upstream); these tests need them
    config = ReferenceConfig(refs, tiny.encode_text(family, "photo of a dog"), "auto", 0,
                             sampling.percent_to_sigma(0.0), sampling.percent_to_sigma(1.0), **kw)
    return apply_reference_injection(model, config)


def target_masks(n):
    masks = torch.zeros(n, 64, 64)
    masks[:, 16:56, 8:48] = 1
    return masks


def with_sharing(model, n_batch, images_per_subject=2, mask_mode="foreground_masks"):
    from comfyui_syncd.nodes.shared_attention_node import SynCDSharedAttention

    masks = target_masks(n_batch) if mask_mode == "foreground_masks" else None
    return SynCDSharedAttention.execute(model, images_per_subject, mask_mode, 0.0, 1.0, False, "all",
                                        foreground_masks=masks).args[0]


def combined(tiny, family, model, refs, n_batch, order="references_first", images_per_subject=2, **kw):
    """(model, reference run) with both patches, applied in ``order``."""
    if order == "references_first":
        patched, run = with_references(tiny, family, model, refs, **kw)
        return with_sharing(patched, n_batch, images_per_subject), run
    patched, run = with_references(tiny, family, with_sharing(model, n_batch, images_per_subject), refs, **kw)
    return patched, run


def noise_for(tiny, family, n, seed=0):
    return torch.randn(n, tiny.LATENT_CHANNELS[family], 8, 8, generator=torch.Generator().manual_seed(seed))


def conds(tiny, family):
    return tiny.encode_text(family, "a photo of a dog on the beach"), tiny.encode_text(family, "")


def ksample(model, tiny, family, noise, steps=2):
    import comfy.sample

    pos, neg = conds(tiny, family)
    return comfy.sample.sample(model, noise, steps, 4.0, "euler", "simple", pos, neg, torch.zeros_like(noise),
                               seed=0, disable_pbar=True)


def guider_for(model, tiny, family, **kw):
    from comfyui_syncd.nodes.guiders import NormalizedGuider

    guider = NormalizedGuider(model, 7.5, 8.0, 13.0, first_step_guidance="on", **kw)
    guider.set_conds(*conds(tiny, family))
    return guider


def guided_sample(model, tiny, family, noise, steps=2):
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()
    return guider_for(model, tiny, family).sample(noise, torch.zeros_like(noise),
                                                  comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                                                  disable_pbar=True)


def perturb_background(run, seed=7):
    """After every reference pass, overwrite the recorded features at the references' background tokens (never
    keys) with noise: what the references show outside their masks, at every layer."""
    ensure = run.ensure_features

    def ensure_then_perturb(*args, **kwargs):
        key = run.key
        ensure(*args, **kwargs)
        if run.key == key:
            return
        g = torch.Generator().manual_seed(seed)
        r = len(run.config.references)
        for layer, feats in list(run.features.items()):
            background = ~run.foreground(run.grids[layer])  # (R, tokens)
            if isinstance(feats, tuple):  # Flux: (S·R, H, L, D) keys and values, image tokens last
                out = []
                for t in feats:
                    t = t.clone()
                    rows = background.repeat(t.shape[0] // r, 1)
                    view = t[:, :, -rows.shape[1]:]
                    noise = torch.randn(view.shape, generator=g).to(t)
                    view[rows[:, None, :, None].expand_as(view)] = noise[rows[:, None, :, None].expand_as(view)]
                    out.append(t)
                run.features[layer] = tuple(out)
            else:  # UNet: (S·R, tokens, C)
                t = feats.clone()
                rows = background.repeat(t.shape[0] // r, 1)
                t[rows] = torch.randn(t[rows].shape, generator=g).to(t)
                run.features[layer] = t
        run.tokens = {}
    run.ensure_features = ensure_then_perturb


def max_change(a, b):
    return (a - b).flatten(1).abs().amax(1)


# --- Dependence ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
def test_each_image_sees_its_group_and_the_references_foreground_only(tiny, models, vaes, family, order):
    """Batch of 4 = two subject groups of 2. Image 0's output depends on the references' foreground and on image
    1 (its group), not on the references' background nor on images 2, 3 (the other group)."""
    model = models[family]
    noise = noise_for(tiny, family, 4)
    patched, _ = combined(tiny, family, model, references(vaes[family]), 4, order)
    base = ksample(patched, tiny, family, noise)

    # the references' foreground: other reference images change every image
    other_refs, _ = combined(tiny, family, model, references(vaes[family], seed=3), 4, order)
    assert max_change(ksample(other_refs, tiny, family, noise), base).min() > 1e-4

    # the references' background: what the references show outside their masks changes nothing
    hidden, run = combined(tiny, family, model, references(vaes[family]), 4, order)
    perturb_background(run)
    torch.testing.assert_close(ksample(hidden, tiny, family, noise), base, rtol=0, atol=1e-6)

    # the group's other image (1) changes image 0; the other group (2, 3) changes neither 0 nor 1
    changed = noise.clone()
    changed[1] = noise_for(tiny, family, 1, seed=11)[0]
    assert max_change(ksample(patched, tiny, family, changed), base)[0] > 1e-4
    changed = noise.clone()
    changed[2:] = noise_for(tiny, family, 2, seed=12)
    d = max_change(ksample(patched, tiny, family, changed), base)
    assert d[0] <= 1e-6 and d[1] <= 1e-6 and d[2] > 1e-4

    # without its foreground image 1 is invisible to image 0 (the group's mask is key-side)
    from comfyui_syncd.nodes.shared_attention_node import SynCDSharedAttention

    masks = target_masks(4)
    masks[1] = 0
    refs_model, _ = with_references(tiny, family, model, references(vaes[family]))
    masked = SynCDSharedAttention.execute(refs_model, 2, "foreground_masks", 0.0, 1.0, False, "all",
                                          foreground_masks=masks).args[0]
    changed = noise.clone()
    changed[1] = noise_for(tiny, family, 1, seed=11)[0]
    assert max_change(ksample(masked, tiny, family, changed), ksample(masked, tiny, family, noise))[0] <= 1e-6


@pytest.mark.parametrize("order", ORDERS)
def test_references_without_foreground_leave_masked_shared_attention(tiny, models, vaes, family, order):
    model = models[family]
    noise = noise_for(tiny, family, 4)
    empty = references(vaes[family], masks=torch.zeros(2, 64, 64))
    both, run = combined(tiny, family, model, empty, 4, order)
    out = ksample(both, tiny, family, noise)
    assert run.passes  # the reference pass ran; its tokens are simply no keys
    torch.testing.assert_close(out, ksample(with_sharing(model, 4), tiny, family, noise), rtol=0, atol=1e-6)


@pytest.mark.parametrize("order", ORDERS)
def test_groups_of_one_are_references_alone(tiny, models, vaes, family, order):
    model = models[family]
    noise = noise_for(tiny, family, 2)
    refs = references(vaes[family])
    both, _ = combined(tiny, family, model, refs, 2, order, images_per_subject=1)
    alone, _ = with_references(tiny, family, model, refs)
    plain = ksample(model, tiny, family, noise)
    want = ksample(alone, tiny, family, noise)
    assert max_change(want, plain).min() > 1e-4
    torch.testing.assert_close(ksample(both, tiny, family, noise), want, rtol=1e-5, atol=1e-5)


# --- Batch layouts and guidance ------------------------------------------------------------------------------

def test_joint_separate_and_alternating_layouts_agree(tiny, models, vaes, family, separate_passes,
                                                      alternating_passes):
    both, _ = combined(tiny, family, models[family], references(vaes[family]), 4)
    noise = noise_for(tiny, family, 4)
    joint = guided_sample(both, tiny, family, noise)
    for layout in (separate_passes(both), separate_passes(both, reverse=True), alternating_passes(both)):
        torch.testing.assert_close(guided_sample(layout, tiny, family, noise), joint, rtol=1e-5, atol=1e-5)


def first_branch_outputs(model, tiny, family, noise):
    """The guider's first model evaluation, per cond: [full (positive), unconditional (negative), image]."""
    import comfy.patcher_extension
    import comfy.samplers

    model = model.clone()
    seen = []

    def capture(executor, *args, **kwargs):
        outs = executor(*args, **kwargs)
        seen.append([o.clone() for o in outs])
        return outs

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "capture", capture)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 1).cpu()
    guider_for(model, tiny, family).sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"),
                                           sigmas, seed=0, disable_pbar=True)
    return seen[0]


def test_guider_branches_keep_their_meaning(tiny, models, vaes, family):
    """Unconditional branch: neither references nor the other images, so exactly the unpatched model's
    unconditional output on the same input (on Flux with flux_uncond_text_sees_references off: by default its
    text tokens see the references, as upstream). Image branch: both the references and the group."""
    model, refs = models[family], references(vaes[family])
    noise = noise_for(tiny, family, 4)
    kw = {"flux_uncond_text_sees_references": False}
    both, _ = combined(tiny, family, model, refs, 4, **kw)
    full, uncond, image = first_branch_outputs(both, tiny, family, noise)
    _, plain_uncond, plain_image = first_branch_outputs(model, tiny, family, noise)
    torch.testing.assert_close(uncond, plain_uncond, rtol=0, atol=1e-6)
    _, _, refs_only_image = first_branch_outputs(with_references(tiny, family, model, refs, **kw)[0], tiny, family,
                                                 noise)
    _, _, shared_only_image = first_branch_outputs(with_sharing(model, 4), tiny, family, noise)
    for other in (plain_image, refs_only_image, shared_only_image):
        assert max_change(image, other).min() > 1e-5
    if family == "flux":  # the default: the unconditional text tokens see the references, the images do not
        default, _ = combined(tiny, family, model, refs, 4)
        assert (first_branch_outputs(default, tiny, family, noise)[1] - plain_uncond).abs().max() > 1e-6


def test_each_node_is_applied_once(tiny, models, vaes):
    from comfyui_syncd.nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    both, _ = combined(tiny, "sd15", models["sd15"], references(vaes["sd15"]), 2)
    with pytest.raises(ValueError, match="already has SynCD Masked Shared Attention applied; apply it only once"):
        apply_shared_attention(both, SharedAttentionConfig(2, "none", 1e9, 0.0))
    with pytest.raises(ValueError, match="already has SynCD Apply References applied; apply it only once"):
        with_references(tiny, "sd15", both, references(vaes["sd15"]))

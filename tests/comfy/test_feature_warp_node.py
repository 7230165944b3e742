"""SynCD Feature Warp in-process on tiny SD1.5 and Flux models: the warp runs only above the threshold, writes into
the sampler's own state (the next step starts from it), leaves sampling alone without correspondences, keeps
objects apart and does not depend on how ComfyUI batches cond and uncond."""

import pytest
import torch

from comfyui_syncd.attention.warp import build_plan, warp_latent_batch
from comfyui_syncd.core.correspondence_format import Correspondences, save

LATENT = {"sd15": (8, 8), "flux": (16, 16)}   # the token grid is 8×8 for both (Flux packs 2×2)
FAMILIES = ["sd15", "flux"]


def centre(index, size):
    return (2 * index + 1) / size - 1


def block_corr(family, views=3):
    """Dense matches on a correspondence grid twice the token grid (upstream's 64 ↔ 128): view 0 and view 1 take
    shifted blocks of the anchor (the last view)."""
    tokens = token_grid(family)
    fine = (2 * tokens[0], 2 * tokens[1])

    def rows(top, left, size, dy, dx):
        return torch.tensor([[centre(y, fine[0]), centre(x, fine[1]), centre(y + dy, fine[0]), centre(x + dx, fine[1])]
                             for y in range(top, top + size) for x in range(left, left + size)])
    return Correspondences(views, fine, {(0, views - 1): rows(2, 2, 8, 4, 2), (1, views - 1): rows(4, 4, 8, -2, 4)})


def token_grid(family):
    h, w = LATENT[family]
    return (h // 2, w // 2) if family == "flux" else (h, w)


def empty_corr(family):
    return Correspondences(3, block_corr(family).size, {})


def build(tiny, family):
    """A tiny model with weights large enough (std 0.3) that x̂₀ depends on the content, so a warp shows."""
    return tiny.build_model(family, std=0.3)


def noise(family, n=3, seed=0):
    from comfyui_syncd.demo.tiny_models import LATENT_CHANNELS

    return torch.randn(n, LATENT_CHANNELS[family], *LATENT[family], generator=torch.Generator().manual_seed(seed))


def sample(model, tiny, family, x, steps=6, sampler="euler", cfg=None):
    import comfy.sample

    cfg = (1.0 if family == "flux" else 4.0) if cfg is None else cfg
    pos, neg = tiny.encode_text(family, "a photo of a mug"), tiny.encode_text(family, "")
    return comfy.sample.sample(model, x, steps, cfg, sampler, "simple", pos, neg, torch.zeros_like(x), seed=0,
                               disable_pbar=True)


def warp(model, corrs, **kwargs):
    from comfyui_syncd.nodes.feature_warp import FeatureWarpConfig, apply_feature_warp

    corrs = tuple(corrs) if isinstance(corrs, (list, tuple)) else (corrs,)
    return apply_feature_warp(model, FeatureWarpConfig(corrs, **kwargs))


def probe(model, key, calls):
    """A PREDICT_NOISE wrapper recording (sigma, x at entry, x after the call, returned x̂₀)."""
    import comfy.patcher_extension

    def wrapper(executor, x, timestep, model_options, seed):
        entry = x.clone()
        out = executor(x, timestep, model_options, seed)
        calls.append((float(timestep.flatten()[0]), entry, x.clone(), out.clone()))
        return out
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, key, wrapper)


def expected_steps(model, steps, threshold):
    """Steps whose normalized time (timestep(σ) / timestep(σ_max)) is above the threshold, from the schedule."""
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", steps)
    top = float(sampling.timestep(torch.tensor([float(sampling.sigma_max)])))
    times = [float(sampling.timestep(s.view(1))) / top for s in sigmas[:-1]]
    return [i for i, t in enumerate(times) if t > threshold], times


@pytest.mark.parametrize("family", FAMILIES)
def test_warp_only_above_threshold_and_the_sampler_continues_from_the_warped_state(tiny, family):
    """Euler: at every warped step the model sees warp(state), and the next step's state is Euler's update from
    the *warped* x_t (upstream: latents replaced before the transformer and the scheduler step); steps at or below
    the threshold pass x through untouched."""
    base = build(tiny, family)
    outer = []
    probe(base, "probe_outer", outer)
    corr = block_corr(family)
    threshold = 0.8 if family == "flux" else 0.7
    model, run = warp(base, corr, sigma_threshold=threshold)
    inner = []
    probe(model, "probe_inner", inner)
    steps = 8
    sample(model, tiny, family, noise(family), steps=steps)
    warped_steps, times = expected_steps(base, steps, threshold)
    assert 0 < len(warped_steps) < steps
    assert [r.step for r in run.records] == warped_steps
    assert all(r.written > 0 for r in run.records)
    assert [r.eroded for r in run.records] == [times[i] < 0.9 for i in warped_steps]
    plan = build_plan(corr, token_grid(family))
    assert len(outer) == len(inner) == steps
    for i, ((sigma, before, after, _), (_, seen, _, denoised)) in enumerate(zip(outer, inner)):
        if i in warped_steps:
            expected = warp_latent_batch(before, [plan], 3, packed=family == "flux", erosion=times[i] < 0.9)
            torch.testing.assert_close(seen, expected, atol=1e-6, rtol=0)
            assert not torch.equal(seen, before)
            torch.testing.assert_close(after, seen)          # the sampler's own tensor holds the warped values
        else:
            assert torch.equal(seen, before)
        if i + 1 < steps:
            next_sigma, next_state = outer[i + 1][0], outer[i + 1][1]
            euler = seen + (seen - denoised) / sigma * (next_sigma - sigma)
            torch.testing.assert_close(next_state, euler, atol=1e-5, rtol=1e-5)
            if i in warped_steps:
                unwarped = before + (before - denoised) / sigma * (next_sigma - sigma)
                assert (next_state - unwarped).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_multistep_sampler_state_holds_the_warp(tiny, family):
    """dpmpp_2m (a history-keeping sampler): after every warped evaluation the sampler's tensor holds the warped
    values, and the result differs from plain sampling."""
    base = build(tiny, family)
    outer = []
    probe(base, "probe_outer", outer)
    model, run = warp(base, block_corr(family))
    out = sample(model, tiny, family, noise(family), sampler="dpmpp_2m")
    assert run.records
    for record in run.records:
        _, before, after, _ = outer[record.step]
        assert not torch.equal(before, after)
    assert not torch.allclose(out, sample(build(tiny, family), tiny, family, noise(family), sampler="dpmpp_2m"))


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_correspondences_equal_plain_sampling(tiny, family):
    plain = sample(build(tiny, family), tiny, family, noise(family))
    model, run = warp(build(tiny, family), empty_corr(family))
    out = sample(model, tiny, family, noise(family))
    assert run.records and all(r.written == 0 for r in run.records)
    assert torch.equal(out, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_objects_in_one_batch_are_independent(tiny, family):
    """A batch of two objects (6 views): correspondences for one object change only its views; one shared set
    warps both objects alike."""
    x = noise(family, n=6)
    plain = sample(build(tiny, family), tiny, family, x)
    first, _ = warp(build(tiny, family), [block_corr(family), empty_corr(family)])
    second, _ = warp(build(tiny, family), [empty_corr(family), block_corr(family)])
    out_first, out_second = sample(first, tiny, family, x), sample(second, tiny, family, x)
    torch.testing.assert_close(out_first[3:], plain[3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_second[:3], plain[:3], atol=1e-5, rtol=1e-5)
    assert (out_first[:3] - plain[:3]).abs().max() > 1e-2 and (out_second[3:] - plain[3:]).abs().max() > 1e-2
    both, run = warp(build(tiny, family), block_corr(family))
    out_both = sample(both, tiny, family, x)
    torch.testing.assert_close(out_both[:3], out_first[:3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_both[3:], out_second[3:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("passes", ["separate", "alternating"])
def test_cond_and_uncond_in_one_or_separate_batches(tiny, separate_passes, alternating_passes, passes):
    """CFG 4 on SD1.5: cond and uncond in one forward pass, in separate ones, or alternating, give the same warped
    sampling (x is shared by the branches, so every branch of a view gets the same warp)."""
    family = "sd15"
    joint, joint_run = warp(tiny.build_model(family), block_corr(family), sigma_threshold=0.5)
    split_base = (separate_passes if passes == "separate" else alternating_passes)(tiny.build_model(family))
    split, split_run = warp(split_base, block_corr(family), sigma_threshold=0.5)
    a, b = sample(joint, tiny, family, noise(family)), sample(split, tiny, family, noise(family))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert [r.step for r in joint_run.records] == [r.step for r in split_run.records] and joint_run.records
    assert (a - sample(tiny.build_model(family), tiny, family, noise(family))).abs().max() > 1e-2


def test_attention_inputs_target_warps_self_attention_inputs_in_the_window(tiny):
    family = "sd15"
    plain = sample(build(tiny, family), tiny, family, noise(family))
    model, run = warp(build(tiny, family), block_corr(family), target="attention_inputs", sigma_threshold=0.7)
    out = sample(model, tiny, family, noise(family))
    assert run.attention_calls > 0 and not run.records
    assert not torch.allclose(out, plain, atol=1e-3)
    never, never_run = warp(build(tiny, family), block_corr(family), target="attention_inputs",
                            sigma_threshold=1.0)
    assert torch.equal(sample(never, tiny, family, noise(family)), plain) and never_run.attention_calls == 0
    empty, _ = warp(build(tiny, family), empty_corr(family), target="attention_inputs", sigma_threshold=0.0)
    torch.testing.assert_close(sample(empty, tiny, family, noise(family)), plain, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="UNet models"):
        warp(build(tiny, "flux"), block_corr("flux"), target="attention_inputs")


def test_composes_with_masked_shared_attention_in_either_order(tiny):
    """Rigid data generation: Masked Shared Attention and the warp on one Flux model, applied in either order."""
    from comfyui_syncd.nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    family = "flux"
    config = SharedAttentionConfig(images_per_subject=3, mask_mode="none", sigma_start=1e9, sigma_end=0.0)
    shared_only, _ = apply_shared_attention(build(tiny, family), config)
    warp_first, _ = warp(build(tiny, family), block_corr(family))
    warp_first, _ = apply_shared_attention(warp_first, config)
    shared_first, _ = apply_shared_attention(build(tiny, family), config)
    shared_first, run = warp(shared_first, block_corr(family))
    a, b = sample(warp_first, tiny, family, noise(family)), sample(shared_first, tiny, family, noise(family))
    torch.testing.assert_close(a, b)
    assert run.records and (a - sample(shared_only, tiny, family, noise(family))).abs().max() > 1e-2


def test_a_noise_mask_is_noted(tiny):
    """With a noise mask ComfyUI hands the model a blended copy of the state: the run notes it (and logs why)."""
    import comfy.sample

    family = "flux"
    model, run = warp(build(tiny, family), block_corr(family))
    x = noise(family)
    pos = tiny.encode_text(family, "a photo of a mug")
    comfy.sample.sample(model, x, 2, 1.0, "euler", "simple", pos, pos, torch.zeros_like(x), seed=0,
                        noise_mask=torch.ones(3, 1, *LATENT[family]), disable_pbar=True)
    assert run.noise_mask and run.records
    sample(model, tiny, family, x, steps=2)
    assert not run.noise_mask


def test_errors_name_the_fix(tiny):
    model, _ = warp(build(tiny, "sd15"), block_corr("sd15"))
    with pytest.raises(ValueError, match="multiple of images_per_object"):
        sample(model, tiny, "sd15", noise("sd15", n=4))
    model, _ = warp(build(tiny, "sd15"), block_corr("sd15", views=4))
    with pytest.raises(ValueError, match="set images_per_object to 4"):
        sample(model, tiny, "sd15", noise("sd15", n=3))
    model, _ = warp(build(tiny, "sd15"), [block_corr("sd15")] * 3)
    with pytest.raises(ValueError, match="one per object"):
        sample(model, tiny, "sd15", noise("sd15", n=6))


def test_nodes_load_a_saved_file_and_patch_the_model(tiny, tmp_path):
    import folder_paths

    from comfyui_syncd.nodes.feature_warp import SynCDFeatureWarp, SynCDLoadCorrespondences

    corr = block_corr("sd15")
    save(tmp_path / "mug.safetensors", corr)
    loaded, info = SynCDLoadCorrespondences.execute(file="(none)", path=str(tmp_path / "mug.safetensors")).result
    assert loaded.views == 3 and loaded.size == corr.size and "3 views" in info
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    try:
        schema = SynCDLoadCorrespondences.define_schema()
        options = next(i for i in schema.inputs if i.id == "file").options
        assert "mug.safetensors" in options
        from_input, _ = SynCDLoadCorrespondences.execute(file="mug.safetensors").result
        assert SynCDLoadCorrespondences.validate_inputs(file="mug.safetensors") is True
        assert "not an option" in SynCDLoadCorrespondences.validate_inputs(file="other.safetensors")
    finally:
        folder_paths.set_input_directory(old)
    for (a, b), rows in corr.pairs.items():
        torch.testing.assert_close(from_input.pairs[(a, b)], rows)
    with pytest.raises(ValueError, match="no file chosen"):
        SynCDLoadCorrespondences.execute(file="(none)")
    (patched,) = SynCDFeatureWarp.execute(build(tiny, "sd15"), from_input, 3, 0.8, 1.0, "bicubic", True,
                                          "noisy_latents", -1).result
    plain = sample(build(tiny, "sd15"), tiny, "sd15", noise("sd15"))
    assert not torch.allclose(sample(patched, tiny, "sd15", noise("sd15")), plain, atol=1e-3)
    assert SynCDFeatureWarp.validate_inputs(interpolation="bicubic", target="noisy_latents") is True
    assert "target" in SynCDFeatureWarp.validate_inputs(interpolation="bicubic", target="q")
    with pytest.raises(ValueError, match="anchor_view 3 does not exist"):
        SynCDFeatureWarp.execute(build(tiny, "sd15"), from_input, 3, 0.8, 1.0, "bicubic", True,
                                 "noisy_latents", 3)

"""The patch kit and the batch layout, directly: grouping, branch roles, block selection, the per-forward state, and
the attention fallbacks that must keep another pack's ``optimized_attention_override`` in the loop."""

import pytest
import torch

pytestmark = pytest.mark.comfy


# --- Batch layout ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cond_or_uncond", [[0], [1, 0], [0, 1], [2, 1, 0]])
def test_subject_groups_follow_cond_or_uncond_and_shapes(cond_or_uncond):
    from comfyui_syncd.nodes.layout import subject_groups

    latent = 6
    groups = subject_groups(latent * len(cond_or_uncond), {"cond_or_uncond": cond_or_uncond}, 3)
    assert [(g.rows.start, g.rows.stop) for g in groups] == [(s, s + 3) for s in range(0, latent * len(cond_or_uncond), 3)]
    assert [g.latent_index for g in groups] == [0, 3] * len(cond_or_uncond)
    assert [g.cond_index for g in groups] == [c for c in cond_or_uncond for _ in range(2)]


def test_subject_groups_refuse_batches_that_do_not_divide():
    from comfyui_syncd.nodes.layout import subject_groups

    with pytest.raises(ValueError, match="not divisible by images_per_subject=4"):
        subject_groups(12, {"cond_or_uncond": [1, 0]}, 4)
    with pytest.raises(RuntimeError, match="cannot hold 2 conditioning chunks"):
        subject_groups(7, {"cond_or_uncond": [1, 0]}, 1)


def test_chunk_roles_and_reference_access_come_from_the_uuids():
    from comfyui_syncd.nodes.layout import FULL, IMAGE, UNCOND, chunk_reference_access, chunk_roles

    to = {"cond_or_uncond": [2, 1, 0], "uuids": ["img", "neg", "pos"]}
    roles = {"neg": UNCOND, "img": IMAGE, "pos": FULL}
    assert chunk_roles(6, to, roles) == [(IMAGE, slice(0, 2)), (UNCOND, slice(2, 4)), (FULL, slice(4, 6))]
    assert chunk_reference_access(6, to, roles) == [(True, slice(0, 2)), (False, slice(2, 4)), (True, slice(4, 6))]
    # no guider (plain KSampler), or uuids that do not match the chunks: every chunk is FULL
    assert chunk_reference_access(6, to) == [(True, slice(0, 2)), (True, slice(2, 4)), (True, slice(4, 6))]
    assert chunk_roles(4, {"cond_or_uncond": [1, 0], "uuids": ["x"]}, roles) == [(FULL, slice(0, 2)),
                                                                                (FULL, slice(2, 4))]


# --- Block selection -------------------------------------------------------------------------------------------

UNET = [("input", 1), ("input", 2), ("input", 4), ("middle", 0), ("output", 3), ("output", 4), ("output", 5)]
FLUX = [("double", 0), ("double", 1), ("single", 0), ("single", 1)]


@pytest.mark.parametrize("spec,available,expected", [
    ("all", UNET, UNET),
    ("", FLUX, FLUX),
    ("output, middle", UNET, [("output", 3), ("output", 4), ("output", 5), ("middle", 0)]),
    ("input.2", UNET, [("input", 2)]),
    ("output.4-5, output.3", UNET, [("output", 4), ("output", 5), ("output", 3)]),
    ("DOUBLE.1, single", FLUX, [("double", 1), ("single", 0), ("single", 1)]),
])
def test_select_blocks(spec, available, expected):
    from comfyui_syncd.nodes.patch_kit import select_blocks

    assert select_blocks(spec, available, "node") == expected


@pytest.mark.parametrize("spec,message", [("double", "does not match this model"), ("input.3", "selects no block"),
                                          ("out", "does not match"), ("input.x", "does not match")])
def test_select_blocks_errors_name_the_fix(spec, message):
    from comfyui_syncd.nodes.patch_kit import select_blocks

    with pytest.raises(ValueError, match=message):
        select_blocks(spec, UNET, "node")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_block_walker_finds_the_blocks_comfyui_runs_attention_in(tiny, family):
    """The walker's (block, number) keys are exactly the ``extra_options["block"]`` ComfyUI reports from inside
    every self-attention of a forward pass (the keys replace patches are looked up by)."""
    from comfyui_syncd.nodes.patch_kit import model_blocks, unet_attention_blocks

    model = tiny.build_model(family).clone()
    seen = set()

    def probe(n, context, value, extra):
        seen.add(tuple(extra["block"]))
        return n, context, value

    model.set_model_attn1_patch(probe)
    _sample(model, tiny, family, n=1)
    walked = unet_attention_blocks(model.get_model_object("diffusion_model"))
    assert set(walked) == seen and len(walked) == len(seen)
    assert model_blocks(model.get_model_object("diffusion_model"), "n") == walked


def test_flux_block_walker_and_markers(tiny):
    """Flux: one ("double"/"single", i) per block; the kit's markers name the running block for the override."""
    from comfyui_syncd.nodes import patch_kit as kit

    model = tiny.build_model("flux").clone()
    dm = model.get_model_object("diffusion_model")
    assert kit.flux_blocks(dm) == [("double", i) for i in range(len(dm.double_blocks))] + \
        [("single", i) for i in range(len(dm.single_blocks))]
    seen = []
    kit.add_forward_wrapper(model, "probe", lambda state, *a: None)
    kit.mark_flux_blocks(model)
    kit.mark_flux_blocks(model)  # once per model: a second call adds no second marker
    kit.add_attention_override(model, lambda q, k, v, heads, mask, state, to: seen.append(state.block))
    _sample(model, tiny, "flux", n=1)
    assert seen[:4] == kit.flux_blocks(dm)


# --- Per-forward state -----------------------------------------------------------------------------------------

def test_forward_state_is_fresh_per_forward_and_keeps_the_template():
    from comfyui_syncd.nodes.patch_kit import (KEY, ForwardState, GuidanceBranches, Phase, begin_forward,
                                               forward_state)

    template = ForwardState(guidance=GuidanceBranches(roles={"u": "uncond"}))
    sigmas = torch.tensor([14.6, 7.0, 0.0])
    x = torch.zeros(2, 16, 8, 6)
    to = {KEY: template, "sigmas": torch.tensor([7.0, 7.0]), "sample_sigmas": sigmas}
    state = begin_forward(to, x, torch.zeros(2, 5, 8), flux=True)
    assert state is not template and state.guidance is template.guidance and state.phase is Phase.TARGET
    assert (state.step, state.sigma, state.flux_tokens) == (1, 7.0, (5, 4, 3))
    assert begin_forward(to, x, None, flux=True) is state     # a second pack wrapper of the same pass
    other = dict(to)                                          # ComfyUI copies the options for every pass
    other[KEY] = template
    assert begin_forward(other, x, None, flux=False) is not state
    assert forward_state({}).phase is Phase.TARGET            # outside the pack's wrappers


def test_phase_scope_nests():
    from comfyui_syncd.nodes.patch_kit import Phase, current_phase, in_reference_pass, phase_scope

    assert current_phase() is Phase.TARGET
    with phase_scope(Phase.REFERENCE):
        assert in_reference_pass()
        with phase_scope(Phase.TARGET):
            assert not in_reference_pass()
        assert in_reference_pass()
    assert not in_reference_pass()


# --- Fallbacks keep another pack's attention override ----------------------------------------------------------

def _count_override(counts):
    def override(func, *args, **kwargs):
        counts.append(1)
        return func(*args, **kwargs)
    return override


def _sample(model, tiny, family, n=3, steps=1):
    import comfy.sample

    noise = torch.randn(n, tiny.LATENT_CHANNELS[family], 8, 8, generator=torch.Generator().manual_seed(0))
    pos, neg = tiny.encode_text(family, "a photo of a dog"), tiny.encode_text(family, "")
    return comfy.sample.sample(model, noise, steps, 4.0, "euler", "simple", pos, neg, torch.zeros_like(noise),
                               seed=0, disable_pbar=True)


@pytest.mark.parametrize("node", ["shared_automatic", "references"])
def test_attention_fallbacks_still_call_an_earlier_override(tiny, family, node):
    """With the pack's patch applied but inactive (outside its window), every attention call still reaches an
    ``optimized_attention_override`` set by another pack before ours: same count as without our patch."""
    from comfyui_syncd.nodes.reference_injection import ReferenceConfig, apply_reference_injection
    from comfyui_syncd.nodes.reference_nodes import encode_references
    from comfyui_syncd.nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    base = tiny.build_model(family)
    base.model_options["transformer_options"]["optimized_attention_override"] = _count_override(plain := [])
    _sample(base, tiny, family)
    counted = []
    model = tiny.build_model(family)
    model.model_options["transformer_options"]["optimized_attention_override"] = _count_override(counted)
    if node == "shared_automatic":
        config = SharedAttentionConfig(3, "automatic", -1.0, -2.0, subject_tokens=(4,))  # window never reached
        patched, _ = apply_shared_attention(model, config)
    else:
        refs = encode_references(tiny.build_vae(family), torch.rand(1, 64, 64, 3))
        patched, _ = apply_reference_injection(model, ReferenceConfig(refs, tiny.encode_text(family, "a dog"),
                                                                      "auto", 0, -1.0, -2.0))
    _sample(patched, tiny, family)
    assert plain and len(counted) == len(plain)

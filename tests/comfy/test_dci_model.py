"""DCI dual-branch inference on tiny real SD1.5, SDXL and Flux models inside ComfyUI's sampling code."""

import pytest
import torch

pytestmark = pytest.mark.comfy

PROMPT = "a photo of a sks dog in times square"


@pytest.fixture(scope="module")
def models(tiny, families):
    return {f: tiny.build_model(f, seed=1, std=0.3) for f in families}


def dci(tiny, family, model, strength=1.0, window=0.5, prompt=PROMPT, cfg=4.0):
    from comfyui_syncd.nodes.dci_nodes import DCIDualBranch, DCIGuiderNode

    patched, p, aux = DCIDualBranch.execute(model, prompt, "sks dog", "dog", strength, window).args
    guider = DCIGuiderNode.execute(patched, tiny.encode_text(family, p), tiny.encode_text(family, aux),
                                   tiny.encode_text(family, ""), cfg).args[0]
    return guider


def plain(tiny, family, model, cfg=4.0):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(tiny.encode_text(family, PROMPT), tiny.encode_text(family, ""))
    guider.set_cfg(cfg)
    return guider


def run(guider, tiny, family, steps=4, n=2, sampler="euler"):
    import comfy.samplers

    noise = torch.randn(n, tiny.LATENT_CHANNELS[family], 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "simple",
                                             steps).cpu()
    return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object(sampler), sigmas, seed=3,
                         disable_pbar=True)


def test_window_zero_is_the_plain_model_exactly(tiny, models, family):
    model = models[family]
    assert torch.equal(run(dci(tiny, family, model, window=0.0), tiny, family), run(plain(tiny, family, model),
                                                                                      tiny, family))


def test_strength_to_minus_infinity_leaves_the_concept_branch_unchanged(tiny, models, family):
    model = models[family]
    guider = dci(tiny, family, model, strength=-1e9)
    torch.testing.assert_close(run(guider, tiny, family), run(plain(tiny, family, model), tiny, family),
                               rtol=1e-4, atol=1e-4)
    assert len(guider.weight_maps) > 0  # the auxiliary branch did run


def test_integration_changes_the_concept_branch_with_strength(tiny, models, family):
    model = models[family]
    base = run(plain(tiny, family, model), tiny, family)
    outs = {s: run(dci(tiny, family, model, strength=s), tiny, family) for s in (-2.0, 2.0)}
    assert (outs[2.0] - base).abs().max() > 1e-3
    assert (outs[2.0] - outs[-2.0]).abs().max() > 1e-3


def count_passes(model):
    """A clone that records the phase of every forward pass (kit ForwardState) and its batch size."""
    import comfy.patcher_extension

    from comfyui_syncd.nodes import patch_kit as kit

    passes = []
    m = model.clone()

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        state = transformer_options.get(kit.KEY)
        passes.append((getattr(state, "phase", None), x.shape[0], float(t.max())))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_count", wrapper)
    return m, passes


@pytest.mark.parametrize("window", [0.15, 0.3])
def test_auxiliary_passes_only_inside_the_window(tiny, models, window):
    from comfyui_syncd.nodes.dci import in_window
    from comfyui_syncd.nodes.patch_kit import Phase

    model, passes = count_passes(models["sd15"])
    guider = dci(tiny, "sd15", model, window=window)
    run(guider, tiny, "sd15", steps=12)
    sampling = model.get_model_object("model_sampling")
    aux = [p for p in passes if p[0] is Phase.AUXILIARY]
    inside = [s for s in {p[2] for p in passes} if sampling.timestep(torch.tensor([s])).item() / 1000 > 1 - window]
    assert len(aux) == len(inside) == len(guider.weight_maps) > 0
    assert all(in_window(sampling, p[2], window) for p in aux)
    # the auxiliary latents (2) only in their own pass; the concept latents with cond and uncond batched (4)
    assert all(p[1] == (2 if p[0] is Phase.AUXILIARY else 4) for p in passes)
    assert len(passes) == 12 + len(aux)  # the concept branch every step, the auxiliary one inside the window


def test_every_batch_layout_gives_the_same_result(tiny, models, family, separate_passes, alternating_passes):
    model = models[family]
    joint = run(dci(tiny, family, model), tiny, family)
    effect = (joint - run(plain(tiny, family, model), tiny, family)).abs().max()
    for layout in (separate_passes(model), separate_passes(model, reverse=True), alternating_passes(model)):
        # float noise of batching only (the plain model differs as much between layouts), far below DCI's effect
        difference = (run(dci(tiny, family, layout), tiny, family) - joint).abs().max()
        assert difference < 2e-6 * joint.abs().max() + 1e-5 or difference < 1e-3 * effect, (difference, effect)


def test_only_the_concept_conditional_rows_are_blended(tiny, models, separate_passes):
    """In separate passes (where cond_or_uncond is (0,) for both), the unconditional pass of a DCI step equals the
    plain model on the same input, the concept pass does not."""
    import comfy.patcher_extension

    from comfyui_syncd.nodes import patch_kit as kit

    model = separate_passes(models["sd15"])
    seen = []

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        state = transformer_options.get(kit.KEY)
        if getattr(state, "dual_branch", None) is not None and state.phase is kit.Phase.TARGET:
            plain_out = executor(x, t, c_concat, c_crossattn, control,
                                 {**transformer_options, kit.KEY: kit.ForwardState()}, **kwargs)
            (uuid,) = transformer_options["uuids"]  # one cond per pass here
            seen.append((state.guidance.roles[uuid], bool(torch.equal(out, plain_out))))
        return out

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_rows", wrapper)
    run(dci(tiny, "sd15", m, strength=2.0), tiny, "sd15")
    assert {role for role, _ in seen} == {"full", "uncond"}
    assert all(same for role, same in seen if role == "uncond")     # unconditional: untouched
    assert not any(same for role, same in seen if role == "full")   # concept conditional: blended


def test_weight_maps_node_outputs_one_mask_per_step_and_image(tiny, models):
    from comfyui_syncd.nodes.dci_nodes import DCIWeightMaps

    guider = dci(tiny, "sd15", models["sd15"], strength=1.0, window=0.3)
    out = run(guider, tiny, "sd15", steps=10)
    (masks,) = DCIWeightMaps.execute(guider, {"samples": out}, 8).args
    assert masks.shape == (2 * len(guider.weight_maps), 64, 64)
    assert 0 <= float(masks.min()) and float(masks.max()) <= 1 and float(masks.std()) > 0


def test_wrong_wiring_is_named(tiny, models):
    from comfyui_syncd.nodes.dci_nodes import DCIDualBranch, DCIGuiderNode

    model = models["sd15"]
    with pytest.raises(ValueError, match="not patched by DCI Dual-Branch"):
        DCIGuiderNode.execute(model, *(tiny.encode_text("sd15", t) for t in (PROMPT, "a dog", "")), 4.0)
    patched = DCIDualBranch.execute(model, PROMPT, "sks dog", "dog", 1.0, 0.3).args[0]
    with pytest.raises(ValueError, match="auxiliary conditioning did not encode the auxiliary prompt"):
        DCIGuiderNode.execute(patched, *(tiny.encode_text("sd15", t) for t in (PROMPT, "a cat", "")), 4.0)
    with pytest.raises(ValueError, match="'sks cat' is not in the prompt"):
        DCIDualBranch.execute(model, PROMPT, "sks cat", "cat", 1.0, 0.3)


def test_token_sets_of_a_textual_inversion_concept_with_comfyui_tokenizer(tmp_path):
    """'embedding:name' (an ICO concept) is found with ComfyUI's own tokenizer, vectors and all."""
    import comfy.sd1_clip
    import safetensors.torch

    from comfyui_syncd.core.dci_prompt import dual_branch_tokens
    from comfyui_syncd.core.tokens import clip_tokenizer

    safetensors.torch.save_file({"emb_params": torch.randn(3, 768)}, str(tmp_path / "my_dog.safetensors"))

    class Clip:  # the part of ComfyUI's CLIP object that clip_tokenizer uses
        tokenizer = comfy.sd1_clip.SDTokenizer(embedding_directory=str(tmp_path))

        def tokenize(self, text):
            return {"l": self.tokenizer.tokenize_with_weights(text)}

    tokens = dual_branch_tokens(clip_tokenizer(Clip()), "a photo of a embedding:my_dog dog on the beach",
                                "embedding:my_dog dog", "dog")
    assert tokens.auxiliary_prompt == "a photo of a dog on the beach"
    assert tokens.concept.tokens == (5, 6, 7, 8)  # <start> a photo of a [3 vectors] dog
    assert tokens.concept.window == tuple(range(1, 12)) and tokens.auxiliary_noun == (5,)


def test_a_longer_negative_prompt_gives_the_same_result_in_every_layout(tiny, models, separate_passes):
    """ComfyUI repeats the shorter context of a joint pass to the longer one's length; the maps fold the copies."""
    from comfyui_syncd.nodes.dci_nodes import DCIDualBranch, DCIGuiderNode

    model = models["sd15"]
    long_negative = tiny.encode_text("sd15", "blurry, " * 60)
    assert long_negative[0][0].shape[1] == 154

    def sample(m):
        patched, p, aux = DCIDualBranch.execute(m, PROMPT, "sks dog", "dog", 2.0, 0.5).args
        guider = DCIGuiderNode.execute(patched, tiny.encode_text("sd15", p), tiny.encode_text("sd15", aux),
                                       long_negative, 4.0).args[0]
        return run(guider, tiny, "sd15")
    joint, separate = sample(model), sample(separate_passes(model))
    assert (joint - separate).abs().max() < 1e-5 * joint.abs().max() + 1e-5


def test_post_cfg_functions_see_both_branches_once_with_the_shared_unconditional(tiny, models):
    """The auxiliary branch is CFG on the concept latent's unconditional ε (upstream share_guidance), and post-CFG
    functions (CFG++ samplers) run once per evaluation on both branches."""
    seen = []

    def post(args):
        seen.append(args)
        return args["denoised"]

    model = models["sd15"].clone()
    model.set_model_sampler_post_cfg_function(post)
    guider = dci(tiny, "sd15", model, window=0.5, cfg=4.0)
    run(guider, tiny, "sd15")
    inside = [a for a in seen if not torch.equal(a["cond_denoised"][2:], a["input"][2:])]
    assert inside and len(inside) < len(seen)  # the window, then the dropped auxiliary branch
    for a in inside:
        x, b = a["input"], 2
        xc, xa = x[:b], x[b:]
        torch.testing.assert_close(a["uncond_denoised"][b:], a["uncond_denoised"][:b] + (xa - xc))
        eps = lambda d, lat: (lat - d) / a["sigma"][b:].view(-1, 1, 1, 1)  # noqa: E731
        eps_u, eps_a = eps(a["uncond_denoised"][:b], xc), eps(a["cond_denoised"][b:], xa)
        expected = xa - a["sigma"][b:].view(-1, 1, 1, 1) * (eps_u + 4.0 * (eps_a - eps_u))
        torch.testing.assert_close(a["denoised"][b:], expected, rtol=1e-4, atol=1e-3)
    for a in seen:
        assert a["denoised"].shape[0] == 4
    assert run(dci(tiny, "sd15", models["sd15"]), tiny, "sd15", sampler="euler_cfg_pp").shape[0] == 2


def test_callbacks_and_noise_of_the_doubled_batch(tiny, models):
    import comfy.samplers

    from comfyui_syncd.nodes.dci import auxiliary_noise

    guider = dci(tiny, "sd15", models["sd15"])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.calculate_sigmas(models["sd15"].get_model_object("model_sampling"), "simple", 4).cpu()
    shapes = []
    out = guider.sample(noise, torch.zeros(1, 4, 8, 8), comfy.samplers.sampler_object("euler"), sigmas, seed=3,
                        callback=lambda i, x0, x, n: shapes.append((x0.shape[0], x.shape[0])), disable_pbar=True)
    assert out.shape[0] == 2 and shapes and set(shapes) == {(2, 2)}  # previews/denoised_output: concept only
    aux = auxiliary_noise(noise, 3)
    assert aux.shape == noise.shape and not torch.equal(aux, noise)
    assert not torch.equal(aux, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)))


def test_conditionings_dci_cannot_blend_are_refused(tiny, models):
    from comfyui_syncd.nodes.dci_nodes import DCIDualBranch, DCIGuiderNode

    patched, p, aux = DCIDualBranch.execute(models["sd15"], PROMPT, "sks dog", "dog", 1.0, 0.3).args
    positive, auxiliary = tiny.encode_text("sd15", p), tiny.encode_text("sd15", aux)
    with pytest.raises(ValueError, match="the positive conditioning must be one plain text encoding"):
        DCIGuiderNode.execute(patched, positive + positive, auxiliary, tiny.encode_text("sd15", ""), 4.0)
    with_area = [[auxiliary[0][0], {**auxiliary[0][1], "area": (4, 4, 0, 0)}]]
    with pytest.raises(ValueError, match="auxiliary conditioning must be one plain text encoding .* with area"):
        DCIGuiderNode.execute(patched, positive, with_area, tiny.encode_text("sd15", ""), 4.0)
    with pytest.raises(ValueError, match="longer than one text-encoder chunk"):
        DCIDualBranch.execute(models["sd15"], PROMPT + ", very detailed" * 30, "sks dog", "dog", 1.0, 0.3)

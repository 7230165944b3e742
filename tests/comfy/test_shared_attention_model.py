"""SynCDSharedAttention on tiny real SD1.5, SDXL and Flux models inside ComfyUI's own sampling code."""

import pytest
import torch

pytestmark = pytest.mark.comfy

PROMPT = "a photo of a dog on the beach"


@pytest.fixture(scope="module")
def models(tiny, families):
    return {f: tiny.build_model(f, seed=3, width=32) for f in families}


def conds(tiny, family):
    return tiny.encode_text(family, PROMPT), tiny.encode_text(family, "")


def noise_for(tiny, family, n, seed=0):
    return torch.randn(n, tiny.LATENT_CHANNELS[family], 8, 8, generator=torch.Generator().manual_seed(seed))


def sample(model, noise, pos, neg, steps=1, cfg=4.0, model_options=None):
    import comfy.sample

    if model_options:
        model = model.clone()
        model.model_options.update(model_options)
    latent = torch.zeros_like(noise)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, latent, seed=0,
                               disable_pbar=True)


def patch(model, images_per_subject=3, mask_mode="none", masks=None, unmasked_first_step=False, blocks="all",
          start=0.0, end=1.0, **kw):
    from comfyui_syncd.nodes.shared_attention_node import SynCDSharedAttention

    return SynCDSharedAttention.execute(model, images_per_subject, mask_mode, start, end, unmasked_first_step,
                                        blocks, foreground_masks=masks, **kw).args[0]


def influence(tiny, family, model, source, n=3, **sample_kw):
    """Max change of every image's output when image ``source``'s noise changes."""
    pos, neg = conds(tiny, family)
    noise = noise_for(tiny, family, n)
    base = sample(model, noise, pos, neg, **sample_kw)
    noise2 = noise.clone()
    noise2[source] = noise_for(tiny, family, 1, seed=99)[0]
    changed = sample(model, noise2, pos, neg, **sample_kw)
    return (changed - base).flatten(1).abs().amax(1)


def test_unpatched_images_are_independent(tiny, models, family):
    d = influence(tiny, family, models[family], source=1)
    assert d[0] == 0 and d[2] == 0 and d[1] > 0


def test_jedi_coupled_attention_couples_every_image(tiny, models, family):
    d = influence(tiny, family, patch(models[family], mask_mode="none"), source=1)
    assert d[0] > 1e-6 and d[2] > 1e-6


def test_dependence_follows_foreground_masks(tiny, models, family):
    masks = torch.zeros(3, 64, 64)
    masks[:, 16:48, 16:48] = 1
    shared = influence(tiny, family, patch(models[family], mask_mode="foreground_masks", masks=masks), source=1)
    assert shared[0] > 1e-6 and shared[2] > 1e-6
    masks[1] = 0  # image 1 shows no subject: the others must not see it at all
    hidden = influence(tiny, family, patch(models[family], mask_mode="foreground_masks", masks=masks), source=1)
    assert hidden[0] == 0 and hidden[2] == 0
    # image 1 itself still looks at the other images' foreground
    d = influence(tiny, family, patch(models[family], mask_mode="foreground_masks", masks=masks), source=0)
    assert d[1] > 1e-6


def test_first_step_unmasked_option(tiny, models, family):
    masks = torch.ones(3, 64, 64)
    masks[1] = 0
    on = influence(tiny, family, patch(models[family], mask_mode="foreground_masks", masks=masks,
                                       unmasked_first_step=True), source=1)
    assert on[0] > 1e-6  # one-step sampling: the only step is the first, which shares everything


def test_groups_never_leak(tiny, models, family):
    model = patch(models[family], images_per_subject=2, mask_mode="none")
    d = influence(tiny, family, model, source=0, n=4)
    assert d[1] > 1e-6
    assert d[2] == 0 and d[3] == 0


def test_percent_range_switches_sharing_off(tiny, models, family):
    d = influence(tiny, family, patch(models[family], mask_mode="none", start=0.5, end=1.0), source=1)
    assert d[0] == 0 and d[2] == 0  # the single step lies before start_percent






def test_batch_layouts_give_the_same_result(tiny, models, family, separate_passes, alternating_passes):
    masks = torch.zeros(3, 64, 64)
    masks[0, :32] = 1
    masks[1, :, 20:] = 1
    masks[2, 10:50, 10:50] = 1
    model = patch(models[family], mask_mode="foreground_masks", masks=masks)
    pos, neg = conds(tiny, family)
    noise = noise_for(tiny, family, 3)
    joint = sample(model, noise, pos, neg, steps=3)
    for layout in (separate_passes(model), separate_passes(model, reverse=True), alternating_passes(model)):
        other = sample(layout, noise, pos, neg, steps=3)
        torch.testing.assert_close(other, joint, rtol=1e-4, atol=1e-4)
    unpatched = sample(models[family], noise, pos, neg, steps=3)
    assert (joint - unpatched).abs().max() > 1e-6


def test_cfg_one_runs_cond_alone_and_still_shares(tiny, models, family):
    d = influence(tiny, family, patch(models[family], mask_mode="none"), source=2, cfg=1.0)
    assert d[0] > 1e-6 and d[1] > 1e-6


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_three_condition_guider_shares_within_each_chunk(tiny, models, family, separate_passes):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG

    model = patch(models[family], mask_mode="none")
    pos, neg = conds(tiny, family)
    middle = tiny.encode_text(family, "a dog")
    noise = noise_for(tiny, family, 3)
    sigmas = model.get_model_object("model_sampling").sigma(torch.tensor([999.0, 500.0])).tolist() + [0.0]
    sampler = comfy.samplers.sampler_object("euler")
    seen = []

    def run(m):
        m = m.clone()

        def spy(apply_model, args):
            seen.append(list(args["cond_or_uncond"]))
            return apply_model(args["input"], args["timestep"], **args["c"])
        m.set_model_unet_function_wrapper(spy)
        guider = Guider_DualCFG(m)
        guider.set_conds(pos, middle, neg)
        guider.set_cfg(3.0, 2.0)
        return guider.sample(noise, torch.zeros_like(noise), sampler, torch.tensor(sigmas), seed=0,
                             disable_pbar=True)

    joint = run(model)
    assert [2, 1, 0] in seen  # three chunks in one forward pass
    seen.clear()
    separate = run(separate_passes(model))
    assert seen and all(len(chunks) == 1 for chunks in seen)  # really one cond per forward pass
    torch.testing.assert_close(separate, joint, rtol=1e-4, atol=1e-4)


def test_reference_implementation_matches_efficient(tiny, models, family):
    masks = torch.zeros(3, 64, 64)
    masks[:, 8:40, 12:60] = 1
    pos, neg = conds(tiny, family)
    noise = noise_for(tiny, family, 3)
    eff = sample(patch(models[family], mask_mode="foreground_masks", masks=masks), noise, pos, neg, steps=2)
    ref = sample(patch(models[family], mask_mode="foreground_masks", masks=masks,
                       attention_implementation="reference"), noise, pos, neg, steps=2)
    torch.testing.assert_close(eff, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,blocks", [("sd15", "output"), ("sd15", "input.1, middle"), ("sdxl", "output.3-5"),
                                           ("flux", "single"), ("flux", "double.1")])
def test_block_selection(tiny, models, family, blocks):
    model = patch(models[family], mask_mode="none", blocks=blocks)
    d = influence(tiny, family, model, source=1)
    assert d[0] > 1e-6
    pos, neg = conds(tiny, family)
    noise = noise_for(tiny, family, 3)
    everywhere = sample(patch(models[family], mask_mode="none"), noise, pos, neg)
    assert (sample(model, noise, pos, neg) - everywhere).abs().max() > 1e-7


def test_flux_rope_layout_matters(tiny, models):
    pos, neg = conds(tiny, "flux")
    noise = noise_for(tiny, "flux", 3)
    stacked = sample(patch(models["flux"], mask_mode="none"), noise, pos, neg)
    shared = sample(patch(models["flux"], mask_mode="none", flux_rope_layout="shared"), noise, pos, neg)
    assert (stacked - shared).abs().max() > 1e-7


def test_rope_shift_equals_reencoding_at_shifted_rows():
    from comfy.ldm.flux.layers import EmbedND
    from comfy.ldm.flux.math import apply_rope1

    from comfyui_syncd.attention.rope import shift_axis

    axes, theta = [4, 6, 6], 10000
    embed = EmbedND(16, theta, axes)
    ids = torch.zeros(1, 12, 3)
    ids[0, :, 1] = torch.arange(12) // 4
    ids[0, :, 2] = torch.arange(12) % 4
    shifted = ids.clone()
    shifted[0, :, 1] += 8
    k = torch.randn(1, 2, 12, 16)
    torch.testing.assert_close(shift_axis(apply_rope1(k, embed(ids)), 8, axes, 1, theta),
                               apply_rope1(k, embed(shifted)), rtol=1e-5, atol=1e-5)


def test_automatic_masks_are_estimated_every_step_and_used(tiny, models, family):
    from comfyui_syncd.nodes.shared_attention import SharedAttentionConfig, apply_shared_attention
    from comfyui_syncd.core.tokens import subject_token_positions

    tokens = subject_token_positions(tiny.token_ids, PROMPT, "dog")
    assert tokens == (5,)  # <start> a photo of a dog
    config = SharedAttentionConfig(3, "automatic", 1e9, 0.0, unmasked_first_step=True, subject_tokens=tokens)
    model, run = apply_shared_attention(models[family], config)
    pos, neg = conds(tiny, family)
    noise = noise_for(tiny, family, 3)
    out = sample(model, noise, pos, neg, steps=4)
    est = run.estimator
    assert est._history_steps == 3  # steps 0..2 folded in; step 3 used them
    masks = est.masks
    grid = (4, 4) if family == "flux" else (8, 8)
    assert masks.shape == (3, *grid) and set(masks.unique().tolist()) <= {0.0, 1.0}
    none = sample(patch(models[family], mask_mode="none", unmasked_first_step=True), noise, pos, neg, steps=4)
    if not bool(masks.all()):
        assert (out - none).abs().max() > 1e-7  # the estimated masks restricted sharing after step 0
    # a second run starts from scratch: same result
    torch.testing.assert_close(sample(model, noise, pos, neg, steps=4), out)


def test_automatic_masks_node_gives_the_runs_otsu_maps(tiny, models, family):
    import torch.nn.functional as F

    from comfyui_syncd.core.tokens import subject_token_positions
    from comfyui_syncd.nodes.automatic_masks import SynCDAutomaticMasks, estimated_masks
    from comfyui_syncd.nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    tokens = subject_token_positions(tiny.token_ids, PROMPT, "dog")
    config = SharedAttentionConfig(3, "automatic", 1e9, 0.0, unmasked_first_step=True, subject_tokens=tokens)
    model, run = apply_shared_attention(models[family], config)
    pos, neg = conds(tiny, family)
    images = torch.zeros(3, 48, 80, 3)
    with pytest.raises(ValueError, match="no estimate yet"):
        estimated_masks(model, images)
    sample(model.clone(), noise_for(tiny, family, 3), pos, neg, steps=4)  # the sampler's clone shares the run
    masks = SynCDAutomaticMasks.execute(model, images).args[0]
    est = run.estimator
    assert est._history_steps == 4  # the last step folded in too
    expected = F.interpolate(est.otsu_masks[:, None], size=(48, 80), mode="nearest")[:, 0]
    torch.testing.assert_close(masks, expected)
    assert masks.shape == (3, 48, 80) and set(masks.unique().tolist()) <= {0.0, 1.0}
    dilated = estimated_masks(model, images, dilated=True)
    assert bool((dilated >= masks).all())  # dilation only adds
    with pytest.raises(ValueError, match="3 masks but 2 images"):
        estimated_masks(model, images[:2])
    with pytest.raises(ValueError, match="mask_mode 'none'"):
        estimated_masks(patch(models[family], mask_mode="none"), images)
    with pytest.raises(ValueError, match="has no Masked Shared Attention"):
        estimated_masks(models[family], images)


def test_subject_word_found_with_a_real_clip_tokenizer(tiny):
    import comfy.sd1_clip

    from comfyui_syncd.core.tokens import subject_token_positions

    tok = comfy.sd1_clip.SDTokenizer()

    def tokenize(text):
        return [t[0] for t in tok.tokenize_with_weights(text)[0]]
    assert subject_token_positions(tokenize, "A Golden-Retriever runs", "retriever") == (4,)
    word = [t for t in tokenize("corgi") if t not in set(tokenize(""))]
    start = subject_token_positions(tokenize, "my corgi sleeps", "corgi")[0]
    assert tokenize("my corgi sleeps")[start:start + len(word)] == word


def test_bad_inputs_give_clear_errors(tiny, models):
    pos, neg = conds(tiny, "sd15")
    model = models["sd15"]
    masks = torch.ones(2, 64, 64)
    with pytest.raises(ValueError, match="holds 2 masks but the latent batch has 3"):
        sample(patch(model, mask_mode="foreground_masks", masks=masks), noise_for(tiny, "sd15", 3), pos, neg)
    with pytest.raises(ValueError, match="not divisible by images_per_subject=3"):
        sample(patch(model), noise_for(tiny, "sd15", 4), pos, neg)
    empty = torch.ones(6, 64, 64)
    empty[3:] = 0
    with pytest.raises(ValueError, match=r"images 3..5 is empty"):
        sample(patch(model, mask_mode="foreground_masks", masks=empty), noise_for(tiny, "sd15", 6), pos, neg)
    with pytest.raises(ValueError, match="no foreground_masks are connected"):
        patch(model, mask_mode="foreground_masks")
    with pytest.raises(ValueError, match="'cat' is not in the prompt"):
        patch(model, mask_mode="automatic", prompt=PROMPT, subject_word="cat")
    with pytest.raises(ValueError, match="need subject_word"):
        patch(model, mask_mode="automatic", prompt=PROMPT, subject_word=" ")
    with pytest.raises(ValueError, match="block selector 'double'"):
        patch(model, blocks="double")
    with pytest.raises(ValueError, match="selects no block"):
        patch(model, blocks="input.2")
    with pytest.raises(ValueError, match="start_percent"):
        patch(model, start=0.8, end=0.2)


def test_flux_keeps_earlier_block_replace_patches(tiny, models):
    calls = []

    def earlier(args, extra):
        calls.append(1)
        return extra["original_block"](args)
    m = models["flux"].clone()
    m.set_model_patch_replace(earlier, "dit", "double_block", 0)
    d = influence(tiny, "flux", patch(m, mask_mode="none"), source=1)
    assert calls and d[0] > 1e-6


@pytest.mark.parametrize("tokenizer_path,prompt,expected_key", [
    ("comfy.sd1_clip.SD1Tokenizer", "a photo of a dog on the beach", "l"),
    ("comfy.text_encoders.flux.FluxTokenizer", "a photo of a dog on the beach", "t5xxl"),
])
def test_clip_tokenizer_reads_the_tokens_that_condition_the_model(tokenizer_path, prompt, expected_key):
    import importlib

    import comfy.sd

    from comfyui_syncd.core.tokens import clip_tokenizer, subject_token_positions

    module, name = tokenizer_path.rsplit(".", 1)
    clip = comfy.sd.CLIP(no_init=True)  # tokenizer only: CLIP.tokenize without text-encoder weights
    clip.tokenizer, clip.tokenizer_options = getattr(importlib.import_module(module), name)(), {}
    tokenize = clip_tokenizer(clip)
    ids = tokenize(prompt)
    direct = [t[0] for t in clip.tokenize(prompt)[expected_key][0]]
    assert ids == direct
    (pos,) = subject_token_positions(tokenize, prompt, "dog")
    word = [t for t in tokenize("dog") if t not in set(tokenize(""))]
    assert ids[pos] == word[0]
    assert subject_token_positions(tokenize, "Dog running", "dog") == (subject_token_positions(tokenize, "Dog running", "Dog"))

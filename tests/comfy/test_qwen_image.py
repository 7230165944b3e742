"""Masked Shared Attention, automatic masks, reference features and the normalized guider on a tiny real
Qwen-Image (ComfyUI's ``QwenImageTransformer2DModel``, 5-D Wan 2.1 latents) inside ComfyUI's own sampling code,
mirroring the Flux tests."""

import pytest
import torch

pytestmark = pytest.mark.comfy

FAMILY = "qwen_image"
PROMPT = "a photo of a dog on the beach"


@pytest.fixture(scope="module")
def model(tiny):
    return tiny.build_model(FAMILY, seed=3, width=32, std=0.3)  # weights that carry signal through both blocks


@pytest.fixture(scope="module")
def vae(tiny):
    return tiny.build_vae(FAMILY, seed=1)


def conds(tiny):
    return tiny.encode_text(FAMILY, PROMPT), tiny.encode_text(FAMILY, "")


def noise_for(n, seed=0, size=8):
    """(n, 16, 1, size, size): the video-style latents Qwen-Image samples (ComfyUI unsqueezes the empty SD3
    latent)."""
    return torch.randn(n, 16, 1, size, size, generator=torch.Generator().manual_seed(seed))


def sample(tiny, model, noise, steps=1, cfg=4.0):
    import comfy.sample

    pos, neg = conds(tiny)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, torch.zeros_like(noise),
                               seed=0, disable_pbar=True)


def patch(model, images_per_subject=3, mask_mode="none", masks=None, unmasked_first_step=False, **kw):
    from comfyui_syncd.nodes.shared_attention_node import SynCDSharedAttention

    return SynCDSharedAttention.execute(model, images_per_subject, mask_mode, 0.0, 1.0, unmasked_first_step, "all",
                                        foreground_masks=masks, **kw).args[0]


def influence(tiny, model, source, n=3):
    """Max change of every image's output when image ``source``'s noise changes."""
    noise = noise_for(n)
    base = sample(tiny, model, noise)
    changed = noise.clone()
    changed[source] = noise_for(1, seed=99)[0]
    return (sample(tiny, model, changed) - base).flatten(1).abs().amax(1)


# --- Masked Shared Attention ----------------------------------------------------------------------------------

def test_qwen_image_is_a_joint_model_with_its_blocks(model):
    from comfyui_syncd.nodes import patch_kit as kit

    dm = model.get_model_object("diffusion_model")
    assert kit.joint_family(dm) == "qwen_image" and not kit.is_flux(dm)
    assert kit.model_blocks(dm, "test") == [("double", 0), ("double", 1)]
    assert kit.rope_params(dm) == ([4, 6, 6], 10000)


def test_unpatched_images_are_independent_and_coupled_attention_couples(tiny, model):
    d = influence(tiny, model, source=1)
    assert d[0] == 0 and d[2] == 0 and d[1] > 0
    d = influence(tiny, patch(model, mask_mode="none"), source=1)
    assert d[0] > 1e-6 and d[2] > 1e-6


def test_dependence_follows_foreground_masks(tiny, model):
    masks = torch.zeros(3, 64, 64)
    masks[:, 16:48, 16:48] = 1
    shared = influence(tiny, patch(model, mask_mode="foreground_masks", masks=masks), source=1)
    assert shared[0] > 1e-6 and shared[2] > 1e-6
    masks[1] = 0  # image 1 shows no subject: the others must not see it at all
    hidden = influence(tiny, patch(model, mask_mode="foreground_masks", masks=masks), source=1)
    assert hidden[0] == 0 and hidden[2] == 0
    d = influence(tiny, patch(model, mask_mode="foreground_masks", masks=masks), source=0)
    assert d[1] > 1e-6  # image 1 itself still looks at the other images' foreground


def test_zero_masks_equal_plain_sampling(tiny, model):
    """An image whose group-mates' masks are all zero has nothing to share with: it samples as without the patch
    (a group whose masks are all zero is refused before sampling, as nothing would be shared)."""
    noise = noise_for(3)
    plain = sample(tiny, model, noise, steps=2)
    masks = torch.zeros(3, 64, 64)
    masks[0, 16:48, 16:48] = 1
    out = sample(tiny, patch(model, mask_mode="foreground_masks", masks=masks), noise, steps=2)
    torch.testing.assert_close(out[0], plain[0], rtol=1e-5, atol=1e-4)
    assert (out[1:] - plain[1:]).abs().max() > 1e-4  # images 1 and 2 see image 0's foreground
    with pytest.raises(ValueError, match="every foreground mask of the subject group"):
        sample(tiny, patch(model, mask_mode="foreground_masks", masks=torch.zeros(3, 64, 64)), noise)


def test_groups_never_leak(tiny, model):
    d = influence(tiny, patch(model, images_per_subject=2, mask_mode="none"), source=0, n=4)
    assert d[1] > 1e-6
    assert d[2] == 0 and d[3] == 0


def test_batch_layouts_give_the_same_result(tiny, model, separate_passes, alternating_passes):
    masks = torch.zeros(3, 64, 64)
    masks[0, :32] = 1
    masks[1, :, 20:] = 1
    masks[2, 10:50, 10:50] = 1
    patched = patch(model, mask_mode="foreground_masks", masks=masks)
    noise = noise_for(3)
    joint = sample(tiny, patched, noise, steps=3)
    for layout in (separate_passes(patched, reverse=True), alternating_passes(patched)):
        torch.testing.assert_close(sample(tiny, layout, noise, steps=3), joint, rtol=1e-4, atol=1e-4)


def test_stacked_rope_layout_equals_dense_concatenated_positions(tiny, model):
    """The other images' keys sit below the own image (upstream's stacking, ``flux_syncd.py``): recompute one
    block's shared attention from the q/k/v Qwen-Image's joint attention received, with every other image's keys
    re-encoded by Qwen-Image's own EmbedND/apply_rotary_emb at dense positions of a canvas stacked under the own
    image (rows + slot·h, the centred ids of ``process_img``), and compare with the patched model's output."""
    from comfy.ldm.qwen_image.model import apply_rotary_emb

    from comfyui_syncd.attention.shared import roll_slot
    from comfyui_syncd.nodes import patch_kit as kit

    seen = []

    def recorder(q, k, v, heads, mask, state, to, call_next):
        if state.phase is kit.Phase.TARGET and state.block == ("double", 1):
            seen.append((q, k, v, state.flux_tokens, list(to.get("cond_or_uncond")), call_next()))
        return None

    patched = patch(model, mask_mode="none").clone()
    kit.add_attention_override(patched, recorder, chained=True)  # outermost: sees the shared attention's output
    sample(tiny, patched, noise_for(3), cfg=1.0)
    (q, k, v, (n_text, gh, gw), chunks, out), = seen
    assert chunks == [0] and q.shape[0] == 3
    dm = model.get_model_object("diffusion_model")
    _, img_ids, _ = dm.process_img(torch.zeros(1, 16, 1, 2 * gh, 2 * gw))  # the centred ids of one image

    def rope(x, ids):  # heads-first x at the given ids, as Qwen-Image's joint attention encodes them
        emb = dm.pe_embedder(ids).squeeze(1).unsqueeze(2)
        return apply_rotary_emb(x.transpose(1, 2), emb.to(x.dtype)).transpose(1, 2)

    image = slice(n_text, n_text + gh * gw)
    for i in range(3):
        keys, values = [k[i:i + 1]], [v[i:i + 1]]
        for s in range(1, 3):
            j = (i - s) % 3
            assert roll_slot(i, j, 3) == s
            plain = rope(k[j:j + 1, :, image], -img_ids)  # undo the own-image encoding
            dense = img_ids.clone()
            dense[..., 1] += s * gh                       # the slot-s image of the stacked canvas
            keys.append(rope(plain, dense))
            values.append(v[j:j + 1, :, image])
        want_image = torch.nn.functional.scaled_dot_product_attention(q[i:i + 1, :, image], torch.cat(keys, 2),
                                                                      torch.cat(values, 2))
        want_text = torch.nn.functional.scaled_dot_product_attention(q[i:i + 1, :, :n_text], k[i:i + 1],
                                                                     v[i:i + 1])
        torch.testing.assert_close(out[i:i + 1, :, image], want_image, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[i:i + 1, :, :n_text], want_text, rtol=1e-4, atol=1e-5)


def test_rope_layout_matters(tiny, model):
    noise = noise_for(3)
    stacked = sample(tiny, patch(model, mask_mode="none"), noise)
    shared = sample(tiny, patch(model, mask_mode="none", flux_rope_layout="shared"), noise)
    assert (stacked - shared).abs().max() > 1e-6


# --- Automatic masks ------------------------------------------------------------------------------------------

def test_subject_word_is_located_with_the_qwen_tokenizer(tiny):
    """Qwen2.5-VL's tokens after the chat-template prefix ComfyUI's text encoder drops, found through the CLIP
    object's tokenizer as a real CLIPLoader(type qwen_image) gives it."""
    import comfy.text_encoders.qwen_image

    from comfyui_syncd.core.tokens import clip_tokenizer, qwen_template_end, subject_token_positions

    tokenizer = comfy.text_encoders.qwen_image.QwenImageTokenizer()

    class Clip:  # the part of comfy.sd.CLIP that clip_tokenizer reads
        def tokenize(self, text):
            return tokenizer.tokenize_with_weights(text)

    full = [t[0] for t in tokenizer.tokenize_with_weights(PROMPT)["qwen25_7b"][0]]
    assert qwen_template_end(full) == 34  # system prompt + "<|im_start|>user\n", as encode_token_weights drops
    tokenize = clip_tokenizer(Clip())
    assert tokenize(PROMPT) == tiny.qwen_token_ids(PROMPT) == full[34:]
    assert subject_token_positions(tokenize, PROMPT, "dog") == (4,)  # a photo of a ␣dog
    assert subject_token_positions(tokenize, "Dog on the beach", "dog") == (0,)  # first word: no leading space
    with pytest.raises(ValueError, match="not in the prompt"):
        subject_token_positions(tokenize, PROMPT, "cat")
    assert tiny.encode_text(FAMILY, PROMPT)[0][0].shape[1] == len(full) - 34


def test_automatic_masks_are_estimated_every_step_and_used(tiny, model):
    from comfyui_syncd.core.tokens import subject_token_positions
    from comfyui_syncd.nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    tokens = subject_token_positions(tiny.qwen_token_ids, PROMPT, "dog")
    config = SharedAttentionConfig(3, "automatic", 1e9, 0.0, unmasked_first_step=True, subject_tokens=tokens,
                                   prompt_tokens=tuple(tiny.qwen_token_ids(PROMPT)))
    patched, run = apply_shared_attention(model, config)
    noise = noise_for(3, size=16)  # an 8×8 token grid, so the 3×3 dilation leaves background
    out = sample(tiny, patched, noise, steps=4)
    assert run.estimator._history_steps == 3  # steps 0..2 folded in; step 3 used them
    masks = run.estimator.masks
    assert masks.shape == (3, 8, 8) and set(masks.unique().tolist()) == {0.0, 1.0}  # Otsu split each map
    none = sample(tiny, patch(model, mask_mode="none", unmasked_first_step=True), noise, steps=4)
    assert (out - none).abs().max() > 1e-6  # the estimated masks restricted sharing after step 0
    torch.testing.assert_close(sample(tiny, patched, noise, steps=4), out)  # a second run starts from scratch
    # through the node, with the tiny model's tokenizer (the tiny demo encoding's tokens)
    node = patch(model, mask_mode="automatic", unmasked_first_step=True, prompt=PROMPT, subject_word="dog")
    torch.testing.assert_close(sample(tiny, node, noise, steps=4), out)


# --- Reference features and the guider ------------------------------------------------------------------------

def references(vae, n=2, masks=None):
    from comfyui_syncd.nodes.reference_nodes import encode_references

    images = torch.rand(n, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    return encode_references(vae, images, masks)


def inject(tiny, model, refs, **kw):
    from comfyui_syncd.nodes.reference_injection import ReferenceConfig, apply_reference_injection

    sampling = model.get_model_object("model_sampling")
    config = ReferenceConfig(refs, tiny.encode_text(FAMILY, "photo of a dog"), "auto", 0,
                             sampling.percent_to_sigma(0.0), sampling.percent_to_sigma(1.0), **kw)
    return apply_reference_injection(model, config)


def normalized(tiny, model, **kw):
    from comfyui_syncd.nodes.guiders import NormalizedGuider

    guider = NormalizedGuider(model, 2.5, 2.0, 3.0, **kw)
    guider.set_conds(*conds(tiny))
    return guider


def guided_sample(guider, model, noise, steps=3):
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()
    return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                         disable_pbar=True)


def test_references_are_encoded_one_frame_each_by_the_wan_vae(vae):
    refs = references(vae, n=2)
    assert tuple(refs.latents.shape) == (2, 16, 1, 8, 8)


def test_references_change_the_output_and_zero_masks_change_nothing(tiny, model, vae):
    noise = noise_for(2)
    plain = sample(tiny, model, noise, steps=2)
    patched, run = inject(tiny, model, references(vae))
    out = sample(tiny, patched, noise, steps=2)
    assert (out - plain).flatten(1).abs().amax(1).min() > 1e-6  # every target image of the batch is affected
    assert run.passes == [0, 1]  # one reference pass per step, clean references (the in-context path)
    assert run.config.noise_mode == "clean"
    empty = references(vae, masks=torch.zeros(2, 64, 64))
    masked, _ = inject(tiny, model, empty)  # masks on by default (eq. 1's rule; no SynCD Qwen-Image model)
    assert torch.equal(sample(tiny, masked, noise, steps=2), plain)
    unmasked, _ = inject(tiny, model, empty, use_masks="off")  # as Flux's in-context model: the whole references
    assert not torch.equal(sample(tiny, unmasked, noise, steps=2), plain)


def test_reference_keys_sit_beside_the_target(tiny, model, vae):
    """The references' keys are moved to the columns right of the target, bridging Qwen-Image's centred ids: a
    reference token at column c of its own grid lands at the target's first column + target width + c."""
    from comfy.ldm.qwen_image.model import apply_rotary_emb

    patched, run = inject(tiny, model, references(vae, n=1))
    patched = patched.clone()
    layer, captured = ("double", 0), []
    patched.set_model_sampler_post_cfg_function(  # after the step's evaluation, while its features exist
        lambda a: captured.append((run.features[layer][0], run.tokens[(layer, 4, 4, True)][0])) or a["denoised"])
    sample(tiny, patched, noise_for(1), steps=1, cfg=1.0)
    (rk, keys), = captured  # recorded (1, H, 16, D) at the centred ids of a 4×4 grid; the keys the target saw
    dm = model.get_model_object("diffusion_model")
    _, ids, _ = dm.process_img(torch.zeros(1, 16, 1, 8, 8))

    def rope(x, at):
        return apply_rotary_emb(x.transpose(1, 2), dm.pe_embedder(at).squeeze(1).unsqueeze(2)).transpose(1, 2)

    beside = ids.clone()
    beside[..., 2] += 4  # target columns -2..1 → the reference's -2..1 become 2..5
    torch.testing.assert_close(keys[0], rope(rope(rk, -ids), beside)[0], rtol=1e-4, atol=1e-5)


def test_normalized_guider_runs_with_cond_and_uncond_in_one_or_separate_batches(tiny, model, vae, separate_passes,
                                                                               alternating_passes):
    patched, run = inject(tiny, model, references(vae))
    noise = noise_for(2)
    joint = guided_sample(normalized(tiny, patched), patched, noise)
    assert run.passes == [0, 1, 2]
    for layout in (separate_passes(patched, reverse=True), alternating_passes(patched)):
        torch.testing.assert_close(guided_sample(normalized(tiny, layout), layout, noise), joint, rtol=1e-4,
                                   atol=1e-4)
        assert run.passes == [0, 1, 2]  # one reference pass per step whatever the layout
    plain = guided_sample(normalized(tiny, model), model, noise)
    assert (joint - plain).abs().max() > 1e-6
    guider = normalized(tiny, patched)
    guided_sample(guider, patched, noise)
    assert guider.image_scales == [(1, 2.5), (2, 3.0)]  # as Flux: the first step unguided


def test_shared_attention_and_references_compose(tiny, model, vae):
    """A consistent set: MSA among three new images plus the references, sampled with the normalized guider."""
    with_refs, _ = inject(tiny, patch(model, mask_mode="none"), references(vae))
    noise = noise_for(3)
    base = guided_sample(normalized(tiny, with_refs), with_refs, noise)
    changed = noise.clone()
    changed[1] = noise_for(1, seed=99)[0]
    d = (guided_sample(normalized(tiny, with_refs), with_refs, changed) - base).flatten(1).abs().amax(1)
    assert d[0] > 1e-6 and d[2] > 1e-6
    refs_only, _ = inject(tiny, model, references(vae))
    assert (guided_sample(normalized(tiny, refs_only), refs_only, noise) - base).abs().max() > 1e-6


def test_edit_reference_latents_stay_private_under_shared_attention(tiny, model, vae):
    """Qwen-Image-Edit's own reference input (``reference_latents``, as TextEncodeQwenImageEditPlus sets it) appends
    the references' tokens after each image's own; Masked Shared Attention composes with it and never shares those
    tokens: an image without foreground stays invisible to its group even though its reference tokens have seen it."""
    import comfy.sample
    import node_helpers

    ref = vae.encode(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5)))
    pos, neg = (node_helpers.conditioning_set_values(c, {"reference_latents": [ref]}, append=True)
                for c in conds(tiny))

    def run(m, noise):
        return comfy.sample.sample(m, noise, 1, 4.0, "euler", "simple", pos, neg, torch.zeros_like(noise), seed=0,
                                   disable_pbar=True)
    masks = torch.zeros(3, 64, 64)
    masks[:, 16:48, 16:48] = 1
    masks[1] = 0
    patched = patch(model, mask_mode="foreground_masks", masks=masks)
    noise = noise_for(3)
    changed = noise.clone()
    changed[1] = noise_for(1, seed=99)[0]
    d = (run(patched, changed) - run(patched, noise)).flatten(1).abs().amax(1)
    assert d[0] == 0 and d[2] == 0 and d[1] > 0
    assert (run(patched, noise) - sample(tiny, patched, noise)).abs().max() > 1e-6  # the references took part

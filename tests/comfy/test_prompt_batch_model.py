"""SynCD Per-Image Prompts (one prompt per image of a batch) with real tiny ComfyUI text encoders and models, and
the automatic masks of SynCD Masked Shared Attention reading each image's subject word in its own prompt."""

from __future__ import annotations

import pytest
import torch
from tiny_text_encoders import build_clip, encode

pytestmark = pytest.mark.comfy

PROMPTS = ["a dog on the beach", "on the beach there sits a brown dog", "in a snowy park a dog sleeps"]


@pytest.fixture(scope="module")
def clips():
    return {}


def tiny_clip(clips, family):
    if family not in clips:
        clips[family] = build_clip(family, seed=1)
    return clips[family]


def prompt_batch(clip, lines, per_image=True):
    from comfyui_syncd.nodes.prompt_batch import SynCDPromptBatch

    return SynCDPromptBatch.execute(clip, "\n".join(lines), per_image).args


def tiny_batch(family, lines, per_image=True):
    from comfyui_syncd.demo.nodes import SynCDTinyDemoPromptBatch

    return SynCDTinyDemoPromptBatch.execute(family, "\n".join(lines), per_image, 0).args


def sample(model, noise, pos, neg, steps=1, cfg=1.0):
    import comfy.sample

    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, torch.zeros_like(noise), seed=0,
                               disable_pbar=True)


def noise_for(tiny, family, n, seed=0):
    return torch.randn(n, tiny.LATENT_CHANNELS[family], 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_rows_are_the_individually_encoded_prompts(clips, family):
    """Row i of the node's conditioning (text and pooled vector) is CLIPTextEncode's encoding of line i."""
    clip = tiny_clip(clips, family)
    conditioning, text = prompt_batch(clip, ["  " + PROMPTS[0], "", *PROMPTS[1:]])  # stripped, blank line skipped
    (cond, extras), = conditioning
    assert text == "\n".join(PROMPTS)
    assert cond.shape[0] == 3 and extras["pooled_output"].shape[0] == 3
    for i, prompt in enumerate(PROMPTS):
        (alone, alone_extras), = encode(clip, prompt)
        torch.testing.assert_close(cond[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(extras["pooled_output"][i:i + 1], alone_extras["pooled_output"], rtol=1e-5,
                                   atol=1e-5)
    assert (cond[0] - cond[1]).abs().max() > 1e-3, "the prompts differ, so must the rows"
    conditioning, text = prompt_batch(clip, PROMPTS, per_image=False)  # one prompt for the whole set
    (alone, _), = encode(clip, PROMPTS[0])
    assert text == PROMPTS[0] and torch.equal(conditioning[0][0], alone)


def test_prompts_of_different_lengths_are_padded_as_the_tokenizer_pads(clips):
    """Flux: the shorter T5 row ends in pad tokens (= the tokenizer with a longer min_length), the shorter CLIP-L
    row gets empty-text chunks (its pooled vector, from the first chunk, is unchanged). SD1.5: the missing chunk is
    the empty text's chunk, encoded on its own as ComfyUI encodes every 77-token chunk."""
    long = " ".join(["a brown dog with a red collar"] * 45)  # > 256 T5 tokens, several CLIP chunks
    clip = tiny_clip(clips, "flux")
    length = len(clip.tokenize(long)["t5xxl"][0])
    assert length > 256 and len(clip.tokenize(long)["l"]) > 1
    (cond, extras), = prompt_batch(clip, [PROMPTS[0], long])[0]
    (short_padded, _), = encode(clip, PROMPTS[0], t5xxl_min_length=length)
    (short, short_extras), = encode(clip, PROMPTS[0])
    (alone, alone_extras), = encode(clip, long)
    assert cond.shape[1] == length
    torch.testing.assert_close(cond[0:1], short_padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond[1:2], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extras["pooled_output"][0:1], short_extras["pooled_output"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extras["pooled_output"][1:2], alone_extras["pooled_output"], rtol=1e-5, atol=1e-5)

    clip = tiny_clip(clips, "sd15")
    long = " ".join(["a brown dog"] * 30)  # 90 tokens: two chunks
    (cond, _), = prompt_batch(clip, [PROMPTS[0], long])[0]
    (short, _), = encode(clip, PROMPTS[0])
    (empty, _), = encode(clip, "")
    assert cond.shape[1] == 154
    torch.testing.assert_close(cond[0:1], torch.cat([short, empty], dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond[1:2], encode(clip, long)[0][0], rtol=1e-5, atol=1e-5)


def test_clear_errors(clips):
    from comfyui_syncd.nodes.prompt_batch import SynCDPromptBatch

    with pytest.raises(ValueError, match="the text is empty"):
        SynCDPromptBatch.execute(tiny_clip(clips, "sd15"), " \n\n ", True)
    with pytest.raises(ValueError, match="no CLIP is connected"):
        SynCDPromptBatch.execute(None, "a dog", True)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_a_batch_samples_each_image_with_its_own_prompt(clips, tiny, family):
    """Sampling 3 latents with the 3-row conditioning gives, per image, what sampling that image alone with its own
    prompt gives; with one prompt for the set the other images change."""
    clip = tiny_clip(clips, family)
    model = tiny.build_model(family, seed=2, width=32, std=0.3)
    (negative,) = [encode(clip, "")]
    cfg = 1.0 if family == "flux" else 3.0
    noise = noise_for(tiny, family, 3)
    batch = sample(model, noise, prompt_batch(clip, PROMPTS)[0], negative, cfg=cfg)
    for i, prompt in enumerate(PROMPTS):
        alone = sample(model, noise[i:i + 1], encode(clip, prompt), negative, cfg=cfg)
        scale = float(alone.abs().max())  # std 0.3 weights: outputs in the hundreds; batching moves them ~1e-6
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=1e-5 * scale)
    one = sample(model, noise, prompt_batch(clip, PROMPTS, per_image=False)[0], negative, cfg=cfg)
    torch.testing.assert_close(one[0], batch[0], rtol=0, atol=1e-5 * scale)
    assert (one[1:] - batch[1:]).flatten(1).abs().amax(1).min() > 1e-2 * scale


# --- The tiny demo counterpart -----------------------------------------------------------------------------------

def test_tiny_demo_rows_record_each_lines_tokens(tiny):
    from comfyui_syncd.nodes.patch_kit import ENCODED_TOKENS

    (cond, extras), = tiny_batch("flux", PROMPTS)[0]
    for i, prompt in enumerate(PROMPTS):
        (alone, alone_extras), = tiny.encode_text("flux", prompt)
        assert torch.equal(cond[i:i + 1], alone) and torch.equal(extras["pooled_output"][i:i + 1],
                                                                  alone_extras["pooled_output"])
    assert extras[ENCODED_TOKENS] == tuple(tuple(tiny.token_ids(p)) for p in PROMPTS)
    long = " ".join(["a brown dog"] * 30)
    (cond, _), = tiny_batch("sd15", [PROMPTS[0], long])[0]
    empty = tiny.encode_text("sd15", "")[0][0]
    assert torch.equal(cond[0:1], torch.cat([tiny.encode_text("sd15", PROMPTS[0])[0][0], empty], dim=1))
    conditioning, text = tiny_batch("sd15", PROMPTS, per_image=False)
    (alone, alone_extras), = tiny.encode_text("sd15", PROMPTS[0])
    assert text == PROMPTS[0] and torch.equal(conditioning[0][0], alone)
    assert conditioning[0][1][ENCODED_TOKENS] == alone_extras[ENCODED_TOKENS]


# --- Automatic masks with one prompt per image -------------------------------------------------------------------

def shared(model, prompt, images_per_subject=3, subject_word="dog"):
    from comfyui_syncd.nodes.shared_attention_node import SynCDSharedAttention

    return SynCDSharedAttention.execute(model, images_per_subject, "automatic", 0.0, 1.0, True, "all",
                                        prompt=prompt, subject_word=subject_word).args[0]


def line_positions(tiny):
    from comfyui_syncd.core.tokens import subject_token_positions

    positions = [subject_token_positions(tiny.token_ids, p, "dog") for p in PROMPTS]
    assert len(set(positions)) == 3, "the subject word sits at a different position in every line"
    return positions


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_automatic_masks_use_each_rows_own_subject_tokens(tiny, family, separate_passes, monkeypatch):
    """2 objects × 3 images, 3 per-image prompts, cfg > 1 (cond and uncond chunks, joint and in separate passes in
    reverse order): every recorded attention map of latent j sums the subject tokens of prompt j mod 3."""
    from comfyui_syncd.nodes import shared_attention

    calls = []
    original = shared_attention.subject_attention_rows

    def spy(image, text, row_positions):
        calls.append([tuple(p) for p in row_positions])
        return original(image, text, row_positions)

    monkeypatch.setattr(shared_attention, "subject_attention_rows", spy)
    positive, prompts = tiny_batch(family, PROMPTS)
    negative = tiny.encode_text(family, "")
    base = tiny.build_model(family, seed=3, width=32)
    expected = line_positions(tiny) * 2
    for model in (shared(base, prompts), separate_passes(shared(base, prompts), reverse=True)):
        calls.clear()
        sample(model, noise_for(tiny, family, 6), positive, negative, steps=2, cfg=2.0)
        assert calls and all(c == expected for c in calls), calls[:1]

    # one prompt for the set: the first line's positions for every image, through the single-prompt path
    calls.clear()
    positive, prompts = tiny_batch(family, PROMPTS, per_image=False)
    model = shared(base, prompts)
    sample(model, noise_for(tiny, family, 6), positive, negative, steps=1, cfg=2.0)
    run = model.get_attachment(shared_attention.RUN_ATTACHMENT)
    assert calls == [] and run.prompt_rows is None and run.estimator._step_layers > 0  # recorded, one prompt


def test_recorded_maps_follow_each_rows_tokens_in_any_chunk_order():
    """SharedAttentionRun.record_subject_attention with the positive chunk second (``cond_or_uncond`` [1, 0]): the
    maps it adds are each row's softmax mass on its own prompt's subject tokens, not row 0's."""
    from comfyui_syncd.attention.masks import subject_attention
    from comfyui_syncd.nodes.shared_attention import (PromptLine, SharedAttentionConfig, SharedAttentionRun,
                                                      subject_token_rows)

    per_line = [(2,), (5, 6), (9,)]
    lines = tuple(PromptLine(f"line {i}", p) for i, p in enumerate(per_line))
    config = SharedAttentionConfig(3, "automatic", 1e9, 0.0, subject_tokens=(2,), prompt_lines=lines)

    class Guider:
        original_conds = {"positive": [{"cross_attn": torch.zeros(3, 12, 8)}]}
    run = SharedAttentionRun(config, is_flux=False, blocks=[])
    run.reset(torch.Size([3, 4, 4, 4]))
    run.prompt_rows = subject_token_rows(config, Guider())
    assert run.prompt_rows == tuple(per_line)
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 2, 16, 8, generator=g) * 2, torch.randn(6, 2, 12, 8, generator=g) * 2
    run.record_subject_attention(image, text, {"cond_or_uncond": [1, 0]}, (4, 4))
    got = run.estimator._step_sum
    expected = torch.cat([subject_attention(image[3 + b:4 + b], text[3 + b:4 + b], per_line[b]) for b in range(3)])
    torch.testing.assert_close(got, expected)
    row0 = subject_attention(image[3:], text[3:], per_line[0])
    assert (got[1:] - row0[1:]).abs().max() > 1e-3, "row 0's tokens for every row would give other maps"


def test_which_reading_of_the_prompt_and_its_errors(tiny):
    """Lines = rows: per image. One row: the whole text is one prompt (unchanged). Otherwise, a line without the
    subject word, or lines that are not what was encoded, are refused before sampling."""
    from comfyui_syncd.nodes import shared_attention

    base = tiny.build_model("sd15", seed=3, width=32)
    negative = tiny.encode_text("sd15", "")
    noise = noise_for(tiny, "sd15", 3)
    text = "\n".join(PROMPTS)
    model = shared(base, text)
    sample(model, noise, tiny.encode_text("sd15", text), negative, steps=1, cfg=2.0)  # one row: one prompt
    assert model.get_attachment(shared_attention.RUN_ATTACHMENT).prompt_rows is None
    with pytest.raises(ValueError, match="has 3 lines but the positive conditioning has 2 rows"):
        sample(model, noise, tiny_batch("sd15", PROMPTS[:2])[0], negative, steps=1)
    with pytest.raises(ValueError, match="not the prompts the positive conditioning encoded"):
        sample(model, noise, tiny_batch("sd15", [PROMPTS[0], PROMPTS[2], PROMPTS[1]])[0], negative, steps=1)
    no_dog = [PROMPTS[0], "a cat on a sofa", PROMPTS[2]]
    with pytest.raises(ValueError, match=r"subject word is not in line 2 of the prompt \('a cat on a sofa'\)"):
        sample(shared(base, "\n".join(no_dog)), noise, tiny_batch("sd15", no_dog)[0], negative, steps=1)

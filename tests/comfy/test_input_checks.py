"""Inputs the editor cannot stop (API prompts, ``run --set``, wiring): combo values, conditioning of another model
family, and the automatic-mask prompt, each refused with a message that names the fix."""

import inspect

import pytest
import torch

pytestmark = pytest.mark.comfy

PROMPT = "a photo of a dog on the beach"


def pack_nodes():
    from comfyui_syncd.demo.nodes import DEMO_NODES
    from comfyui_syncd.nodes import NODES

    return NODES + DEMO_NODES


def combo_inputs(node):
    return {i.id: list(i.options) for i in node.define_schema().inputs if getattr(i, "options", None) is not None}


def test_every_combo_of_every_pack_node_is_validated(comfy_imports):
    from comfy_api.latest import io

    checked = 0
    for node in pack_nodes():
        combos = combo_inputs(node)
        schema = node.define_schema()
        if not combos:
            assert node.validate_inputs.__func__ is io.ComfyNode.validate_inputs.__func__, node
            continue
        # validate_inputs names exactly the combos: ComfyUI then skips only their checks and keeps its own for
        # ranges and types of every other input
        assert list(inspect.signature(node.validate_inputs).parameters) == list(combos), schema.node_id
        for name, options in combos.items():
            assert not options or node.validate_inputs(**{name: options[0]}) is True
            assert node.validate_inputs(**{name: None}) is True  # linked: known only at run time
            answer = node.validate_inputs(**{name: "no-such-option"})
            assert isinstance(answer, str), (schema.node_id, name)
            assert answer.startswith(f"{schema.display_name}: {name} 'no-such-option' is not an option")
            if 0 < len(options) <= 30:
                assert ", ".join(map(str, options)) in answer
            checked += 1
    assert checked >= 10


def test_linked_values_are_checked_where_the_config_is_built(tiny):
    from comfyui_syncd.nodes.guiders import NormalizedGuider
    from comfyui_syncd.nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    model = tiny.build_model("sd15")
    for field, name in (({"mask_mode": "foo"}, "mask_mode"), ({"implementation": "foo"}, "attention_implementation"),
                        ({"flux_rope_layout": "foo"}, "flux_rope_layout")):
        config = SharedAttentionConfig(**{"images_per_subject": 1, "mask_mode": "none", "sigma_start": 1e9,
                                          "sigma_end": 0.0, **field})
        with pytest.raises(ValueError, match=f"SynCD Masked Shared Attention: {name} 'foo' is not an option"):
            apply_shared_attention(model, config)
    with pytest.raises(ValueError, match="combination 'foo' is not an option; choose one of: normalized, brooks"):
        NormalizedGuider(model, 3.0, 8.0, 13.0, combination="foo")


def ksample(model, pos, neg, channels=4, steps=1):
    import comfy.sample

    noise = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, steps, 3.0, "euler", "simple", pos, neg, torch.zeros_like(noise),
                               seed=0, disable_pbar=True)


@pytest.mark.parametrize("model_family,text_family,expected", [
    ("sd15", "sdxl", "the positive conditioning has 64-wide text features but this SD15 model expects 768"),
    ("sdxl", "sd15", "the positive conditioning has 768-wide text features but this SDXL model expects 64"),
    ("flux", "sdxl", "the positive conditioning's pooled_output is 64 wide but this Flux model expects 32"),
])
def test_a_text_encoding_of_another_family_is_named_before_sampling(tiny, model_family, text_family, expected):
    model = tiny.build_model(model_family)
    pos, neg = tiny.encode_text(text_family, PROMPT), tiny.encode_text(model_family, "")
    with pytest.raises(ValueError, match=f"SynCD Tiny Demo Model: {expected}"):
        ksample(model, pos, neg, tiny.LATENT_CHANNELS[model_family])
    ksample(model, tiny.encode_text(model_family, PROMPT), neg, tiny.LATENT_CHANNELS[model_family])  # matching: runs


def test_flux_customization_fed_sd_conditioning_is_named(tiny):
    from comfyui_syncd.demo.nodes import demo_subject_images
    from comfyui_syncd.nodes.guiders import SynCDNormalizedGuider
    from comfyui_syncd.nodes.reference_nodes import SynCDApplyReferences, encode_references

    model = tiny.build_model("flux")
    images, masks = demo_subject_images(1, 64, 0)
    refs = encode_references(tiny.build_vae("flux"), images, masks)
    sd = tiny.encode_text("sd15", "photo of a dog")
    flux = tiny.encode_text("flux", "photo of a dog")
    with pytest.raises(ValueError, match="SynCD Apply References: the reference_conditioning conditioning has "
                                         "768-wide text features but this Flux model expects 64"):
        SynCDApplyReferences.execute(model, refs, sd, "auto", 0, 0.0, 1.0)
    no_pooled = [[flux[0][0], {k: v for k, v in flux[0][1].items() if k != "pooled_output"}]]
    with pytest.raises(ValueError, match="SynCD Normalized Text\\+Image Guider: the negative conditioning has no "
                                         "pooled_output, which this Flux model needs"):
        SynCDNormalizedGuider.execute(model, flux, no_pooled, 3.0, 8.0, 13.0, "normalized", 0.0)


def test_a_subject_word_after_the_first_77_tokens_is_found_and_used(tiny):
    from comfyui_syncd.core.tokens import subject_token_positions
    from comfyui_syncd.nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    long_prompt = "a photo in a sunny park with " + "green trees and " * 30 + "a dog"
    ids = tiny.token_ids(long_prompt)
    pos = tiny.encode_text("sd15", long_prompt)
    assert len(ids) == 154 and pos[0][0].shape[1] == 154  # two chunks, as CLIPTextEncode concatenates them
    (position,) = subject_token_positions(tiny.token_ids, long_prompt, "dog")
    assert position > 77 and ids[position] == tiny.token_ids("dog")[1]
    config = SharedAttentionConfig(2, "automatic", 1e9, 0.0, subject_tokens=(position,), prompt_tokens=tuple(ids))
    model, run = apply_shared_attention(tiny.build_model("sd15", std=0.3), config)
    ksample_batch = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    import comfy.sample

    comfy.sample.sample(model, ksample_batch, 3, 3.0, "euler", "simple", pos, tiny.encode_text("sd15", ""),
                        torch.zeros_like(ksample_batch), seed=0, disable_pbar=True)
    masks = run.estimator.masks  # estimated from the attention to token 80-odd
    assert masks is not None and masks.shape == (2, 8, 8) and 0 < masks.sum() < masks.numel()


def test_automatic_prompt_that_differs_from_the_encoded_text_is_refused(tiny):
    from comfyui_syncd.nodes.shared_attention_node import SynCDSharedAttention

    model = tiny.build_model("sd15")
    patched = SynCDSharedAttention.execute(model, 1, "automatic", 0.0, 1.0, True, "all", prompt=PROMPT,
                                           subject_word="dog").args[0]
    neg = tiny.encode_text("sd15", "")
    with pytest.raises(ValueError, match="the 'prompt' input is not the text the positive conditioning encoded"):
        ksample(patched, tiny.encode_text("sd15", "a photo of a cat and a dog"), neg)
    ksample(patched, tiny.encode_text("sd15", PROMPT), neg)  # the same text: runs


def test_a_real_clip_tokenizer_is_searched_over_all_its_chunks():
    import comfy.sd1_clip

    from comfyui_syncd.core.tokens import clip_tokenizer, subject_token_positions

    class Clip:  # the part of ComfyUI's CLIP object that clip_tokenizer uses
        tokenizer = comfy.sd1_clip.SDTokenizer()

        def tokenize(self, text):
            return {"l": self.tokenizer.tokenize_with_weights(text)}

    long_prompt = "a photo in a sunny park with " + "green trees and " * 30 + "a corgi"
    tokenize = clip_tokenizer(Clip())
    positions = subject_token_positions(tokenize, long_prompt, "corgi")
    assert positions[0] > 77 and len(tokenize(long_prompt)) == 154

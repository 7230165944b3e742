"""The ICO exports load in ComfyUI without this pack: ``embedding:NAME`` in CLIPTextEncode puts the trained V*
vectors into the prompt, and LoraLoaderModelOnly adds exactly the trained k/v differences to a ComfyUI UNet built
from the same tiny diffusers UNet. ComfyUI in-process on the CPU."""

from __future__ import annotations

import functools
import logging

import pytest
import safetensors.torch
import torch
from ico_tiny_models import comfy_unet_config, save_single_file

from comfyui_syncd.training import checkpoints, ico, models

pytestmark = pytest.mark.comfy

PROMPT = "embedding:myconcept teddy bear"


@pytest.fixture(scope="module")
def comfy(comfy_imports):
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.utils

    return comfy


def comfy_sd1_clip(comfy, encoder, embedding_directory):
    """A ComfyUI CLIP (SD1 tokenizer + SD1ClipModel) of the tiny transformers CLIP-L config and weights."""
    config = encoder.config.to_dict()

    class TinyClipL(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=config, return_projected_pooled=False,
                             model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                    functools.partial(comfy.sd1_clip.SD1ClipModel,
                                                                      clip_model=TinyClipL))
    clip = comfy.sd.CLIP(target, embedding_directory=str(embedding_directory),
                         model_options={"dtype": torch.float32})
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in encoder.state_dict().items()}
    sd["text_projection.weight"] = torch.eye(config["hidden_size"])
    missing, unexpected = clip.load_sd(sd)
    assert not [k for k in missing if "position_ids" not in k] and not unexpected
    return clip


def test_embedding_resolves_in_clip_text_encode(comfy, trained_sd15, monkeypatch):
    """CLIPTextEncode on "embedding:myconcept teddy bear": ComfyUI reads the file from the embeddings folder, its
    token sequence carries the three trained vectors at positions 1..3 (the rest is the plain prompt's), and the
    encoding equals the trainer's own encoding of that prompt (V* rows at the word, positions added once)."""
    import nodes

    out = trained_sd15.out
    encoder = trained_sd15.parts.text_encoders[0]
    clip = comfy_sd1_clip(comfy, encoder, out / "embeddings")
    v_star = safetensors.torch.load_file(str(out / "embeddings" / "myconcept.safetensors"))["emb_params"]
    assert torch.equal(v_star, trained_sd15.core.prompts.v_star[0].detach())

    tokens = clip.tokenize(PROMPT)["l"][0]
    plain = clip.tokenize("teddy bear")["l"][0]
    assert all(isinstance(t[0], torch.Tensor) for t in tokens[1:4])
    assert [t[0] for t in tokens[4:74]] == [t[0] for t in plain[1:71]] and tokens[0][0] == plain[0][0]
    clip_l = clip.cond_stage_model.clip_l
    embeds = clip_l.process_tokens([[t[0] for t in tokens]], "cpu")[0][0]
    plain_embeds = clip_l.process_tokens([[t[0] for t in plain]], "cpu")[0][0]
    torch.testing.assert_close(embeds[1:4], v_star, rtol=0, atol=0)
    torch.testing.assert_close(embeds[4:], plain_embeds[1:74], rtol=0, atol=0)
    torch.testing.assert_close(embeds[0], plain_embeds[0], rtol=0, atol=0)

    (conditioning,) = nodes.CLIPTextEncode().encode(clip, PROMPT)
    context = conditioning[0][0]
    with torch.no_grad():
        embeds_hf, pools = ico.concept_input_embeddings(trained_sd15.parts, trained_sd15.core.prompts, [PROMPT],
                                                        "myconcept")
        expected, _ = models.conditioning(trained_sd15.parts, embeds_hf, pools)
    assert context.shape == expected.shape == (1, 77, 32)
    torch.testing.assert_close(context, expected, rtol=1e-4, atol=1e-5)
    (without,) = nodes.CLIPTextEncode().encode(clip, "teddy bear")
    assert not torch.allclose(without[0][0][:, 1:4], context[:, 1:4])


def test_sdxl_embedding_has_a_vector_set_per_text_encoder(comfy, trained_sdxl):
    out = trained_sdxl.out / "embeddings"
    saved = safetensors.torch.load_file(str(out / "myconcept.safetensors"))
    tokenizer = comfy.sdxl_clip.SDXLTokenizer(embedding_directory=str(out))
    tokens = tokenizer.tokenize_with_weights(PROMPT)
    for key, vectors in (("l", saved["clip_l"]), ("g", saved["clip_g"])):
        seq = tokens[key][0]
        assert torch.equal(torch.stack([t[0] for t in seq[1:4]]), vectors), key
        assert all(isinstance(t[0], int) for t in seq[4:])


def comfy_unet(comfy, family, diffusers_unet):
    """A ComfyUI model (comfy.supported_models SD15/SDXL) holding ``diffusers_unet``'s weights, converted with
    ComfyUI's own diffusers key map, and wrapped in a ModelPatcher."""
    cfg = comfy_unet_config(family)
    model_config = (comfy.supported_models.SD15 if family == "sd15" else comfy.supported_models.SDXL)(dict(cfg))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    mapping = comfy.utils.unet_to_diffusers(cfg)
    sd = diffusers_unet.state_dict()
    assert set(sd) <= set(mapping)
    model.diffusion_model.load_state_dict({mapping[k]: v for k, v in sd.items()}, strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu")), mapping


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kv_file_applies_through_lora_loader_model_only(comfy, family, request, monkeypatch, caplog):
    """LoraLoaderModelOnly (strength 1) on the exported file changes the ComfyUI model's attn2 to_k/to_v weights by
    exactly the stored differences, which are the trained weights minus the base ones, and nothing else; the
    export's keys are ComfyUI's (checked against comfy.utils.unet_to_diffusers)."""
    import folder_paths
    import nodes
    from diffusers import UNet2DConditionModel

    run = request.getfixturevalue(f"trained_{family}")
    base_unet = UNet2DConditionModel.from_pretrained(request.getfixturevalue(f"tiny_{family}"), subfolder="unet")
    patcher, mapping = comfy_unet(comfy, family, base_unet)
    if family == "sd15":  # the converted model computes what the diffusers UNet computes
        x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
        with torch.no_grad():
            ours = patcher.model.diffusion_model(x, timesteps=t, context=c)
            torch.testing.assert_close(ours, base_unet(x, t, c).sample, rtol=1e-4, atol=1e-5)

    lpb = base_unet.config.layers_per_block
    kv_names = [n for n, _ in base_unet.named_parameters() if ico.KV_PATTERN.search(n)]
    assert len(kv_names) == (14 if family == "sd15" else 16)
    for name in kv_names:
        assert checkpoints.comfy_unet_key(name, lpb) == "diffusion_model." + mapping[name]

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(run.out / "loras")], {".safetensors"}))
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    diffs = safetensors.torch.load_file(str(run.out / "loras" / "myconcept.safetensors"))
    assert len(diffs) == len(kv_names)
    with caplog.at_level(logging.WARNING):
        (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, "myconcept.safetensors", 1.0)
    assert "not loaded" not in caplog.text
    assert len(patched.patches) == len(kv_names)
    trained = dict(run.core.unet.named_parameters())
    patched.patch_model()
    try:
        after = patched.model.state_dict()
        for name in kv_names:
            key = "diffusion_model." + mapping[name]
            diff = diffs[key[:-len(".weight")] + ".diff"]
            assert torch.equal(after[key], before[key] + diff), key
            torch.testing.assert_close(after[key], trained[name].detach(), rtol=0, atol=1e-6)
            assert not torch.equal(after[key], before[key])
        changed = [k for k in after if not torch.equal(after[k], before[k])]
        assert len(changed) == len(kv_names)
    finally:
        patched.unpatch_model()
    assert all(torch.equal(v, before[k]) for k, v in patcher.model.state_dict().items())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_checkpoints_load_like_the_diffusers_folder(comfy, family, request, tmp_path):
    """A ComfyUI-layout single file (``models/checkpoints``) of the tiny model loads through diffusers'
    ``from_single_file`` (configs from ``diffusers_config``, offline) into exactly the folder's weights."""
    folder = request.getfixturevalue(f"tiny_{family}")
    path = save_single_file(folder, family, tmp_path / f"tiny_{family}.safetensors")
    assert models.detect_family(path) == family
    single, ref = models.load(path, diffusers_config=str(folder)), models.load(folder)
    assert single.family == ref.family == family
    pairs = [(single.unet, ref.unet), (single.vae, ref.vae), *zip(single.text_encoders, ref.text_encoders)]
    assert len(pairs) == (3 if family == "sd15" else 4)
    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), type(a).__name__
    assert single.noise_scheduler.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="neither an SD1.5 nor an SDXL"):
        models.family_of_keys(["model.diffusion_model.out.0.weight"])

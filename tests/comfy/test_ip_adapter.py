"""IP-Adapter Plus (SynCDIPAdapterLoader / SynCDIPAdapterApply): layouts, layer mapping and the per-row patch."""

import pytest
import torch

import syncd_synthetic_weights as W

pytestmark = pytest.mark.comfy

TINY_IP = dict(unet=W.TINY_SDXL_UNET, cross_dim=64, embedding_dim=32, dim=32, heads=1)  # tiny SDXL, tiny CLIP


@pytest.fixture(scope="module")
def sdxl(tiny):
    return tiny.build_model("sdxl", seed=3)


@pytest.fixture(scope="module")
def clip_vision(tiny):
    return tiny.build_clip_vision(seed=0)


@pytest.fixture(scope="module")
def ipadapter():
    return W.ipadapter_plus(**TINY_IP)


def images(n=1, seed=0, size=40):
    return torch.rand(n, size, size + 8, 3, generator=torch.Generator().manual_seed(seed))


def gray(clip_vision):
    return torch.full((1, clip_vision.image_size, clip_vision.image_size, 3), 0.5)


def apply(model, ipadapter, clip_vision, image, weight=0.6, reference_weight=1.0, references=None):
    from comfyui_syncd.nodes.ip_adapter import SynCDIPAdapterApply

    return SynCDIPAdapterApply.execute(model, ipadapter, clip_vision, image, weight, reference_weight,
                                       references=references).args[0]


def sample(tiny, model, noise, cfg=4.0, steps=2, wrapper=None):
    import comfy.patcher_extension
    import comfy.sample

    if wrapper is not None:
        model = model.clone()
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test", wrapper)
    pos, neg = tiny.encode_text("sdxl", "a photo of a dog"), tiny.encode_text("sdxl", "")
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, torch.zeros_like(noise),
                               seed=0, disable_pbar=True)


def noise(n=1, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# --- files and layouts -----------------------------------------------------------------------------------------

def test_loader_reads_safetensors_and_bin_layouts(tmp_path, monkeypatch, ipadapter):
    import folder_paths
    import safetensors.torch

    from comfyui_syncd.nodes.ip_adapter import FOLDER, SynCDIPAdapterLoader

    flat = {f"{part}.{k}": v.contiguous() for part in ("image_proj", "ip_adapter") for k, v in ipadapter[part].items()}
    safetensors.torch.save_file(flat, str(tmp_path / "ip-adapter-plus_tiny.safetensors"))
    torch.save(ipadapter, tmp_path / "ip-adapter-plus_tiny.bin")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(tmp_path)], {".bin", ".safetensors"}))
    for name in ("ip-adapter-plus_tiny.safetensors", "ip-adapter-plus_tiny.bin"):
        loaded = SynCDIPAdapterLoader.execute(name).args[0]
        for part in ("image_proj", "ip_adapter"):
            assert loaded[part].keys() == ipadapter[part].keys()
            assert all(torch.equal(loaded[part][k], ipadapter[part][k]) for k in ipadapter[part])


def test_loader_refuses_pickled_objects_and_non_plus_files(tmp_path, ipadapter):
    from comfyui_syncd.nodes.ip_adapter import load_ipadapter

    torch.save({"image_proj": {}, "ip_adapter": {}, "x": torch.nn.Linear(2, 2)}, tmp_path / "evil.bin")
    with pytest.raises(ValueError, match="weights_only"):
        load_ipadapter(tmp_path / "evil.bin")
    plain = {"image_proj": {"proj.weight": torch.zeros(4, 4)}, "ip_adapter": dict(ipadapter["ip_adapter"])}
    torch.save(plain, tmp_path / "ip-adapter_sd15.bin")
    with pytest.raises(ValueError, match="not an IP-Adapter \\*Plus\\*"):
        load_ipadapter(tmp_path / "ip-adapter_sd15.bin")


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_full_size_ip_layers_match_comfy_cross_attentions(family):
    """ip-adapter-plus_sdxl_vit-h (70 layers, keys 1..139) and ip-adapter-plus_sd15 (16 layers) against the real
    SDXL/SD1.5 UNets, built on the meta device: every layer lands on the cross-attention of its diffusers index."""
    import comfy.supported_models as sm

    from comfyui_syncd.nodes.ip_adapter import cross_attentions, match_layers

    if family == "sdxl":
        model, unet = W.meta_model(sm.SDXL, W.SDXL_CONFIG), W.SDXL_UNET
        ip = W.ipadapter_plus(unet, 2048, 1280, 1280, 20, device="meta")
    else:
        model, unet = W.meta_model(sm.SD15, W.SD15_CONFIG), W.SD15_UNET
        ip = W.ipadapter_plus(unet, 768, 1280, 768, 12, device="meta")
    dm = model.get_model_object("diffusion_model")
    layers = match_layers(dm, ip)
    blocks = W.transformer_blocks(unet)
    assert len(layers) == len(blocks) == (70 if family == "sdxl" else 16)
    for k, (ca, (path, channels)) in enumerate(zip(cross_attentions(dm), blocks)):
        assert layers[ca.location][0] is ip["ip_adapter"][f"{2 * k + 1}.to_k_ip.weight"]
        assert ca.shape[0] == channels
        assert ca.location[0] == {"down": "input", "up": "output", "mid": "middle"}[path.split("_")[0]]
    other = W.ipadapter_plus(W.SD15_UNET if family == "sdxl" else W.SDXL_UNET, 8, 8, 8, 1, device="meta")
    with pytest.raises(ValueError, match="IP-Adapter Plus of this model family"):
        match_layers(dm, other)


# --- the patch --------------------------------------------------------------------------------------------------

def test_patch_changes_the_output_and_weight_zero_is_the_unpatched_model(tiny, sdxl, ipadapter, clip_vision):
    n = noise()
    base = sample(tiny, sdxl, n)
    assert (sample(tiny, apply(sdxl, ipadapter, clip_vision, images()), n) - base).abs().max() > 1e-4
    assert torch.equal(sample(tiny, apply(sdxl, ipadapter, clip_vision, images(), weight=0.0), n), base)


def capture(store):
    """APPLY_MODEL wrapper keeping each chunk's model output by its cond index."""
    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kw):
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)
        cond_or_uncond = transformer_options["cond_or_uncond"]
        for c, chunk in zip(cond_or_uncond, out.chunk(len(cond_or_uncond))):
            store.setdefault(c, chunk)
        return out
    return wrapper


def blind_uncond(inner):
    """Mark the negative chunk (cond index 1) as having no reference access, as the SynCD guider does."""
    from comfyui_syncd.nodes import patch_kit as kit
    from comfyui_syncd.nodes.layout import FULL, UNCOND

    def wrapper(executor, x, t, c_concat, c_crossattn, control, to, **kw):
        roles = {u: UNCOND if c == 1 else FULL for u, c in zip(to["uuids"], to["cond_or_uncond"])}
        to[kit.KEY] = kit.ForwardState(guidance=kit.GuidanceBranches(roles=roles))
        return inner(executor, x, t, c_concat, c_crossattn, control, to, **kw)
    return wrapper


def test_blind_chunks_get_the_gray_image_embedding(tiny, sdxl, ipadapter, clip_vision):
    n = noise()
    with_image, with_gray, mixed = {}, {}, {}
    sample(tiny, apply(sdxl, ipadapter, clip_vision, images()), n, steps=1, wrapper=capture(with_image))
    sample(tiny, apply(sdxl, ipadapter, clip_vision, gray(clip_vision)), n, steps=1, wrapper=capture(with_gray))
    sample(tiny, apply(sdxl, ipadapter, clip_vision, images()), n, steps=1, wrapper=blind_uncond(capture(mixed)))
    assert torch.equal(mixed[1], with_gray[1])   # blind negative branch: the gray image
    assert torch.equal(mixed[0], with_image[0])  # positive branch: the global image
    assert (with_image[1] - with_gray[1]).abs().max() > 1e-5


def test_reference_pass_rows_get_their_own_images_at_reference_weight(tiny, sdxl, ipadapter, clip_vision):
    from comfyui_syncd.nodes import patch_kit as kit
    from comfyui_syncd.nodes.references import ReferenceSet

    refs = images(3, seed=7)
    reference_set = ReferenceSet(images=refs, latents=torch.zeros(3, 4, 8, 8), masks=torch.ones(3, 40, 48))

    def as_reference_pass(executor, x, t, c_concat, c_crossattn, control, to, **kw):
        to[kit.KEY] = kit.ForwardState(phase=kit.Phase.REFERENCE, reference_rows=(2, 0))
        return executor(x, t, c_concat, c_crossattn, control, to, **kw)

    n = noise(2)
    ref_pass = sample(tiny, apply(sdxl, ipadapter, clip_vision, images(), weight=0.6, reference_weight=0.8,
                                  references=reference_set), n, cfg=1.0, wrapper=as_reference_pass)
    per_row = sample(tiny, apply(sdxl, ipadapter, clip_vision, refs[[2, 0]], weight=0.8), n, cfg=1.0)
    torch.testing.assert_close(ref_pass, per_row, rtol=1e-5, atol=1e-4)  # image batches of 3 vs 2: float noise
    with pytest.raises(ValueError, match="no references connected"):
        sample(tiny, apply(sdxl, ipadapter, clip_vision, images()), n, cfg=1.0, wrapper=as_reference_pass)


def test_works_with_the_reference_injection_pass(tiny, sdxl, ipadapter, clip_vision):
    from comfyui_syncd.nodes.reference_injection import ReferenceConfig, apply_reference_injection
    from comfyui_syncd.nodes.references import ReferenceSet

    refs = images(2, seed=3)
    reference_set = ReferenceSet(images=refs, latents=torch.randn(2, 4, 8, 8), masks=torch.ones(2, 40, 48))
    config = ReferenceConfig(reference_set, tiny.encode_text("sdxl", "photo of a dog"), "noised", 0, 1e9, 0.0)
    injected, run = apply_reference_injection(sdxl, config)
    n = noise()
    with_refs = sample(tiny, apply(injected, ipadapter, clip_vision, images(), references=reference_set), n)
    other_refs = ReferenceSet(images=images(2, seed=4), latents=reference_set.latents, masks=reference_set.masks)
    changed = sample(tiny, apply(injected, ipadapter, clip_vision, images(), references=other_refs), n)
    assert run.passes and (with_refs - changed).abs().max() > 0  # the reference pass reads the references' images


def test_chains_an_earlier_attn2_replace_patch(tiny, sdxl, ipadapter, clip_vision):
    import comfy.ldm.modules.attention

    from comfyui_syncd.nodes.patch_kit import unet_attention_blocks

    calls = []

    def earlier(q, k, v, extra):
        calls.append(extra["block"])
        return comfy.ldm.modules.attention.optimized_attention(q, k, v, extra["n_heads"])

    m = sdxl.clone()
    for name, i in unet_attention_blocks(m.get_model_object("diffusion_model")):
        m.set_model_attn2_replace(earlier, name, i)
    n = noise()
    chained = sample(tiny, apply(m, ipadapter, clip_vision, images()), n, steps=1)
    assert calls
    assert torch.equal(chained, sample(tiny, apply(sdxl, ipadapter, clip_vision, images()), n, steps=1))


def test_errors_name_the_fix(tiny, sdxl, ipadapter, clip_vision):
    flux = tiny.build_model("flux", seed=0)
    with pytest.raises(ValueError, match="SD1.5/SDXL UNets"):
        apply(flux, ipadapter, clip_vision, images())
    with pytest.raises(ValueError, match="one image, or one per latent image"):
        sample(tiny, apply(sdxl, ipadapter, clip_vision, images(2)), noise(3), steps=1)
    wide = W.ipadapter_plus(**{**TINY_IP, "embedding_dim": 48})
    with pytest.raises(ValueError, match="CLIP-ViT-H-14"):
        apply(sdxl, wide, clip_vision, images())


def test_automatic_shared_attention_keeps_the_ip_adapter_in_either_order(tiny, sdxl, ipadapter, clip_vision):
    """Both patch attn2; whichever is applied second calls the first, so the order does not matter."""
    from comfyui_syncd.nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    config = SharedAttentionConfig(1, "automatic", 1e9, 0.0, subject_tokens=(5,))
    n = noise(1)
    ip_then_shared = apply_shared_attention(apply(sdxl, ipadapter, clip_vision, images()), config)[0]
    shared_then_ip = apply(apply_shared_attention(sdxl, config)[0], ipadapter, clip_vision, images())
    shared_only = apply_shared_attention(sdxl, config)[0]
    a, b = sample(tiny, ip_then_shared, n), sample(tiny, shared_then_ip, n)
    torch.testing.assert_close(a, b)
    assert (a - sample(tiny, shared_only, n)).abs().max() > 1e-4

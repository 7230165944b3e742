"""Official SynCD checkpoints (SynCDCheckpointLoader): key matching at full size, the LoRA and IP weights on tiny
models, the reference pass without LoRA, files and the converter."""

import pytest
import torch

import syncd_synthetic_weights as W

pytestmark = pytest.mark.comfy

TINY_FLUX = {"hidden": 32, "mlp": 64, "double": 2, "single": 2}  # tiny_models.model_config("flux", 32)


@pytest.fixture(scope="module")
def sdxl(tiny):
    return tiny.build_model("sdxl", seed=3)


@pytest.fixture(scope="module")
def flux(tiny):
    return tiny.build_model("flux", seed=3)


def sample(tiny, family, model, steps=2, cfg=4.0):
    import comfy.sample

    n = torch.randn(1, tiny.LATENT_CHANNELS[family], 8, 8, generator=torch.Generator().manual_seed(0))
    pos, neg = tiny.encode_text(family, "a photo of a dog"), tiny.encode_text(family, "")
    return comfy.sample.sample(model, n, steps, cfg, "euler", "simple", pos, neg, torch.zeros_like(n), seed=0,
                               disable_pbar=True)


# --- full-size key matching (meta device: no memory) ------------------------------------------------------------

def test_full_size_sdxl_checkpoint_matches_every_key():
    import comfy.supported_models as sm

    from comfyui_syncd.nodes.ip_adapter import cross_attentions
    from comfyui_syncd.nodes.syncd_checkpoint import apply_sdxl

    model = W.meta_model(sm.SDXL, W.SDXL_CONFIG)
    ip = W.ipadapter_plus(W.SDXL_UNET, 2048, 1280, 1280, 20, device="meta")
    sd = W.syncd_sdxl_checkpoint(W.SDXL_UNET, 2048, device="meta")
    patched, new_ip, report = apply_sdxl(model, sd, 1.0, ip)
    assert (report.lora_modules, report.ip_layers, report.frozen_skipped, report.unmatched) == (280, 70, 0, [])
    assert len(sd) == 700
    keys = set(patched.weight_wrapper_patches)
    assert len(keys) == 280 and all(".attn1.to_" in k for k in keys)
    assert "diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_out.0.weight" in keys
    # the SynCD to_k_ip/to_v_ip of diffusers module k replace IP-Adapter layer 2k+1 (the same cross-attention)
    for k, (path, _) in enumerate(W.transformer_blocks(W.SDXL_UNET)):
        for kv in "kv":
            assert new_ip["ip_adapter"][f"{2 * k + 1}.to_{kv}_ip.weight"] is \
                sd[f"unet.{path}.attn2.processor.attn_op.to_{kv}_ip.0.weight"]
    assert new_ip["image_proj"] is ip["image_proj"] and len(cross_attentions(model.model.diffusion_model)) == 70


def test_full_size_flux_checkpoint_matches_every_key():
    import comfy.supported_models as sm

    from comfyui_syncd.nodes.syncd_checkpoint import apply_flux

    model = W.meta_model(sm.Flux, W.FLUX_DEV_CONFIG)
    sd = W.syncd_flux_checkpoint(**W.FLUX_DEV, device="meta")
    sd["vae.decoder.conv_in.weight"] = torch.empty(1, device="meta")  # frozen base weights are skipped, counted
    sd["transformer.base_model.model.transformer_blocks.0.attn.to_q.base_layer.weight"] = torch.empty(1, device="meta")
    patched, report = apply_flux(model, sd, 1.0)
    assert (report.lora_modules, report.frozen_skipped, report.unmatched) == (19 * 12 + 38 * 3, 2, [])
    qkv = patched.patches["diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    assert sorted(p[3][1] for p in qkv) == [0, 3072, 6144]  # to_q, to_k, to_v slices of the fused weight
    assert len(patched.patches["diffusion_model.single_blocks.37.linear1.weight"]) == 3
    for key in ("double_blocks.18.txt_mlp.2", "double_blocks.3.txt_attn.proj", "double_blocks.0.img_mlp.0"):
        assert f"diffusion_model.{key}.weight" in patched.patches


def test_unmatched_keys_are_listed(sdxl, flux):
    from comfyui_syncd.core.checkpoint_keys import UnmatchedKeysError
    from comfyui_syncd.nodes.syncd_checkpoint import apply_flux, apply_sdxl

    sd = W.syncd_flux_checkpoint(**TINY_FLUX, rank=4)
    sd["transformer.base_model.model.transformer_blocks.5.attn.to_q.lora_A.default.weight"] = torch.zeros(4, 32)
    sd["transformer.base_model.model.transformer_blocks.5.attn.to_q.lora_B.default.weight"] = torch.zeros(32, 4)
    sd["transformer.base_model.model.transformer_blocks.0.ff.net.2.lora_B.default.weight"] = torch.zeros(7, 4)
    sd["optimizer.step"] = torch.zeros(1)
    with pytest.raises(UnmatchedKeysError) as err:
        apply_flux(flux, sd, 1.0)
    text = str(err.value)
    assert "3 keys" in text and "transformer_blocks.5.attn.to_q (no such module" in text
    assert "ff.net.2 (lora_A (4, 64), lora_B (7, 4)" in text and "optimizer.step (unknown key)" in text
    ip = W.ipadapter_plus(W.TINY_SDXL_UNET, 64, 32, 32, 1)
    sd = W.syncd_sdxl_checkpoint(W.TINY_SDXL_UNET, 64, rank=4)
    ip_key = "unet.up_blocks.0.attentions.0.transformer_blocks.1.attn2.processor.attn_op.to_k_ip.0.weight"
    sd[ip_key] = torch.zeros(3, 3)
    del sd["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default.weight"]
    with pytest.raises(UnmatchedKeysError, match="2 keys") as err:
        apply_sdxl(sdxl, sd, 1.0, ip)
    assert "attn1.to_q.lora_B (missing)" in str(err.value) and "to_k_ip.0.weight (shape (3, 3)" in str(err.value)


# --- numbers on tiny models -------------------------------------------------------------------------------------

def test_sdxl_lora_applies_except_in_the_reference_pass(tiny, sdxl):
    from comfyui_syncd.nodes.patch_kit import Phase, phase_scope
    from comfyui_syncd.nodes.syncd_checkpoint import apply_sdxl

    sd = W.syncd_sdxl_checkpoint(W.TINY_SDXL_UNET, 64, rank=8, std=0.3)
    ip = W.ipadapter_plus(W.TINY_SDXL_UNET, 64, 32, 32, 1)
    patched, _, report = apply_sdxl(sdxl, sd, 1.0, ip)
    assert report.lora_modules == 4 * len(W.transformer_blocks(W.TINY_SDXL_UNET))
    base = sample(tiny, "sdxl", sdxl)
    assert (sample(tiny, "sdxl", patched) - base).abs().max() > 1e-3
    with phase_scope(Phase.REFERENCE):
        assert torch.equal(sample(tiny, "sdxl", patched), base)
    assert torch.equal(sample(tiny, "sdxl", apply_sdxl(sdxl, sd, 0.0, ip)[0]), base)
    # the wrapper is W + strength·B·A, the diffusers name mapped onto ComfyUI's module
    key = "diffusion_model.output_blocks.1.1.transformer_blocks.1.attn1.to_v.weight"
    path = "unet.up_blocks.0.attentions.1.transformer_blocks.1.attn1.to_v"
    (wrapper,) = apply_sdxl(sdxl, sd, 0.5, ip)[0].weight_wrapper_patches[key]
    w = sdxl.model.state_dict()[key]
    expected = w + 0.5 * sd[f"{path}.lora_B.default.weight"] @ sd[f"{path}.lora_A.default.weight"]
    torch.testing.assert_close(wrapper(w), expected)
    with phase_scope(Phase.REFERENCE):
        assert torch.equal(wrapper(w), w)


def test_flux_lora_is_an_ordinary_weight_patch(tiny, flux):
    from comfyui_syncd.nodes.syncd_checkpoint import apply_flux

    sd = W.syncd_flux_checkpoint(**TINY_FLUX, rank=4, std=0.3)
    patched, report = apply_flux(flux, sd, 1.0)
    assert report.lora_modules == 2 * 12 + 2 * 3
    base = sample(tiny, "flux", flux)
    assert (sample(tiny, "flux", patched) - base).abs().max() > 1e-3
    assert torch.equal(sample(tiny, "flux", apply_flux(flux, sd, 0.0)[0]), base)
    fresh = tiny.build_model("flux", seed=3)  # not loaded by the samplings above
    patched = apply_flux(fresh, sd, 1.0)[0]
    key = "diffusion_model.single_blocks.1.linear1.weight"
    before = fresh.model.state_dict()[key].clone()
    patched.patch_model()
    try:
        after = patched.model.state_dict()[key]
        lora = "transformer.base_model.model.single_transformer_blocks.1.attn.to_k.lora_{}.default.weight"
        torch.testing.assert_close(after[32:64], before[32:64] + sd[lora.format("B")] @ sd[lora.format("A")])
        assert torch.equal(after[96:], before[96:])  # proj_mlp rows of linear1 untouched
    finally:
        patched.unpatch_model()


# --- files -----------------------------------------------------------------------------------------------------

@pytest.fixture
def syncd_folder(tmp_path, monkeypatch):
    import folder_paths

    from comfyui_syncd.nodes.syncd_checkpoint import FOLDER

    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(tmp_path)], {".ckpt", ".bin",
                                                                                         ".safetensors"}))
    return tmp_path


def test_loader_node_reads_the_lightning_ckpt_and_its_safetensors_conversion(tiny, sdxl, syncd_folder, capsys):
    from comfyui_syncd.checkpoint_convert import main as convert_main
    from comfyui_syncd.nodes.syncd_checkpoint import SynCDCheckpointLoader

    sd = W.syncd_sdxl_checkpoint(W.TINY_SDXL_UNET, 64, rank=8, std=0.3)
    ip = W.ipadapter_plus(W.TINY_SDXL_UNET, 64, 32, 32, 1)
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 20000, "pytorch-lightning_version": "2.4.0"},
               syncd_folder / "sdxl_finetuned_20k.ckpt")
    assert convert_main([str(syncd_folder / "sdxl_finetuned_20k.ckpt"), str(syncd_folder / "sdxl.safetensors")]) == 0
    assert f"{len(sd)} tensors" in capsys.readouterr().out
    outs = [SynCDCheckpointLoader.execute(sdxl, name, 1.0, ip).args
            for name in ("sdxl_finetuned_20k.ckpt", "sdxl.safetensors")]
    for model, new_ip in outs:
        assert torch.equal(new_ip["ip_adapter"]["1.to_k_ip.weight"],
                           sd["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.attn_op."
                              "to_k_ip.0.weight"])
    torch.testing.assert_close(sample(tiny, "sdxl", outs[0][0]), sample(tiny, "sdxl", outs[1][0]))
    with pytest.raises(ValueError, match="connect the IP-Adapter Plus it was trained from"):
        SynCDCheckpointLoader.execute(sdxl, "sdxl_finetuned_20k.ckpt", 1.0)


def test_loader_node_flux_bin_and_family_mismatch(tiny, sdxl, flux, syncd_folder):
    from comfyui_syncd.nodes.syncd_checkpoint import SynCDCheckpointLoader

    torch.save(W.syncd_flux_checkpoint(**TINY_FLUX, rank=4), syncd_folder / "pytorch_model.bin")
    model, ip = SynCDCheckpointLoader.execute(flux, "pytorch_model.bin", 1.0).args
    assert ip is None and len(model.patches) == 2 * 8 + 2
    with pytest.raises(ValueError, match="SynCD FLUX checkpoint but the model is not Flux"):
        SynCDCheckpointLoader.execute(sdxl, "pytorch_model.bin", 1.0)


def test_reference_injection_runs_the_reference_pass_without_the_lora(tiny, sdxl):
    """With the SynCD SDXL LoRA and reference injection: every attn1 input captured in the reference pass equals the
    one of the model without the LoRA (upstream: LoRA scale 0), while the target pass uses the LoRA (its output
    differs from the LoRA-less model's)."""
    from comfyui_syncd.nodes.patch_kit import Phase, forward_state
    from comfyui_syncd.nodes.reference_injection import ReferenceConfig, apply_reference_injection
    from comfyui_syncd.nodes.reference_nodes import encode_references
    from comfyui_syncd.nodes.syncd_checkpoint import apply_sdxl

    sd = W.syncd_sdxl_checkpoint(W.TINY_SDXL_UNET, 64, rank=8, std=0.3)
    ip = W.ipadapter_plus(W.TINY_SDXL_UNET, 64, 32, 32, 1)
    with_lora = apply_sdxl(sdxl, sd, 1.0, ip)[0]
    refs = encode_references(tiny.build_vae("sdxl", seed=1),
                             torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0)))
    config = ReferenceConfig(refs, tiny.encode_text("sdxl", "photo of a dog"), "noised", 0, 1e9, 0.0)

    def run(model):
        injected = apply_reference_injection(model, config)[0].clone()
        captured = []

        def probe(n, context, value, extra):
            if forward_state(extra).phase is Phase.REFERENCE:
                captured.append(n.clone())
            return n, context, value

        injected.set_model_attn1_patch(probe)
        return sample(tiny, "sdxl", injected, steps=1), captured

    out_base, feats_base = run(sdxl)
    out_lora, feats_lora = run(with_lora)
    assert len(feats_base) == len(feats_lora) == len(W.transformer_blocks(W.TINY_SDXL_UNET))
    for a, b in zip(feats_base, feats_lora):
        torch.testing.assert_close(a, b)
    assert (out_lora - out_base).abs().max() > 1e-3

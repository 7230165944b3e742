"""SynCD Flux in-context training (training/flux_incontext.py) on a tiny diffusers Flux (1 double + 1 single block,
2 heads of 16): canvas/packing/σ helpers, the loss on target tokens with clean references, a few steps lower the
loss, and the export loads through the pack's SynCD Checkpoint Loader on a ComfyUI Flux of the same shape."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from ico_tiny_models import clip_config, tokenizer_path

from comfyui_syncd.core import checkpoint_keys as ck
from comfyui_syncd.training import config, flux_incontext as fx

pytestmark = pytest.mark.comfy  # ComfyUI's tokenizer files; ComfyUI's Flux for the loader test

TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="session")
def tiny_flux(comfy_path, tmp_path_factory):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    root = tmp_path_factory.mktemp("tiny_flux")
    torch.manual_seed(0)
    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(root / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
                  ).save_pretrained(root / "vae")
    CLIPTextModel(clip_config(16)).save_pretrained(root / "text_encoder")
    CLIPTokenizer.from_pretrained(tokenizer_path(), model_max_length=77).save_pretrained(root / "tokenizer")
    T5EncoderModel(T5Config(vocab_size=32128, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
                   ).save_pretrained(root / "text_encoder_2")
    t5_tok = tokenizer_path().parent / "text_encoders" / "t5_tokenizer"
    T5TokenizerFast.from_pretrained(t5_tok).save_pretrained(root / "tokenizer_2")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}))
    return root


def flux_raw(model, dataset, output_dir, **train):
    return {"model": {"path": str(model)},
            "data": {"dirs": [str(dataset)], "resolution": 32, "crop_padding": 4, "num_workers": 0,
                     "max_sequence_length": 8, "drop_text": 0.0},
            "lora": {"rank": 4, "alpha": 8.0},
            "train": {"output_dir": str(output_dir), "max_steps": 2, "checkpoint_every": 2, "learning_rate": 1e-3,
                      "gradient_accumulation_steps": 1, **train}}


def test_canvas_tokens_and_sigmas():
    lat = torch.arange(2 * 3 * 1 * 4 * 4, dtype=torch.float32).view(6, 1, 4, 4)  # 2 samples x 3 images
    c = fx.canvas(lat, 3)
    assert c.shape == (2, 1, 4, 12)
    assert torch.equal(c[1, :, :, 4:8], lat[4]) and torch.equal(c[0, :, :, :4], lat[0])  # b c h (n w)
    packed = fx.pack(c)
    assert packed.shape == (2, 2 * 6, 4)
    keep = fx.target_tokens(4, 4, 3)
    assert keep.tolist() == [True, True, False, False, False, False] * 2  # first w/2 columns of each token row
    assert torch.equal(packed[0, keep], fx.pack(lat[:1])[0])  # target tokens = the target's own packing
    ids = fx.image_ids(4, 12)
    assert ids.shape == (12, 3) and ids[7].tolist() == [0, 1, 1]
    assert fx.shift_mu(256) == pytest.approx(0.5) and fx.shift_mu(4096) == pytest.approx(1.15)
    u = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(fx.shifted_sigmas(u, 0.0), u)
    s = fx.shifted_sigmas(u, 1.0)
    e = 2.718281828459045
    assert s[0] == 0 and s[2] == 1 and s[1].item() == pytest.approx(e * 0.5 / (1 + (e - 1) * 0.5))


def test_loss_on_target_only_with_clean_references(tiny_flux, tiny_dataset, tmp_path):
    """The transformer sees the references exactly clean (x_t = x0) at the target's σ, and changing the
    prediction on reference tokens does not change the loss."""
    run = fx.prepare(config.from_dict(fx.FluxConfig, flux_raw(tiny_flux, tiny_dataset, tmp_path / "r")), None)
    n = len(run.dataset)
    batch = fx.syncd.collate([run.dataset[(0, 0)]])
    inputs = fx.model_inputs(run, batch, torch.Generator().manual_seed(0))
    assert inputs["x0"].shape == (1, 16, 16, 48) and 0 < inputs["sigmas"].item() < 1 and n == 3
    seen = {}
    tr = run.core.transformer
    real = tr.forward

    def spy(**kw):
        seen.update(kw)
        out = real(**kw)
        out[0][:, ~fx.target_tokens(16, 16, 3)] += 100.0  # garbage on reference tokens
        return out
    tr.forward = spy
    try:
        loss = run.model(**inputs)
    finally:
        del tr.forward
    x0 = fx.pack(inputs["x0"])
    keep = fx.target_tokens(16, 16, 3)
    assert torch.equal(seen["hidden_states"][:, ~keep], x0[:, ~keep])
    assert not torch.equal(seen["hidden_states"][:, keep], x0[:, keep])
    assert torch.equal(seen["timestep"], inputs["sigmas"]) and seen["guidance"].tolist() == [1.0]
    assert seen["img_ids"].shape == (keep.numel(), 3) and seen["encoder_hidden_states"].shape == (1, 8, 32)
    assert loss.item() < 50  # the +100 on reference tokens did not enter the loss


def test_a_few_steps_lower_the_loss_and_export_loads_in_comfy(tiny_flux, tiny_dataset, tmp_path, comfy_imports):
    raw = flux_raw(tiny_flux, tiny_dataset, tmp_path / "run", max_steps=25, learning_rate=2e-2, max_grad_norm=0)
    run = fx.prepare(config.from_dict(fx.FluxConfig, raw), None)
    batch = fx.syncd.collate([run.dataset[(0, 0)]])
    names = {n.split(".lora_")[0] for n in run.trainable}
    assert len(names) == 12 + 3  # double block: 12 target suffixes; single block: attn.to_q/k/v

    def mean_loss():
        with torch.no_grad():
            return sum(run.model(**fx.model_inputs(run, batch, torch.Generator().manual_seed(50 + s))).item()
                       for s in range(4)) / 4

    before = mean_loss()
    fixed = iter(lambda: batch, None)
    for _ in range(25):
        fx.train_step(run, fixed)
    after = mean_loss()
    assert after < 0.9 * before, (before, after)
    path = fx.export(run)
    sd = safetensors.torch.load_file(str(path))
    assert ck.detect_family(sd) == "flux" and len(sd) == 2 * len(names)
    assert all(k.startswith("transformer.base_model.model.") and ck.FLUX_LORA_KEY.match(k) for k in sd)

    import comfy.lora  # noqa: F401
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils  # noqa: F401
    from comfyui_syncd.nodes.syncd_checkpoint import load_syncd_checkpoint

    dit = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 16, "context_in_dim": 32,
           "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
           "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2}
    mc = comfy.supported_models.Flux(dit)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ComfyUI's ops leave weights uninitialised
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    patched, _, report = load_syncd_checkpoint(patcher, path, 1.0)
    assert report.unmatched == [] and report.lora_modules == len(names)
    before_w = {k: v.clone() for k, v in patched.model.state_dict().items()}
    patched.patch_model()
    try:
        after_w = patched.model.state_dict()
        # attn.to_out.0 of the double block -> img_attn.proj: exactly + B·A (alpha/rank folded into B)
        key = "diffusion_model.double_blocks.0.img_attn.proj.weight"
        pre = "transformer.base_model.model.transformer_blocks.0.attn.to_out.0"
        delta = sd[pre + ".lora_B.default.weight"] @ sd[pre + ".lora_A.default.weight"]
        torch.testing.assert_close(after_w[key] - before_w[key], delta, rtol=1e-4, atol=1e-6)
        lora = run.core.transformer.transformer_blocks[0].attn.to_out[0]
        torch.testing.assert_close(delta, lora.lora_B["default"].weight.detach() @ lora.lora_A["default"].weight
                                   .detach() * lora.scaling["default"], rtol=1e-5, atol=1e-7)
        assert lora.scaling["default"] == 2.0
    finally:
        patched.unpatch_model()


def test_example_config_reads_with_upstream_defaults():
    import pathlib

    cfg = config.load(pathlib.Path(fx.__file__).parent / "configs" / "flux_incontext.yaml", fx.FluxConfig)
    fx.check(cfg)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.train.guidance) == (32, 32.0, 1.0)
    assert (cfg.train.sigma_beta_a, cfg.train.sigma_beta_b, cfg.train.gradient_accumulation_steps) == (4.0, 2.0, 2)
    from comfyui_syncd.training import validation

    assert cfg.validation == validation.FluxValidationConfig()  # listed with its defaults (off)
    assert (cfg.validation.steps, cfg.validation.guidance) == (30, 3.5)


# --- resume ----------------------------------------------------------------------------------------------------

SCRIPT = "comfyui_syncd.training.flux_incontext"


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(tiny_flux, tiny_dataset, tmp_path):
    """``python -m ...flux_incontext`` killed while writing checkpoint 4, rerun with the same command: it resumes at
    step 2 with the data stream where the uninterrupted run has it, and ends with the uninterrupted run's losses,
    LoRA export and final trained tensors, bit for bit."""
    import yaml
    from script_runs import assert_same_tensors, killed_at_checkpoint_4, resumed_from_checkpoint_2

    from comfyui_syncd.training import loop

    def raw(out):
        return flux_raw(tiny_flux, tiny_dataset, out, max_steps=6, checkpoint_every=2, keep_checkpoints=0)

    ref_dir = tmp_path / "uninterrupted"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the single-threaded subprocess runs
    try:
        fx.train(fx.prepare(config.from_dict(fx.FluxConfig, raw(ref_dir)), None), progress=False)
    finally:
        torch.set_num_threads(before)
    out = tmp_path / "run"
    cfg_path = tmp_path / "flux.yaml"
    cfg_path.write_text(yaml.safe_dump(raw(out)))
    args = ["--config", str(cfg_path), "--no-progress"]
    killed_at_checkpoint_4(SCRIPT, args, out)

    # the data order after resuming: the resumed run's first micro-batch is the fresh stream's third
    resumed = fx.prepare(config.from_dict(fx.FluxConfig, raw(out)), "auto")
    assert resumed.step == 2
    fresh = fx.prepare(config.from_dict(fx.FluxConfig, raw(tmp_path / "fresh")), None)
    stream = fx.loader(fresh)
    third = [next(stream) for _ in range(3)][-1]
    first = next(fx.loader(resumed))
    assert first["index"] == third["index"] and torch.equal(first["pixel_values"], third["pixel_values"])
    del resumed, fresh, stream

    resumed_from_checkpoint_2(SCRIPT, args, out)
    assert loop.read_losses(out) == loop.read_losses(ref_dir) and sorted(loop.read_losses(out)) == list(range(1, 7))
    assert len((out / loop.LOSS_LOG).read_text().splitlines()) == 6
    assert_same_tensors(out, ref_dir, ["syncd/syncd_flux.safetensors", "checkpoints/step_000004/trainable.safetensors",
                                       "checkpoints/step_000006/trainable.safetensors"])

"""SynCD customization training on tiny models (training/syncd.py): the loss goes down, the reference pass runs
without the LoRA, the target's attn1 sees exactly [own ‖ reference foreground], a killed run resumes bit-identically,
and the exported checkpoint has the official keys and loads through the pack's SynCD checkpoint loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from script_runs import assert_same_tensors, killed_at_checkpoint_4, resumed_from_checkpoint_2, tensors

from comfyui_syncd.attention.masks import resize_to_grid
from comfyui_syncd.core import checkpoint_keys as ck
from comfyui_syncd.training import config, loop, syncd

pytestmark = pytest.mark.comfy  # needs the ComfyUI checkout (tokenizer files of the tiny models)


def syncd_raw(model, image_encoder, dataset, output_dir, **train) -> dict:
    return {"model": {"path": str(model)},
            "ip_adapter": {"image_encoder": str(image_encoder), "resampler_dim": 32, "resampler_heads": 1,
                           "resampler_depth": 1, "num_queries": 4},
            "data": {"dirs": [str(dataset)], "resolution": 64, "crop_padding": 4, "num_workers": 0},
            "lora": {"rank": 4, "alpha": 4.0},
            "train": {"output_dir": str(output_dir), "max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 0,
                      "gradient_accumulation_steps": 1, "learning_rate": 1.0e-3, **train}}


def make_run(raw, resume=None):
    return syncd.prepare(config.from_dict(syncd.SyncdConfig, raw), resume=resume)


def _train(raw):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the single-threaded subprocess runs it is compared with
    try:
        return syncd.train(make_run(raw), progress=False)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def syncd_trained_sd15(tiny_sd15, tiny_image_encoder, tiny_dataset, tmp_path_factory):
    return _train(syncd_raw(tiny_sd15, tiny_image_encoder, tiny_dataset, tmp_path_factory.mktemp("syncd_sd15")))


@pytest.fixture(scope="session")
def syncd_trained_sdxl(tiny_sdxl, tiny_image_encoder, tiny_dataset, tmp_path_factory):
    raw = syncd_raw(tiny_sdxl, tiny_image_encoder, tiny_dataset, tmp_path_factory.mktemp("syncd_sdxl"), max_steps=2)
    return _train(raw)


def _fixed_batch(run, positions=(0, 1, 2)):
    n = len(run.dataset)
    return syncd.collate([run.dataset[(p % n, p)] for p in positions])


def test_dataset_samples(syncd_trained_sd15):
    """Per sample: 3 images (a 2-image object is completed with a flipped one), 64 px, latent-grid masks dilated
    5x5, IP images at the encoder's size; positions decide everything (same key, same sample)."""
    ds = syncd_trained_sd15.dataset
    ex = ds[(1, 7)]
    assert ex["pixel_values"].shape == (3, 3, 64, 64) and ex["ref_images"].shape == (3, 3, 32, 32)
    assert ex["masks"].shape == (3, 8, 8) and set(ex["masks"].unique().tolist()) <= {0.0, 1.0}
    assert len(ex["prompts"]) == 3 and all(p.startswith("a photo of object 1") or p == "" for p in ex["prompts"])
    again = ds[(1, 7)]
    assert all(torch.equal(ex[k], again[k]) for k in ("pixel_values", "ref_images", "masks"))
    for seed in range(5):
        chosen = syncd.choose_images(2, 3, np.random.default_rng(seed))
        assert len(set(chosen)) == 3 and set(chosen) <= {0, 1, -1, -2}
        glob_idx = syncd.global_indices(chosen, np.random.default_rng(seed))
        target = chosen[0]
        assert glob_idx[1:] == [1, 2] and chosen[glob_idx[0]] not in (target, -target - 1)


def test_a_few_steps_lower_the_loss(tiny_sd15, tiny_image_encoder, tiny_dataset, tmp_path):
    raw = syncd_raw(tiny_sd15, tiny_image_encoder, tiny_dataset, tmp_path / "run", max_steps=10,
                    learning_rate=1.0e-2)
    raw["data"].update(drop_text=0.0, drop_image=0.0, drop_both=0.0, drop_mask=0.0)
    run = make_run(raw)
    batch = _fixed_batch(run)
    frozen = {n: p.detach().clone() for n, p in run.core.named_parameters() if not p.requires_grad}
    assert run.trainable and all(".lora_" in n or "_ip." in n for n in run.trainable)

    def mean_loss():
        total = 0.0
        with torch.no_grad():
            for s in range(3):
                inputs = syncd.model_inputs(run, batch, torch.Generator().manual_seed(100 + s))
                total += run.model(**inputs).item()
        return total / 3

    before = mean_loss()
    batches = iter(lambda: batch, None)
    losses = [syncd.train_step(run, batches) for _ in range(10)]
    after = mean_loss()
    assert all(np.isfinite(losses))
    assert after < 0.95 * before, (before, after)
    for n, p in run.core.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def _lora_modules(unet):
    return {n: m for n, m in unet.named_modules() if n.endswith((".lora_A.default", ".lora_B.default"))}


def test_reference_pass_runs_without_lora(syncd_trained_sd15, monkeypatch):
    """No LoRA layer runs during the reference pass (they all run in the target pass), and the captured features
    equal those of the same pass with the LoRA zeroed, while an enabled LoRA would change them."""
    run = syncd_trained_sd15
    core, state = run.core, run.state
    lora = _lora_modules(core.unet)
    n_attn1 = sum(1 for n in core.unet.attn_processors if n.endswith("attn1.processor"))
    assert n_attn1 == 7 and len(lora) == 2 * 4 * n_attn1  # A and B x q, k, v, out.0 of every attn1
    modes = []
    hooks = [m.register_forward_hook(lambda *a: modes.append(state.mode)) for m in lora.values()]
    inputs = syncd.model_inputs(run, _fixed_batch(run, (0,)), torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            run.model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    assert modes and set(modes) == {"shared"}
    assert any(m.weight.abs().max() > 0 for n, m in lora.items() if "lora_B" in n)  # trained: B moved off zero

    n = inputs["n"]
    refs = torch.arange(n) % n != 0
    t = inputs["timesteps"].repeat_interleave(n)[refs]
    noisy = core.scheduler.add_noise(inputs["latents"], inputs["noise"], inputs["timesteps"].repeat_interleave(n))
    args = (noisy[refs], t, inputs["context"][refs], None, None, inputs["ip_tokens"][refs])
    disabled = {k: v.clone() for k, v in core.reference_pass(*args).items()}
    saved = {n_: m.weight.detach().clone() for n_, m in lora.items() if "lora_B" in n_}

    def set_b(zero):
        with torch.no_grad():
            for n_, m in lora.items():
                if "lora_B" in n_:
                    m.weight.copy_(torch.zeros_like(saved[n_]) if zero else saved[n_])

    try:
        set_b(zero=True)
        zeroed = {k: v.clone() for k, v in core.reference_pass(*args).items()}
        set_b(zero=False)
        with monkeypatch.context() as mp:  # an enabled LoRA would contribute: the pass's switch made a no-op
            mp.setattr(core.unet, "disable_adapters", lambda: None)
            enabled = {k: v.clone() for k, v in core.reference_pass(*args).items()}
    finally:
        set_b(zero=False)
    assert len(disabled) == n_attn1 and disabled.keys() == zeroed.keys()
    assert all(torch.equal(disabled[k], zeroed[k]) for k in disabled)
    assert any(not torch.allclose(enabled[k], disabled[k]) for k in list(disabled)[1:])


@pytest.mark.parametrize("all_ones", [False, True])
def test_target_attn1_sees_own_and_reference_foreground(syncd_trained_sd15, all_ones):
    """A spy on the MSA processor: per attn1 layer and sample, the key input is exactly [the target's own tokens ‖
    the captured reference tokens at the foreground of their masks nearest-resized to the layer grid]."""
    run = syncd_trained_sd15
    state = run.state
    batch = _fixed_batch(run, (0, 4))
    masks = torch.zeros_like(batch["masks"])
    masks[:, :4, :] = 1  # top half foreground ...
    masks[2::3, :, :] = 0  # ... and the second reference of each sample has none
    batch["masks"] = torch.ones_like(masks) if all_ones else masks
    seen = []

    def spy(name, own, key_input):
        seen.append((name, own.clone(), key_input.clone(), {k: v.clone() for k, v in state.captured.items()}))

    state.spy = spy
    try:
        with torch.no_grad():
            run.model(**syncd.model_inputs(run, batch, torch.Generator().manual_seed(1)))
    finally:
        state.spy = None
    layers = sorted({s[0] for s in seen})
    assert len(layers) == 7 and len(seen) == 2 * len(layers)  # every attn1, 2 samples each
    ref_masks = batch["masks"][torch.arange(6) % 3 != 0]
    counts = {}
    for name, own, key_input, captured in seen:
        row = counts.get(name, 0)
        counts[name] = row + 1
        tokens = own.shape[0]
        side = int(tokens ** 0.5)
        fg = resize_to_grid(ref_masks, side, side)
        refs = captured[name][2 * row:2 * row + 2]
        expected = torch.cat([own, refs[0][fg[2 * row]], refs[1][fg[2 * row + 1]]])
        assert torch.equal(key_input, expected), name
        n_keys = tokens + (2 * tokens if all_ones else tokens // 2)
        assert key_input.shape[0] == n_keys


# --- resume and exports --------------------------------------------------------------------------------------

SCRIPT = "comfyui_syncd.training.syncd"


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(tiny_sd15, tiny_image_encoder, tiny_dataset,
                                                               tmp_path, syncd_trained_sd15):
    out = tmp_path / "run"
    cfg_path = tmp_path / "syncd.yaml"
    cfg_path.write_text(yaml.safe_dump(syncd_raw(tiny_sd15, tiny_image_encoder, tiny_dataset, out)))
    args = ["--config", str(cfg_path), "--no-progress"]
    killed_at_checkpoint_4(SCRIPT, args, out)
    resumed_from_checkpoint_2(SCRIPT, args, out)
    ref = syncd_trained_sd15.out
    # losses.jsonl: the killed run's steps 3-4 (after its last checkpoint) were dropped on resume and redone
    assert loop.read_losses(out) == loop.read_losses(ref) and sorted(loop.read_losses(out)) == list(range(1, 7))
    assert len((out / loop.LOSS_LOG).read_text().splitlines()) == 6
    assert_same_tensors(out, ref, ["syncd/syncd.safetensors", "ip_adapter/syncd.safetensors",
                                   "syncd/syncd_step000004.safetensors",
                                   "checkpoints/step_000006/trainable.safetensors"])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_export_has_the_official_keys(family, request):
    """Every key of the exported checkpoint is an official SDXL LoRA (attn1 q/k/v/out.0, peft ``.default``) or
    IP (``attn2.processor.to_k_ip.0``) key: complete pairs for every attn1 and an IP pair per attn2; the IP-Adapter
    export is a complete IP-Adapter Plus carrying the same trained weights, and it loads back into a new run."""
    from comfyui_syncd.core.ip_adapter_model import check_plus_layout, split_flat_state_dict

    run = request.getfixturevalue(f"syncd_trained_{family}")
    sd = tensors(run.out / "syncd" / "syncd.safetensors")
    assert ck.detect_family(sd) == "sdxl"
    report = ck.CheckpointReport("sdxl", keys=len(sd))
    pairs = ck.lora_pairs(sd, ck.SDXL_LORA_KEY, report)
    ck.count_other_keys(sd, [ck.SDXL_LORA_KEY, ck.SDXL_IP_KEY], report)
    assert report.unmatched == [] and report.frozen_skipped == 0
    unet = run.core.unet
    attn1 = [n for n in unet.attn_processors if n.endswith("attn1.processor")]
    attn2 = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert len(pairs) == 4 * len(attn1)
    ip_keys = [k for k in sd if ck.SDXL_IP_KEY.match(k)]
    assert len(ip_keys) == 2 * len(attn2) and all(k.endswith(".to_k_ip.0.weight") or k.endswith(".to_v_ip.0.weight")
                                                 for k in ip_keys)
    modules = dict(unet.named_modules())
    for module, pair in pairs.items():
        base = modules[module].base_layer
        assert ck.check_lora_shapes(module, pair, base.out_features, base.in_features, report)
        assert pair["A"].shape[0] == 4
    ip = split_flat_state_dict(tensors(run.out / "ip_adapter" / "syncd.safetensors"))
    check_plus_layout(ip)
    names = list(unet.attn_processors)
    for key in ip_keys:
        proc_name = key.removeprefix("unet.").split(".to_")[0]
        which = "k" if ".to_k_ip." in key else "v"
        assert torch.equal(ip["ip_adapter"][f"{names.index(proc_name)}.to_{which}_ip.weight"], sd[key])
    assert any(not torch.equal(sd[k], modules[k.removeprefix("unet.").split(".processor")[0]].to_k.weight.detach())
               for k in ip_keys if ".to_k_ip." in k)  # trained away from the fresh init (a copy of to_k)

    raw = config.to_dict(run.cfg)
    raw["ip_adapter"]["path"] = str(run.out / "ip_adapter" / "syncd.safetensors")
    raw["train"]["output_dir"] = str(run.out.parent / f"reload_{family}")
    again = make_run(raw)
    for key in ip_keys:
        name = key.removeprefix("unet.")
        assert torch.equal(dict(again.core.unet.named_parameters())[name].detach(), sd[key])
    assert all(torch.equal(a, b) for a, b in zip(again.core.resampler.state_dict().values(),
                                                 run.core.resampler.state_dict().values()))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_checkpoint_loads_through_the_syncd_loader(family, request, comfy_imports):
    """``load_syncd_checkpoint`` (the SynCD Checkpoint Loader's function) on a ComfyUI UNet built from the same tiny
    base: every key matched, a reference-pass-aware LoRA wrapper per attn1 projection whose B·A is the trained
    delta, and the IP-Adapter's to_k_ip/to_v_ip replaced by the trained ones."""
    from diffusers import UNet2DConditionModel
    from test_ico_comfy_load import comfy_unet

    import comfy
    import comfy.lora  # noqa: F401
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.supported_models  # noqa: F401
    import comfy.utils  # noqa: F401
    from comfyui_syncd.core.ip_adapter_model import split_flat_state_dict
    from comfyui_syncd.nodes.syncd_checkpoint import ReferencePassLoRA, load_syncd_checkpoint

    run = request.getfixturevalue(f"syncd_trained_{family}")
    base = UNet2DConditionModel.from_pretrained(request.getfixturevalue(f"tiny_{family}"), subfolder="unet")
    patcher, _ = comfy_unet(comfy, family, base)
    trained_ip = split_flat_state_dict(tensors(run.out / "ip_adapter" / "syncd.safetensors"))
    fresh_ip = {"image_proj": trained_ip["image_proj"],
                "ip_adapter": {k: torch.zeros_like(v) for k, v in trained_ip["ip_adapter"].items()}}
    model, ipadapter, report = load_syncd_checkpoint(patcher, run.out / "syncd" / "syncd.safetensors", 1.0,
                                                     fresh_ip)
    sd = tensors(run.out / "syncd" / "syncd.safetensors")
    n_attn1 = sum(1 for n in run.core.unet.attn_processors if n.endswith("attn1.processor"))
    assert report.unmatched == [] and report.lora_modules == 4 * n_attn1 and report.ip_layers == n_attn1
    for k, v in trained_ip["ip_adapter"].items():
        assert torch.equal(ipadapter["ip_adapter"][k], v), k
    wrappers = [w for ws in model.weight_wrapper_patches.values() for w in ws]
    assert len(wrappers) == 4 * n_attn1 and all(isinstance(w, ReferencePassLoRA) for w in wrappers)
    deltas = sorted(float((w.up @ w.down).abs().sum()) for w in wrappers)
    pairs = ck.lora_pairs(sd, ck.SDXL_LORA_KEY, ck.CheckpointReport("sdxl"))
    assert deltas == pytest.approx(sorted(float((p["B"] @ p["A"]).abs().sum()) for p in pairs.values()))



def test_example_config_reads_with_upstream_defaults():
    import pathlib

    path = pathlib.Path(syncd.__file__).parent / "configs" / "syncd_sdxl.yaml"
    cfg = config.load(path, syncd.SyncdConfig)
    syncd.check(cfg)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.train.learning_rate) == (128, 128.0, 5e-6)
    assert (cfg.data.drop_text, cfg.data.drop_image, cfg.data.drop_both, cfg.data.drop_mask) == (0.05, 0.05, 0.05, 0.1)
    assert cfg.train.prediction_type == "v_prediction" and cfg.train.rescale_betas_zero_snr
    from comfyui_syncd.training import validation

    assert cfg.validation == validation.SyncdValidationConfig()  # listed with its defaults (off)
    v = cfg.validation
    assert (v.steps, v.text_scale, v.image_scale_start, v.image_scale_end, v.ip_scale) == (50, 7.5, 8.0, 13.0, 0.6)
    with pytest.raises(config.ConfigError, match="unknown key"):
        config.from_dict(syncd.SyncdConfig, {**config.to_dict(cfg), "lora": {"rnak": 4}})


# --- the kohya LoRA and the IP-Adapter files -----------------------------------------------------------------

def _peft_lora(unet):
    return {n: m for n, m in unet.named_modules() if n.endswith(syncd.LORA_TARGETS) and hasattr(m, "lora_A")}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_kohya_lora_loads_through_comfy_lora(family, alpha, request, comfy_imports, caplog, monkeypatch):
    """``loras/syncd.safetensors`` through ComfyUI's own LoRA path: ``comfy.lora.load_lora`` with
    ``model_lora_keys_unet`` of a ComfyUI model built from the same tiny UNet consumes every key (no "lora key not
    loaded"), gives one patch per trained attn1 projection, and patching adds exactly B·A·(alpha/rank) (= the peft
    scaling the run trained with) to those weights and nothing else. ``alpha=2.0``: a run whose peft scaling is
    alpha/rank = 0.5 (set on the live modules) writes alpha 2 and ComfyUI applies half of B·A."""
    import logging

    from diffusers import UNet2DConditionModel
    from test_ico_comfy_load import comfy_unet

    import comfy
    import comfy.lora
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.supported_models  # noqa: F401
    import comfy.utils  # noqa: F401

    run = request.getfixturevalue(f"syncd_trained_{family}")
    peft = _peft_lora(run.core.unet)
    rank = run.cfg.lora.rank
    if alpha is None:
        sd = tensors(run.out / "loras" / "syncd.safetensors")
        scale = run.cfg.lora.alpha / rank
        assert all(m.scaling["default"] == scale for m in peft.values())
    else:
        monkeypatch.setattr(run.cfg.lora, "alpha", alpha)
        for m in peft.values():
            monkeypatch.setitem(m.scaling, "default", alpha / rank)
        sd = syncd.kohya_lora_state_dict(run)
        scale = alpha / rank
    n_attn1 = sum(1 for n in run.core.unet.attn_processors if n.endswith("attn1.processor"))
    assert len(peft) == 4 * n_attn1 and len(sd) == 3 * len(peft)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in sd)
    assert any("input_blocks" in k for k in sd) == (family == "sdxl")  # kohya: SDXL LDM names, SD1.5 diffusers

    base = UNet2DConditionModel.from_pretrained(request.getfixturevalue(f"tiny_{family}"), subfolder="unet")
    patcher, mapping = comfy_unet(comfy, family, base)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert "lora key not loaded" not in caplog.text
    expected = {}
    for name, module in peft.items():
        key = "diffusion_model." + mapping[name + ".weight"]
        a, b = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
        expected[key] = b @ a * module.scaling["default"]
        assert module.scaling["default"] == scale
    assert set(patches) == set(expected)
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    assert len(patcher.add_patches(patches, 1.0)) == len(expected)
    patcher.patch_model()
    try:
        after = patcher.model.state_dict()
        for key, delta in expected.items():
            assert delta.abs().max() > 0, key
            torch.testing.assert_close(after[key] - before[key], delta, rtol=1e-4, atol=1e-6)
        assert {k for k in after if not torch.equal(after[k], before[k])} == set(expected)
    finally:
        patcher.unpatch_model()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_ip_adapter_export_is_the_public_plus_layout(family, request, comfy_imports):
    """``ip_adapter/syncd.safetensors`` has h94's IP-Adapter Plus keys exactly: the Resampler under ``image_proj.``
    (latents, proj_in/out, norm_out, layers.<i>.0 attention, layers.<i>.1 feed-forward) and ``ip_adapter.<n>.to_
    {k,v}_ip.weight`` for n = 1, 3, 5, ... (one per cross-attention); the pack's SynCD IP-Adapter Loader function
    ``load_ipadapter`` reads it and ``check_plus_layout`` accepts it."""
    import re

    from comfyui_syncd.core.ip_adapter_model import check_plus_layout
    from comfyui_syncd.nodes.ip_adapter import load_ipadapter

    run = request.getfixturevalue(f"syncd_trained_{family}")
    path = run.out / "ip_adapter" / "syncd.safetensors"
    sd = tensors(path)
    n_attn2 = sum(1 for n in run.core.unet.attn_processors if n.endswith("attn2.processor"))
    ip_keys = sorted(k for k in sd if k.startswith("ip_adapter."))
    assert ip_keys == sorted(f"ip_adapter.{2 * i + 1}.to_{kv}_ip.weight" for i in range(n_attn2) for kv in "kv")
    plus = re.compile(r"^image_proj\.(latents|proj_(in|out)\.(weight|bias)|norm_out\.(weight|bias)|layers\.\d+\.0\."
                      r"(norm[12]\.(weight|bias)|to_q\.weight|to_kv\.weight|to_out\.weight)|layers\.\d+\.1\."
                      r"(0\.(weight|bias)|1\.weight|3\.weight))$")
    proj = [k for k in sd if k.startswith("image_proj.")]
    assert len(proj) + len(ip_keys) == len(sd) and all(plus.match(k) for k in proj), proj
    ipadapter = load_ipadapter(str(path))
    check_plus_layout(ipadapter)
    assert ipadapter["image_proj"]["latents"].shape == (1, 4, 32)
    for k in ip_keys:
        assert torch.equal(ipadapter["ip_adapter"][k.removeprefix("ip_adapter.")], sd[k])

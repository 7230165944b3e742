"""Validation sampling, TensorBoard logging and the progress bar of the SynCD, JeDi and Flux in-context training
scripts (training/validation.py, training/loop.py) on the tiny models: each sampler runs the training's model code
with its paper's guidance (spied), the grid lands in ``validation/step_NNNNNN.png`` (and TensorBoard), and a run with
validation on trains exactly what a run with it off trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_flux_incontext import flux_raw, tiny_flux  # noqa: F401  (session fixture of the tiny Flux)
from test_jedi_training import jedi_raw
from test_syncd_training import syncd_raw

from comfyui_syncd.training import config, flux_incontext as fx, jedi, loop, syncd, validation

pytestmark = pytest.mark.comfy  # ComfyUI's tokenizer files for the tiny models


def _prepare(module, cls, raw, resume=None):
    return module.prepare(config.from_dict(cls, raw), resume=resume)


def _train(module, cls, raw, progress=False):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return module.train(_prepare(module, cls, raw), progress=progress)
    finally:
        torch.set_num_threads(before)


def _modes(run):
    return [m.training for m in run.core.modules()]


def _grid(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# --- SynCD: the sampler ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def syncd_run(tiny_sdxl, tiny_image_encoder, tiny_dataset, tmp_path_factory):
    """A prepared (untrained) SDXL SynCD run with a little LoRA/IP weight so that the LoRA and references matter."""
    raw = syncd_raw(tiny_sdxl, tiny_image_encoder, tiny_dataset, tmp_path_factory.mktemp("val_syncd"))
    run = _prepare(syncd, syncd.SyncdConfig, raw)
    with torch.no_grad():
        for name, p in run.core.unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return run


def test_syncd_sampler_runs_upstream_inference(syncd_run, monkeypatch):
    """Per step: one reference pass (LoRA off, IP scale 1.0) on the references noised to that step's timestep with
    fresh noise, zeroed text in the image branch's rows and the reference prompt in the full branch's; one target pass
    (IP 0.6) whose uncond row attends to its own tokens only while the image and full rows also see the references'
    foreground; SynCD eq. 4 with the image scale linear from start to end; the same seed gives the same image."""
    run = syncd_run
    core, state = run.core, run.state
    v = validation.SyncdValidationConfig(steps=3, text_scale=5.0, image_scale_start=2.0, image_scale_end=4.0)
    refs = validation.object_references(run.dataset.objects[0], 2, run.resolution)
    assert refs.pixels.shape == (2, 3, 64, 64) and refs.category == "thing"
    ref_calls, tgt_calls, keys, combos = [], [], [], []
    real_ref, real_tgt, real_norm = core.reference_pass, core.target_pass, validation.normalized_guidance

    def spy_ref(noisy, t, context, pooled, time_ids, ip_tokens, **kw):  # the training's pass: LoRA off
        ref_calls.append((noisy.clone(), t.clone(), context.clone(), pooled.clone(), kw))
        return real_ref(noisy, t, context, pooled, time_ids, ip_tokens, **kw)

    def spy_tgt(noisy, t, context, pooled, time_ids, ip_tokens, ref_masks, refs_per_row, **kw):
        tgt_calls.append((t.clone(), context.clone(), ref_masks.clone(), refs_per_row, kw["ip_scale"]))
        return real_tgt(noisy, t, context, pooled, time_ids, ip_tokens, ref_masks, refs_per_row, **kw)

    def spy_norm(uncond, image, full, image_scale, text_scale, canvas=None):
        combos.append((image_scale, text_scale, uncond.clone(), image.clone(), full.clone()))
        return real_norm(uncond, image, full, image_scale, text_scale, canvas)

    monkeypatch.setattr(core, "reference_pass", spy_ref)
    monkeypatch.setattr(core, "target_pass", spy_tgt)
    monkeypatch.setattr(validation, "normalized_guidance", spy_norm)
    state.spy = lambda name, own, key_input: keys.append((name, own.shape[0], key_input.shape[0]))
    try:
        with torch.no_grad():
            image = validation.sample_syncd(core, run.parts, refs, "a thing on a beach", v, run.resolution, "cpu",
                                            torch.Generator().manual_seed(0))
    finally:
        state.spy = None
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert len(ref_calls) == len(tgt_calls) == len(combos) == 3
    scheduler = validation.sd_scheduler(core.scheduler, "euler_ancestral")
    scheduler.set_timesteps(3)
    assert scheduler.timesteps[0] == 999  # zero-SNR: trailing spacing starts at t = 999
    latents = validation._encode(run.parts.vae, refs.pixels, "cpu")
    from comfyui_syncd.training import models

    ctx_ref, pooled_ref = models.encode_text(run.parts, ["photo of a thing"])
    ctx_full, _ = models.encode_text(run.parts, ["a thing on a beach"])
    previous = None
    for step, (noisy, t, context, pooled, kw) in enumerate(ref_calls):
        assert t == scheduler.timesteps[step] and kw == {"ip_scale": 1.0}
        assert noisy.shape[0] == 4 and torch.equal(noisy[:2], noisy[2:])
        # noised to this step's t: x = sqrt(a) x0 + sqrt(1-a) n, with n of unit size
        a = core.scheduler.alphas_cumprod[int(t.round())]
        n = (noisy[:2] - a.sqrt() * latents) / (1 - a).sqrt()
        assert 0.8 < n.std() < 1.2
        if previous is not None:
            assert not torch.allclose(n, previous)  # fresh noise every step
        previous = n
        assert not context[:2].any() and torch.allclose(context[2:], ctx_ref.expand(2, -1, -1))
        assert not pooled[:2].any() and torch.allclose(pooled[2:], pooled_ref.expand(2, -1))
    for t, context, ref_masks, per_row, ip_scale in tgt_calls:
        assert per_row == 2 and ip_scale == 0.6
        assert not context[:2].any() and torch.allclose(context[2], ctx_full[0])
        assert not ref_masks[:2].any() and ref_masks[2:].any() and torch.equal(ref_masks[2:4], ref_masks[4:])
    # the spy of the MSA processor: per layer, 3 rows; the uncond row's keys are its own tokens only
    per_call = len(keys) // 3
    for call in range(3):
        rows = keys[call * per_call:(call + 1) * per_call]
        for i in range(0, len(rows), 3):
            (_, own0, k0), (_, own1, k1), (_, own2, k2) = rows[i:i + 3]
            assert k0 == own0 and k1 > own1 and k1 == k2
    assert [c[0] for c in combos] == pytest.approx([2.0, 3.0, 4.0]) and all(c[1] == 5.0 for c in combos)
    _, _, u, im, full = combos[0]
    assert not torch.allclose(u, im) and not torch.allclose(im, full)
    monkeypatch.undo()
    with torch.no_grad():
        again = validation.sample_syncd(core, run.parts, refs, "a thing on a beach", v, run.resolution, "cpu",
                                        torch.Generator().manual_seed(0))
        other = validation.sample_syncd(core, run.parts, refs, "a thing on a beach", v, run.resolution, "cpu",
                                        torch.Generator().manual_seed(1))
    assert torch.equal(image, again) and not torch.allclose(image, other)


def test_validation_leaves_training_state_alone(syncd_run):
    """run_validation: the PNG grid (references then the sample per row), the global RNG states and every module's
    train/eval mode as before, the processors' pass state back to plain."""
    run = syncd_run
    v = validation.SyncdValidationConfig(steps=2, prompts=["a {category}", "two {category}s"])
    run.core.unet.train()
    modes = _modes(run)
    torch.manual_seed(123)
    np.random.seed(5)
    expected_torch, expected_np = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(5)
    run.cfg.validation = v
    path = validation.run_validation(run, v, syncd.validation_grid)
    assert torch.equal(torch.rand(3), expected_torch) and np.array_equal(np.random.rand(3), expected_np)
    assert _modes(run) == modes and run.core.unet.training
    assert run.state.mode == "plain" and run.state.ip_scale == 1.0 and run.state.ip_tokens is None
    assert path == run.out / "validation" / f"step_{run.step:06d}.png"
    grid = _grid(path)
    assert grid.shape == (2 * 64, 3 * 64, 3)  # two prompts x (2 references + the sample)
    refs = validation.object_references(run.dataset.objects[0], 2, 64)
    assert np.array_equal(grid[:64, :128], np.concatenate(list(validation.to_uint8(refs.pixels)), axis=1))
    assert not np.array_equal(grid[:64, 128:], grid[64:, 128:])  # another prompt (and noise)


# --- JeDi and Flux: the samplers ---------------------------------------------------------------------------------

def test_syncd_sampler_brooks_guidance_option(syncd_run, monkeypatch):
    """guidance: brooks combines the same three branches with Brooks et al.'s un-normalized rule instead of eq. 4."""
    run = syncd_run
    refs = validation.object_references(run.dataset.objects[0], 1, run.resolution)
    seen = []
    real = validation.brooks_guidance
    monkeypatch.setattr(validation, "brooks_guidance", lambda *a, **k: seen.append(a[3:5]) or real(*a, **k))
    images = {}
    for guidance in ("normalized", "brooks"):
        v = validation.SyncdValidationConfig(steps=2, image_scale_start=3.0, image_scale_end=3.0, guidance=guidance)
        with torch.no_grad():
            images[guidance] = validation.sample_syncd(run.core, run.parts, refs, "a thing", v, run.resolution, "cpu",
                                                       torch.Generator().manual_seed(0))
    assert seen == [(3.0, 7.5), (3.0, 7.5)]
    assert not torch.allclose(images["normalized"], images["brooks"])


def test_jedi_sampler_uses_the_set_and_image_guidance(tiny_sd15, tiny_dataset, tmp_path, monkeypatch):
    """Each step one predict call over [references ‖ target | target alone]: sets [R+1, 1], reference channels and
    mask 1 on the references only, the references noised to t; the references' own captions, the prompt, and the
    empty caption for ε⁰; JeDi eq. 3 with λ."""
    run = _prepare(jedi, jedi.JediConfig, jedi_raw(tiny_sd15, tiny_dataset, tmp_path / "run"))
    core = run.core
    v = validation.JediValidationConfig(steps=2, image_scale=2.5)
    refs = validation.object_references(run.dataset.objects[0], 2, 64)
    calls, combos = [], []
    real, real_g = core.predict, validation.jedi_image_guidance

    def spy(noisy, ref_latents, ref_mask, t, context, set_sizes):
        calls.append((noisy.clone(), ref_latents.clone(), ref_mask.clone(), t.clone(), context.clone(), set_sizes))
        return real(noisy, ref_latents, ref_mask, t, context, set_sizes)

    monkeypatch.setattr(core, "predict", spy)
    monkeypatch.setattr(validation, "jedi_image_guidance",
                        lambda null, full, scale: combos.append((null, full, scale)) or real_g(null, full, scale))
    with torch.no_grad():
        image = validation.sample_jedi(core, run.parts, refs, "a thing in snow", v, 64, "cpu",
                                       torch.Generator().manual_seed(0))
    assert image.shape == (1, 3, 64, 64) and len(calls) == 2 and len(combos) == 2
    from comfyui_syncd.training import models

    latents = validation._encode(run.parts.vae, refs.pixels, "cpu")
    texts = models.encode_text(run.parts, refs.prompts + ["a thing in snow", ""])[0]
    for noisy, ref_latents, ref_mask, t, context, set_sizes in calls:
        assert set_sizes == [3, 1] and ref_mask.tolist() == [1.0, 1.0, 0.0, 0.0]
        assert torch.equal(ref_latents[:2], latents) and not ref_latents[2:].any()
        assert torch.equal(noisy[2], noisy[3]) and torch.allclose(context, texts)
        a = core.scheduler.alphas_cumprod[int(t)]
        assert 0.7 < ((noisy[:2] - a.sqrt() * latents) / (1 - a).sqrt()).std() < 1.3
    assert all(c[2] == 2.5 and c[0].shape == c[1].shape == (1, 4, 8, 8) for c in combos)
    assert not torch.allclose(combos[0][0], combos[0][1])  # references and text change the prediction
    with torch.no_grad():  # one reference: the set [reference ‖ target | target alone]
        one = validation.sample_jedi(core, run.parts, validation.object_references(run.dataset.objects[0], 1, 64),
                                     "a thing in snow", v, 64, "cpu", torch.Generator().manual_seed(0))
    assert one.shape == (1, 3, 64, 64) and calls[-1][5] == [2, 1] and calls[-1][2].tolist() == [1.0, 0.0, 0.0]


def test_flux_sampler_keeps_the_references_clean(tiny_flux, tiny_dataset, tmp_path, monkeypatch):  # noqa: F811
    """Every step the canvas is [target ‖ references] with the references' tokens exactly their clean latents, the
    timestep the scheduler's σ (μ from the whole canvas), the sampling guidance embedding; the sample is decoded
    from the target only."""
    run = _prepare(fx, fx.FluxConfig, flux_raw(tiny_flux, tiny_dataset, tmp_path / "run"))
    v = validation.FluxValidationConfig(steps=3, guidance=3.5)
    refs = validation.object_references(run.dataset.objects[0], 2, 32)
    tr = run.core.transformer
    seen = []
    real = tr.forward

    def spy(**kw):
        seen.append({k: (x.clone() if torch.is_tensor(x) else x) for k, x in kw.items()})
        return real(**kw)
    tr.forward = spy
    try:
        with torch.no_grad():
            image = validation.sample_flux(run.core, run.parts, refs, "a thing", v, 32, "cpu",
                                           torch.Generator().manual_seed(0), 8)
    finally:
        del tr.forward
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all() and len(seen) == 3
    latents = validation._encode(run.parts.vae, refs.pixels, "cpu")
    keep = fx.target_tokens(16, 16, 3)
    clean = fx.pack(fx.canvas(torch.cat([torch.zeros_like(latents[:1]), latents]), 3))
    mu = fx.shift_mu(8 * 24)
    sigmas = fx.shifted_sigmas(torch.tensor([1.0, 2 / 3, 1 / 3]), mu)
    for kw, sigma in zip(seen, sigmas):
        assert torch.equal(kw["hidden_states"][:, ~keep], clean[:, ~keep])
        assert kw["timestep"].item() == pytest.approx(sigma.item(), rel=1e-5)
        assert kw["guidance"].tolist() == [3.5]
    assert not torch.equal(seen[0]["hidden_states"][:, keep], seen[1]["hidden_states"][:, keep])


# --- whole runs: validation on trains the same; TensorBoard; progress bar ---------------------------------------

def _event_data(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {log_dir}"
    scalars, images = {}, {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
        for tag in tags["images"]:
            images.setdefault(tag, {}).update({e.step: (e.width, e.height) for e in acc.Images(tag)})
    return scalars, images


@pytest.mark.parametrize("script", ["syncd", "jedi", "flux"])
def test_validation_on_trains_the_same_and_logs_to_tensorboard(script, request, tiny_sd15, tiny_image_encoder,
                                                               tiny_dataset, tmp_path, monkeypatch):
    """Three runs of 4 steps: validation off, validation every 2 steps with TensorBoard, and validation on with
    TensorBoard missing (``has_tensorboard`` patched). Equal losses and trained weights, bit for bit; grids at steps
    2 and 4; the TensorBoard event files hold the loss of every step and the grid of steps 2 and 4."""
    if script == "syncd":
        module, cls = syncd, syncd.SyncdConfig

        def raw(out):
            return syncd_raw(tiny_sd15, tiny_image_encoder, tiny_dataset, out, max_steps=4)
        size, cols = 64, 3
    elif script == "jedi":
        module, cls = jedi, jedi.JediConfig

        def raw(out):
            return jedi_raw(tiny_sd15, tiny_dataset, out, max_steps=4, checkpoint_every=2)
        size, cols = 64, 3
    else:
        module, cls = fx, fx.FluxConfig
        flux = request.getfixturevalue("tiny_flux")

        def raw(out):
            return flux_raw(flux, tiny_dataset, out, max_steps=4)
        size, cols = 32, 3
    runs = {}
    for name, every, tensorboard in (("off", 0, False), ("on", 2, True), ("no_tb", 2, None)):
        r = raw(tmp_path / name)
        r["train"]["tensorboard"] = bool(tensorboard) or tensorboard is None
        r["validation"] = {"every": every, "steps": 2}
        with monkeypatch.context() as mp:
            if tensorboard is None:
                mp.setattr(loop, "has_tensorboard", lambda: False)
            runs[name] = _train(module, cls, r)
    off, on, no_tb = runs["off"], runs["on"], runs["no_tb"]
    assert sorted(loop.read_losses(off.out)) == [1, 2, 3, 4]
    assert loop.read_losses(on.out) == loop.read_losses(off.out) == loop.read_losses(no_tb.out)
    for name, p in off.trainable.items():
        assert torch.equal(p, on.trainable[name]) and torch.equal(p, no_tb.trainable[name]), name
    assert not (off.out / "validation").exists() and not (off.out / "logs").exists()
    for run in (on, no_tb):
        pngs = sorted(p.name for p in (run.out / "validation").iterdir())
        assert pngs == ["step_000002.png", "step_000004.png"]
        grids = [_grid(run.out / "validation" / p) for p in pngs]
        assert grids[0].shape == (size, cols * size, 3)
        assert not np.array_equal(grids[0][:, -size:], grids[1][:, -size:])  # the weights changed between them
    for p in ("step_000002.png", "step_000004.png"):
        assert np.array_equal(_grid(on.out / "validation" / p), _grid(no_tb.out / "validation" / p))
    assert not (no_tb.out / "logs").exists()
    scalars, images = _event_data(on.out / "logs")
    losses = loop.read_losses(on.out)
    assert sorted(scalars["loss"]) == [1, 2, 3, 4]
    assert all(scalars["loss"][s] == pytest.approx(losses[s], rel=1e-6) for s in losses)
    assert images["validation"] == {2: (cols * size, size), 4: (cols * size, size)}


def test_progress_bar_shows_loss_and_step_rate(tiny_sd15, tiny_dataset, tmp_path, capsys):
    """The scripts' shared progress bar: the loss as a postfix and the rate in steps."""
    _train(jedi, jedi.JediConfig, jedi_raw(tiny_sd15, tiny_dataset, tmp_path / "run", max_steps=2), progress=True)
    err = capsys.readouterr().err
    assert "JeDi" in err and "loss=" in err and ("step/s" in err or "s/step" in err), err[-500:]


def test_validation_config_errors():
    with pytest.raises(config.ConfigError, match="validation.every"):
        validation.check(validation.ValidationConfig(every=-1))
    with pytest.raises(config.ConfigError, match="mask_dilation"):
        validation.check(validation.SyncdValidationConfig(mask_dilation=2))
    with pytest.raises(config.ConfigError, match="unknown key"):
        config.from_dict(validation.SyncdValidationConfig, {"evry": 3})
    assert validation.due(validation.ValidationConfig(every=3), 6, False)
    assert validation.due(validation.ValidationConfig(every=3), 7, True)
    assert not validation.due(validation.ValidationConfig(every=3), 7, False)
    assert not validation.due(validation.ValidationConfig(every=0), 7, True)


def test_impossible_reference_count_fails_before_training(tiny_sd15, tiny_dataset, tmp_path):
    raw = jedi_raw(tiny_sd15, tiny_dataset, tmp_path / "run")
    raw["validation"] = {"every": 1, "num_references": 7}  # the first object has 3 images (6 with flips)
    with pytest.raises(config.ConfigError, match="validation.num_references"):
        _prepare(jedi, jedi.JediConfig, raw)

"""JeDi training on tiny models (training/jedi.py): the zero-initialised conv_in widening leaves the UNet unchanged,
each image's attn1 keys are the tokens of exactly its own set, a few steps lower the loss, and the exported UNet
reloads with equal weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_syncd.training import config, jedi

pytestmark = pytest.mark.comfy  # needs the ComfyUI checkout (tokenizer files of the tiny models)


def jedi_raw(model, dataset, output_dir, **train) -> dict:
    return {"model": {"path": str(model)},
            "data": {"dirs": [str(dataset)], "resolution": 64, "num_workers": 0, "drop_text": 0.0},
            "train": {"output_dir": str(output_dir), "max_steps": 2, "checkpoint_every": 100,
                      "learning_rate": 1.0e-3, "export_dtype": "float32", **train}}


def make_run(raw, resume=None):
    return jedi.prepare(config.from_dict(jedi.JediConfig, raw), resume=resume)


@pytest.fixture(scope="module")
def jedi_run(tiny_sd15, tiny_dataset, tmp_path_factory):
    return make_run(jedi_raw(tiny_sd15, tiny_dataset, tmp_path_factory.mktemp("jedi")))


def _fixed_batch(run, positions=(0, 1, 2)):
    n = len(run.dataset)
    return jedi.collate([run.dataset[(p % n, p)] for p in positions])


def test_dataset_sets(jedi_run):
    """Sets of 2-4 images (a 2-image object completed with flips up to 4), references drawn, >= 1 non-reference."""
    ds = jedi_run.dataset
    sizes = set()
    for pos in range(24):
        ex = ds[(1, pos)]
        k = ex["pixel_values"].shape[0]
        sizes.add(k)
        assert ex["pixel_values"].shape[1:] == (3, 64, 64) and len(ex["prompts"]) == k
        assert not ex["is_reference"].all()
        again = ds[(1, pos)]
        assert torch.equal(ex["pixel_values"], again["pixel_values"])
        assert torch.equal(ex["is_reference"], again["is_reference"])
    assert sizes == {2, 3, 4}
    refs = [jedi.draw_references(3, 0.5, np.random.default_rng(s)) for s in range(200)]
    assert all(not all(r) for r in refs) and 0.3 < np.mean([x for r in refs for x in r]) < 0.5


def test_example_config_lists_the_defaults():
    """training/configs/jedi_sd15.yaml loads, passes the checks and states every default."""
    import pathlib

    path = pathlib.Path(jedi.__file__).parent / "configs" / "jedi_sd15.yaml"
    cfg = config.load(path, jedi.JediConfig)
    jedi.check(cfg)
    defaults = jedi.JediConfig(model=jedi.ModelConfig(path=cfg.model.path), data=jedi.DataConfig(dirs=cfg.data.dirs),
                               train=jedi.TrainConfig(output_dir=cfg.train.output_dir))
    assert config.to_dict(cfg) == config.to_dict(defaults)


def test_loss_covers_the_non_references_only(jedi_run, monkeypatch):
    """Predicting the noise exactly on the non-reference rows gives loss 0 whatever the reference rows predict."""
    run = jedi_run
    core = run.core
    inputs = jedi.model_inputs(run, _fixed_batch(run, (0, 1)), torch.Generator().manual_seed(3))
    is_ref = inputs["is_reference"]
    assert is_ref.any() and not is_ref.all()
    noise = inputs["noise"]
    garbage = torch.where(is_ref.view(-1, 1, 1, 1), noise + 5.0, noise)
    monkeypatch.setattr(core, "predict", lambda *a, **k: garbage)
    with torch.no_grad():
        assert run.model(**inputs).item() == 0.0
        monkeypatch.setattr(core, "loss_on_references", True)
        assert run.model(**inputs).item() > 1.0


def test_zero_init_widening_keeps_the_output(tiny_sd15):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").eval()
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=ctx).sample
        old_w = unet.conv_in.weight.clone()
        jedi.widen_conv_in(unet)
        assert unet.conv_in.in_channels == 9 and unet.config.in_channels == 9
        assert torch.equal(unet.conv_in.weight[:, :4], old_w) and not unet.conv_in.weight[:, 4:].any()
        widened = unet(torch.cat([x, torch.zeros(2, 5, 8, 8)], 1), t, encoder_hidden_states=ctx).sample
        # the reference channels are multiplied by zero weights at init: any content gives the same output
        filled = unet(torch.cat([x, torch.randn(2, 5, 8, 8)], 1), t, encoder_hidden_states=ctx).sample
    assert torch.equal(before, widened) and torch.equal(before, filled)


def test_coupled_attention_keys_cover_own_set_only(jedi_run):
    """Spy: per attn1 layer and set, the key tokens are the attn1 input of exactly that set's rows; and the coupling
    is real: changing another image of the set changes an image's output, changing another set does not."""
    run = jedi_run
    core, state = run.core, run.state
    unet = core.unet
    batch = _fixed_batch(run, (0, 1))
    sizes = batch["set_sizes"]
    assert len(sizes) == 2 and all(2 <= s <= 4 for s in sizes)
    inputs = jedi.model_inputs(run, batch, torch.Generator().manual_seed(0))
    attn1 = {n.removesuffix(".processor"): m for n, m in unet.attn_processors.items() if n.endswith("attn1.processor")}
    modules = dict(unet.named_modules())
    layer_inputs, seen = {}, []
    hooks = [modules[name].register_forward_pre_hook(
        lambda mod, args, kwargs, name=name: layer_inputs.__setitem__(name, (args[0] if args else
                                                                              kwargs["hidden_states"]).clone()),
        with_kwargs=True) for name in attn1]
    state.spy = lambda name, rows, keys: seen.append((name, rows, keys.clone()))
    rows_total = sum(sizes)
    t = torch.repeat_interleave(inputs["timesteps"], torch.tensor(sizes))
    noisy = core.scheduler.add_noise(inputs["latents"], inputs["noise"], t)
    args = (inputs["latents"], inputs["is_reference"].float(), t, inputs["context"], sizes)
    try:
        with torch.no_grad():
            base = core.predict(noisy, *args)
    finally:
        state.spy = None
        for h in hooks:
            h.remove()
    assert len(attn1) == 7 and len(seen) == 2 * len(attn1)
    expected_rows = [list(range(0, sizes[0])), list(range(sizes[0], rows_total))]
    for name in attn1:
        calls = [(rows, keys) for n, rows, keys in seen if n == name]
        assert [rows for rows, _ in calls] == expected_rows, name
        for rows, keys in calls:
            assert torch.equal(keys, layer_inputs[name][rows]), name

    with torch.no_grad():
        changed = noisy.clone()
        changed[1] += torch.randn_like(changed[1])  # the second image of the first set
        out = core.predict(changed, *args)
    assert not torch.allclose(out[0], base[0], atol=1e-6)  # same set: coupled
    assert torch.allclose(out[sizes[0]:], base[sizes[0]:], atol=1e-6)  # the other set: untouched


def test_a_few_steps_lower_the_loss(tiny_sd15, tiny_dataset, tmp_path):
    run = make_run(jedi_raw(tiny_sd15, tiny_dataset, tmp_path / "run", max_steps=10, learning_rate=2.0e-3))
    batch = _fixed_batch(run)
    assert any(batch["is_reference"]) and not all(batch["is_reference"])

    def mean_loss():
        total = 0.0
        with torch.no_grad():
            for s in range(3):
                total += run.model(**jedi.model_inputs(run, batch, torch.Generator().manual_seed(100 + s))).item()
        return total / 3

    before = mean_loss()
    batches = iter(lambda: batch, None)
    losses = [jedi.train_step(run, batches) for _ in range(10)]
    after = mean_loss()
    assert all(np.isfinite(losses))
    assert after < 0.9 * before, (before, after)


def test_script_trains_and_export_reloads(tiny_sd15, tiny_dataset, tmp_path):
    import yaml

    out = tmp_path / "run"
    cfg = tmp_path / "jedi.yaml"
    cfg.write_text(yaml.safe_dump(jedi_raw(tiny_sd15, tiny_dataset, out)))
    assert jedi.main(["--config", str(cfg), "--no-progress"]) == 0
    path = out / "jedi" / "jedi.safetensors"
    assert path.is_file()
    from comfyui_syncd.training import loop

    assert sorted(loop.read_losses(out)) == [1, 2]
    unet = jedi.load_exported_unet(path)
    assert unet.config.in_channels == 9 and unet.conv_in.weight.shape[1] == 9
    import safetensors.torch

    saved = safetensors.torch.load_file(str(path))
    assert saved.keys() == unet.state_dict().keys() and "conv_in.weight" in saved
    for k, v in unet.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # equal to the run's trained UNet: a resumed run (from the final checkpoint) exports the same weights
    run = make_run(jedi_raw(tiny_sd15, tiny_dataset, out), resume="auto")
    assert run.step == 2
    trained = run.core.unet.state_dict()
    assert trained.keys() == saved.keys()
    assert all(torch.equal(trained[k], saved[k]) for k in saved)

"""training/text_to_image.py: captions drawn per sample, what is trained, the exported pipeline, bit-identical
resume (tiny SD1.5 pipeline, 64 px toy renders)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy  # ComfyUI's tokenizer files for the tiny model


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory):
    from comfyui_syncd.toyworld import base_model

    return base_model.corpus(tmp_path_factory.mktemp("toy_corpus"), count=6, seed=3)


def make_config(model, images, out, **train):
    from comfyui_syncd.training import config, text_to_image as T

    raw = {"model": {"path": str(model)}, "data": {"dir": str(images), "resolution": 64},
           "train": {"output_dir": str(out), "max_steps": 3, "batch_size": 2, "checkpoint_every": 2,
                     "tensorboard": False, "learning_rate": 1e-3, **train}}
    return config.from_dict(T.TextToImageConfig, raw)


def run(cfg, resume="auto"):
    from comfyui_syncd.training import text_to_image as T

    return T.train(T.prepare(cfg, resume=resume), progress=False)


def test_pick_caption_draws_lines_and_drops():
    from comfyui_syncd.training.text_to_image import pick_caption

    text = "first\nsecond\n\nthird\n"
    drawn = {pick_caption(text, "random_line", 0.0, torch.Generator().manual_seed(s)) for s in range(40)}
    assert drawn == {"first", "second", "third"}
    assert {pick_caption(text, "first_line", 0.0, torch.Generator().manual_seed(s)) for s in range(10)} == {"first"}
    assert pick_caption(text, "random_line", 1.0, torch.Generator()) == ""
    a = [pick_caption(text, "random_line", 0.3, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(a)) == 1  # a function of the generator's state only


def test_trains_unet_and_text_encoder_and_exports_pipeline(tiny_sd15, toy_images, tmp_path):
    from comfyui_syncd.training import loop, models

    base = models.load(tiny_sd15)
    r = run(make_config(tiny_sd15, toy_images, tmp_path / "both", text_encoder_learning_rate=1e-3))
    assert sorted(loop.read_losses(tmp_path / "both")) == [1, 2, 3]
    exported = models.load(tmp_path / "both" / "pipeline")
    for trained, before, live in ((exported.unet, base.unet, r.core.unet),
                                  (exported.text_encoders[0], base.text_encoders[0], r.core.text_encoder)):
        after, start, now = trained.state_dict(), before.state_dict(), live.state_dict()
        assert any(not torch.equal(after[k], start[k]) for k in after)      # trained
        assert all(torch.equal(after[k], now[k].cpu()) for k in after)       # the export is the trained model
    frozen = run(make_config(tiny_sd15, toy_images, tmp_path / "unet_only"))
    te, start = frozen.core.text_encoder.state_dict(), base.text_encoders[0].state_dict()
    assert all(torch.equal(te[k], start[k]) for k in te)


def test_resume_is_bit_identical(tiny_sd15, toy_images, tmp_path):
    straight = run(make_config(tiny_sd15, toy_images, tmp_path / "a", max_steps=4, text_encoder_learning_rate=1e-3))
    run(make_config(tiny_sd15, toy_images, tmp_path / "b", max_steps=2, text_encoder_learning_rate=1e-3))
    resumed = run(make_config(tiny_sd15, toy_images, tmp_path / "b", max_steps=4, text_encoder_learning_rate=1e-3))
    a, b = straight.core.state_dict(), resumed.core.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_widened_unet_starts_as_the_model_it_was(tiny_sd15):
    from comfyui_syncd.training import models
    from comfyui_syncd.training.text_to_image import widen_input

    unet = models.load(tiny_sd15).unet.eval()
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=context).sample
        widen_input(unet, 8)
        after = unet(torch.cat([x, torch.randn_like(x)], 1), t, encoder_hidden_states=context).sample
    assert unet.config.in_channels == 8 and unet.conv_in.in_channels == 8
    assert torch.equal(before, after)  # the new channels' weights are zero
    widen_input(unet, 8)  # already wide: left as it is
    with pytest.raises(ValueError, match="input channels"):
        widen_input(unet, 4)


def test_concat_conditioning_trains_the_new_channels_and_exports_them(tiny_sd15, tmp_path):
    from comfyui_syncd.toyworld import base_model
    from comfyui_syncd.training import models

    images = base_model.corpus(tmp_path / "corpus", count=6, seed=3, depth=True)
    cfg = make_config(tiny_sd15, images, tmp_path / "depth")
    cfg.data.conditioning_dir = str(images / "depth")
    r = run(cfg)
    exported = models.load(tmp_path / "depth" / "pipeline").unet
    assert exported.config.in_channels == 8
    new = exported.conv_in.weight[:, 4:]
    assert new.abs().sum() > 0  # gradients reached the conditioning channels
    assert torch.equal(exported.conv_in.weight, r.core.unet.conv_in.weight.detach().cpu())
    # the conditioning image is read beside its image: a missing one is named
    (images / "depth" / "000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="000002.png has no conditioning image"):
        run(_with_output(cfg, tmp_path / "missing"))


def _with_output(cfg, out):
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(out)))

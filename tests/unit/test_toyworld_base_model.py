"""toyworld/base_model.py: phrasings, the VAE's folded latent scale, the single model file."""

from __future__ import annotations

import pytest
import torch

from comfyui_syncd.toyworld import base_model as B, scene as S

pytestmark = pytest.mark.unit


def test_phrasings_name_what_they_keep():
    scene = S.Scene(shape="cube", colour="red", texture="striped", background="grass", placement="left",
                    background_seed=0, azimuth=0.0, elevation=30.0, scale=11.0, cx=0.28, cy=0.55)
    lines = B.phrasings(scene)
    assert lines[0] == lines[1] == S.caption(scene) == "a red striped cube on grass, on the left"
    assert len(lines) == len(set(lines[1:])) + 1 == 9
    assert "a cube on grass" in lines and "a red cube on grass, on the left" in lines
    assert "a striped cube on grass" in lines
    for line in lines:
        assert "cube" in line and "on grass" in line
    plain = S.Scene(**{**scene.__dict__, "texture": "plain"})
    assert "a plain cube on grass" in B.phrasings(plain)
    empty = S.sample_scenes(1, 0, p_empty=1.0)[0]
    assert B.phrasings(empty) == [S.caption(empty)] * 2


def test_corpus_writes_images_and_phrasings(tmp_path):
    folder = B.corpus(tmp_path / "c", count=3, seed=5)
    scenes = S.sample_scenes(3, 5, p_empty=0.05)
    for i, scn in enumerate(scenes):
        assert (folder / f"{i:06d}.txt").read_text().splitlines() == B.phrasings(scn)
    images = B.read_corpus_images(folder)
    rendered = S.render(scenes).image.permute(0, 3, 1, 2) * 2 - 1
    assert (images - rendered).abs().max() <= 1 / 127.5 + 1e-6  # PNG rounding only
    stamp = (folder / "corpus.json").stat().st_mtime_ns
    B.corpus(folder, count=3, seed=5)
    assert (folder / "corpus.json").stat().st_mtime_ns == stamp  # a finished corpus is kept


def test_a_128_px_corpus_rendered_by_two_workers_is_the_serial_one(tmp_path):
    serial = B.corpus(tmp_path / "serial", count=5, seed=5, chunk=2, size=128)
    parallel = B.corpus(tmp_path / "parallel", count=5, seed=5, chunk=2, size=128, workers=2)
    images = B.read_corpus_images(parallel)
    assert images.shape == (5, 3, 128, 128)
    assert torch.equal(images, B.read_corpus_images(serial))
    assert [(parallel / f"{i:06d}.txt").read_text() for i in range(5)] == \
        [(serial / f"{i:06d}.txt").read_text() for i in range(5)]
    rendered = S.render(S.sample_scenes(5, 5, p_empty=0.05), 128).image.permute(0, 3, 1, 2) * 2 - 1
    assert (images - rendered).abs().max() <= 1 / 127.5 + 1e-6
    assert B.corpus_masks(5, seed=5, limit=3, size=128).shape == (3, 1, 128, 128)
    B.corpus(tmp_path / "serial", count=5, seed=5, size=64)  # another size is another corpus: rendered again
    assert B.read_corpus_images(serial).shape[-1] == 64


@torch.no_grad()
def test_folding_the_latent_scale_keeps_the_round_trip():
    vae = B.build_vae(0).eval()
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = vae.decode(vae.encode(images).latent_dist.mean).sample
    s = B.fold_latent_scale(vae, images)
    assert s > 0 and abs(s - 1) > 1e-3
    means = vae.encode(images).latent_dist.mean
    assert abs(float(means.std()) * B.LATENT_SCALE - 1) < 1e-3
    torch.testing.assert_close(vae.decode(means).sample, before, rtol=1e-4, atol=1e-4)


def test_model_file_round_trip(tmp_path):
    vae, unet, text = B.build_vae(1), B.build_unet(2), B.build_text_encoder(3)
    path = B.export_file(tmp_path / "toy.safetensors", vae, unet, text, {"note": "x"}, dtype=torch.float32)
    states, configs, info = B.read_file(path)
    assert info == {"note": "x"} and configs["unet"]["cross_attention_dim"] == B.CONTEXT_DIM
    loaded = B.load_parts(path)
    for original, again in zip((vae, unet, text), loaded):
        a, b = original.state_dict(), again.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert path.stat().st_size < 50 * 2 ** 20


def test_read_file_refuses_other_files(tmp_path):
    import safetensors.torch

    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"unet.x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not a toy-world model file"):
        B.read_file(path)


def test_vae_loss_weights_the_object_pixels():
    vae = B.build_vae(0)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    plain = B.vae_loss(vae, pixels, torch.Generator().manual_seed(1))
    no_object = B.vae_loss(vae, pixels, torch.Generator().manual_seed(1), masks=torch.zeros(2, 1, 64, 64))
    torch.testing.assert_close(plain, no_object)  # weights are normalized: all-background = unweighted
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 20:40, 20:40] = 1
    with torch.no_grad():
        recon = vae.decode(vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(1))).sample
    error = (recon - pixels).abs()
    weight = 1 + B.OBJECT_WEIGHT * masks
    expected = (error * weight / weight.mean()).mean()
    weighted = B.vae_loss(vae, pixels, torch.Generator().manual_seed(1), masks=masks, kl_weight=0.0)
    torch.testing.assert_close(weighted, expected)


def test_corpus_masks_are_the_corpus_objects():
    masks = B.corpus_masks(5, seed=3, limit=4)
    scenes = S.sample_scenes(5, 3, p_empty=B.CORPUS_P_EMPTY)[:4]
    assert masks.shape == (4, 1, 64, 64)
    assert torch.equal(masks[:, 0].bool(), S.render(scenes).mask)

"""The toy-world model file in ComfyUI (demo/toy_model.py): MODEL, CLIP and VAE built through ComfyUI's classes
compute what the diffusers/transformers parts of the file compute."""

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    from comfyui_syncd.toyworld import base_model as B

    vae, unet, text = B.build_vae(1), B.build_unet(2), B.build_text_encoder(3)
    with torch.no_grad():  # weights with signal: a freshly initialised UNet has a zero output layer
        for p in unet.conv_out.parameters():
            p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("toy") / "toy.safetensors"
    B.export_file(path, vae, unet, text, {"test": True}, dtype=torch.float32)
    return path


@pytest.fixture(scope="module")
def parts(toy_file):
    from comfyui_syncd.toyworld import base_model as B

    return B.load_parts(toy_file)


@pytest.fixture(scope="module")
def comfy_parts(toy_file):
    from comfyui_syncd.demo import toy_model

    return toy_model.load(toy_file)


def test_clip_encodes_as_transformers(parts, comfy_parts):
    from comfyui_syncd.demo.tiny_models import tokenizer

    _, _, text = parts
    _, clip, _ = comfy_parts
    prompt = "a red striped cube on grass, on the left"
    cond = clip.encode_from_tokens(clip.tokenize(prompt))
    ids = torch.tensor([[t[0] for t in tokenizer().tokenize_with_weights(prompt)[0]]])
    with torch.no_grad():
        expected = text(input_ids=ids)[0]
    assert cond.shape == expected.shape == (1, 77, 64)
    torch.testing.assert_close(cond, expected, rtol=1e-4, atol=1e-5)
    assert (cond - clip.encode_from_tokens(clip.tokenize("a blue cone"))).abs().max() > 1e-2


def test_unet_predicts_as_diffusers(parts, comfy_parts):
    _, unet, _ = parts
    model, _, _ = comfy_parts
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 64, generator=gen)
    t = torch.tensor([900, 40])
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=ctx).sample
        got = model.model.diffusion_model(x, t.float(), context=ctx)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert expected.abs().mean() > 1e-2


def test_vae_round_trip_as_diffusers(parts, comfy_parts):
    vae, _, _ = parts
    _, _, comfy_vae = comfy_parts
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    latent = comfy_vae.encode(image)
    assert latent.shape == (1, 4, 8, 8)
    with torch.no_grad():
        expected = vae.encode(image.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
        decoded = (vae.decode(expected).sample.clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(latent, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(comfy_vae.decode(latent)[0].movedim(-1, 0), decoded[0], rtol=1e-3, atol=1e-3)


def test_node_loads_a_model_from_the_models_folder(toy_file, tmp_path, monkeypatch, comfy_imports):
    import shutil

    import folder_paths
    from comfyui_syncd.demo import toy_model

    folder = tmp_path / "syncd_toyworld"
    folder.mkdir()
    shutil.copy(toy_file, folder / "mine.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, toy_model.FOLDER, ([str(folder)], {".safetensors"}))
    folder_paths.filename_list_cache.pop(toy_model.FOLDER, None)
    assert "mine.safetensors" in toy_model.model_choices()
    assert toy_model.SynCDToyWorldModel.validate_inputs(model_file="mine.safetensors") is True
    assert isinstance(toy_model.SynCDToyWorldModel.validate_inputs(model_file="other.safetensors"), str)
    model, clip, vae = toy_model.SynCDToyWorldModel.execute("mine.safetensors").result
    import comfy.sample

    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a blue cone on a sandy beach"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latent = comfy.sample.sample(model, noise, 2, 5.0, "euler", "simple", pos, neg, torch.zeros_like(noise), seed=0,
                                 disable_pbar=True)
    image = vae.decode(latent)
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def test_toy_world_references_node_renders_one_object_in_several_views():
    """SynCD Toy-World References: view k of the set is what the whole set holds at k, the mask is the object's
    pixels, the reader reads the object asked for, and an index outside the set is an error naming the fix."""
    from comfyui_syncd.demo.toy_model import SynCDToyWorldReferences
    from comfyui_syncd.toyworld import reader as R

    images, masks = SynCDToyWorldReferences.execute("cone", "blue", "dotted", 3, -1, 64, 5).result
    assert images.shape == (3, 64, 64, 3) and masks.shape == (3, 64, 64) and masks.dtype == torch.float32
    one, one_mask = SynCDToyWorldReferences.execute("cone", "blue", "dotted", 3, 1, 64, 5).result
    assert torch.equal(one[0], images[1]) and torch.equal(one_mask[0], masks[1])
    assert not torch.equal(images[0], images[1])                      # different poses and backgrounds
    assert 0.01 < float(masks.mean()) < 0.5 and set(masks.unique().tolist()) == {0.0, 1.0}
    reading = R.read(images)
    assert all(reading.identity(i) == ("cone", "blue", "dotted") for i in range(3))
    big, _ = SynCDToyWorldReferences.execute("cube", "red", "plain", 1, 0, 128, 0).result
    assert big.shape == (1, 128, 128, 3)
    with pytest.raises(ValueError, match="view index 3 does not exist"):
        SynCDToyWorldReferences.execute("cone", "blue", "dotted", 3, 3, 64, 5)
    assert SynCDToyWorldReferences.validate_inputs(shape="pyramid", colour="blue", texture="plain") is not True


def test_a_depth_conditioned_file_loads_as_comfys_instruct_pix2pix_sd15():
    """The concat layout the text-to-image script trains (noisy latent, then the depth image's unscaled latent) is
    the one ComfyUI's SD15_instructpix2pix builds from InstructPixToPixConditioning's concat_latent_image."""
    import comfy.model_base

    from comfyui_syncd.demo import toy_model
    from comfyui_syncd.toyworld import base_model as B
    from comfyui_syncd.training.text_to_image import widen_input

    vae, unet, text = B.build_vae(1), B.build_unet(2), B.build_text_encoder(3)
    widen_input(unet, 8)
    with torch.no_grad():
        for p in (*unet.conv_out.parameters(), unet.conv_in.weight):
            p.normal_(0, 0.3)
    path = B.export_file(__import__("tempfile").mkdtemp() + "/depth.safetensors", vae, unet, text, dtype=torch.float32)
    model, _, _ = toy_model.load(path)
    assert isinstance(model.model, comfy.model_base.SD15_instructpix2pix)
    gen = torch.Generator().manual_seed(0)
    x, depth, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen), \
        torch.randn(2, 77, 64, generator=gen)
    conds = model.model.extra_conds(concat_latent_image=depth, noise=x, device=torch.device("cpu"))
    concat = conds["c_concat"].cond
    assert torch.equal(concat, depth.expand(2, -1, -1, -1))  # unscaled, repeated over the batch
    t = torch.tensor([900, 40])
    with torch.no_grad():
        expected = unet(torch.cat([x, concat], 1), t, encoder_hidden_states=ctx).sample
        got = model.model.diffusion_model(torch.cat([x, concat], 1), t.float(), context=ctx)
        other = unet(torch.cat([x, -concat], 1), t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (other - expected).abs().mean() > 1e-2  # the depth channels carry signal


def test_toy_world_mesh_views_node_gives_depth_silhouettes_and_correspondences():
    from comfyui_syncd.demo.toy_model import SynCDToyWorldMeshViews

    depth, masks, corr, info = SynCDToyWorldMeshViews.execute(shape="torus", views=3, size=64, seed=4).result
    assert depth.shape == (3, 64, 64, 3) and masks.shape == (3, 64, 64)
    assert torch.equal(depth[..., 0] > 0, masks > 0)             # depth exactly on the silhouette
    assert float(depth.max()) == 1.0 and corr.views == 3 and corr.size == (64, 64)
    assert set(corr.pairs) == {(0, 1), (0, 2), (1, 2)} and all(len(r) > 0 for r in corr.pairs.values())
    # a match joins pixels of the two silhouettes
    rows = corr.pairs[(0, 1)]
    ya, xa = ((rows[:, 0] + 1) * 64 - 1) / 2, ((rows[:, 1] + 1) * 64 - 1) / 2
    assert bool(masks[0, ya.round().long(), xa.round().long()].all())
    assert "torus" in info
    assert SynCDToyWorldMeshViews.validate_inputs(shape="pyramid") is not True


def test_the_swap_names_the_shipped_files_as_the_node_lists_them():
    from comfyui_syncd.client import toy_swap
    from comfyui_syncd.demo import toy_model

    assert toy_swap.SHIPPED_CHOICE == toy_model.SHIPPED_CHOICE
    assert toy_swap.SHIPPED_DEPTH_CHOICE == toy_model.SHIPPED_DEPTH_CHOICE
    assert toy_model.SHIPPED_FILES[toy_model.SHIPPED_DEPTH_CHOICE].parent == toy_model.SHIPPED.parent


def test_customization_nodes_refuse_a_base_model_file(toy_file):
    """A toy base model given to the toy customization nodes: the error names the file and what to give."""
    from comfyui_syncd.demo import toy_customization

    with pytest.raises(ValueError, match=r"toy\.safetensors is not a toy-world customization file .*stage customize"):
        toy_customization.read(toy_file)
    with pytest.raises(FileNotFoundError, match="does not exist; train one"):
        toy_customization.read(toy_file.with_name("missing.safetensors"))

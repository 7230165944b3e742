"""What JeDi training writes loads in ComfyUI through JeDi Checkpoint Loader (nodes/jedi_checkpoint.py): a few steps
on the tiny SD1.5 pipeline, export, load in-process on the CPU.

(a) the ComfyUI UNet's weights are the file's, bit for bit (float32 export); (b) one evaluation of the loaded model
(with SynCD Masked Shared Attention as the coupling) equals the diffusers widened UNet with training's coupled
processors on the same noisy latents, timestep, text, reference latents and mask (σ ↔ t through ComfyUI's schedule,
ε = (x − x̂₀)/σ; tolerance 1e-4), and JeDi Image Guider's ε⁰ is the uncoupled model with zero reference latents;
(c) sampling through the nodes changes with the reference images, and the widened model before training samples
exactly what the base UNet samples (zero-initialised new channels; tolerance 1e-5)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from ico_tiny_models import comfy_unet_config
from test_jedi_training import jedi_raw, make_run

from comfyui_syncd.training import jedi

pytestmark = pytest.mark.comfy

FILE_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}   # ComfyUI's attention/conv vs diffusers' on the same float32 weights
SAMPLE_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}  # 9-channel conv_in with zero extra weights vs the 4-channel one
SET = 3                                          # images per set in the sampling tests: 2 references + 1 new


@pytest.fixture(scope="module")
def exported(tiny_sd15, tiny_dataset, tmp_path_factory, comfy_imports):
    """The widened UNet before training (``jedi_init``) and after 3 steps (``jedi``), float32 exports of one run."""
    out = tmp_path_factory.mktemp("jedi_comfy")
    run = make_run(jedi_raw(tiny_sd15, tiny_dataset, out, max_steps=3))
    init = jedi.export(run, "_init")
    jedi.train(run, progress=False)
    return SimpleNamespace(folder=out / "jedi", init=init, trained=out / "jedi" / "jedi.safetensors",
                           base=tiny_sd15 / "unet")


@pytest.fixture
def load(exported, monkeypatch):
    """``load(file_name)``: the MODEL of JeDi Checkpoint Loader for a file of the run's jedi/ folder."""
    import folder_paths

    from comfyui_syncd.nodes.jedi_checkpoint import FOLDER, JeDiCheckpointLoader

    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(exported.folder)], {".safetensors"}))
    assert JeDiCheckpointLoader.validate_inputs(unet_name="jedi.safetensors") is True

    def run(name="jedi.safetensors"):
        (model,) = JeDiCheckpointLoader.execute(name, "default").args
        return model
    return run


def conditioning(seed):
    return [[torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(seed)), {}]]


def coupled(model, images_per_subject=SET):
    from comfyui_syncd.nodes.shared_attention_node import SynCDSharedAttention

    (out,) = SynCDSharedAttention.execute(model, images_per_subject, "none", 0.0, 1.0, True, "all").args
    return out


def test_loaded_weights_are_the_files(exported, load):
    import comfy.utils

    from comfyui_syncd.nodes import jedi_checkpoint as jc

    saved = safetensors.torch.load_file(str(exported.trained))
    assert saved["conv_in.weight"].shape[1] == 9 and saved["conv_in.weight"][:, 4:].abs().max() > 1e-3  # trained
    model = load()
    base = model.model
    assert isinstance(base, jc.JeDiUNetModel) and base.model_type.name == "EPS"
    assert base.concat_keys == ("concat_image", "mask_inverted")
    with safetensors.safe_open(str(exported.trained), "pt") as f:
        config = json.loads(f.metadata()["jedi_unet_config"])
    unet_config = jc.comfy_unet_config(config, torch.float32)
    # the config derived from the diffusers one is the hand-written ComfyUI config of the same tiny UNet
    assert unet_config == comfy_unet_config("sd15") | {"in_channels": 9}
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    weights = base.diffusion_model.state_dict()
    assert len(weights) == len(saved)
    for key, value in saved.items():
        assert weights[mapping[key]].dtype == torch.float32 and torch.equal(weights[mapping[key]], value), key


def one_evaluation(guider, x, sigma, latent_image, noise_mask):
    """The guider's denoised prediction for ``x`` at ``sigma``, through ComfyUI's whole sampling set-up (conds with
    the model's extra_conds from the LATENT and its noise_mask, wrappers, patches), without the inpainting
    replacement of the reference rows: a one-call sampler that evaluates the guider itself."""
    import comfy.samplers

    seen = {}

    def sample(model, noise, sigmas, extra_args, callback, disable):
        s = sigmas[0] * noise.new_ones(noise.shape[0])
        seen["denoised"] = model.inner_model(x, s, model_options=extra_args["model_options"],
                                             seed=extra_args.get("seed"))
        return noise

    guider.sample(torch.zeros_like(x), latent_image, comfy.samplers.KSAMPLER(sample), torch.tensor([sigma, 0.0]),
                  denoise_mask=noise_mask, seed=0, disable_pbar=True)
    return seen["denoised"]


def test_forward_equals_the_diffusers_unet(exported, load):
    """Two sets of 3 ([ref, ref, new], [ref, new, new]); the LATENT's new rows hold garbage, which the mask zeroes
    as training's ``reference latent · mask`` does. KSampler-style CFG at 1 (positive only, every row sees its
    reference channels) and JeDi Image Guider (λ = 3: ε⁰ uncoupled, zero reference latents, mask kept)."""
    import comfy.patcher_extension
    import comfy.samplers

    from comfyui_syncd.nodes.guiders import JeDiImageGuider

    g = torch.Generator().manual_seed(0)
    is_ref = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    rows = len(is_ref)
    model = coupled(load())
    sampling = model.get_model_object("model_sampling")
    latent_image = torch.randn(rows, 4, 8, 8, generator=g) * 5  # raw VAE scale; ComfyUI scales it by 0.18215
    references = model.model.process_latent_in(latent_image)
    noise_mask = (1 - is_ref).view(-1, 1, 1, 1).expand(rows, 1, 8, 8).clone()
    noisy = torch.randn(rows, 4, 8, 8, generator=g)              # x_t as diffusers sees it
    sigma = float(sampling.sigmas[600])
    x = noisy * (sigma ** 2 + 1) ** 0.5                          # ComfyUI's x = x_t / sqrt(ᾱ_t)
    t = sampling.timestep(torch.tensor([sigma])).float().expand(rows)
    pos, neg = conditioning(1), conditioning(2)

    unet = jedi.load_exported_unet(exported.trained).eval()
    state = jedi.CoupledState()
    jedi.install_coupled_attention(unet, state)
    diffusers_model = jedi.JediModel(unet, state, None)

    def diffusers_eps(refs, cond, set_sizes):
        with torch.no_grad():
            return diffusers_model.predict(noisy, refs, is_ref, t, cond[0][0].expand(rows, -1, -1), set_sizes)

    eps = diffusers_eps(references, pos, [3, 3])
    # the reference channels matter here: zero reference latents give another prediction
    assert (diffusers_eps(torch.zeros_like(references), pos, [3, 3]) - eps).abs().max() > 100 * FILE_TOLERANCE["atol"]

    seen_inputs = []

    def probe(executor, xc, timesteps, context, y, control, transformer_options, **kwargs):
        chunks = transformer_options["cond_or_uncond"]
        seen_inputs.append(dict(zip(chunks, xc[:, 4:].clone().chunk(len(chunks)))))
        return executor(xc, timesteps, context, y, control, transformer_options, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "probe", probe)

    cfg1 = comfy.samplers.CFGGuider(model)
    cfg1.set_conds(pos, neg)
    cfg1.set_cfg(1.0)
    denoised = one_evaluation(cfg1, x, sigma, latent_image, noise_mask)
    torch.testing.assert_close((x - denoised) / sigma, eps, **FILE_TOLERANCE)
    mask = is_ref.view(-1, 1, 1, 1).expand(rows, 1, 8, 8)
    (extra,) = seen_inputs
    assert list(extra) == [0]
    torch.testing.assert_close(extra[0], torch.cat([references * mask, mask], 1), rtol=1e-6, atol=1e-6)

    seen_inputs.clear()
    (guider,) = JeDiImageGuider.execute(model, pos, neg, 3.0).args
    denoised = one_evaluation(guider, x, sigma, latent_image, noise_mask)
    eps0 = diffusers_eps(torch.zeros_like(references), neg, [1] * rows)  # one image per set: no coupling
    torch.testing.assert_close((x - denoised) / sigma, eps0 + 3.0 * (eps - eps0), **FILE_TOLERANCE)
    (chunks,) = seen_inputs  # one pass: the positive chunk (0) and ε⁰'s negative chunk (1)
    assert sorted(chunks) == [0, 1]
    torch.testing.assert_close(chunks[0], torch.cat([references * mask, mask], 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunks[1], torch.cat([torch.zeros_like(references), mask], 1), rtol=0, atol=0)


# --- sampling through the nodes ------------------------------------------------------------------------------

def reference_images(seed):
    return torch.rand(SET - 1, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def joint_set(images):
    from comfyui_syncd.demo import tiny_models
    from comfyui_syncd.nodes.jedi import JeDiJointImageSet

    (latent, masks) = JeDiJointImageSet.execute(images, tiny_models.build_vae("sd15"), 1).args
    assert latent["samples"].shape[0] == SET and masks.shape[0] == SET
    return latent


def sample(model, latent, sampler="jedi_guider", positive=None):
    """[model → (coupling) → JeDi Joint Image Set latent → JeDi Image Guider + SamplerCustomAdvanced's call, or
    KSampler], 4 euler steps; the float latents."""
    import comfy.samplers
    import nodes

    from comfyui_syncd.nodes.guiders import JeDiImageGuider

    pos, neg = positive or conditioning(1), conditioning(2)
    if sampler == "ksampler":
        (out,) = nodes.common_ksampler(model, 0, 4, 3.0, "euler", "simple", pos, neg, latent)
        return out["samples"]
    (guider,) = JeDiImageGuider.execute(model, pos, neg, 3.0).args
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4).cpu()
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(0))
    return guider.sample(noise, latent["samples"], comfy.samplers.sampler_object("euler"), sigmas,
                         denoise_mask=latent["noise_mask"], seed=0, disable_pbar=True)


def test_sampling_follows_the_reference_images(load):
    """The trained model's new image changes with the references: through coupled attention and through the
    references' own input channels (blanking those with ComfyUI's concat_latent_image changes it too); without
    coupling the new image cannot see the references at all (the extra channels are per image)."""
    import node_helpers

    model = load()
    with_coupling = coupled(model)
    latent_a, latent_b = joint_set(reference_images(0)), joint_set(reference_images(1))
    out_a = sample(with_coupling, latent_a)
    torch.testing.assert_close(out_a[:2], latent_a["samples"][:2], rtol=1e-5, atol=1e-5)  # replacement trick
    assert (sample(with_coupling, latent_b)[2] - out_a[2]).abs().max() > 1e-3
    blank = node_helpers.conditioning_set_values(conditioning(1),
                                                 {"concat_latent_image": torch.zeros_like(latent_a["samples"])})
    assert (sample(with_coupling, latent_a, positive=blank)[2] - out_a[2]).abs().max() > 1e-3
    assert torch.equal(sample(model, latent_a)[2], sample(model, latent_b)[2])


@pytest.mark.parametrize("sampler", ["ksampler", "jedi_guider"])
def test_zero_initialised_channels_sample_as_the_base_model(exported, load, sampler):
    """The widened UNet before training (new channels zero) samples what the base tiny UNet, built as a plain
    ComfyUI SD15 model, samples with the same coupling, set latent and noise; after training it does not."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from diffusers import UNet2DConditionModel

    config = comfy_unet_config("sd15")
    base_config = comfy.supported_models.SD15(dict(config))
    base_config.set_inference_dtype(torch.float32, None)
    base = base_config.get_model({})
    mapping = comfy.utils.unet_to_diffusers(config)
    unet = UNet2DConditionModel.from_pretrained(exported.base)
    base.diffusion_model.load_state_dict({mapping[k]: v for k, v in unet.state_dict().items()}, strict=True)
    base_model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"),
                                                  offload_device=torch.device("cpu"))

    latent = joint_set(reference_images(0))
    expected = sample(coupled(base_model), latent, sampler)
    got = sample(coupled(load(exported.init.name)), latent, sampler)
    torch.testing.assert_close(got, expected, **SAMPLE_TOLERANCE)
    trained = sample(coupled(load()), latent, sampler)
    assert (trained[2] - expected[2]).abs().max() > 1e-3


def test_files_that_are_not_jedi_exports_are_refused(exported, tmp_path):
    from comfyui_syncd.nodes.jedi_checkpoint import load_jedi_unet

    sd = safetensors.torch.load_file(str(exported.trained))
    with safetensors.safe_open(str(exported.trained), "pt") as f:
        meta = f.metadata()
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(sd, str(plain))
    with pytest.raises(ValueError, match="no 'jedi_unet_config' metadata"):
        load_jedi_unet(plain)
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file(sd, str(other), {**meta, "jedi_input_layout": "noisy_latent:4,reference_mask:1"})
    with pytest.raises(ValueError, match="input layout"):
        load_jedi_unet(other)
    extra = tmp_path / "extra.safetensors"
    safetensors.torch.save_file({**sd, "controlnet_cond_embedding.conv_in.weight": torch.zeros(2, 2)}, str(extra), meta)
    with pytest.raises(ValueError, match="not part of the SD1.5 UNet"):
        load_jedi_unet(extra)


def test_real_sd15_config_converts_as_comfyui_detects_it(comfy_imports):
    """At SD1.5's real size (built on the meta device): the unet_config derived from the diffusers config is the one
    ComfyUI's own diffusers detection gives (``model_detection.unet_config_from_diffusers_unet``; the head count
    comes from ComfyUI's SD15 class either way), and ComfyUI's key map covers every key, conv_in widened or not."""
    import comfy.model_detection
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from comfyui_syncd.nodes.jedi_checkpoint import comfy_unet_config as derive

    sd15 = dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], layers_per_block=2,
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64)
    for in_channels in (4, 9):
        with torch.device("meta"):
            unet = UNet2DConditionModel(in_channels=in_channels, **sd15)
        ours = derive(dict(unet.config))
        assert ours["in_channels"] == in_channels
        if in_channels == 4:
            detected = comfy.model_detection.unet_config_from_diffusers_unet(unet.state_dict())
            assert {k: v for k, v in detected.items() if k != "num_heads"} == ours
        mapping = comfy.utils.unet_to_diffusers(ours)
        assert all(k in mapping for k in unet.state_dict())

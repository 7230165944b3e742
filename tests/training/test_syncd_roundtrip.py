"""What SynCD training writes round-trips into ComfyUI (issue 9): a few steps on a tiny SD1.5/SDXL model, export,
load through the nodes a user connects, and with identical weights and inputs the ComfyUI model computes what the
diffusers training model computes.

The diffusers side is the training model itself (``training/syncd.py`` ``SyncdModel.forward``, the code the loss
is computed with), observed through forward hooks: one call with rows ``[target, reference 1, reference 2]``, the
reference pass (LoRA off) and the target pass (MSA over the references' foreground).

The ComfyUI side is the user's graph, in-process: the base UNet built from the same diffusers weights (ComfyUI's
own diffusers key map: ComfyUI's model detection matches no config to tiny UNets), ComfyUI's
*ModelSamplingDiscrete* (v_prediction, zsnr: the export's ``syncd_prediction_type`` /
``syncd_rescale_betas_zero_snr``), *SynCD IP-Adapter Loader* (``ip_adapter/syncd.safetensors``), *SynCD
Checkpoint Loader* (``syncd/syncd.safetensors``), *SynCD Reference Images*, *SynCD Apply References* (noised) and
*SynCD IP-Adapter Apply* (a CLIP_VISION converted from the training's image encoder), sampled by ComfyUI's
``CFGGuider`` (cfg 1) with a one-evaluation sampler at the σ of the training timestep.

Identical inputs: the references' VAE latents (what SynCD Reference Images encoded, ``process_in``-scaled as
ComfyUI feeds the UNet), the same timestep t (ComfyUI: σ_t of its zsnr schedule, checked against the training
scheduler's ᾱ_t), the reference noise ComfyUI's reference pass draws (``noise_seed + 1000003·step``), the target
noise the sampler adds, the same text context (and SDXL pooled/size conditioning), the same IP-Adapter image tokens
(checked) at scale 1 (the training's ``ip_scale``; SynCD IP-Adapter Apply's ``weight`` and ``reference_weight``
1.0), the same masks (pixel masks aligned to the 8 px latent cells, dilated 3x3 on the latent grid on both sides).

Compared, float32, ``torch.testing.assert_close(rtol=RTOL, atol=ATOL)``:

(a) the reference-pass features, every ``attn1`` input (after norm1) of the references, layers mapped by name
    (diffusers ``down_blocks.0.attentions.0.transformer_blocks.0.attn1`` -> ComfyUI ``(input, 1, 0)`` through
    ``comfy.utils.unet_to_diffusers``);
(b) the target pass's model output (v): ComfyUI's ``apply_model`` returns x̂₀ = x/(σ²+1) − v·σ/√(σ²+1) for a
    V_PREDICTION model, so both the raw ``diffusion_model`` output (its input is c_in·x = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε,
    the diffusers noisy latent, which is checked too) and v recovered from the sampler's x̂₀ as
    (x/(σ²+1) − x̂₀)·√(σ²+1)/σ are compared with the training model's v prediction.

Measured (CPU, float32): features within 8e-6 of values up to ~3.8, v within 1e-6. Connecting the IP-Adapter with
its untrained layers still matches (the checkpoint loader puts the trained ones in). Broken round trips miss even
MARGIN x the tolerance: the LoRA applied in ComfyUI's reference pass (features off by 0.05-0.5 from the second
layer on, v by 3e-3-9e-3), the IP-Adapter's to_k_ip/to_v_ip swapped or left untrained (features ~1-4, v ~0.3-0.7),
the reference masks ignored (v by 1e-2-3e-2, the features unchanged).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from comfyui_syncd.training import config, syncd

pytestmark = pytest.mark.comfy  # ComfyUI in-process (and its tokenizer files for the tiny models)

RTOL, ATOL = 1e-4, 1e-5      # float32; measured differences are <= 1e-5 (operation order, attention kernels)
MARGIN = 10                   # a broken round trip misses the tolerance scaled by this factor
TIMESTEP = 600                # training timestep of the comparison (σ ≈ 2.6 on the zsnr schedule)
R = 2                         # references (the training's num_images 3 = target + 2)
SEED = 7                      # SynCD Apply References' noise_seed
SIZE = 64                     # pixels (latent 8x8, the training resolution)
PROMPT, REFERENCE_PROMPT = "a photo of object 1 on a beach", "photo of a thing"


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool(torch.allclose(actual, expected, rtol=RTOL, atol=ATOL))


def far(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Not close even at MARGIN times the tolerance (a mismatch no rounding explains)."""
    return not torch.allclose(actual, expected, rtol=MARGIN * RTOL, atol=MARGIN * ATOL)


# --- training ------------------------------------------------------------------------------------------------

def train_tiny(base, image_encoder, dataset, output_dir):
    raw = {"model": {"path": str(base)},
           "ip_adapter": {"image_encoder": str(image_encoder), "resampler_dim": 32, "resampler_heads": 1,
                          "resampler_depth": 1, "num_queries": 4},
           "data": {"dirs": [str(dataset)], "resolution": SIZE, "crop_padding": 4, "num_workers": 0},
           "lora": {"rank": 4, "alpha": 4.0},
           "train": {"output_dir": str(output_dir), "max_steps": 3, "checkpoint_every": 100,
                     "gradient_accumulation_steps": 1, "learning_rate": 1.0e-2, "tensorboard": False}}
    run = syncd.prepare(config.from_dict(syncd.SyncdConfig, raw), resume=None)
    return syncd.train(run, progress=False)


# --- the ComfyUI side ----------------------------------------------------------------------------------------

def comfy_clip_vision(image_encoder_folder):
    """ComfyUI's CLIP_VISION (``comfy.clip_vision.ClipVisionModel``, what Load CLIP Vision returns) holding the
    training's transformers image encoder, in float32 (as Load CLIP Vision with ``--fp32-text-enc``), built as SynCD
    Toy-World CLIP Vision builds it."""
    from transformers import CLIPVisionModelWithProjection

    from comfyui_syncd.demo.toy_customization import clip_vision

    hf = CLIPVisionModelWithProjection.from_pretrained(image_encoder_folder)
    return clip_vision({k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")},
                       hf.config.to_dict())


def comfy_base_model(family, diffusers_unet):
    """A ComfyUI model (``comfy.supported_models`` SD15/SDXL, ModelPatcher) holding ``diffusers_unet``'s weights,
    converted with ComfyUI's own diffusers key map; (patcher, {diffusers key: ComfyUI key}). As
    ``test_ico_comfy_load.comfy_unet``, but with the tiny config's head layout kept: the model config class
    overwrites ``num_heads``/``num_head_channels`` with the full-size model's (SDXL: 64-channel heads, i.e. one
    head at the tiny width where diffusers has four)."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from ico_tiny_models import comfy_unet_config

    cfg = comfy_unet_config(family)
    model_config = (comfy.supported_models.SD15 if family == "sd15" else comfy.supported_models.SDXL)(dict(cfg))
    model_config.unet_config.update({k: cfg[k] for k in ("num_heads", "num_head_channels") if k in cfg})
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    mapping = comfy.utils.unet_to_diffusers(cfg)
    sd = diffusers_unet.state_dict()
    model.diffusion_model.load_state_dict({mapping[k]: v for k, v in sd.items()}, strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu")), mapping


def conditioning(context, pooled):
    extra = {} if pooled is None else {"pooled_output": pooled, "width": SIZE, "height": SIZE, "crop_w": 0,
                                       "crop_h": 0, "target_width": SIZE, "target_height": SIZE}
    return [[context, extra]]


def comfy_model(setup, ipadapter_edit=None, masks="given", toy_file=None, toy_ipadapter=True):
    """The user's graph up to the sampler's MODEL, from the exported files: (MODEL, REFERENCES, IPADAPTER).
    ``ipadapter_edit``: ``"untrained_in"`` connects the IP-Adapter with its layers as before training (the
    checkpoint loader must put the trained ones in); broken round trips: ``"untrained_out"`` (the loader's
    IPADAPTER with the untrained layers put back), ``"swap_kv"`` (to_k_ip and to_v_ip swapped). ``toy_file``: the
    run as one toy-world customization file, loaded by the toy-world nodes (checkpoint, IP-Adapter, CLIP vision;
    ``toy_ipadapter=False``: the checkpoint node's ``ipadapter`` left unconnected, so it takes the file's own)."""
    import folder_paths
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    from comfyui_syncd.demo.toy_customization import (SynCDToyWorldCheckpoint, SynCDToyWorldCLIPVision,
                                                      SynCDToyWorldIPAdapter)
    from comfyui_syncd.nodes.ip_adapter import SynCDIPAdapterApply, SynCDIPAdapterLoader
    from comfyui_syncd.nodes.reference_nodes import SynCDApplyReferences, SynCDReferenceImages
    from comfyui_syncd.nodes.syncd_checkpoint import SynCDCheckpointLoader

    out = setup["run"].out
    clip_vision = setup["clip_vision"]
    with pytest.MonkeyPatch.context() as mp:  # the run's output folders as ComfyUI's models/ipadapter, models/syncd
        mp.setitem(folder_paths.folder_names_and_paths, "ipadapter", ([str(out / "ip_adapter")], {".safetensors"}))
        mp.setitem(folder_paths.folder_names_and_paths, "syncd", ([str(out / "syncd")], {".safetensors"}))
        mp.setitem(folder_paths.folder_names_and_paths, "syncd_toyworld",
                   ([str(toy_file.parent if toy_file else out)], {".safetensors"}))
        (model,) = ModelSamplingDiscrete().patch(setup["base"], "v_prediction", True)
        if toy_file:
            ipadapter = SynCDToyWorldIPAdapter.execute(toy_file.name).args[0] if toy_ipadapter else None
            model, ipadapter = SynCDToyWorldCheckpoint.execute(model, toy_file.name, 1.0, ipadapter).args
            clip_vision = SynCDToyWorldCLIPVision.execute(toy_file.name).args[0]
        else:
            ipadapter = SynCDIPAdapterLoader.execute("syncd.safetensors").args[0]
            if ipadapter_edit == "untrained_in":
                ipadapter = {"image_proj": ipadapter["image_proj"], "ip_adapter": dict(setup["fresh_ip"])}
            model, ipadapter = SynCDCheckpointLoader.execute(model, "syncd.safetensors", 1.0, ipadapter).args
    if ipadapter_edit == "untrained_out":
        ipadapter = {"image_proj": ipadapter["image_proj"], "ip_adapter": dict(setup["fresh_ip"])}
    elif ipadapter_edit == "swap_kv":
        swap = {"k": "v", "v": "k"}
        ipadapter = {"image_proj": ipadapter["image_proj"],
                     "ip_adapter": {re.sub(r"to_([kv])_ip", lambda m: f"to_{swap[m.group(1)]}_ip", k): w
                                    for k, w in ipadapter["ip_adapter"].items()}}
    references = SynCDReferenceImages.execute(setup["images"], setup["vae"],
                                              setup["masks"] if masks == "given" else None, 3).args[0]
    model = SynCDApplyReferences.execute(model, references, setup["reference_cond"], "noised", SEED, 0.0,
                                         1.0).args[0]
    model = SynCDIPAdapterApply.execute(model, ipadapter, clip_vision, setup["images"][:1], 1.0, 1.0,
                                        references=references).args[0]
    return model, references, ipadapter


def comfy_evaluate(setup, model):
    """One model evaluation at σ_t through ComfyUI's sampling stack; (reference features by ComfyUI layer,
    [(UNet input, timestep, raw output) per diffusion_model call], x, x̂₀)."""
    import comfy.samplers

    from comfyui_syncd.nodes.patch_kit import Phase, forward_state

    features, calls, record = {}, [], {}

    def probe(n, context, value, extra):
        if forward_state(extra).phase is Phase.REFERENCE:
            features[(*extra["block"], extra["block_index"])] = n.detach().clone()
        return n, context, value

    def one_evaluation(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        record["x"] = x.clone()
        record["denoised"] = model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args).clone()
        return record["denoised"]

    m = model.clone()
    m.set_model_attn1_patch(probe)
    hook = m.model.diffusion_model.register_forward_hook(
        lambda module, args, output: calls.append((args[0].detach().clone(), args[1].detach().clone(),
                                                   output.detach().clone())))
    guider = comfy.samplers.CFGGuider(m)
    guider.set_conds(setup["target_cond"], setup["target_cond"])
    guider.set_cfg(1.0)  # one conditional evaluation (a plain sampler: the branch sees the references)
    try:
        with torch.no_grad():
            guider.sample(setup["noise"], setup["latent"], comfy.samplers.KSAMPLER(one_evaluation),
                          torch.tensor([setup["sigma"], 0.0]), seed=0, disable_pbar=True)
    finally:
        hook.remove()
    return features, calls, record["x"], record["denoised"]


# --- the diffusers side --------------------------------------------------------------------------------------

def diffusers_evaluate(setup):
    """The training model's forward on rows [target, ref 1, ref 2]: (captured reference features by attn1 name,
    [(mode, UNet input, v prediction) per UNet call])."""
    core, state = setup["run"].core, setup["run"].state
    calls, captured = [], {}

    def hook(module, args, output):
        if state.mode == "capture":
            captured.update({k: v.clone() for k, v in state.captured.items()})
        calls.append((state.mode, args[0].detach().clone(), output.sample.detach().clone()))

    handle = core.unet.register_forward_hook(hook)
    try:
        with torch.no_grad():
            core(**setup["inputs"])
    finally:
        handle.remove()
    return captured, calls


# --- the setup -----------------------------------------------------------------------------------------------

def block_images(seed: int):
    """R smooth 64 px images and masks of whole 8 px cells (a rectangle per reference)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(R, 3, 8, 8, generator=gen)
    images = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False).movedim(1, -1)
    masks = torch.zeros(R, SIZE, SIZE)
    masks[0, 8:40, 16:48] = 1.0
    masks[1, 24:56, 0:24] = 1.0
    return images.contiguous(), masks


def latent_masks(masks: torch.Tensor) -> torch.Tensor:
    """The training's latent-grid masks, computed here on their own: a cell is foreground when any of its pixels
    is (the masks are cell-aligned), dilated with a 3x3 box."""
    cells = masks.view(R, 8, 8, 8, 8).amax(dim=(2, 4))
    return F.max_pool2d(cells[:, None], 3, stride=1, padding=1)[:, 0]


def comfy_layer(diffusers_name: str, mapping: dict) -> tuple:
    """ComfyUI's (block, number, index) of a diffusers attn1 (``comfy.utils.unet_to_diffusers``)."""
    comfy_key = mapping[diffusers_name + ".to_q.weight"]
    m = re.match(r"^(input|output)_blocks\.(\d+)\.\d+\.transformer_blocks\.(\d+)\.attn1\.", comfy_key)
    if m:
        return m.group(1), int(m.group(2)), int(m.group(3))
    m = re.match(r"^middle_block\.\d+\.transformer_blocks\.(\d+)\.attn1\.", comfy_key)
    assert m, comfy_key
    return "middle", 0, int(m.group(1))


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def setup(request, tiny_image_encoder, tiny_dataset, tmp_path_factory, comfy_imports):
    from diffusers import UNet2DConditionModel

    from comfyui_syncd.demo import tiny_models
    from comfyui_syncd.nodes.ip_adapter import image_tokens
    from comfyui_syncd.training import models

    family = request.param
    folder = request.getfixturevalue(f"tiny_{family}")
    run = train_tiny(folder, tiny_image_encoder, tiny_dataset, tmp_path_factory.mktemp(f"roundtrip_{family}"))
    base_unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")  # the frozen base the run trained
    patcher, mapping = comfy_base_model(family, base_unet)
    gen = torch.Generator().manual_seed(5)  # the converted base computes what the diffusers base computes
    x, c = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, base_unet.config.cross_attention_dim,
                                                               generator=gen)
    kw, y = {}, None
    if family == "sdxl":
        pooled_probe = torch.randn(1, 64, generator=gen)
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
        kw = {"added_cond_kwargs": {"text_embeds": pooled_probe, "time_ids": time_ids}}
        y = patcher.model.encode_adm(pooled_output=pooled_probe, width=64, height=64)
    with torch.no_grad():
        torch.testing.assert_close(patcher.model.diffusion_model(x, timesteps=torch.tensor([500]), context=c, y=y),
                                   base_unet(x, torch.tensor([500]), c, **kw).sample, rtol=RTOL, atol=ATOL)
    modules = dict(base_unet.named_modules())
    fresh_ip = {}  # the IP-Adapter layers before training (a fresh IP-Adapter: copies of to_k/to_v)
    for i, name in enumerate(base_unet.attn_processors):
        if name.endswith("attn2.processor"):
            attn = modules[name.removesuffix(".processor")]
            fresh_ip[f"{i}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
            fresh_ip[f"{i}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()

    images, masks = block_images(seed=3)
    sdxl = family == "sdxl"
    with torch.no_grad():
        context, pooled = models.encode_text(run.parts, [PROMPT, REFERENCE_PROMPT])
    setup = {"family": family, "run": run, "base": patcher, "mapping": mapping, "images": images, "masks": masks,
             "vae": tiny_models.build_vae(family, seed=1),
             "clip_vision": comfy_clip_vision(tiny_image_encoder),
             "target_cond": conditioning(context[:1], pooled[:1] if sdxl else None),
             "reference_cond": conditioning(context[1:], pooled[1:] if sdxl else None), "fresh_ip": fresh_ip}
    model, references, ipadapter = comfy_model(setup)
    model_sampling = model.get_model_object("model_sampling")
    latent_format = patcher.model.latent_format

    # identical inputs -------------------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(11)
    latent = torch.randn(1, 4, 8, 8, generator=gen)            # the target's latent (VAE space, unscaled)
    noise = torch.randn(1, 4, 8, 8, generator=gen)             # the target's noise (the sampler's)
    ref_noise = torch.randn(references.latents.shape, generator=torch.Generator().manual_seed(SEED))  # step 0
    sigma = float(model_sampling.sigmas[TIMESTEP])
    alpha_bar = float(run.core.scheduler.alphas_cumprod[TIMESTEP])
    assert abs(1 / (sigma ** 2 + 1) - alpha_bar) < 1e-6 * alpha_bar  # ComfyUI's zsnr schedule is the training's

    tokens = image_tokens(ipadapter, setup["clip_vision"], [images[:1], references.images])
    pixels = F.interpolate(images.movedim(-1, 1), size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    with torch.no_grad():
        diffusers_tokens = run.core.image_tokens(pixels * 2 - 1)
    torch.testing.assert_close(tokens[1], diffusers_tokens, rtol=RTOL, atol=ATOL)  # the same image tokens
    torch.testing.assert_close(tokens[0], diffusers_tokens[:1], rtol=RTOL, atol=ATOL)

    n = 1 + R
    lat_masks = torch.cat([torch.ones(1, 8, 8), latent_masks(masks)])
    inputs = {"latents": latent_format.process_in(torch.cat([latent, references.latents])),
              "noise": torch.cat([noise, ref_noise]), "timesteps": torch.tensor([TIMESTEP]),
              "context": torch.cat([context[:1]] + [context[1:]] * R),
              "pooled": torch.cat([pooled[:1]] + [pooled[1:]] * R) if sdxl else None,
              "time_ids": syncd.time_ids_of([(SIZE, SIZE)] * n, SIZE) if sdxl else None,
              "ip_tokens": torch.cat([diffusers_tokens[:1], diffusers_tokens]), "masks": lat_masks, "n": n}
    setup.update(latent=latent, noise=noise, sigma=sigma, inputs=inputs)
    setup["diffusers"] = diffusers_evaluate(setup)
    setup["comfy"] = comfy_evaluate(setup, model)
    return setup


# --- the comparisons -----------------------------------------------------------------------------------------

def reference_features(setup, comfy_result):
    """[(diffusers name, diffusers features, ComfyUI features)] of every attn1, mapped by name."""
    captured, _ = setup["diffusers"]
    features = comfy_result[0]
    pairs = [(name, feats, features.get(comfy_layer(name, setup["mapping"]))) for name, feats in captured.items()]
    assert len(features) == len(captured) == len(pairs)
    return pairs


def target_output(setup, comfy_result):
    """(diffusers v, ComfyUI raw v, ComfyUI v from x̂₀)."""
    _, calls = setup["diffusers"]
    _, comfy_calls, x, denoised = comfy_result
    (mode, _, v), = [c for c in calls if c[0] == "shared"]
    target_calls = [c for c in comfy_calls if c[0].shape[0] == 1]
    assert len(target_calls) == 1 and len(comfy_calls) == 2  # one reference pass (R rows) and the target
    s = setup["sigma"]
    from_denoised = (x / (s ** 2 + 1) - denoised) * (s ** 2 + 1) ** 0.5 / s
    return v, target_calls[0][2], from_denoised


def test_inputs_are_identical(setup):
    """The UNet inputs of both passes: the references noised to σ_t with ComfyUI's reference noise, the target
    with the sampler's, both at timestep t (ComfyUI's c_in·x equals the diffusers noisy latent)."""
    _, calls = setup["diffusers"]
    _, comfy_calls, _, _ = setup["comfy"]
    assert [c[0] for c in calls] == ["capture", "shared"]
    (ref_in, ref_t, _), (target_in, target_t, _) = sorted(comfy_calls, key=lambda c: -c[0].shape[0])
    assert ref_t.tolist() == [TIMESTEP] * R and target_t.tolist() == [TIMESTEP]
    torch.testing.assert_close(ref_in, calls[0][1], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(target_in, calls[1][1], rtol=RTOL, atol=ATOL)


def test_reference_pass_features_match(setup):
    """(a) Every attn1 input of the references in ComfyUI's reference pass equals the training's reference pass
    (LoRA off), layer by layer."""
    pairs = reference_features(setup, setup["comfy"])
    assert len(pairs) == (7 if setup["family"] == "sd15" else 8)
    for name, expected, actual in pairs:
        assert actual is not None, name
        assert actual.shape == expected.shape == (R, *expected.shape[1:]), name
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=name)


def test_target_output_matches(setup):
    """(b) The target pass's v prediction with MSA over the references' foreground: ComfyUI's raw model output and
    the v recovered from its x̂₀ equal the training model's."""
    expected, raw, from_denoised = target_output(setup, setup["comfy"])
    assert expected.shape == raw.shape == (1, 4, 8, 8)
    torch.testing.assert_close(raw, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(from_denoised, expected, rtol=RTOL, atol=10 * ATOL)  # x̂₀ -> v amplifies rounding


def test_checkpoint_loader_puts_the_trained_ip_weights_in(setup):
    """Connecting the IP-Adapter with its layers as before training (as one connects the original IP-Adapter Plus
    to the official checkpoint): the SynCD Checkpoint Loader's trained to_k_ip/to_v_ip make it equal again."""
    assert any(not torch.equal(w, setup["fresh_ip"][k]) for k, w in comfy_model(setup)[2]["ip_adapter"].items())
    result = comfy_evaluate(setup, comfy_model(setup, ipadapter_edit="untrained_in")[0])
    for name, expected, actual in reference_features(setup, result):
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=name)
    expected, raw, _ = target_output(setup, result)
    torch.testing.assert_close(raw, expected, rtol=RTOL, atol=ATOL)


def test_the_toy_world_file_round_trips_too(setup, tiny_image_encoder, tmp_path):
    """The run as one toy-world customization file (``customization.bundle_file``: what ``toyworld reproduce``
    ships), loaded by SynCD Toy-World Checkpoint, IP-Adapter and CLIP Vision, computes what the training model
    computes, as the three separate files do."""
    from comfyui_syncd.toyworld import customization as C

    path = C.bundle_file(setup["run"].out, tiny_image_encoder, tmp_path / "toy_syncd.safetensors", {"test": True},
                         dtype=torch.float32)
    states, config, info = C.read_bundle(path)
    assert {k: bool(v) for k, v in states.items()} == {"syncd": True, "ip_adapter": True, "clip_vision": True}
    assert config["image_size"] == 32 and info == {"test": True}
    result = comfy_evaluate(setup, comfy_model(setup, toy_file=path)[0])
    for name, expected, actual in reference_features(setup, result):
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=name)
    expected, raw, _ = target_output(setup, result)
    torch.testing.assert_close(raw, expected, rtol=RTOL, atol=ATOL)
    # the checkpoint node with its ipadapter unconnected (the Flux graphs on the toy world) takes the file's own: the
    # trained IP-Adapter (an untrained one misses the comparison: test_a_broken_round_trip_fails_the_comparison)
    own = comfy_model(setup, toy_file=path, toy_ipadapter=False)
    torch.testing.assert_close(target_output(setup, comfy_evaluate(setup, own[0]))[1], expected, rtol=RTOL, atol=ATOL)
    C.bundle_file(setup["run"].out, tiny_image_encoder, tmp_path / "half.safetensors")  # fp16, as shipped
    result = comfy_evaluate(setup, comfy_model(setup, toy_file=tmp_path / "half.safetensors")[0])
    torch.testing.assert_close(target_output(setup, result)[1], expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("broken", ["lora_in_reference_pass", "ip_swap_kv", "ip_untrained", "masks_ignored"])
def test_a_broken_round_trip_fails_the_comparison(setup, broken, monkeypatch):
    """The comparisons above are sharp: each of these breakages misses them by > MARGIN x the tolerance (the
    reference features too, except for the masks, which act in the target pass only)."""
    if broken == "lora_in_reference_pass":  # the SynCD LoRA's weight wrappers not switched off in the pass
        import comfyui_syncd.nodes.syncd_checkpoint as ckpt

        monkeypatch.setattr(ckpt, "in_reference_pass", lambda: False)
        model = comfy_model(setup)[0]
    elif broken == "ip_swap_kv":
        model = comfy_model(setup, ipadapter_edit="swap_kv")[0]
    elif broken == "ip_untrained":
        model = comfy_model(setup, ipadapter_edit="untrained_out")[0]
    else:
        model = comfy_model(setup, masks="none")[0]
    result = comfy_evaluate(setup, model)
    expected, raw, _ = target_output(setup, result)
    assert far(raw, expected), float((raw - expected).abs().max())
    features_off = [name for name, feats, actual in reference_features(setup, result) if far(actual, feats)]
    assert bool(features_off) == (broken != "masks_ignored"), features_off

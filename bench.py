"""Benchmarks that print figures (never run as tests).

``python -m comfyui_syncd.bench datagen`` times data generation of one object's 3 images on a tiny Flux (weights
std 0.3): plain batched generation against MSA with automatic masks (deformable, cfg 1), and plain against MSA on
rendered masks with and without feature warping (rigid, true CFG 2.5; the mesh views of the shipped mug), alternating
runs in one process, and prints images per minute, the ratio to its kind's plain batch and peak memory.

``python -m comfyui_syncd.bench shared-attention`` samples a tiny real SD1.5
UNet with and without SynCDSharedAttention, side by side in one process, for
N images per subject and foreground fractions f, with the efficient and the
reference (dense upstream mask) implementation, and prints:

* sampling time with the patch over time without it;
* self-attention time (every attn1 call, timed inside sampling) patched over
  unpatched, against the FLOP prediction 1 + (N-1)·f (each query sees its own
  L keys plus (N-1)·f·L shared ones);
* peak memory above the unpatched run's peak (CUDA allocator on a GPU, the
  process' peak RSS on a CPU).

``python -m comfyui_syncd.bench customization`` times SynCD customization sampling per step on a tiny real model:
plain CFG sampling (2 evaluations), the normalized guider without references (3 evaluations), and with R
references our scheme (one reference pass per step, shared by the three branches) against the upstream scheme
(one reference pass per guidance branch), all in one process, alternating runs.

``python -m comfyui_syncd.bench dci`` times DCI dual-branch sampling against plain CFG sampling of the same tiny
model, for window fractions 0.15 (the paper) and 0.3 (the official code), alternating runs in one process, and
prints the measured ratio beside the predicted one: 1 + (aux passes)/(2 · steps) for one image (the auxiliary
branch adds one conditional pass per step inside the window to the two CFG evaluations).

``python -m comfyui_syncd.bench sets`` times a consistent set (SynCDSharedAttention over N = 4 new images plus
SynCDApplyReferences with R = 2 references, the SynCD normalized guider) per step against plain CFG sampling of
the same 4 images, with the parts on their own (normalized guider alone, sharing alone, references alone), and
prints beside the measured ratio the predicted one: [N·(3 + 2·s·(k − 1)) + T·R] / (2·N), where s is the
self-attention share of plain sampling's time (measured), k = 1 + (N − 1)·f + R·f_ref the key growth of the image
and full branches, and T = 2 the texts batched in the reference pass.

``python -m comfyui_syncd.bench training [--device cuda]`` times one optimizer step of SynCD training
(``training/syncd.py``'s own processors, peft LoRA and ``SyncdModel``; an SD1.5-layout UNet at a small width, one
target and R = 2 references) against a plain LoRA step of the same model (the target alone, plain attention), with
the parts on their own: MSA only (target pass over reference features cached from one earlier pass) and the
reference pass only (no MSA); alternating runs in one process, medians, ratios over the plain LoRA step, in wall time
and in process CPU time (the figure to read on a shared CPU, with ``--threads 1``; on CUDA read wall time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from .comfy_inprocess import import_comfy


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (Linux)
            f.write("5")


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class AttentionTimer:
    """Wraps every attn1 replace patch of a model (an official patch point) to add up its time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(q, k, v, extra_options):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(q, k, v, extra_options)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            return out
        return timed

    def install(self, model):
        """A clone of ``model`` whose attn1 calls are timed (plain attention where nothing replaced them)."""
        import comfy.ldm.modules.attention
        from .nodes.patch_kit import unet_attention_blocks

        m = model.clone()
        replaced = m.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {})

        def plain(q, k, v, extra_options):
            return comfy.ldm.modules.attention.optimized_attention(q, k, v, extra_options["n_heads"])

        for name, number in unet_attention_blocks(m.get_model_object("diffusion_model")):
            m.set_model_attn1_replace(self.wrap(replaced.get((name, number), plain)), name, number)
        return m


def bench_shared_attention(args) -> None:
    import_comfy(cpu=not args.gpu, pytorch_attention=True)
    import comfy.model_management
    import comfy.sample

    from .demo import tiny_models
    from .nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    device = comfy.model_management.get_torch_device()
    torch.set_grad_enabled(False)
    model = tiny_models.build_model("sd15", seed=0, width=args.width)
    pos, neg = tiny_models.encode_text("sd15", "a photo of a dog"), tiny_models.encode_text("sd15", "")
    lat = args.size // 8

    def sample(m, n):
        noise = torch.randn(n, 4, lat, lat, generator=torch.Generator().manual_seed(0))
        timer = AttentionTimer(device)
        timed = timer.install(m)
        _reset_peak(device)
        start = time.perf_counter()
        comfy.sample.sample(timed, noise, args.steps, 5.0, "euler", "normal", pos, neg, torch.zeros_like(noise),
                            seed=0, disable_pbar=True)
        return time.perf_counter() - start, timer.seconds, _peak_bytes(device)

    print(f"SynCDSharedAttention benchmark: tiny SD1.5 UNet width {args.width}, {args.size}x{args.size} px "
          f"({lat}x{lat} latent, {lat * lat} tokens at the first attention level), {args.steps} euler steps, "
          f"cfg 5 (cond+uncond in one pass), device {device}, median of {args.repeats}; masks undilated, so the "
          f"foreground fraction f is exact")
    print(f"{'impl':<10}{'N':>3}{'f':>6}{'t_base s':>10}{'t_patch s':>10}{'ratio':>7}"
          f"{'attn ratio':>11}{'FLOP pred':>10}{'meas/pred':>10}{'extra peak MB':>14}")
    sample(model, 1)  # warm-up
    for impl in args.implementations:
        for f in args.fractions:
            for n in args.sizes:
                masks = torch.zeros(n, args.size, args.size)
                masks[:, :round(args.size * f)] = 1.0  # the top f of the rows: exact on every token grid
                # no dilation: f is then the exact key fraction on every layer (upstream's 9x9 would grow it)
                config = SharedAttentionConfig(n, "foreground_masks", 1e9, 0.0, unmasked_first_step=False,
                                               implementation=impl, foreground_masks=masks, mask_dilation=1)
                patched, _ = apply_shared_attention(model, config)
                sample(model, n), sample(patched, n)  # warm-up at this batch size
                base_runs, patch_runs = [], []
                for _ in range(args.repeats):  # alternate so drift hits both alike
                    base_runs.append(sample(model, n))
                    patch_runs.append(sample(patched, n))
                t_base = statistics.median(r[0] for r in base_runs)
                t_patch = statistics.median(r[0] for r in patch_runs)
                a_base = statistics.median(r[1] for r in base_runs)
                a_patch = statistics.median(r[1] for r in patch_runs)
                extra = max(r[2] for r in patch_runs) - max(r[2] for r in base_runs)
                predicted = 1 + (n - 1) * f
                print(f"{impl:<10}{n:>3}{f:>6.2f}{t_base:>10.3f}{t_patch:>10.3f}{t_patch / t_base:>7.2f}"
                      f"{a_patch / a_base:>11.2f}{predicted:>10.2f}{a_patch / a_base / predicted:>10.2f}"
                      f"{max(extra, 0) / 2**20:>14.1f}")
                sys.stdout.flush()


def bench_customization(args) -> None:
    import_comfy(cpu=not args.gpu, pytorch_attention=True)
    import comfy.model_management
    import comfy.samplers

    from .demo import tiny_models
    from .nodes.guiders import NormalizedGuider
    from .nodes.reference_injection import ReferenceConfig, apply_reference_injection
    from .nodes.reference_nodes import encode_references

    device = comfy.model_management.get_torch_device()
    torch.set_grad_enabled(False)
    family = args.family
    model = tiny_models.build_model(family, seed=0, width=args.width)
    vae = tiny_models.build_vae(family, seed=0)
    pos, neg = tiny_models.encode_text(family, "a photo of a dog"), tiny_models.encode_text(family, "")
    lat = args.size // 8
    channels = tiny_models.LATENT_CHANNELS[family]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", args.steps).cpu()

    outputs = {}

    def per_step(guider) -> float:
        noise = torch.randn(1, channels, lat, lat, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        outputs[id(guider)] = guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"),
                                            sigmas, seed=0, disable_pbar=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    def cfg_guider(m):
        g = comfy.samplers.CFGGuider(m)
        g.set_conds(pos, neg)
        g.set_cfg(5.0)
        return g

    def normalized(m):
        g = NormalizedGuider(m, 7.5, 8.0, 13.0)
        g.set_conds(pos, neg)
        return g

    def patched(n_refs, per_branch):
        images = torch.rand(n_refs, args.size, args.size, 3, generator=torch.Generator().manual_seed(1))
        masks = torch.zeros(n_refs, args.size, args.size)
        masks[:, : args.size // 2] = 1
        refs = encode_references(vae, images, masks)
        m, run = apply_reference_injection(model, ReferenceConfig(refs, pos, "auto", 0, 1e9, 0.0))
        if per_branch:  # the upstream scheme: one reference pass per guidance branch, each with its branch's text
            run.ensure_features = _one_pass_per_branch(run)
        return m, run
    print(f"SynCD customization benchmark: tiny {family} width {args.width}, {args.size}x{args.size} px, "
          f"{args.steps} euler steps, one target image, device {device}, median of {args.repeats}; "
          f"reference masks cover half of each reference")
    print(f"{'scheme':<34}{'refs':>5}{'s/step':>9}{'x plain CFG':>12}{'x ours':>8}{'max |out - ours|':>18}")
    setups = [("plain CFG (2 evaluations)", 0, lambda: (cfg_guider(model), None)),
              ("normalized guider, no references", 0, lambda: (normalized(model), None))]
    for n in args.references:
        setups.append(("ours: 1 batched pass per step", n, lambda n=n: _guided(normalized, patched(n, False))))
        setups.append(("upstream: 1 pass per branch (3)", n, lambda n=n: _guided(normalized, patched(n, True))))
    built = [(name, n, *make()) for name, n, make in setups]
    for _, _, guider, _ in built:
        per_step(guider)  # warm-up
    times = {i: [] for i in range(len(built))}
    for _ in range(args.repeats):
        for i, (_, _, guider, _) in enumerate(built):
            times[i].append(per_step(guider))
    medians = {i: statistics.median(t) for i, t in times.items()}
    ours = {n: medians[i] for i, (name, n, _, _) in enumerate(built) if name.startswith("ours")}
    ours_out = {n: outputs[id(g)] for name, n, g, _ in built if name.startswith("ours")}
    for i, (name, n, _, run) in enumerate(built):
        rel = f"{medians[i] / ours[n]:>8.2f}" if n in ours else f"{'':>8}"
        diff = f"{float((outputs[id(built[i][2])] - ours_out[n]).abs().max()):>18.1e}" if n in ours else ""
        print(f"{name:<34}{n:>5}{medians[i]:>9.3f}{medians[i] / medians[0]:>12.2f}{rel}{diff}")
        sys.stdout.flush()


def bench_dci(args) -> None:
    import_comfy(cpu=not args.gpu, pytorch_attention=True)
    import comfy.model_management
    import comfy.samplers

    from .demo import tiny_models
    from .nodes.dci import in_window
    from .nodes.dci_nodes import DCIDualBranch, DCIGuiderNode

    device = comfy.model_management.get_torch_device()
    torch.set_grad_enabled(False)
    family = args.family
    model = tiny_models.build_model(family, seed=0, width=args.width)
    prompt, negative = "a photo of a V* dog in times square", tiny_models.encode_text(family, "")
    lat, channels = args.size // 8, tiny_models.LATENT_CHANNELS[family]
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "ddim_uniform" if family != "flux" else "simple",
                                             args.steps).cpu()

    def seconds(guider) -> float:
        noise = torch.randn(1, channels, lat, lat, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                      disable_pbar=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    plain = comfy.samplers.CFGGuider(model)
    plain.set_conds(tiny_models.encode_text(family, prompt), negative)
    plain.set_cfg(6.0)
    guiders = [("plain CFG", None, plain)]
    for window in args.windows:
        patched, p, aux = DCIDualBranch.execute(model, prompt, "V* dog", "dog", 1.0, window).args
        guiders.append((f"DCI window {window:g}", window, DCIGuiderNode.execute(
            patched, tiny_models.encode_text(family, p), tiny_models.encode_text(family, aux), negative, 6.0).args[0]))
    for _, _, guider in guiders:
        seconds(guider)  # warm-up
    times = {name: [] for name, _, _ in guiders}
    for _ in range(args.repeats):
        for name, _, guider in guiders:
            times[name].append(seconds(guider))
    base = statistics.median(times["plain CFG"])
    print(f"DCI benchmark: tiny {family} width {args.width}, {args.size}x{args.size} px, {args.steps} steps, one "
          f"image, device {device}, median of {args.repeats}")
    print(f"{'sampling':<20}{'aux passes':>11}{'seconds':>9}{'x plain':>9}{'predicted':>11}")
    for name, window, _ in guiders:
        inside = 0 if window is None else sum(in_window(sampling, float(s), window) for s in sigmas[:-1])
        median = statistics.median(times[name])
        print(f"{name:<20}{inside:>11}{median:>9.3f}{median / base:>9.2f}{1 + inside / (2 * args.steps):>11.2f}")
        sys.stdout.flush()


def bench_sets(args) -> None:
    """Per-step cost of a consistent set (N new images sharing attention + R references) over plain CFG sampling
    of N images: normalized guider (3 branches: uncond sees neither, image and full see both) + one reference
    pass of T·R rows per step."""
    import_comfy(cpu=not args.gpu, pytorch_attention=True)
    import comfy.model_management
    import comfy.samplers

    from .demo import tiny_models
    from .nodes.guiders import NormalizedGuider
    from .nodes.reference_injection import ReferenceConfig, apply_reference_injection
    from .nodes.reference_nodes import encode_references
    from .nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    device = comfy.model_management.get_torch_device()
    torch.set_grad_enabled(False)
    family, n, r, f = args.family, args.images, args.references, args.fraction
    model = tiny_models.build_model(family, seed=0, width=args.width)
    vae = tiny_models.build_vae(family, seed=0)
    pos, neg = tiny_models.encode_text(family, "a photo of a dog"), tiny_models.encode_text(family, "")
    lat, channels = args.size // 8, tiny_models.LATENT_CHANNELS[family]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", args.steps).cpu()
    rows = round(args.size * f)

    def masks(count):
        m = torch.zeros(count, args.size, args.size)
        m[:, :rows] = 1  # the top f of the rows: exact on every token grid
        return m

    def with_sharing(m):
        config = SharedAttentionConfig(n, "foreground_masks", 1e9, 0.0, unmasked_first_step=False,
                                       foreground_masks=masks(n), mask_dilation=1)
        return apply_shared_attention(m, config)[0]

    runs = []

    def with_references(m):
        images = torch.rand(r, args.size, args.size, 3, generator=torch.Generator().manual_seed(1))
        refs = encode_references(vae, images, masks(r), mask_dilation=1)
        patched, run = apply_reference_injection(m, ReferenceConfig(refs, pos, "auto", 0, 1e9, 0.0))
        runs.append(run)
        return patched

    def cfg(m):
        g = comfy.samplers.CFGGuider(m)
        g.set_conds(pos, neg)
        g.set_cfg(5.0)
        return g

    def normalized(m):
        g = NormalizedGuider(m, 7.5, 8.0, 13.0)
        g.set_conds(pos, neg)
        return g

    def per_step(guider, timed=None) -> tuple[float, float]:
        noise = torch.randn(n, channels, lat, lat, generator=torch.Generator().manual_seed(0))
        timer = AttentionTimer(device)
        if timed is not None:
            guider = cfg(timer.install(timed))
        start = time.perf_counter()
        guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                      disable_pbar=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps, timer.seconds / args.steps

    setups = [("plain CFG (2 evaluations)", cfg(model)),
              ("normalized guider (3)", normalized(model)),
              (f"+ sharing N={n}", normalized(with_sharing(model))),
              (f"+ references R={r}", normalized(with_references(model))),
              ("set: sharing + references", normalized(with_sharing(with_references(model))))]
    per_step(setups[0][1], timed=model)  # warm-up
    for _, guider in setups:
        per_step(guider)
    times = {name: [] for name, _ in setups}
    attention = []
    for _ in range(args.repeats):  # alternate so drift hits every setup alike
        step, attn = per_step(None, timed=model)
        attention.append(attn / step)
        for name, guider in setups:
            times[name].append(per_step(guider)[0])
    s = statistics.median(attention)
    texts = len(runs[-1].texts)
    k = 1 + (n - 1) * f + r * f
    predicted = {"plain CFG (2 evaluations)": 1.0, "normalized guider (3)": 1.5,
                 f"+ sharing N={n}": (n * (1 + 2 * (1 + s * (n - 1) * f))) / (2 * n),
                 f"+ references R={r}": (n * (1 + 2 * (1 + s * r * f)) + texts * r) / (2 * n),
                 "set: sharing + references": (n * (3 + 2 * s * (k - 1)) + texts * r) / (2 * n)}
    base = statistics.median(times[setups[0][0]])
    print(f"Consistent-set benchmark: tiny {family} width {args.width}, {args.size}x{args.size} px, {args.steps} "
          f"euler steps, N = {n} images per set, R = {r} references, foreground fraction f = {f:g} (targets and "
          f"references, undilated), device {device}, median of {args.repeats}")
    print(f"self-attention share of plain CFG sampling s = {s:.3f}; reference pass: T = {texts} texts x R = {r} "
          f"rows per step; key growth of the sharing branches k = 1 + (N-1)f + Rf = {k:.2f}")
    print(f"{'sampling':<30}{'s/step':>9}{'x plain':>9}{'predicted':>11}")
    for name, _ in setups:
        median = statistics.median(times[name])
        print(f"{name:<30}{median:>9.3f}{median / base:>9.2f}{predicted[name]:>11.2f}")
        sys.stdout.flush()


def _one_pass_per_branch(run):
    """``ReferenceRun.ensure_features`` as upstream schedules it: a pass of R rows for each of the three branches
    (unconditional and image with the text-free text, full with the reference prompt); the features are then
    merged so the target pass sees exactly what ours computes in one batched pass."""
    from .nodes.patch_kit import NEGATIVE_TEXT as NEGATIVE, REFERENCE_TEXT as REFERENCE

    once = run.ensure_features

    def every_branch(executor, base_model, x, sigma, to, state, texts):
        if (state.step, float(sigma[0])) == run.key:
            return
        features = {}
        for text in (NEGATIVE, NEGATIVE, REFERENCE):  # uncond, image, full
            run.key = None
            once(executor, base_model, x, sigma, to, state, (text,))
            features[text] = (dict(run.features), dict(run.grids), dict(run.outputs))
        run.texts = tuple(t for t in (REFERENCE, NEGATIVE) if t in texts)
        run.features = {layer: _cat([features[t][0][layer] for t in run.texts]) for layer in features[REFERENCE][0]}
        run.grids, run.tokens = features[REFERENCE][1], {}
        run.outputs = {t: features[t][2][t] for t in run.texts}
        del run.passes[-2:]  # count the step once, as ours
    return every_branch


def _cat(parts):
    if isinstance(parts[0], tuple):  # Flux: (keys, values)
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def _guided(make_guider, patched_and_run):
    m, run = patched_and_run
    return make_guider(m), run


def bench_training(args) -> None:
    import types

    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from .training import syncd

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w, lat, r = args.width, args.size // 8, args.references
    # SD1.5's UNet layout (3 cross-attention levels + 1 plain, 2 layers per block, 8 heads, 768-wide text) at width w
    unet = UNet2DConditionModel(sample_size=lat, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(w, 2 * w, 4 * w, 4 * w),
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                cross_attention_dim=768, attention_head_dim=8)
    state = syncd.PassState()
    syncd.install_processors(unet, state, (lat, lat))   # the training's own attn1 (MSA) / attn2 (IP) processors
    syncd.add_lora(unet, args.rank, float(args.rank))    # peft LoRA on attn1 q/k/v/out.0, as training
    for name, p in unet.named_parameters():
        p.requires_grad_(".lora_" in name or "_ip." in name)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="v_prediction",
                              rescale_betas_zero_snr=True)
    model = syncd.SyncdModel(types.SimpleNamespace(unet=unet, family="sd15"), None, None, state, scheduler, 224)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-6, weight_decay=0.01)

    n = 1 + r  # rows: the target, then its references (SyncdModel.forward's layout)
    gen = torch.Generator().manual_seed(1)
    masks = torch.zeros(n, lat, lat)
    masks[:, :round(lat * args.fraction)] = 1.0
    inputs = {"latents": torch.randn(n, 4, lat, lat, generator=gen),
              "noise": torch.randn(n, 4, lat, lat, generator=gen), "timesteps": torch.tensor([500]),
              "context": torch.randn(n, 77, 768, generator=gen),
              "pooled": None, "time_ids": None, "ip_tokens": torch.randn(n, 16, 768, generator=gen), "masks": masks}
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    inputs["n"] = n
    target = torch.arange(n, device=device) % n == 0
    refs = ~target
    t = inputs["timesteps"].repeat_interleave(n)
    noisy = scheduler.add_noise(inputs["latents"], inputs["noise"], t)
    velocity = scheduler.get_velocity(inputs["latents"], inputs["noise"], t)[target]
    ref_args = (noisy[refs], t[refs], inputs["context"][refs], None, None, inputs["ip_tokens"][refs])
    cached = {k: v.clone() for k, v in model.reference_pass(*ref_args).items()}  # for "MSA only"

    def target_loss(mode: str, captured: dict):
        """The target half of SyncdModel.forward: plain attention, or MSA over ``captured``."""
        state.mode, state.ip_tokens, state.captured = mode, inputs["ip_tokens"][target], captured
        state.ref_masks, state.refs_per_row = inputs["masks"][refs], r
        try:
            pred = model._unet(noisy[target], t[target], inputs["context"][target], None, None)
        finally:
            state.mode, state.captured, state.ip_tokens, state.ref_masks = "plain", {}, None, None
        return F.mse_loss(pred.float(), velocity.float())

    def plain():
        return target_loss("plain", {})

    def msa_only():
        return target_loss("shared", cached)

    def reference_only():
        model.reference_pass(*ref_args)
        return target_loss("plain", {})

    def full():
        return model(**inputs)  # the training step's forward: reference pass (LoRA off) + MSA target pass

    variants = [("plain LoRA step (target only)", plain), ("+ MSA only (cached reference features)", msa_only),
                ("+ reference pass only (no MSA)", reference_only), ("full SynCD step (reference pass + MSA)", full)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def seconds(loss_fn) -> tuple[float, float]:
        """(wall, process CPU) seconds of one optimizer step."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start

    total = sum(p.numel() for p in unet.parameters())
    print(f"SynCD training-step benchmark: SD1.5-layout UNet at width {w} ({total / 1e6:.1f} M parameters, "
          f"{sum(p.numel() for p in params) / 1e6:.2f} M trained: LoRA r{args.rank} on attn1 + to_k_ip/to_v_ip), "
          f"{args.size}x{args.size} px ({lat}x{lat} latent), {r} references with foreground fraction "
          f"{args.fraction:g}, IP-Adapter tokens in every variant, AdamW, {args.dtype}, device {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} alternating runs")
    for _, fn in variants:
        seconds(fn)  # warm-up
    times = {name: [] for name, _ in variants}
    for _ in range(args.repeats):
        for name, fn in variants:
            times[name].append(seconds(fn))
    wall = {name: statistics.median(v[0] for v in runs) for name, runs in times.items()}
    cpu = {name: statistics.median(v[1] for v in runs) for name, runs in times.items()}
    names = [name for name, _ in variants]

    def parts(m):  # plain + what MSA adds + what the reference pass adds
        return m[names[0]] + (m[names[1]] - m[names[0]]) + (m[names[2]] - m[names[0]])
    print(f"{'variant':<42}{'wall s/step':>12}{'x plain':>9}{'CPU s/step':>12}{'x plain':>9}")
    for name in names + ["(plain + MSA cost + reference-pass cost)"]:
        w_s, c_s = (wall[name], cpu[name]) if name in wall else (parts(wall), parts(cpu))
        print(f"{name:<42}{w_s:>12.3f}{w_s / wall[names[0]]:>9.2f}{c_s:>12.3f}{c_s / cpu[names[0]]:>9.2f}")
    sys.stdout.flush()


def bench_datagen(args) -> None:
    """Images per minute of SynCD data generation (MSA, + feature warp) over plain batched generation."""
    import_comfy(cpu=not args.gpu, pytorch_attention=True)
    import comfy.model_management
    import comfy.samplers

    from .core.tokens import subject_token_positions
    from .demo import tiny_models
    from .nodes.feature_warp import SynCDFeatureWarp
    from .nodes.mesh_views import SynCDMeshViews
    from .nodes.shared_attention import SharedAttentionConfig, apply_shared_attention

    device = comfy.model_management.get_torch_device()
    torch.set_grad_enabled(False)
    n, lat = 3, args.size // 8
    model = tiny_models.build_model("flux", seed=0, width=args.width, std=0.3)
    prompt = "a photo of a dog on a beach"
    positive, negative = tiny_models.encode_text("flux", prompt), tiny_models.encode_text("flux", "")
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", args.steps).cpu()
    tokens = subject_token_positions(tiny_models.token_ids, prompt, "dog")
    automatic = apply_shared_attention(model, SharedAttentionConfig(n, "automatic", 1e9, 0.0, subject_tokens=tokens))[0]
    mesh = SynCDMeshViews.execute("pack/mug.glb", "random", 20, 0, "", "", 2.0, 39.6, args.size, args.size, 128,
                                  0.01, 0.1, 0, 0.0, 60.0, True).args
    masks, correspondences = mesh[1], mesh[2]
    rigid = apply_shared_attention(model, SharedAttentionConfig(n, "foreground_masks", 1e9, 0.0,
                                                                foreground_masks=masks))[0]
    warped = SynCDFeatureWarp.execute(rigid, correspondences, n, 0.8, 1.0, "bicubic", True, "noisy_latents",
                                      -1).args[0]

    def guider(m, cfg):
        g = comfy.samplers.CFGGuider(m)
        g.set_conds(positive, negative)
        g.set_cfg(cfg)
        return g

    runs = [("deformable: plain batch (cfg 1)", guider(model, 1.0)),
            ("deformable: MSA automatic masks", guider(automatic, 1.0)),
            ("rigid: plain batch (true CFG 2.5)", guider(model, 2.5)),
            ("rigid: MSA masks", guider(rigid, 2.5)),
            ("rigid: MSA masks + feature warp", guider(warped, 2.5))]

    def measure(g) -> tuple[float, int]:
        noise = torch.randn(n, 16, lat, lat, generator=torch.Generator().manual_seed(0))
        _reset_peak(device)
        start = time.perf_counter()
        g.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                 disable_pbar=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, _peak_bytes(device)

    for _, g in runs:
        measure(g)  # warm-up
    times = {name: [] for name, _ in runs}
    peaks = {name: 0 for name, _ in runs}
    for _ in range(args.repeats):
        for name, g in runs:
            seconds, peak = measure(g)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
    print(f"data generation benchmark: tiny Flux width {args.width} (std 0.3), {n} images of one object at "
          f"{args.size}x{args.size} px, {args.steps} steps euler, device {device}, median of {args.repeats}")
    print(f"{'generation':<36}{'s/set':>8}{'images/min':>12}{'x plain':>9}{'peak MB':>9}")
    for k, (name, _) in enumerate(runs):  # "x plain": throughput over its kind's plain batch
        median = statistics.median(times[name])
        plain = statistics.median(times[runs[0 if k < 2 else 2][0]])
        print(f"{name:<36}{median:>8.2f}{n * 60 / median:>12.1f}{plain / median:>9.2f}{peaks[name] / 2**20:>9.0f}")
        sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfyui_syncd.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    sa = sub.add_parser("shared-attention", help="SynCDSharedAttention cost over plain sampling")
    sa.add_argument("--width", type=int, default=64, help="UNet model_channels (multiple of 32)")
    sa.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8)")
    sa.add_argument("--steps", type=int, default=3)
    sa.add_argument("--repeats", type=int, default=3)
    sa.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    sa.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 1.0])
    sa.add_argument("--implementations", type=lambda s: s.split(","), default=["efficient", "reference"])
    sa.add_argument("--gpu", action="store_true", help="run on the GPU (default: CPU)")
    cu = sub.add_parser("customization", help="SynCD customization sampling cost per step")
    cu.add_argument("--family", choices=["sd15", "sdxl", "flux"], default="sd15")
    cu.add_argument("--width", type=int, default=64, help="model width (UNet model_channels / Flux hidden size)")
    cu.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8)")
    cu.add_argument("--steps", type=int, default=4)
    cu.add_argument("--repeats", type=int, default=3)
    cu.add_argument("--references", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3])
    cu.add_argument("--gpu", action="store_true", help="run on the GPU (default: CPU)")
    dc = sub.add_parser("dci", help="DCI dual-branch sampling cost over plain sampling")
    dc.add_argument("--family", choices=["sd15", "sdxl", "flux"], default="sd15")
    dc.add_argument("--width", type=int, default=64, help="model width (UNet model_channels / Flux hidden size)")
    dc.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8)")
    dc.add_argument("--steps", type=int, default=20)
    dc.add_argument("--repeats", type=int, default=3)
    dc.add_argument("--windows", type=lambda s: [float(x) for x in s.split(",")], default=[0.15, 0.3])
    dc.add_argument("--gpu", action="store_true", help="run on the GPU (default: CPU)")
    se = sub.add_parser("sets", help="consistent set (N images sharing + R references) cost over plain sampling")
    se.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    se.add_argument("--width", type=int, default=64, help="UNet model_channels (multiple of 32)")
    se.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8)")
    se.add_argument("--steps", type=int, default=4)
    se.add_argument("--repeats", type=int, default=3)
    se.add_argument("--images", type=int, default=4, help="N: new images of the set")
    se.add_argument("--references", type=int, default=2, help="R: reference images")
    se.add_argument("--fraction", type=float, default=0.5, help="foreground fraction of every mask")
    se.add_argument("--gpu", action="store_true", help="run on the GPU (default: CPU)")
    tr = sub.add_parser("training", help="SynCD training step cost over a plain LoRA step")
    tr.add_argument("--width", type=int, default=64, help="UNet model_channels (multiple of 32; SD1.5: 320)")
    tr.add_argument("--size", type=int, default=256, help="training resolution in pixels (latent = size/8)")
    tr.add_argument("--references", type=int, default=2, help="references per target (upstream: 2)")
    tr.add_argument("--fraction", type=float, default=0.5, help="foreground fraction of the reference masks")
    tr.add_argument("--rank", type=int, default=128, help="LoRA rank (upstream: 128, alpha = rank)")
    tr.add_argument("--repeats", type=int, default=5)
    tr.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (upstream trains bf16)")
    tr.add_argument("--device", default="cpu", help="cpu or cuda")
    tr.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 on a busy CPU)")
    dg = sub.add_parser("datagen", help="data generation images/min with MSA (+ warp) over plain batched generation")
    dg.add_argument("--width", type=int, default=64, help="Flux hidden size (multiple of 16)")
    dg.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8)")
    dg.add_argument("--steps", type=int, default=8)
    dg.add_argument("--repeats", type=int, default=3)
    dg.add_argument("--gpu", action="store_true", help="run on the GPU (default: CPU)")
    args = parser.parse_args(argv)
    if args.bench == "dci":
        bench_dci(args)
    elif args.bench == "shared-attention":
        bench_shared_attention(args)
    elif args.bench == "customization":
        bench_customization(args)
    elif args.bench == "sets":
        bench_sets(args)
    elif args.bench == "training":
        bench_training(args)
    elif args.bench == "datagen":
        bench_datagen(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

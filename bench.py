"""Benchmarks that print figures (never run as tests).

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
    args = parser.parse_args(argv)
    if args.bench == "dci":
        bench_dci(args)
    elif args.bench == "shared-attention":
        bench_shared_attention(args)
    elif args.bench == "customization":
        bench_customization(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

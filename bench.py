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
        from .nodes.shared_attention import unet_attention_blocks

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

    from .nodes import tiny_models
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
          f"cfg 5 (cond+uncond in one pass), device {device}, median of {args.repeats}")
    print(f"{'impl':<10}{'N':>3}{'f':>6}{'t_base s':>10}{'t_patch s':>10}{'ratio':>7}"
          f"{'attn ratio':>11}{'FLOP pred':>10}{'meas/pred':>10}{'extra peak MB':>14}")
    sample(model, 1)  # warm-up
    for impl in args.implementations:
        for f in args.fractions:
            for n in args.sizes:
                masks = torch.zeros(n, args.size, args.size)
                masks[:, :round(args.size * f)] = 1.0  # the top f of the rows: exact on every token grid
                config = SharedAttentionConfig(n, "foreground_masks", 1e9, 0.0, unmasked_first_step=False,
                                               implementation=impl, foreground_masks=masks)
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
    args = parser.parse_args(argv)
    if args.bench == "shared-attention":
        bench_shared_attention(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Qwen-Image: SynCD's reference pass vs Qwen-Image-Edit's own reference input, on a tiny real Qwen-Image.

``python -m comfyui_syncd.demo.qwen_edit_comparison [--size 256] [--references 1] [--steps 4] [--repeats 3]``

Prints, per sampling step of a CFG run (cond + uncond), the forward passes, the tokens each joint attention
sees and the wall time of both mechanisms on ComfyUI's own classes:

* **Edit** (``TextEncodeQwenImageEditPlus``): the references' latents ride as ``reference_latents`` in both
  conditionings, so every branch's forward carries [text ‖ target ‖ all references] (ComfyUI ``ref_latents``,
  RoPE index 1, 2, …); the references are re-computed in every branch and every step, and attend to the target.
* **SynCD Apply References**: one reference pass per step over the clean references (shared by the branches),
  then the target's joint attention gets the references' (foreground) keys/values beside it.

Weights are random: the figures are costs, not quality. What each needs is in the module's printout.
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--references", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=64, help="tiny model width (heads × 16)")
    args = parser.parse_args(argv)

    from ..comfy_inprocess import import_comfy

    import_comfy(cpu=True)
    import torch

    import comfy.sample
    import node_helpers

    from ..nodes.reference_injection import ReferenceConfig, apply_reference_injection
    from ..nodes.reference_nodes import encode_references
    from . import tiny_models

    torch.manual_seed(0)
    model = tiny_models.build_model("qwen_image", seed=3, width=args.width, std=0.3)
    vae = tiny_models.build_vae("qwen_image", seed=1)
    images = torch.rand(args.references, args.size, args.size, 3, generator=torch.Generator().manual_seed(0))
    refs = encode_references(vae, images)
    pos = tiny_models.encode_text("qwen_image", "a photo of a dog on the beach")
    neg = tiny_models.encode_text("qwen_image", " ")
    latent = args.size // 8
    noise = torch.randn(1, 16, 1, latent, latent, generator=torch.Generator().manual_seed(0))

    calls = []

    def counting(m):
        m = m.clone()

        def wrapper(apply_model, a):
            calls.append((a["input"].shape[0], len(a["c"].get("ref_latents") or [])))
            return apply_model(a["input"], a["timestep"], **a["c"])
        m.set_model_unet_function_wrapper(wrapper)
        return m

    def timed(m, p, n):
        best = float("inf")
        comfy.sample.sample(m, noise, 1, 2.5, "euler", "simple", p, n, torch.zeros_like(noise), seed=0,
                            disable_pbar=True)  # warm-up: first-call costs would otherwise dominate a tiny model
        for _ in range(args.repeats):
            calls.clear()
            start = time.perf_counter()
            comfy.sample.sample(m, noise, args.steps, 2.5, "euler", "simple", p, n, torch.zeros_like(noise),
                                seed=0, disable_pbar=True)
            best = min(best, time.perf_counter() - start)
        return best / args.steps, list(calls)

    ref_latents = [refs.latents[i:i + 1] for i in range(args.references)]
    edit_pos = node_helpers.conditioning_set_values(pos, {"reference_latents": ref_latents}, append=True)
    edit_neg = node_helpers.conditioning_set_values(neg, {"reference_latents": ref_latents}, append=True)
    sampling = model.get_model_object("model_sampling")
    patched, run = apply_reference_injection(model, ReferenceConfig(
        refs, tiny_models.encode_text("qwen_image", "photo of a dog"), "auto", 0, sampling.percent_to_sigma(0.0),
        sampling.percent_to_sigma(1.0)))

    grid = (latent // 2) ** 2
    n_text = pos[0][0].shape[1]
    plain_t, plain_calls = timed(counting(model), pos, neg)
    edit_t, edit_calls = timed(counting(model), edit_pos, edit_neg)
    syncd_t, syncd_calls = timed(counting(patched), pos, neg)
    r = args.references
    print(f"tiny Qwen-Image width {args.width}, {args.size}² px ({grid} image tokens), {r} reference(s), "
          f"{args.steps} steps, CFG (cond + uncond), CPU; best of {args.repeats}")
    print(f"{'mechanism':<28}{'s/step':>8}{'× plain':>9}  forward calls/step (rows, ref_latents)  keys/query")
    for name, t, seen, keys in (
            ("plain", plain_t, plain_calls, f"{n_text + grid}"),
            ("Edit: reference_latents", edit_t, edit_calls, f"{n_text + grid * (1 + r)}"),
            ("SynCD Apply References", syncd_t, syncd_calls, f"{n_text + grid} + {r * grid} (target image rows)")):
        per_step = seen[:len(seen) // args.steps] if seen else []
        print(f"{name:<28}{t:>8.3f}{t / plain_t:>9.2f}  {per_step} (+1 reference pass of {r} row(s))"
              if name.startswith("SynCD") else f"{name:<28}{t:>8.3f}{t / plain_t:>9.2f}  {per_step}", f"  {keys}")
    print(f"SynCD reference passes in the last run, by step: {run.passes}")
    # Work per step that grows with the image, counted in image-token rows through the blocks (projections + MLP)
    # and attention scores (queries × keys), text tokens aside; P image tokens, R references.
    p_tok = grid
    figures = {
        "Edit, CFG (both branches carry the references)": (2 * p_tok * (1 + r), 2 * (p_tok * (1 + r)) ** 2),
        "SynCD, CFG (one reference pass)": (2 * p_tok + r * p_tok, 2 * p_tok * (p_tok + r * p_tok) + r * p_tok ** 2),
        # uncond sees no references; Qwen-Image's reference and negative texts differ in length: two batches
        "SynCD, normalized guider (3 branches)": (3 * p_tok + 2 * r * p_tok,
                                                  p_tok ** 2 + 2 * p_tok * (p_tok + r * p_tok) + 2 * r * p_tok ** 2),
    }
    print(f"per step, relative to plain CFG ({2 * p_tok} rows, {2 * p_tok ** 2} scores):")
    for name, (rows, scores) in figures.items():
        print(f"  {name:<50} rows ×{rows / (2 * p_tok):.2f}  attention scores ×{scores / (2 * p_tok ** 2):.2f}")

if __name__ == "__main__":
    main()

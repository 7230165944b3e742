"""The toy world (issue 13 §1): procedural 64 px objects with exact masks and captions, multi-view sets of one
identity, and a tiny attribute reader that stands in for DINOv2/CLIP scores on a CPU.

* :mod:`.scene` — vocabularies, scene sampling, captions and the renderer (shaded 3D solids, sphere-traced);
* :mod:`.views` — identities and multi-view sets (same object, different pose);
* :mod:`.reader` — the attribute reader (small CNN), its training, held-out evaluation and ``read``.

Pure numpy/PIL/torch: no ComfyUI, no diffusers.
"""

"""Training scripts (diffusers + accelerate; no ComfyUI import), producing files ComfyUI loads on its own.

- ``ico``: ICO fine-tuning (DCI/ICO), ``python -m comfyui_syncd.training.ico --config CONFIG``
  (example configs in ``configs/``).

Shared pieces for the training scripts:

- ``config``: YAML/TOML into dataclasses (defaults documented there; unknown keys are errors naming the key)
- ``models``: SD1.5/SDXL from a single file or a diffusers folder; text conditioning from input embeddings; sampling
- ``data``: image folders with captions and masks; crops, flips; a resumable batch stream
- ``loop``: the prepared run, resume, the micro-batch stream, the step loop (loss log, progress, checkpoints,
  exports) and the command line the scripts share
- ``checkpoints``: resumable accelerate checkpoints of the trained tensors; ComfyUI exports (textual-inversion
  embeddings, weight differences for LoraLoaderModelOnly)
"""

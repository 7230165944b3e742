"""The tiny demo models and their nodes (category SynCD/testing): real ComfyUI architectures at tiny width with seeded
random weights, so workflows and tests run on any machine. No production module imports this package."""

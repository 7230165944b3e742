"""The papers' math in plain torch: no ComfyUI or diffusers import here."""

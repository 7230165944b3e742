"""The formats and math that need no ComfyUI: subject-token location, the IP-Adapter Plus model, weight reading and
the official SynCD checkpoint keys. Plain torch/python; importable by the ComfyUI nodes, training and datagen."""

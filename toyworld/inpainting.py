"""JeDi personalization as inpainting in the toy world: the shipped ``jedi_inpainting_sd15.json`` on the toy base
model, without any JeDi fine-tuning (issue 13 §3: a reference object carried into a new scene).

The workflow batches the references with the image to generate (JeDi Joint Image Set: the replacement trick keeps
the references at their forward-diffused values) and couples their self-attention (SynCD Masked Shared Attention
over the set). Per evaluation case (:func:`customization.eval_cases`) the two Load Image nodes become views of the
case's identity (SynCD Toy-World References, :func:`~comfyui_syncd.client.toy_swap.toy_swap`), the prompt is the
case's, and the generated image is read by the attribute reader, once per :data:`CONDITIONS` entry with the same
seeds: coupled as shipped, and uncoupled (each image attends only to itself, i.e. the text alone).
"""

from __future__ import annotations

import copy

WORKFLOW = "jedi_inpainting_sd15.json"
CONDITIONS = {  # name -> (images_per_subject, what it is)
    "coupled": (3, "the references and the new image share self-attention (the shipped workflow)"),
    "uncoupled": (1, "each image attends only to itself: the new image follows the text alone"),
}


def case_graph(api: dict, shape: str, colour: str, texture: str, prompt: str, seed: int,
               images_per_subject: int) -> dict:
    """The toy-swapped API graph for one case: its identity's views as references, its prompt, ``seed``."""
    graph = copy.deepcopy(api)
    for node in graph.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "SynCDToyWorldReferences":
            inputs.update(shape=shape, colour=colour, texture=texture, seed=seed)
        elif kind == "CLIPTextEncode" and inputs.get("text"):  # the positive prompt (the negative is empty)
            inputs["text"] = prompt
        elif kind == "RandomNoise":
            inputs["noise_seed"] = seed
        elif kind == "SynCDSharedAttention":
            inputs["images_per_subject"] = images_per_subject
    return graph

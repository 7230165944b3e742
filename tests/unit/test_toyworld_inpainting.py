"""toyworld/inpainting.py: one evaluation case written into the toy-swapped JeDi inpainting graph."""

from __future__ import annotations

import pytest

from comfyui_syncd.toyworld import inpainting as J

pytestmark = pytest.mark.unit

API = {
    "2": {"class_type": "SynCDToyWorldReferences", "inputs": {"shape": "cube", "colour": "red", "texture": "plain",
                                                             "views": 2, "index": 0, "size": 128, "seed": 0}},
    "3": {"class_type": "SynCDToyWorldReferences", "inputs": {"shape": "cube", "colour": "red", "texture": "plain",
                                                             "views": 2, "index": 1, "size": 128, "seed": 0}},
    "12": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a corgi dog on the beach", "clip": ["1", 1]}},
    "13": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "14": {"class_type": "SynCDSharedAttention", "inputs": {"images_per_subject": 3, "model": ["1", 0]}},
    "16": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
}


def test_case_graph_sets_the_identity_prompt_seed_and_coupling():
    graph = J.case_graph(API, "cone", "blue", "striped", "a cone on grass, on the left", 7, 1)
    for k in ("2", "3"):
        assert graph[k]["inputs"] == {**API[k]["inputs"], "shape": "cone", "colour": "blue", "texture": "striped",
                                      "seed": 7}
    assert graph["12"]["inputs"]["text"] == "a cone on grass, on the left"
    assert graph["13"]["inputs"]["text"] == ""  # the negative stays empty
    assert graph["16"]["inputs"]["noise_seed"] == 7 and graph["14"]["inputs"]["images_per_subject"] == 1
    assert API["2"]["inputs"]["shape"] == "cube" and API["14"]["inputs"]["images_per_subject"] == 3  # not modified
    assert set(J.CONDITIONS) == {"coupled", "uncoupled"} and J.CONDITIONS["coupled"][0] == 3

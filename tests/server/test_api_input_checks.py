"""Over the HTTP API, a pack node's unknown combo value is refused when the prompt is queued (ComfyUI 0.3.64 does
not check V3 combos itself), with the node, input, value and options; ComfyUI's own range checks stay."""

from __future__ import annotations

import pytest

from comfyui_syncd.client.api import PromptValidationError


def coupled_graph(**shared):
    return {
        "1": {"class_type": "SynCDTinyDemoModel", "inputs": {"family": "sd15", "seed": 0, "width": 32}},
        "2": {"class_type": "SynCDTinyDemoTextEncode", "inputs": {"family": "sd15", "text": "a dog", "seed": 0}},
        "3": {"class_type": "SynCDTinyDemoTextEncode", "inputs": {"family": "sd15", "text": "", "seed": 0}},
        "4": {"class_type": "SynCDSharedAttention", "inputs": {
            "model": ["1", 0], "images_per_subject": 2, "mask_mode": "none", "start_percent": 0.0,
            "end_percent": 1.0, "unmasked_first_step": True, "blocks": "all", **shared}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "6": {"class_type": "KSampler", "inputs": {
            "seed": 1, "steps": 1, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}},
    }


@pytest.mark.parametrize("inputs,message", [
    ({"mask_mode": "foo"}, "SynCD Masked Shared Attention: mask_mode 'foo' is not an option; choose one of: "
                           "foreground_masks, none, automatic"),
    ({"attention_implementation": "foo"}, "attention_implementation 'foo' is not an option; choose one of: "
                                          "efficient, reference"),
    ({"flux_rope_layout": "foo"}, "flux_rope_layout 'foo' is not an option; choose one of: stacked, shared"),
])
def test_unknown_combo_value_is_refused_at_queue_time(comfy_client, inputs, message):
    with pytest.raises(PromptValidationError) as refused:
        comfy_client.queue_prompt(coupled_graph(**inputs))
    errors = refused.value.node_errors["4"]
    assert errors["class_type"] == "SynCDSharedAttention"
    assert any(message in e.get("details", "") for e in errors["errors"]), errors


def test_valid_combos_run_and_ranges_stay_checked_by_comfyui(comfy_client):
    result = comfy_client.run(coupled_graph(attention_implementation="reference"), timeout=120)
    assert result.history["status"]["status_str"] == "success"
    with pytest.raises(PromptValidationError, match="images_per_subject"):  # min=1, ComfyUI's own check
        comfy_client.queue_prompt(coupled_graph(images_per_subject=0))

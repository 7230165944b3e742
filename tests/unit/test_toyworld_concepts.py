"""``toyworld/concepts.py``: the concept prompt, the one-branch DCI graph with the concept's LoRA, and the check
that ComfyUI found the concept embeddings."""

from __future__ import annotations

import pytest

from comfyui_syncd.toyworld import concepts as D

pytestmark = pytest.mark.unit


def sweep_api() -> dict:
    """The toy-swapped shipped λ sweep in API format, as ``to_api`` writes it (three λ branches, weight maps)."""
    g = {"1": ("SynCDToyWorldModel", {"model_file": "toy_sd15.safetensors"}),
         "2": ("PrimitiveStringMultiline", {"value": "a photo of a V* dog in times square"}),
         "6": ("CLIPTextEncode", {"text": ["3", 1], "clip": ["1", 1]}),
         "7": ("CLIPTextEncode", {"text": ["3", 2], "clip": ["1", 1]}),
         "8": ("CLIPTextEncode", {"text": "", "clip": ["1", 1]}),
         "9": ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
         "10": ("RandomNoise", {"noise_seed": 0}),
         "11": ("KSamplerSelect", {"sampler_name": "ddpm"}),
         "12": ("BasicScheduler", {"scheduler": "ddim_uniform", "steps": 200, "denoise": 1.0, "model": ["1", 0]}),
         "25": ("DCIWeightMaps", {"scale": 8, "guider": ["17", 0], "samples": ["18", 0]}),
         "26": ("MaskToImage", {"mask": ["25", 0]}),
         "27": ("SaveImage", {"filename_prefix": "dci_weight_maps", "images": ["26", 0]})}
    for k, strength in enumerate((-2.0, 0.0, 2.0)):
        dual, guider, sample, decode, save = (str(n) for n in (3 + k, 13 + 4 * k, 14 + 4 * k, 15 + 4 * k, 16 + 4 * k))
        g[dual] = ("DCIDualBranch", {"prompt": ["2", 0], "concept": "V* dog", "auxiliary_noun": "dog",
                                     "strength": strength, "window": 0.3, "model": ["1", 0], "clip": ["1", 1]})
        g[guider] = ("DCIGuider", {"cfg": 6.0, "model": [dual, 0], "positive": ["6", 0], "auxiliary": ["7", 0],
                                   "negative": ["8", 0]})
        g[sample] = ("SamplerCustomAdvanced", {"noise": ["10", 0], "guider": [guider, 0], "sampler": ["11", 0],
                                               "sigmas": ["12", 0], "latent_image": ["9", 0]})
        g[decode] = ("VAEDecode", {"samples": [sample, 0], "vae": ["1", 2]})
        g[save] = ("SaveImage", {"filename_prefix": f"dci_lambda_{strength:g}", "images": [decode, 0]})
    return {k: {"class_type": kind, "inputs": inputs} for k, (kind, inputs) in g.items()}


def test_concept_prompt_puts_the_embedding_before_the_shape():
    text, concept = D.concept_prompt("an ellipsoid on grass, on the left", "ellipsoid", "toy_case03_1ref")
    assert text == "an embedding:toy_case03_1ref ellipsoid on grass, on the left"
    assert concept == "embedding:toy_case03_1ref ellipsoid"
    with pytest.raises(ValueError, match="does not name the shape"):
        D.concept_prompt("a cube on grass", "cone", "x")


def test_sweep_graph_keeps_one_branch_behind_the_concept_lora():
    graph = D.sweep_graph(sweep_api())
    kinds = sorted(n["class_type"] for n in graph.values())
    assert kinds.count("DCIDualBranch") == 1 and kinds.count("SaveImage") == 1
    assert "DCIWeightMaps" not in kinds and "MaskToImage" not in kinds
    assert graph["3"]["inputs"]["strength"] == -2.0  # the first λ's branch
    assert graph[D.LORA_NODE] == {"class_type": "LoraLoaderModelOnly",
                                  "inputs": {"model": ["1", 0], "lora_name": "", "strength_model": 1.0}}
    assert graph["3"]["inputs"]["model"] == [D.LORA_NODE, 0]
    assert graph["12"]["inputs"]["model"] == [D.LORA_NODE, 0]  # the schedule of the patched model
    assert graph["3"]["inputs"]["clip"] == ["1", 1]  # the CLIP stays the toy model's
    api = sweep_api()
    api["30"] = {"class_type": "ImageScale", "inputs": {"image": ["15", 0]}}
    api["16"]["inputs"]["images"] = ["30", 0]
    with pytest.raises(ValueError, match="unexpected nodes"):
        D.sweep_graph(api)


def test_set_concept_writes_prompt_concept_setting_and_sampling():
    base = D.sweep_graph(sweep_api())
    g = D.set_concept(base, "toy_case00_3ref", "a cone on sand, on the right", "cone", strength=2.0, window=0.0,
                      seed=7, steps=25, cfg=5.0)
    assert g["2"]["inputs"]["value"] == "a embedding:toy_case00_3ref cone on sand, on the right"
    wanted = {"concept": "embedding:toy_case00_3ref cone", "auxiliary_noun": "cone", "strength": 2.0, "window": 0.0,
              "prompt": ["2", 0]}
    assert {k: g["3"]["inputs"][k] for k in wanted} == wanted
    assert g[D.LORA_NODE]["inputs"]["lora_name"] == "toy_case00_3ref.safetensors"
    assert g["10"]["inputs"]["noise_seed"] == 7 and g["12"]["inputs"]["steps"] == 25
    assert g["13"]["inputs"]["cfg"] == 5.0
    assert base[D.LORA_NODE]["inputs"]["lora_name"] == "" and base["3"]["inputs"]["window"] == 0.3  # a copy


def test_missing_embeddings_in_the_server_log_are_an_error():
    D.check_embeddings_found("got prompt\nPrompt executed in 0.4 seconds\n")
    with pytest.raises(RuntimeError, match="toy_case01_1ref"):
        D.check_embeddings_found("got prompt\nwarning, embedding:toy_case01_1ref does not exist, ignoring\n")


def test_model_paths_point_the_server_at_the_concepts_and_the_run_model(tmp_path):
    model = tmp_path / "export" / "toy_sd15.safetensors"
    (tmp_path / "dci").mkdir()
    path = D.model_paths_yaml(tmp_path / "dci", model)
    text = path.read_text()
    assert "embeddings: embeddings" in text and "loras: loras" in text
    assert f'syncd_toyworld: "{model.parent.resolve()}"' in text and f'base_path: "{(tmp_path / "dci").resolve()}"' in text

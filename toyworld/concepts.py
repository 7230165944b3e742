"""DCI/ICO in the toy world (issue 13 §2.4): one ICO concept per held-out object, then DCI's λ sweep in ComfyUI.

For each evaluation case (:func:`customization.eval_cases`) and reference count (1 or 3),
:mod:`comfyui_syncd.training.ico` fine-tunes the toy base model on the rendered references (the concept
``toy_caseNN_Kref``, noun = the shape; cross-attention k/v and 3 concept tokens, image-specific contexts). The
exported embedding and k/v file are then used the way a ComfyUI user uses them: the shipped workflow
``dci_lambda_sweep_sd15.json``, toy-swapped (:func:`~comfyui_syncd.client.toy_swap.toy_swap`), with
``LoraLoaderModelOnly`` after the toy model and the concept written as ``embedding:NAME <shape>``; queued on an
embedded ComfyUI once per setting (:data:`SETTINGS`: the concept model alone, i.e. window 0, and λ = −2, 0, 2 in
upstream's window 0.3).

Deviations from upstream's ICO settings, for a 64 px model trained from scratch: ``ico_steps`` steps (upstream
900) at learning rate 1e-3 × batch (upstream 1e-5 × batch), no regularisation images; sampling with the toy
model's steps and CFG. The prompt is the evaluation case's ("a cube on grass, on the left") with the concept in
place of the shape word.
"""

from __future__ import annotations

import io
import json
import pathlib
import shutil

import torch

from . import scene as S

WORKFLOW = "dci_lambda_sweep_sd15.json"
SETTINGS = {  # row name -> (λ, window)
    "ICO concept model alone (no DCI)": (0.0, 0.0),
    "ICO + DCI, λ = −2": (-2.0, 0.3),
    "ICO + DCI, λ = 0": (0.0, 0.3),
    "ICO + DCI, λ = 2": (2.0, 0.3),
}
LEARNING_RATE = 1e-3
KEEP = ("SynCDToyWorldModel", "DCIDualBranch", "CLIPTextEncode", "EmptyLatentImage", "RandomNoise", "KSamplerSelect",
        "BasicScheduler", "DCIGuider", "SamplerCustomAdvanced", "VAEDecode", "SaveImage")
LORA_NODE = "lora"


def concept_name(case_index: int, count: int) -> str:
    return f"toy_case{case_index:02d}_{count}ref"


def concept_prompt(prompt: str, shape: str, name: str) -> tuple[str, str]:
    """(the prompt with ``embedding:NAME`` before its first ``shape``, the concept phrase) — the DCI inputs."""
    words = prompt.split(" ")
    if shape not in words:
        raise ValueError(f"the prompt {prompt!r} does not name the shape {shape!r}")
    concept = f"embedding:{name} {shape}"
    words[words.index(shape)] = concept
    return " ".join(words), concept


def ico_config(base, images, name: str, noun: str, out, steps: int, seed: int = 0, size: int = S.SIZE):
    """The ICO run of one concept on the toy base model (no validation images, one export at the end)."""
    from ..training import config, ico

    return config.from_dict(ico.IcoConfig, {
        "model": {"path": str(base), "family": "sd15"},
        "data": {"images": str(images), "resolution": size, "num_workers": 0},
        "concept": {"name": name, "noun": noun},
        "train": {"output_dir": str(out), "max_steps": steps, "learning_rate": LEARNING_RATE, "seed": seed,
                  "checkpoint_every": steps, "keep_checkpoints": 1, "export_every_checkpoint": False},
        "validation": {"every": 0}})


def train_concept(base, references: torch.Tensor, name: str, noun: str, folder, steps: int,
                  progress: bool = False) -> dict:
    """Fine-tune one concept on (K, H, W, 3) reference renders; copies its files to ``folder``/embeddings and
    ``folder``/loras (the ComfyUI folders of the stage). Resumes a finished run without training again."""
    from ..training import ico, loop

    folder = pathlib.Path(folder)
    run_dir = folder / "runs" / name
    images = run_dir / "references"
    images.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(references):
        S.to_pil(image).save(images / f"{i:02d}.png")
    cfg = ico_config(base, images, name, noun, run_dir, steps, size=references.shape[1])
    run = ico.prepare(cfg, resume="auto")
    if run.step < steps:
        ico.train(run, progress=progress)
    for kind in ("embeddings", "loras"):
        (folder / kind).mkdir(exist_ok=True)
        shutil.copyfile(run_dir / kind / f"{name}.safetensors", folder / kind / f"{name}.safetensors")
    losses = loop.read_losses(run_dir)
    return {"steps": len(losses), "loss_mean": round(sum(losses.values()) / max(1, len(losses)), 4)}


def model_paths_yaml(folder, model_file) -> pathlib.Path:
    """``extra_model_paths.yaml`` for the stage's server: the run's toy model, the concepts' embeddings and loras."""
    from ..client.embedded import extra_model_paths

    folder = pathlib.Path(folder)
    return extra_model_paths(folder / "extra_model_paths.yaml", "toyworld_dci", folder,
                             {"embeddings": "embeddings", "loras": "loras",
                              "syncd_toyworld": pathlib.Path(model_file).parent.resolve()})


def sweep_graph(api: dict) -> dict:
    """One λ branch of the toy-swapped shipped sweep (API format): its first DCIDualBranch and what it feeds,
    with ``LoraLoaderModelOnly`` (node ``lora``) between the toy model and every model input."""
    feeds = {k: {v[0] for v in n["inputs"].values() if isinstance(v, list)} for k, n in api.items()}
    branches = sorted((k for k, n in api.items() if n["class_type"] == "DCIDualBranch"), key=int)
    saves = [k for k, n in api.items() if n["class_type"] == "SaveImage"
             and branches[0] in _upstream(k, feeds) and not set(branches[1:]) & _upstream(k, feeds)]
    graph = {k: json.loads(json.dumps(api[k])) for save in saves for k in _upstream(save, feeds)}
    unknown = {n["class_type"] for n in graph.values()} - set(KEEP) - {"PrimitiveStringMultiline"}
    if unknown:
        raise ValueError(f"{WORKFLOW}: unexpected nodes {sorted(unknown)} in the λ branch")
    model = next(k for k, n in graph.items() if n["class_type"] == "SynCDToyWorldModel")
    for node in graph.values():
        for name, value in node["inputs"].items():
            if name == "model" and value == [model, 0]:
                node["inputs"][name] = [LORA_NODE, 0]
    graph[LORA_NODE] = {"class_type": "LoraLoaderModelOnly",
                        "inputs": {"model": [model, 0], "lora_name": "", "strength_model": 1.0}}
    return graph


def _upstream(start: str, feeds: dict) -> set:
    """``start`` and every node it is fed from (API format)."""
    seen, todo = set(), [start]
    while todo:
        k = todo.pop()
        if k not in seen:
            seen.add(k)
            todo.extend(feeds[k])
    return seen


def set_concept(graph: dict, name: str, prompt: str, shape: str, strength: float, window: float, seed: int,
                steps: int, cfg: float) -> dict:
    """A copy of :func:`sweep_graph`'s graph for one concept, prompt and DCI setting."""
    g = json.loads(json.dumps(graph))
    text, concept = concept_prompt(prompt, shape, name)
    g[LORA_NODE]["inputs"]["lora_name"] = f"{name}.safetensors"
    for node in g.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "PrimitiveStringMultiline":
            inputs["value"] = text
        elif kind == "DCIDualBranch":
            inputs.update(concept=concept, auxiliary_noun=shape, strength=strength, window=window)
            if not isinstance(inputs["prompt"], list):
                inputs["prompt"] = text
        elif kind == "RandomNoise":
            inputs["noise_seed"] = seed
        elif kind == "BasicScheduler":
            inputs["steps"] = steps
        elif kind == "DCIGuider":
            inputs["cfg"] = cfg
    return g


MISSING_EMBEDDING = "does not exist, ignoring"  # comfy/sd1_clip.py's warning for an unknown embedding:NAME


def check_embeddings_found(log: str) -> None:
    """Raise when the server's log says a prompt's ``embedding:NAME`` was not found (ComfyUI only warns)."""
    missing = [line.strip() for line in log.splitlines() if MISSING_EMBEDDING in line]
    if missing:
        raise RuntimeError(f"ComfyUI did not find the concept embeddings: {missing[0]}")


def run_image(client, graph: dict, last: bool = False) -> torch.Tensor:
    """Queue ``graph`` and return its one saved image (``last``: the last of the batch it saves) as (1, H, W, 3) in
    [0, 1]."""
    from ..evaluation.scoring import load_image

    files = [f for f in client.run(graph).files() if f.type == "output"]
    if last:
        files = files[-1:]
    if len(files) != 1:
        raise RuntimeError(f"expected one saved image, got {len(files)}")
    return load_image(io.BytesIO(client.view(files[0].filename, files[0].subfolder, files[0].type)))[None]


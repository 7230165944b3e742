"""Swap a text-to-image workflow's loaders for the toy world's trained model (``SynCDToyWorldModel``).

The toy model (``demo/toy_model.py``) is a small SD1.5 architecture trained from scratch on the toy world's 64 px
objects, so it draws recognisable cubes and spheres on grass where the tiny random demo models draw noise. This
rewrites an editor (UI) graph the way :func:`~.tiny_swap.tiny_swap` does, keeping node ids and every other node:

- ``CheckpointLoaderSimple`` / ``UNETLoader`` -> ``SynCDToyWorldModel`` (MODEL, CLIP, VAE); the first one also
  serves the CLIP of every ``DualCLIPLoader`` / ``CLIPLoader`` and the VAE of every ``VAELoader``, which are removed.
  Text encoders (``CLIPTextEncode``, ``SynCDPromptBatch``) stay: they encode with the toy model's own CLIP;
- ``ConditioningZeroOut`` (a negative unused at cfg 1) -> ``CLIPTextEncode`` of the empty prompt: the toy model
  learned the unconditional prediction from empty captions and samples with true classifier-free guidance (SynCD's
  customization workflows too: upstream's zeroed text is SDXL's dropped caption, the toy models' is the empty one);
- ``LoadImage`` / ``LoadImageMask`` -> ``SynCDToyWorldReferences``: the k-th image (mask) loader gives view k of
  one rendered toy object's multi-view set, with its exact mask, so an image and its mask file still match;
- SynCD Masked Shared Attention's ``mask_dilation`` (a box on the token grid: upstream's 9 on the 32×32 tokens of
  512 px Flux) scaled to the toy latent grid (``size`` / 8), the nearest odd size: 3 at 64 px, 5 at 128 px — upstream's
  9 would cover the whole 8×8 or 16×16 grid and make the foreground masks share everything;
- empty latents and image resizes to 128 px a side (the shipped toy model's size; any latent channel count is fixed by
  ComfyUI's sampler for an empty latent), every sampler's ``steps`` and ``cfg`` and ``BasicScheduler``'s ``steps`` to
  the toy model's.

With ``depth=True`` (``model_file`` is a depth-conditioned toy model: ``toyworld reproduce``'s ``depth_model``
stage) a rigid data-generation workflow runs too: ``InstructPixToPixConditioning`` stays (it feeds the toy model's
depth channels) and ``SynCDMeshViews`` becomes ``SynCDToyWorldMeshViews`` (depth, masks and correspondences of a toy
solid: set its ``shape``; the data-generation driver's mesh slot becomes a seed slot, so each object gets its own
poses).

The SDXL customization workflows run on the toy SynCD customization model (``toyworld reproduce``'s ``customize``
stage, one file: ``demo/toy_customization.py``): SynCD Checkpoint Loader, SynCD IP-Adapter Loader and Load CLIP
Vision become ``SynCDToyWorldCheckpoint``, ``SynCDToyWorldIPAdapter`` and ``SynCDToyWorldCLIPVision`` of that file,
``ModelSamplingDiscrete`` (v-prediction) is bypassed, and the prompts of a workflow with toy references name the
references' subject (a cube): upstream's reference prompt "photo of a cube", toy scenes for the new images, and
Masked Shared Attention's ``subject_word``. SynCD Identity Model Loader becomes ``SynCDToyWorldScoreModel`` (the
attribute reader) and SynCD Identity Score's metric ``toy_identity``: the share of shape, colour and texture read alike.

The Flux customization and Qwen-Image consistent-set workflows run on the same toy models (there is no toy DiT):
their flow shifts (``ModelSamplingFlux`` / ``ModelSamplingAuraFlow`` / ``ModelSamplingSD3``) and ``FluxGuidance``
are bypassed, SynCD's guidance nodes get their default scales (upstream SDXL's; Flux's 1.5/1.0 are far too weak for
a UNet sampled with true guidance) and, with toy references, the negative prompt becomes the empty one. The Flux
graphs have no IP-Adapter, so the toy customization model runs on its LoRA and reference attention alone.

Nodes that need what the toy world does not have (depth conditioning without ``depth``, JeDi checkpoints) are
refused with the reason. Pure: no ComfyUI import.
"""

from __future__ import annotations

import copy

from .tiny_swap import RESIZE_NODES, TinySwapError, _fold_into, _Graph, _scaled
from .ui_graph import set_widget
from .workflow_format import input_defs, is_api_format, is_ui_format, widget_values

TOY_MODEL = "SynCDToyWorldModel"
SHIPPED_CHOICE = "toy_sd15 (shipped)"  # demo/toy_model.py SHIPPED_CHOICE (that module imports ComfyUI)
SHIPPED_DEPTH_CHOICE = "toy_sd15_depth (shipped)"  # demo/toy_model.py SHIPPED_DEPTH_CHOICE
SIZE = 128  # the shipped toy-world model's resolution (toyworld reproduce --large)
STEPS = 25
CFG = 5.0
MODEL_LOADERS = {"CheckpointLoaderSimple": {0: 0, 1: 1, 2: 2}, "UNETLoader": {0: 0}}  # old slot -> toy slot
CLIP_LOADERS = ("DualCLIPLoader", "CLIPLoader")
SAMPLERS = ("KSampler", "KSamplerAdvanced")
SCHEDULERS = ("BasicScheduler", "SynCDCustomizationSampler")  # steps only (SynCD's guidance scales stay)
REFUSED = {
    "InstructPixToPixConditioning": "depth conditioning (the toy model is text-to-image only)",
    "JeDiCheckpointLoader": "a JeDi checkpoint for a real base model",
}
CUSTOMIZATION = {  # SDXL customization loaders -> the toy customization file's nodes: old output slot -> new slot
    "SynCDCheckpointLoader": ("SynCDToyWorldCheckpoint", {0: 0, 1: 1}, ("model", "ipadapter")),
    "SynCDIPAdapterLoader": ("SynCDToyWorldIPAdapter", {0: 0}, ()),
    "CLIPVisionLoader": ("SynCDToyWorldCLIPVision", {0: 0}, ()),
}
SHIPPED_CUSTOMIZATION_CHOICE = "toy_syncd (shipped)"  # demo/toy_customization.py SHIPPED_CHOICE
OWN_SCHEDULE = "the toy model keeps its own ε-prediction schedule"
BYPASSED = {  # node -> why it is bypassed on the toy model
    "ModelSamplingDiscrete": OWN_SCHEDULE,
    "ModelSamplingFlux": f"Flux's flow shift; {OWN_SCHEDULE}",
    "ModelSamplingAuraFlow": f"Qwen-Image's flow shift; {OWN_SCHEDULE}",
    "ModelSamplingSD3": f"a flow shift; {OWN_SCHEDULE}",
    "FluxGuidance": "Flux's distilled-guidance embedding; the toy model has none",
}
FLOW_SCHEDULES = ("ModelSamplingFlux", "ModelSamplingAuraFlow", "ModelSamplingSD3")
# SynCD's guidance nodes: a flow model's scales (Flux 1.5/1.0, Qwen-Image 2.5/1.0) go to the node defaults, upstream
# SDXL's, which the toy models (UNets sampled with true guidance, the customization model SynCD's SDXL recipe) follow
GUIDANCE_NODES = ("SynCDNormalizedGuider", "SynCDCustomizationSampler")
GUIDANCE_SCALES = ("text_scale", "image_scale_start", "image_scale_end")
NEGATIVE_PASS_THROUGH = ("FluxGuidance",)  # conditioning nodes between a negative prompt and its guider
# The subject of the toy references (SynCDToyWorldReferences' default: a red striped cube) in the prompts of a
# workflow that gets them: upstream's reference prompt "photo of a <category>", a toy scene for the new image(s)
TOY_SUBJECT = "cube"
REFERENCE_PROMPT = f"photo of a {TOY_SUBJECT}"
SCENE_PROMPTS = (f"a {TOY_SUBJECT} on a sandy beach, on the left", f"a {TOY_SUBJECT} in the snow, on the right",
                 f"a {TOY_SUBJECT} on grass, in the middle")
TEXT_NODES = ("CLIPTextEncode", "PrimitiveStringMultiline")
SCORE_LOADER, TOY_SCORE_MODEL = "SynCDIdentityModelLoader", "SynCDToyWorldScoreModel"
IDENTITY_SCORE, TOY_METRIC = "SynCDIdentityScore", "toy_identity"  # the attribute reader's identity score
APPLY_REFERENCES = "SynCDApplyReferences"
DEPTH_NODE = "InstructPixToPixConditioning"
SHARED_ATTENTION = "SynCDSharedAttention"
UPSTREAM_TOKEN_GRID = 32  # gen_rigid.py: 512 px Flux, 64×64 latents packed 2×2: the grid its 9×9 dilation is on
TOY_REFERENCES = "SynCDToyWorldReferences"
MESH_VIEWS, TOY_MESH_VIEWS = "SynCDMeshViews", "SynCDToyWorldMeshViews"
DATAGEN_ROLE = "syncd_datagen"  # datagen/driver.py ROLE (that module is not imported here)
IMAGE_LOADERS = {"LoadImage": {0: 0, 1: 1}, "LoadImageMask": {0: 1}}  # old output slot -> toy references slot


def toy_swap(workflow: dict, object_info: dict, model_file: str = SHIPPED_CHOICE, steps: int = STEPS,
             cfg: float = CFG, size: int = SIZE, depth: bool = False,
             customization_file: str = SHIPPED_CUSTOMIZATION_CHOICE) -> tuple[dict, list[str]]:
    """(a copy of ``workflow`` running on the toy-world model ``model_file``, one line per change); ``depth``: the
    model is depth-conditioned (rigid data generation runs on toy solids); ``customization_file``: the toy SynCD
    customization model that replaces a SynCD checkpoint, IP-Adapter and CLIP vision model."""
    if is_api_format(workflow) or not is_ui_format(workflow):
        raise TinySwapError("the toy-world swap works on editor-format workflows (as in workflows/)")
    g = _Graph(copy.deepcopy(workflow), object_info)
    report = g.report
    for kind, why in REFUSED.items():
        found = g.of_type(kind) if not (depth and kind == DEPTH_NODE) else []
        if found:
            raise TinySwapError(f"{g.describe(found[0])} needs {why}; the toy-world model cannot run this workflow")
    if TOY_MODEL not in object_info:
        raise TinySwapError(f"the server has no {TOY_MODEL} node; it comes with the SynCD pack")
    options = _combo_options(object_info[TOY_MODEL], "model_file")
    if model_file not in options:
        raise TinySwapError(f"toy-world model {model_file!r} is not on the server (it lists {options or 'none'}); the "
                            "shipped one is toyworld/weights/toy_sd15.safetensors, your own runs' files go to "
                            "models/syncd_toyworld")

    models = g.of_type(*MODEL_LOADERS)
    if not models:
        raise TinySwapError("no CheckpointLoaderSimple or UNETLoader to swap for the toy-world model")
    for node in models:
        kind = node["type"]
        g.replace(node, TOY_MODEL, MODEL_LOADERS[kind], model_file=model_file)
        report.append(f"{g.describe(node)}: was {kind} (toy-world model {model_file})")
    primary = models[0]
    for node in g.of_type(*CLIP_LOADERS):
        _fold_into(g, node, primary, 1, "CLIP", report)
    for node in g.of_type("VAELoader"):
        _fold_into(g, node, primary, 2, "VAE", report)

    for node in g.of_type("ConditioningZeroOut"):
        g.replace(node, "CLIPTextEncode", {0: 0}, text="")
        g.add_link(primary, 1, node, "clip")
        report.append(f"{g.describe(node)}: was ConditioningZeroOut (now the empty prompt, for true guidance)")

    for kind in IMAGE_LOADERS:  # the k-th image (mask) file -> view k of one toy object's set
        loaders = sorted(g.of_type(kind), key=lambda n: n["id"])
        for k, node in enumerate(loaders):
            g.replace(node, TOY_REFERENCES, IMAGE_LOADERS[kind], views=max(1, len(loaders)), index=k, size=size)
            report.append(f"{g.describe(node)}: was {kind} (view {k} of a rendered toy object, {size} px)")

    customization = g.of_type(*CUSTOMIZATION)
    if customization:
        options = _combo_options(object_info.get(CUSTOMIZATION["SynCDCheckpointLoader"][0], {}), "model_file")
        if customization_file not in options:
            raise TinySwapError(f"{g.describe(customization[0])} needs the toy-world customization model "
                                f"{customization_file!r}, which the server does not list ({options or 'none'})")
    for node in customization:
        kind = node["type"]
        toy_kind, slots, keep = CUSTOMIZATION[kind]
        g.replace(node, toy_kind, slots, keep_inputs=keep, model_file=customization_file)
        report.append(f"{g.describe(node)}: was {kind} (toy-world customization model {customization_file})")
    flow = bool(g.of_type(*FLOW_SCHEDULES))
    for node in g.of_type(*BYPASSED):
        node["mode"] = 4
        report.append(f"{g.describe(node)}: bypassed ({BYPASSED[node['type']]})")
    for node in g.of_type(*GUIDANCE_NODES) if flow else []:
        _default_scales(g, node, report)
    if g.of_type(TOY_REFERENCES):
        _toy_subject_prompts(g, object_info, report)
    for node in g.of_type(SCORE_LOADER):
        g.replace(node, TOY_SCORE_MODEL, {0: 0})
        report.append(f"{g.describe(node)}: was {SCORE_LOADER} (the toy world's attribute reader)")
    for node in g.of_type(IDENTITY_SCORE):
        node_def = g.node_def(IDENTITY_SCORE)
        metric = widget_values(node, node_def).get("metric")
        set_widget(node, node_def, "metric", TOY_METRIC)
        report.append(f"{g.describe(node)}: metric {metric} -> {TOY_METRIC} (shape, colour and texture as the "
                      f"attribute reader reads them)")

    for node in g.of_type(MESH_VIEWS) if depth else []:
        g.replace(node, TOY_MESH_VIEWS, {0: 0, 1: 1, 2: 2, 3: 3}, size=size)
        if node["properties"].get(DATAGEN_ROLE) == "mesh":  # no mesh file for a toy solid: a pose per object
            node["properties"][DATAGEN_ROLE] = "seed"
        report.append(f"{g.describe(node)}: was {MESH_VIEWS} (a toy solid's views, {size} px)")

    for node in sorted(g.nodes.values(), key=lambda n: n["id"]):
        node_def = g.object_info.get(node["type"])
        if node_def is None or node.get("mode", 0) != 0:
            continue
        values = widget_values(node, node_def)
        kind = node["type"]
        if (kind in RESIZE_NODES or (kind.startswith("Empty") and "Latent" in kind)) \
                and isinstance(values.get("width"), int) and isinstance(values.get("height"), int):
            new = _scaled(values["width"], values["height"], size)
            if new != (values["width"], values["height"]):
                set_widget(node, node_def, "width", new[0])
                set_widget(node, node_def, "height", new[1])
                report.append(f"{g.describe(node)}: {values['width']}x{values['height']} -> {new[0]}x{new[1]}")
        if kind in SAMPLERS:
            set_widget(node, node_def, "steps", steps)
            set_widget(node, node_def, "cfg", cfg)
            report.append(f"{g.describe(node)}: steps {values.get('steps')} -> {steps}, cfg {values.get('cfg')} -> {cfg}")
        if kind == SHARED_ATTENTION and isinstance(values.get("mask_dilation"), int):
            scaled = scaled_dilation(values["mask_dilation"], size // 8)
            if scaled != values["mask_dilation"]:
                set_widget(node, node_def, "mask_dilation", scaled)
                report.append(f"{g.describe(node)}: mask_dilation {values['mask_dilation']} -> {scaled} (the toy "
                              f"{size // 8}x{size // 8} latent grid)")
        if kind in SCHEDULERS and values.get("steps") != steps:
            set_widget(node, node_def, "steps", steps)
            report.append(f"{g.describe(node)}: steps {values.get('steps')} -> {steps}")

    swapped = g.finish()
    swapped.setdefault("extra", {}).setdefault("syncd", {}).update(family="sd15", toy=model_file)
    return swapped, report


def _default_scales(g, node: dict, report: list[str]) -> None:
    """A SynCD guidance node's text and image scales -> the node's defaults (upstream SDXL's: a flow model's scales
    are far too weak for the toy UNets)."""
    node_def = g.node_def(node["type"])
    values = widget_values(node, node_def)
    defaults = {d.name: d.options.get("default") for d in input_defs(node_def) if d.name in GUIDANCE_SCALES}
    changed = {k: (values.get(k), v) for k, v in defaults.items() if v is not None and values.get(k) != v}
    for name, (_, new) in changed.items():
        set_widget(node, node_def, name, new)
    if changed:
        report.append(f"{g.describe(node)}: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                      + " (the node's defaults, upstream SynCD SDXL's; the flow model's scales are too weak for "
                        "the toy model)")


def _negative_prompts(g) -> set[tuple[int, int]]:
    """(node id, slot) of the conditioning every ``negative`` input reads, through :data:`NEGATIVE_PASS_THROUGH`."""
    found = set()
    for node in g.nodes.values():
        source = g.source_of(node, "negative") if node.get("mode", 0) == 0 else None
        while source is not None:
            found.add(source)
            origin = g.nodes[source[0]]
            source = g.source_of(origin, "conditioning") if origin["type"] in NEGATIVE_PASS_THROUGH else None
    return found


def _toy_subject_prompts(g, object_info: dict, report: list[str]) -> None:
    """Prompts about the toy references' subject: the reference prompt (the text into SynCD Apply References'
    ``reference_conditioning``) -> :data:`REFERENCE_PROMPT`, a negative prompt -> the empty one (the toy models'
    unconditional: they learned it from empty captions, and know no style words), every other non-empty prompt -> a
    toy scene (one line per line it had), and SynCD Masked Shared Attention's subject word -> :data:`TOY_SUBJECT`."""
    reference = {g.source_of(n, "reference_conditioning") for n in g.of_type(APPLY_REFERENCES)}
    negative = _negative_prompts(g)
    for node in g.of_type(*TEXT_NODES):
        node_def = object_info.get(node["type"])
        name = "text" if node["type"] == "CLIPTextEncode" else "value"
        text = widget_values(node, node_def).get(name) if node_def else None
        if not isinstance(text, str) or not text.strip() or g.source_of(node, name):  # empty, or fed by a link
            continue
        lines = [line for line in text.splitlines() if line.strip()]
        new = REFERENCE_PROMPT if (node["id"], 0) in reference else "" if (node["id"], 0) in negative else "\n".join(
            SCENE_PROMPTS[i % len(SCENE_PROMPTS)] for i in range(len(lines)))
        if new != text:
            set_widget(node, node_def, name, new)
            why = "the toy models' unconditional" if not new else "the toy references' subject"
            report.append(f"{g.describe(node)}: prompt {text!r} -> {new!r} ({why})")
    for node in g.of_type(SHARED_ATTENTION):
        node_def = object_info.get(SHARED_ATTENTION)
        subject = widget_values(node, node_def).get("subject_word") if node_def else None
        if isinstance(subject, str) and subject.strip() and subject != TOY_SUBJECT:
            set_widget(node, node_def, "subject_word", TOY_SUBJECT)
            report.append(f"{g.describe(node)}: subject_word {subject!r} -> {TOY_SUBJECT!r}")


def scaled_dilation(dilation: int, grid: int) -> int:
    """The odd box size nearest ``dilation`` × ``grid`` / :data:`UPSTREAM_TOKEN_GRID` (at least 1; ties go up)."""
    target = dilation * grid / UPSTREAM_TOKEN_GRID
    return max(1, 2 * int((target - 1) / 2 + 0.5) + 1)


def _combo_options(node_def: dict, name: str) -> list:
    """The options of combo input ``name`` (none when the node or input is missing)."""
    spec = next((d for d in input_defs(node_def) if d.name == name), None) if node_def else None
    return list(spec.options.get("options") or []) if spec else []


def demo_swap(workflow: dict, object_info: dict, random_only: bool = False) -> tuple[dict, list[str], str]:
    """``--tiny``: (the workflow on the toy-world model — the depth-conditioned one for a workflow with depth
    conditioning — when its weights are shipped and it can run the workflow, else on the tiny random demo models;
    one line per change; which of the two, in words)."""
    from .tiny_swap import tiny_swap

    note = []
    depth = any(n.get("type") == DEPTH_NODE and n.get("mode", 0) == 0 for n in workflow.get("nodes", []))
    choice = SHIPPED_DEPTH_CHOICE if depth else SHIPPED_CHOICE
    options = _combo_options(object_info.get(TOY_MODEL, {}), "model_file")
    if not random_only and choice in options:
        try:
            swapped, report = toy_swap(workflow, object_info, model_file=choice, depth=depth)
            customized = any(n.get("type") in CUSTOMIZATION and n.get("mode", 0) == 0 for n in workflow["nodes"])
            which = ("the depth-conditioned toy-world model" if depth else
                     "the toy-world customization model" if customized else "the toy-world model")
            return swapped, report, which
        except TinySwapError as exc:
            note = [f"(not the toy-world model: {exc})"]
    elif not random_only and SHIPPED_CHOICE in options:
        note = [f"(not the toy-world model: the workflow's depth conditioning needs {choice!r}, which is not "
                "shipped)"]
    swapped, report = tiny_swap(workflow, object_info)
    return swapped, note + report, "the tiny demo models"

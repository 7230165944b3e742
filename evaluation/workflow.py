"""Where the eval command puts a benchmark job into a customization workflow (editor format), and the references.

**Slots.** Per job the command sets the reference images, the prompt, the seed and the subject's class word.
Each role's nodes come, first found wins, from ``--slot ROLE=ID[,ID]``, from ``properties["syncd_eval"] = ROLE``
on nodes (``properties["syncd_datagen"]`` roles prompt, seed, subject_word and images count too), or from the graph
as the shipped workflows build it (:func:`find_slots`):

* ``images``: the one active SaveImage; with a JeDi joint image set (``JeDiJointImageSet``) only its last
  ``images_to_generate`` outputs are generations (the first ones are the reconstructed references);
* ``prompt``: the text node behind the samplers' ``positive`` input, through conditioning-only nodes
  (FluxGuidance ...): the ``CLIPTextEncode``, or the primitive that feeds its text;
* ``reference_prompt``: the text node behind ``SynCDApplyReferences.reference_conditioning`` when it is not the
  prompt's; it gets SynCD's ``photo of a {class}``;
* ``subject_word``: nodes with a non-empty ``subject_word`` (Masked Shared Attention) get the class word;
* ``seed``: every ``seed`` / ``noise_seed`` widget;
* ``references``: the active ``LoadImage`` nodes, in id order.

**References.** Each reference is centre-cropped to a square (the workflows crop so too) and all are resized to
one size; its foreground mask travels as the alpha channel (``LoadImage``'s MASK is 1 − alpha, so transparent =
subject; no mask: the whole image). N references go to S LoadImage nodes one each when N = S; with fewer nodes
they are split in order, a node getting several as the frames of one animated PNG, which ``LoadImage`` loads as
a batch (so a 1-reference workflow takes 3 references).
"""

from __future__ import annotations

import copy
import dataclasses
import io
from typing import Optional, Sequence

from ..client.ui_graph import set_widget, widget_inputs
from ..client.workflow_format import FRONTEND_ONLY_NODES, MUTED
from ..datagen.driver import ROLE as DATAGEN_ROLE
from ..datagen.driver import SLOT_INPUTS

ROLE = "syncd_eval"
WIDGETS = {"references": ("image",), "prompt": SLOT_INPUTS["prompt"], "reference_prompt": SLOT_INPUTS["prompt"],
           "subject_word": SLOT_INPUTS["subject_word"], "seed": SLOT_INPUTS["seed"], "images": ()}
DATAGEN_ROLES = ("prompt", "seed", "subject_word", "images")
OUTPUT_TYPES = ("SaveImage",)
REFERENCE_LOADERS = ("LoadImage",)
UPLOAD_FOLDER = "syncd_eval"
MAX_SIDE = 1024


class EvalWorkflowError(ValueError):
    """The workflow cannot take the benchmark's values; the message says what to mark."""


def how_to_mark(role: str) -> str:
    return (f"mark the node with properties.{ROLE} = '{role}' (editor: right-click the node › Properties Panel, "
            f"add the property) or pass --slot {role}=NODE_ID")


def parse_slot(text: str) -> tuple[str, list[int]]:
    """``'prompt=12'`` / ``'references=6,7,8'`` → (role, node ids)."""
    role, sep, ids = text.partition("=")
    role = role.strip()
    if not sep or role not in WIDGETS:
        raise EvalWorkflowError(f"--slot {text!r}: expected ROLE=NODE_ID[,NODE_ID...] with ROLE one of "
                                f"{', '.join(WIDGETS)}")
    try:
        return role, [int(i) for i in ids.split(",") if i.strip()]
    except ValueError:
        raise EvalWorkflowError(f"--slot {text!r}: node ids are numbers, e.g. --slot {role}=12") from None


@dataclasses.dataclass
class Slots:
    """role → editor node ids; ``keep_last``: only the last N output images are generations (None: all)."""
    nodes: dict
    keep_last: Optional[int] = None

    @property
    def references(self) -> list:
        return self.nodes.get("references", [])

    def describe(self, workflow: dict) -> str:
        by_id = {n["id"]: n for n in workflow["nodes"]}
        parts = []
        for role, ids in self.nodes.items():
            if ids:
                parts.append(f"{role}: " + ", ".join(f"#{i} {by_id[i]['type']}" for i in ids))
        if self.keep_last:
            parts.append(f"generations: the last {self.keep_last} output image(s)")
        return "; ".join(parts)


class _Graph:
    """The editor graph read-only: nodes by id, link sources, upstream walks (Reroutes are passed through)."""

    def __init__(self, workflow: dict, object_info: dict):
        self.nodes = {n["id"]: n for n in workflow.get("nodes") or []}
        self.links = {}
        for link in workflow.get("links") or []:
            if isinstance(link, dict):  # workflow schema 1
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                        link.get("type")]
            self.links[link[0]] = link
        self.object_info = object_info

    def active(self, node: dict) -> bool:
        return node.get("mode", 0) == 0 and node.get("type") not in FRONTEND_ONLY_NODES - {"Reroute"}

    def widget_names(self, node: dict) -> set:
        node_def = self.object_info.get(node.get("type"))
        return set() if node_def is None else {d.name for d in widget_inputs(node_def)}

    def linked_inputs(self, node: dict) -> list[dict]:
        return [e for e in node.get("inputs") or [] if e.get("link") is not None and e["link"] in self.links]

    def source(self, node: dict, name: str) -> Optional[dict]:
        for entry in self.linked_inputs(node):
            if entry.get("name") == name:
                origin = self.nodes.get(self.links[entry["link"]][1])
                while origin is not None and origin.get("type") == "Reroute":
                    inputs = self.linked_inputs(origin)
                    origin = self.nodes.get(self.links[inputs[0]["link"]][1]) if inputs else None
                return origin
        return None

    def ancestors(self, node_id: int) -> list[dict]:
        """``node_id`` and every node upstream of it, active ones only, in id order."""
        seen, todo = set(), [node_id]
        while todo:
            current = todo.pop()
            if current in seen or current not in self.nodes:
                continue
            seen.add(current)
            todo += [self.links[e["link"]][1] for e in self.linked_inputs(self.nodes[current])]
        return [self.nodes[i] for i in sorted(seen) if self.active(self.nodes[i])]

    def text_node(self, node: dict, name: str) -> Optional[dict]:
        """The node whose widget holds the text behind input ``name``: through nodes with one CONDITIONING input to
        a node with a ``text`` widget, then to the primitive feeding that text when it is linked."""
        origin, seen = self.source(node, name), set()
        while origin is not None and origin["id"] not in seen:
            seen.add(origin["id"])
            if "text" in self.widget_names(origin):
                return self.source(origin, "text") or origin
            conditioning = [e for e in self.linked_inputs(origin) if e.get("type") == "CONDITIONING"]
            if len(conditioning) != 1:
                return None
            origin = self.source(origin, conditioning[0]["name"])
        return None


def _marked(workflow: dict) -> dict:
    found: dict = {}
    for node in workflow.get("nodes") or []:
        properties = node.get("properties") or {}
        role = properties.get(ROLE)
        if role is None and properties.get(DATAGEN_ROLE) in DATAGEN_ROLES:
            role = properties[DATAGEN_ROLE]
        for r in [role] if isinstance(role, str) else role or []:
            if r not in WIDGETS:
                raise EvalWorkflowError(f"node #{node['id']}: unknown properties.{ROLE} role {r!r} (roles: "
                                        f"{', '.join(WIDGETS)})")
            found.setdefault(r, []).append(node["id"])
    return found


def find_slots(workflow: dict, object_info: dict, overrides: Optional[dict] = None) -> Slots:
    """Each role's nodes (module docstring); EvalWorkflowError says what to mark when one cannot be found."""
    if not isinstance(workflow.get("nodes"), list):
        raise EvalWorkflowError("the eval command needs an editor-format workflow (as in workflows/, or saved with "
                                "Workflow › Save), not the API format: it finds the prompt and references in the "
                                "graph")
    graph = _Graph(workflow, object_info)
    chosen = {**_marked(workflow), **(overrides or {})}
    for role, ids in chosen.items():
        for i in ids:
            if i not in graph.nodes:
                raise EvalWorkflowError(f"{role}: the workflow has no node #{i}")
    outputs = chosen.get("images") or [n["id"] for n in graph.nodes.values()
                                       if n.get("type") in OUTPUT_TYPES and graph.active(n)]
    if len(outputs) != 1:
        listed = ", ".join(f"#{i}" for i in outputs) or "none"
        raise EvalWorkflowError(f"the generated images: expected one active SaveImage, found {listed}; "
                                + how_to_mark("images"))
    upstream = graph.ancestors(outputs[0])
    nodes = {"images": outputs}

    if "prompt" in chosen:
        nodes["prompt"] = chosen["prompt"]
    else:
        texts = {}
        for node in upstream:
            if graph.source(node, "positive") is not None:
                text = graph.text_node(node, "positive")
                if text is None:
                    raise EvalWorkflowError(f"the prompt: no text node found behind the positive input of "
                                            f"#{node['id']} {node['type']}; " + how_to_mark("prompt"))
                texts[text["id"]] = text
        if len(texts) != 1:
            listed = ", ".join(f"#{i}" for i in texts) or "none"
            raise EvalWorkflowError(f"the prompt: expected one text node behind the samplers' positive input, found "
                                    f"{listed}; " + how_to_mark("prompt"))
        nodes["prompt"] = list(texts)

    if "reference_prompt" in chosen:
        nodes["reference_prompt"] = chosen["reference_prompt"]
    else:
        found = []
        for node in upstream:
            if graph.source(node, "reference_conditioning") is not None:
                text = graph.text_node(node, "reference_conditioning")
                if text is not None and text["id"] not in nodes["prompt"] and text["id"] not in found:
                    found.append(text["id"])
        nodes["reference_prompt"] = found

    nodes["subject_word"] = chosen.get("subject_word") or [
        n["id"] for n in upstream if "subject_word" in graph.widget_names(n)
        and str(_widget(graph, n, "subject_word") or "").strip()]
    nodes["seed"] = chosen.get("seed") or [
        n["id"] for n in upstream if graph.widget_names(n) & {"seed", "noise_seed"}
        and not any(graph.source(n, name) for name in ("seed", "noise_seed"))]
    nodes["references"] = chosen.get("references") or [n["id"] for n in upstream
                                                       if n.get("type") in REFERENCE_LOADERS]
    if not nodes["references"]:
        raise EvalWorkflowError("the references: no active LoadImage feeds the output, so the workflow takes no "
                                "reference image (is it a customization workflow?); " + how_to_mark("references"))
    for role, ids in nodes.items():
        for i in ids:
            names = graph.widget_names(graph.nodes[i])
            if WIDGETS[role] and not names & set(WIDGETS[role]):
                raise EvalWorkflowError(f"{role}: node #{i} ({graph.nodes[i]['type']}) has no widget "
                                        f"{' / '.join(WIDGETS[role])}")
    keep_last = None
    for node in upstream:
        if node.get("type") == "JeDiJointImageSet":
            keep_last = int(_widget(graph, node, "images_to_generate") or 1)
    return Slots(nodes, keep_last)


def _widget(graph: _Graph, node: dict, name: str):
    from ..client.workflow_format import widget_values

    node_def = graph.object_info.get(node.get("type"))
    return None if node_def is None else widget_values(node, node_def).get(name)


def fill(workflow: dict, slots: Slots, object_info: dict, prompt: str, class_word: str, seed: int,
         reference_names: Sequence[str]) -> dict:
    """A copy of ``workflow`` with one job's values in its slots (``reference_names``: one uploaded file per
    reference node, in order)."""
    if len(reference_names) != len(slots.references):
        raise EvalWorkflowError(f"{len(reference_names)} reference files for {len(slots.references)} LoadImage nodes")
    workflow = copy.deepcopy(workflow)
    by_id = {n["id"]: n for n in workflow["nodes"]}
    values = {"prompt": prompt, "reference_prompt": f"photo of a {class_word}", "subject_word": class_word,
              "seed": seed}
    assignments = [(role, node_id, values[role]) for role in values for node_id in slots.nodes.get(role, [])]
    assignments += list(zip(["references"] * len(reference_names), slots.references, reference_names))
    for role, node_id, value in assignments:
        node = by_id[node_id]
        node_def = object_info[node["type"]]
        names = {d.name for d in widget_inputs(node_def)}
        set_widget(node, node_def, next(n for n in WIDGETS[role] if n in names), value)
    return workflow


def tiny(workflow: dict, slots: Slots, object_info: dict) -> dict:
    """``client.tiny_swap`` for the tiny demo models, except that the reference LoadImage nodes stay: the
    benchmark's images still go in."""
    from ..client.tiny_swap import tiny_swap

    hidden = copy.deepcopy(workflow)
    modes = {}
    for node in hidden["nodes"]:
        if node["id"] in slots.references:
            modes[node["id"]] = node.get("mode", 0)
            node["mode"] = MUTED  # tiny_swap leaves muted nodes alone
    swapped, _ = tiny_swap(hidden, object_info)
    for node in swapped["nodes"]:
        if node["id"] in modes:
            node["mode"] = modes[node["id"]]
    return swapped


# -- references -------------------------------------------------------------------------------------------------
def split_references(count: int, nodes: int) -> list[int]:
    """How many references each of ``nodes`` LoadImage nodes gets: one each when equal, else in order as evenly
    as possible; fewer references than nodes is an error."""
    if count < 1:
        raise EvalWorkflowError("--references must be at least 1")
    if count < nodes:
        raise EvalWorkflowError(f"the workflow has {nodes} reference LoadImage nodes, so it takes at least {nodes} "
                                f"references, not {count}; use a workflow with one reference node (it takes any "
                                f"number, e.g. workflows/syncd_customization_sdxl_1ref.json) or --references {nodes}")
    base, extra = divmod(count, nodes)
    return [base + (1 if i < extra else 0) for i in range(nodes)]


def reference_frames(images: Sequence, masks: Sequence, max_side: int = MAX_SIDE) -> list:
    """RGBA PIL frames: each image centre-cropped to a square, all resized to the smallest square (at most
    ``max_side``); alpha = 255 · (1 − mask), LoadImage's convention (a missing mask: the whole image is subject)."""
    from PIL import Image, ImageOps

    side = min(max_side, *(min(im.size) for im in images))
    frames = []
    for image, mask in zip(images, masks):
        rgb = ImageOps.fit(image.convert("RGB"), (side, side), Image.Resampling.LANCZOS)
        if mask is None:
            alpha = Image.new("L", (side, side), 0)
        else:
            alpha = ImageOps.invert(ImageOps.fit(mask.convert("L"), (side, side), Image.Resampling.BILINEAR))
        rgb.putalpha(alpha)
        frames.append(rgb)
    return frames


def png_bytes(frames: Sequence) -> bytes:
    """One PNG, or an animated PNG of the frames (each frame replaces the last: read back as written)."""
    buffer = io.BytesIO()
    if len(frames) == 1:
        frames[0].save(buffer, format="PNG")
    else:
        frames[0].save(buffer, format="PNG", save_all=True, append_images=list(frames[1:]), default_image=False,
                       disposal=0, blend=0, optimize=False)
    return buffer.getvalue()

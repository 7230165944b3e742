"""``run --tiny``: swap a real-model editor workflow's loaders for the pack's tiny demo nodes.

The shipped workflows load real checkpoints. To run one on any machine (tests, CI, a first try), this
rewrites the editor (UI) graph, keeping node ids and every other node as it is:

- ``CheckpointLoaderSimple`` / ``UNETLoader`` -> ``SynCDTinyDemoModel`` (MODEL, VAE) of the workflow's
  family; ``VAELoader`` is removed and its consumers read the tiny model's VAE;
- ``CLIPTextEncode`` -> ``SynCDTinyDemoTextEncode`` (same text, same family), ``SynCDPromptBatch`` ->
  ``SynCDTinyDemoPromptBatch`` (same lines, same ``prompt_per_image``, same family); the CLIP loaders
  (``DualCLIPLoader``, ``CLIPLoader``, the checkpoint's CLIP) are removed, and an optional CLIP input
  of another node (``SynCDSharedAttention.clip``) is disconnected: with a tiny demo model that node
  locates subject tokens with the demo tokenizer;
- ``SynCDIPAdapterLoader`` + ``CLIPVisionLoader`` -> one ``SynCDTinyDemoIPAdapter`` fed by the tiny model;
- ``SynCDCheckpointLoader`` is removed: its MODEL and IPADAPTER consumers read what fed it;
- ``SynCDIdentityModelLoader`` -> ``SynCDTinyDemoScoreModel`` of the kind its model name says (clip, dinov2,
  dino), with a random aesthetic head where the loader names one;
- ``LoadImage`` / ``LoadImageMask`` -> ``SynCDTinyDemoReferences`` (IMAGE, MASK), one view each, the
  same seed, so an image and its mask file still match;
- empty latents and image resizes to at most ``size`` px a side, every ``steps`` widget to at most ``steps``.

Widget values of the new nodes come from ``/object_info`` defaults, as in the editor. Pure: no ComfyUI
import, so the command line applies it before its UI -> API conversion and the browser test loads the
result into the page.
"""

from __future__ import annotations

import copy

from .ui_graph import build_widgets_values, set_widget
from .workflow_format import input_defs, is_api_format, is_ui_format, widget_values

FAMILIES = ("sd15", "sdxl", "flux", "qwen_image")
TINY_MODEL = "SynCDTinyDemoModel"
TINY_TEXT = "SynCDTinyDemoTextEncode"
TINY_PROMPT_BATCH = "SynCDTinyDemoPromptBatch"
TEXT_ENCODERS = {"CLIPTextEncode": TINY_TEXT, "SynCDPromptBatch": TINY_PROMPT_BATCH}  # their CLIP input is cut
TINY_REFERENCES = "SynCDTinyDemoReferences"
TINY_IP_ADAPTER = "SynCDTinyDemoIPAdapter"

MODEL_LOADERS = {"CheckpointLoaderSimple": {0: 0, 2: 1}, "UNETLoader": {0: 0},  # old output slot -> tiny slot
                 "JeDiCheckpointLoader": {0: 0}}
CLIP_SOURCES = {"CheckpointLoaderSimple": 1, "DualCLIPLoader": 0, "CLIPLoader": 0}  # type -> its CLIP output
IMAGE_LOADERS = {"LoadImage": {0: 0, 1: 1}, "LoadImageMask": {0: 1}}
RESIZE_NODES = {"ImageScale", "SynCDMeshViews"}  # besides every Empty*Latent* node with width/height widgets


class TinySwapError(ValueError):
    """The workflow cannot be swapped to the tiny demo models; the message names the node and why."""


def infer_family(workflow: dict) -> str:
    """The model family the workflow is built for: ``extra.syncd.family`` (the shipped workflows store it),
    else its loaders: UNETLoader or a Flux DualCLIPLoader -> flux; an SDXL-looking checkpoint name -> sdxl;
    another checkpoint -> sd15."""
    family = ((workflow.get("extra") or {}).get("syncd") or {}).get("family")
    if family is not None:
        if family not in FAMILIES:
            raise TinySwapError(f"extra.syncd.family is {family!r}; expected one of {', '.join(FAMILIES)}")
        return family
    nodes = workflow.get("nodes") or []
    for node in nodes:
        values = [str(v).lower() for v in node.get("widgets_values") or [] if isinstance(v, str)]
        if node.get("type") == "UNETLoader" or (node.get("type") == "DualCLIPLoader" and "flux" in values):
            return "flux"
    for node in nodes:
        if node.get("type") == "CheckpointLoaderSimple":
            name = str((node.get("widgets_values") or [""])[0]).lower()
            return "sdxl" if "xl" in name else "sd15"
    raise TinySwapError("cannot tell the model family (no extra.syncd.family, no CheckpointLoaderSimple or "
                        "UNETLoader); pass family= (sd15, sdxl or flux)")


def _scaled(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the longer side ``size``, multiples of 16, aspect kept as far as that allows."""
    if max(width, height) <= size:
        return width, height
    scale = size / max(width, height)
    return max(16, round(width * scale / 16) * 16), max(16, round(height * scale / 16) * 16)


class _Graph:
    """The editor graph being rewritten: nodes by id, links by id, both kept consistent."""

    def __init__(self, workflow: dict, object_info: dict):
        self.workflow = workflow
        self.object_info = object_info
        self.nodes = {node["id"]: node for node in workflow["nodes"]}
        for item in workflow.get("links") or []:
            if not isinstance(item, list):
                raise TinySwapError("links are saved as objects (workflow schema 1); save the workflow from the "
                                    "editor in the classic format (version 0.4) to use --tiny")
        self.links = {item[0]: item for item in workflow.get("links") or []}
        self.next_link = max([workflow.get("last_link_id") or 0, *self.links]) + 1
        self.report: list[str] = []

    def describe(self, node: dict) -> str:
        return f"#{node['id']} {node['type']}"

    def node_def(self, kind: str) -> dict:
        if kind not in self.object_info:
            raise TinySwapError(f"the server has no {kind} node; --tiny needs the SynCD pack's demo nodes")
        return self.object_info[kind]

    def of_type(self, *kinds: str) -> list[dict]:
        return sorted((n for n in self.nodes.values() if n.get("type") in kinds and n.get("mode", 0) == 0),
                      key=lambda n: n["id"])

    def links_from(self, node: dict, slot: int | None = None) -> list[list]:
        return [link for link in self.links.values()
                if link[1] == node["id"] and (slot is None or link[2] == slot)]

    def links_into(self, node: dict) -> list[list]:
        return [link for link in self.links.values() if link[3] == node["id"]]

    def input_name(self, link: list) -> str:
        target = self.nodes[link[3]]
        for entry in target.get("inputs") or []:
            if entry.get("link") == link[0]:
                return entry["name"]
        raise TinySwapError(f"link {link[0]} into {self.describe(target)} is not on any of its inputs")

    def source_of(self, node: dict, input_name: str) -> tuple[int, int] | None:
        for entry in node.get("inputs") or []:
            if entry.get("name") == input_name and entry.get("link") is not None:
                link = self.links[entry["link"]]
                return link[1], link[2]
        return None

    def remove_link(self, link: list) -> None:
        del self.links[link[0]]
        for entry in self.nodes[link[3]].get("inputs") or []:
            if entry.get("link") == link[0]:
                entry["link"] = None
        for output in self.nodes[link[1]].get("outputs") or []:
            if link[0] in (output.get("links") or []):
                output["links"].remove(link[0])

    def repoint(self, link: list, origin_id: int, slot: int) -> None:
        """Make ``link`` start at output ``slot`` of node ``origin_id``."""
        for output in self.nodes[link[1]].get("outputs") or []:
            if link[0] in (output.get("links") or []):
                output["links"].remove(link[0])
        link[1], link[2] = origin_id, slot
        output = self.nodes[origin_id]["outputs"][slot]
        output.setdefault("links", []).append(link[0])
        link[5] = output["type"]

    def add_link(self, origin: dict, slot: int, target: dict, input_name: str) -> None:
        entry = next(e for e in target["inputs"] if e["name"] == input_name)
        if entry.get("link") is not None:
            self.remove_link(self.links[entry["link"]])
        link = [self.next_link, origin["id"], slot, target["id"], target["inputs"].index(entry),
                origin["outputs"][slot]["type"]]
        self.next_link += 1
        self.links[link[0]] = link
        entry["link"] = link[0]
        origin["outputs"][slot].setdefault("links", []).append(link[0])

    def remove_node(self, node: dict) -> None:
        for link in self.links_into(node) + self.links_from(node):
            self.remove_link(link)
        del self.nodes[node["id"]]

    def replace(self, node: dict, kind: str, outputs: dict[int, int], keep_inputs: tuple[str, ...] = (),
                **widgets) -> None:
        """Turn ``node`` into a ``kind`` node in place: output slot ``old`` becomes ``outputs[old]`` (links
        from other slots must be gone), inputs named in ``keep_inputs`` keep their links, others are cut. A title
        the workflow gave the node ("Prompt", "Reference 1") stays."""
        node_def = self.node_def(kind)
        for link in self.links_from(node):
            if link[2] not in outputs:
                raise TinySwapError(f"{self.describe(node)} output {link[2]} is still connected")
        kept = {}
        for link in self.links_into(node):
            name = self.input_name(link)
            if name in keep_inputs:
                kept[name] = link
            else:
                self.remove_link(link)
        defs = input_defs(node_def)
        inputs = [{"name": d.name, "type": d.type, "link": None} for d in defs if not d.is_widget]
        for name, link in kept.items():
            entry = next((e for e in inputs if e["name"] == name), None)
            if entry is None:  # a widget input fed by a link
                entry = {"name": name, "type": link[5], "widget": {"name": name}, "link": None}
                inputs.append(entry)
            entry["link"] = link[0]
        new_outputs = [{"name": name, "type": type_, "links": [], "slot_index": i}
                       for i, (name, type_) in enumerate(zip(node_def["output_name"], node_def["output"]))]
        moved = self.links_from(node)
        node.update(type=kind, inputs=inputs, outputs=new_outputs, widgets_values=build_widgets_values(
            kind, node_def, widgets), properties={**(node.get("properties") or {}), "Node name for S&R": kind})
        for link in moved:
            new_slot = outputs[link[2]]
            link[2], link[5] = new_slot, new_outputs[new_slot]["type"]
            new_outputs[new_slot]["links"].append(link[0])
        for index, entry in enumerate(inputs):
            if entry["link"] is not None:
                self.links[entry["link"]][4] = index

    def finish(self) -> dict:
        self.workflow["nodes"] = [n for n in self.workflow["nodes"] if n["id"] in self.nodes]
        self.workflow["links"] = sorted(self.links.values(), key=lambda link: link[0])
        self.workflow["last_link_id"] = self.next_link - 1
        return self.workflow


def tiny_swap(workflow: dict, object_info: dict, family: str | None = None, steps: int = 4,
              size: int = 64) -> tuple[dict, list[str]]:
    """(a copy of ``workflow`` running on the tiny demo nodes, one line per change).

    ``object_info`` is the server's ``/object_info`` (it must list the pack's demo nodes); ``family``
    defaults to :func:`infer_family`."""
    if is_api_format(workflow):
        raise TinySwapError("--tiny works on editor-format workflows (as in workflows/, or saved with Workflow > "
                            "Save); this one is in API format, where loaders cannot be swapped reliably. Use the "
                            "editor-format file, or edit the API graph's loaders yourself")
    if not is_ui_format(workflow):
        raise TinySwapError("not an editor-format workflow (no 'nodes' list)")
    family = family or infer_family(workflow)
    if family not in FAMILIES:
        raise TinySwapError(f"family {family!r}: expected one of {', '.join(FAMILIES)}")
    g = _Graph(copy.deepcopy(workflow), object_info)
    report = g.report

    # 1. CLIP: text encoders become tiny text encoders; an optional CLIP input elsewhere is cut.
    for kind, slot in CLIP_SOURCES.items():
        for source in g.of_type(kind):
            for link in g.links_from(source, slot):
                target = g.nodes[link[3]]
                name = g.input_name(link)
                if target["type"] in TEXT_ENCODERS:
                    g.remove_link(link)
                    continue
                spec = g.object_info.get(target["type"], {}).get("input", {})
                if name in (spec.get("optional") or {}):
                    g.remove_link(link)
                    report.append(f"{g.describe(target)}: disconnected its optional input {name!r} (CLIP of "
                                  f"{g.describe(source)}); the tiny demo model needs no text encoder")
                else:
                    raise TinySwapError(f"{g.describe(target)} input {name!r} needs the CLIP of "
                                        f"{g.describe(source)}, which --tiny cannot provide (only CLIPTextEncode, "
                                        "SynCDPromptBatch and optional CLIP inputs are swapped)")
    for node in g.of_type("CLIPTextEncode"):
        text = widget_values(node, g.node_def("CLIPTextEncode")).get("text", "")
        g.replace(node, TINY_TEXT, {0: 0}, keep_inputs=("text",), family=family, text=text)
        report.append(f"{g.describe(node)}: was CLIPTextEncode ({family}, same text)")
    for node in g.of_type("SynCDPromptBatch"):
        values = widget_values(node, g.node_def("SynCDPromptBatch"))
        g.replace(node, TINY_PROMPT_BATCH, {0: 0, 1: 1}, keep_inputs=("text",), family=family,
                  text=values.get("text", ""), prompt_per_image=values.get("prompt_per_image", True))
        report.append(f"{g.describe(node)}: was SynCDPromptBatch ({family}, same prompts)")

    # 2. Models: every checkpoint/UNet loader becomes a tiny model; the first one also gives the VAE.
    models = g.of_type(*MODEL_LOADERS)
    for node in models:
        kind = node["type"]
        g.replace(node, TINY_MODEL, MODEL_LOADERS[kind], family=family)
        report.append(f"{g.describe(node)}: was {kind} ({family})")
    primary = models[0] if models else None
    for node in g.of_type("VAELoader"):
        if primary is None:
            g.replace(node, TINY_MODEL, {0: 1}, family=family)
            primary = node
            report.append(f"{g.describe(node)}: was VAELoader ({family})")
            continue
        _fold_into(g, node, primary, 1, "VAE", report)
    for kind in ("DualCLIPLoader", "CLIPLoader"):
        for node in g.of_type(kind):
            g.remove_node(node)
            report.append(f"#{node['id']} {kind}: removed (the tiny text encoder needs no CLIP)")

    # 3. The SynCD checkpoint patches the real model: pass its MODEL and IPADAPTER inputs through.
    for node in g.of_type("SynCDCheckpointLoader"):
        for slot, name in ((0, "model"), (1, "ipadapter")):
            consumers = g.links_from(node, slot)
            source = g.source_of(node, name)
            if consumers and source is None:
                raise TinySwapError(f"{g.describe(node)}: its output {slot} is used but its {name!r} input is "
                                    "not connected, so --tiny has nothing to pass through")
            for link in consumers:
                g.repoint(link, *source)
        g.remove_node(node)
        report.append(f"#{node['id']} SynCDCheckpointLoader: removed; MODEL and IPADAPTER pass through")

    # 4. IP-Adapter + CLIP vision -> one tiny IP-Adapter on the tiny model.
    ip_loaders = g.of_type("SynCDIPAdapterLoader")
    vision_loaders = g.of_type("CLIPVisionLoader")
    if (ip_loaders or vision_loaders) and primary is None:
        raise TinySwapError("the IP-Adapter needs a model loader to swap (the tiny IP-Adapter is fitted to the "
                            "tiny model)")
    tiny_ip = None
    for node in ip_loaders:
        g.replace(node, TINY_IP_ADAPTER, {0: 0})
        g.add_link(primary, 0, node, "model")
        tiny_ip = tiny_ip or node
        report.append(f"{g.describe(node)}: was SynCDIPAdapterLoader (fitted to {g.describe(primary)})")
    for node in vision_loaders:
        if tiny_ip is None:
            g.replace(node, TINY_IP_ADAPTER, {0: 1})
            g.add_link(primary, 0, node, "model")
            tiny_ip = node
            report.append(f"{g.describe(node)}: was CLIPVisionLoader")
            continue
        _fold_into(g, node, tiny_ip, 1, "CLIP vision model", report)

    # 4b. Scoring models (identity score, aesthetic score, dataset filter) -> tiny random ones of the same kind.
    for node in g.of_type("SynCDIdentityModelLoader"):
        values = widget_values(node, g.node_def("SynCDIdentityModelLoader"))
        name = f"{values.get('model_path') or ''} {values.get('model') or ''}".lower()
        kind = "clip" if "clip" in name else "dinov2" if "dinov2" in name else "dino" if "dino" in name else "dinov2"
        aesthetic = kind == "clip" and (values.get("aesthetic_head", "none") != "none"
                                        or bool(str(values.get("aesthetic_head_path") or "").strip()))
        g.replace(node, "SynCDTinyDemoScoreModel", {0: 0}, model_kind=kind, aesthetic_head=aesthetic)
        report.append(f"{g.describe(node)}: was SynCDIdentityModelLoader (a tiny random {kind} model"
                      + (" with an aesthetic head)" if aesthetic else ")"))

    # 5. Input images: synthetic views of one subject with its mask, one per loader.
    for node in g.of_type(*IMAGE_LOADERS):
        kind = node["type"]
        g.replace(node, TINY_REFERENCES, IMAGE_LOADERS[kind], count=1, size=size)
        report.append(f"{g.describe(node)}: was {kind} (a {size} px synthetic subject view and its mask)")

    # 6. Small and fast: latent and resize sizes, step counts.
    for node in sorted(g.nodes.values(), key=lambda n: n["id"]):
        kind = node["type"]
        node_def = g.object_info.get(kind)
        if node_def is None or node.get("mode", 0) != 0:
            continue
        values = widget_values(node, node_def)
        resizes = kind in RESIZE_NODES or (kind.startswith("Empty") and "Latent" in kind)
        if resizes and isinstance(values.get("width"), int) and isinstance(values.get("height"), int):
            new = _scaled(values["width"], values["height"], size)
            if new != (values["width"], values["height"]):
                set_widget(node, node_def, "width", new[0])
                set_widget(node, node_def, "height", new[1])
                report.append(f"{g.describe(node)}: {values['width']}x{values['height']} -> {new[0]}x{new[1]}")
        if isinstance(values.get("steps"), int) and values["steps"] > steps:
            set_widget(node, node_def, "steps", steps)
            report.append(f"{g.describe(node)}: steps {values['steps']} -> {steps}")

    swapped = g.finish()
    swapped.setdefault("extra", {}).setdefault("syncd", {}).update(family=family, tiny=True)
    return swapped, report


def _fold_into(g, node: dict, target: dict, slot: int, what: str, report: list) -> None:
    """Point the consumers of ``node``'s output 0 at ``target``'s output ``slot`` and drop ``node``."""
    for link in g.links_from(node, 0):
        g.repoint(link, target["id"], slot)
    g.remove_node(node)
    report.append(f"#{node['id']} {node['type']}: removed; its consumers use the {what} of {g.describe(target)}")

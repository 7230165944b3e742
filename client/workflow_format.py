"""Convert a UI-format workflow (as the editor saves it) to the API format the server executes.

Mirrors ComfyUI_frontend 1.27 (the version bundled with ComfyUI 0.3.64): ``graphToPrompt``
(``utils/executionUtil.ts``), ``ExecutableNodeDTO.resolveInput/resolveOutput`` (bypass and virtual
nodes), the widget layout of ``litegraphService.ts`` and ``useIntWidget``/``useComboWidget``
(``control_after_generate``), ``PrimitiveNode.applyToGraph`` and ``processDynamicPrompt``.

Not reproduced (an error says so): subgraphs, legacy group nodes, widgets whose value the editor
computes when queueing (webcam capture, 3D viewers) and PrimitiveNode text replacements. Values
are queued as saved, i.e. the default 'control after generate' mode, not 'before'. Widgets the editor adds after a node's inputs (image/audio 'upload' buttons) only
leave trailing entries in ``widgets_values`` and are ignored.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from typing import Any

MUTED, BYPASSED = 2, 4  # LGraphEventMode.NEVER / BYPASS
FRONTEND_ONLY_NODES = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}  # isVirtualNode in the frontend
# Input types the frontend draws as a widget (scripts/widgets.ts ComfyWidgets + core extensions).
WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "IMAGEUPLOAD", "FILEUPLOAD", "COLOR",
                "IMAGECOMPARE", "TREESELECT", "MULTISELECT", "CHART", "GALLERIA", "SELECTBUTTON", "TEXTAREA"}
UNSUPPORTED_WIDGET_TYPES = {"WEBCAM", "LOAD_3D", "LOAD_3D_ANIMATION", "PREVIEW_3D", "PREVIEW_3D_ANIMATION",
                            "AUDIO_UI", "AUDIOUPLOAD", "AUDIO_RECORD"}


class WorkflowFormatError(ValueError):
    """The workflow cannot be converted; the message names the node and the fix."""


def is_api_format(workflow: Any) -> bool:
    """API format: ``{id: {"class_type": ..., "inputs": {...}}}``."""
    return (isinstance(workflow, dict) and bool(workflow)
            and all(isinstance(v, dict) and "class_type" in v for v in workflow.values()))


def is_ui_format(workflow: Any) -> bool:
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list)


# -- node definitions ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InputDef:
    """One input of an ``/object_info`` node definition, as the frontend sees it."""

    name: str
    type: str  # "COMBO" for option lists, as in the frontend's V2 input spec
    options: dict
    optional: bool

    @property
    def widget_type(self) -> str:
        return self.options.get("widgetType") or self.type

    @property
    def is_widget(self) -> bool:
        """A widget unless forceInput (``litegraphService.ts`` #addInputWidget)."""
        known = self.widget_type in WIDGET_TYPES or self.widget_type in UNSUPPORTED_WIDGET_TYPES
        return known and not self.options.get("forceInput")

    @property
    def frontend_default(self) -> Any:
        """A new widget's value (``use*Widget``): the spec default, else 0 / False / '' / first option."""
        if self.widget_type == "COMBO":
            choices = self.options.get("options") or []
            return self.options.get("default") or (choices[0] if choices else None)
        fallback = {"INT": 0, "FLOAT": 0, "BOOLEAN": False, "STRING": ""}.get(self.widget_type)
        default = self.options.get("default")
        return fallback if default is None else default

    @property
    def control_widgets(self) -> int:
        """Extra ``widgets_values`` entries after this widget's value.

        INT (``useIntWidget``): ``control_after_generate ?? name in ('seed', 'noise_seed')`` adds the
        control combo; so an INT named seed gets one unless its spec says ``control_after_generate: false``.
        COMBO (``useComboWidget``): a truthy ``control_after_generate`` adds the control combo and the
        filter-list string. Other types: none.
        """
        flag = self.options.get("control_after_generate")
        if self.widget_type == "INT":
            if flag is None:
                return 1 if self.name in ("seed", "noise_seed") else 0
            return 1 if flag else 0
        if self.widget_type == "COMBO":
            return 2 if flag else 0
        return 0


def input_defs(node_def: dict) -> list[InputDef]:
    """Inputs in the frontend's order (``getOrderedInputSpecs``): ``input_order`` required, then optional,
    then any input not listed there."""
    specs: dict[str, InputDef] = {}
    for section in ("required", "optional"):
        for name, spec in (node_def.get("input", {}).get(section) or {}).items():
            kind = spec[0] if spec else "UNKNOWN"
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(kind, list):  # V1 combo: the option list in place of the type
                options = {**options, "options": kind}
            specs[name] = InputDef(name, "COMBO" if isinstance(kind, list) else kind, options,
                                   section == "optional")
    order = node_def.get("input_order") or {}
    ordered = [specs[n] for n in order.get("required", []) if n in specs and not specs[n].optional]
    ordered += [specs[n] for n in order.get("optional", []) if n in specs and specs[n].optional]
    seen = {d.name for d in ordered}
    return ordered + [d for d in specs.values() if d.name not in seen]


def widget_values(node: dict, node_def: dict) -> dict[str, Any]:
    """Map ``widgets_values`` onto input names, skipping the control widgets' entries.

    Widgets past the end of a shorter list (a node that gained inputs since it was saved) keep their
    default, as in the editor (``LGraphNode.configure`` only assigns the saved values).
    """
    defs = input_defs(node_def)
    saved = node.get("widgets_values")
    if saved is None:
        saved = []
    widgets = [d for d in defs if d.is_widget]
    if isinstance(saved, dict):  # some custom frontends save widgets by name
        saved_by_name = saved
    else:
        saved = _migrate_force_input_values(defs, widgets, list(saved))
        saved_by_name, position = {}, 0
        for d in widgets:
            if position < len(saved):
                saved_by_name[d.name] = saved[position]
            position += 1 + d.control_widgets
    values = {}
    for d in widgets:
        value = saved_by_name[d.name] if d.name in saved_by_name else d.frontend_default
        if value is not None or d.name in saved_by_name:  # JSON.stringify drops undefined
            values[d.name] = value
    return values


def _migrate_force_input_values(defs: list[InputDef], widgets: list[InputDef], saved: list) -> list:
    """``migrateWidgetsValues``: workflows saved before frontend 1.16 also stored a value for forceInput inputs."""
    legacy = [d for d in defs if d in widgets or d.options.get("forceInput")]
    if len(legacy) == len(widgets):
        return saved
    count = sum(2 if (d.options.get("control_after_generate") or d.name in ("seed", "noise_seed")) else 1
                for d in legacy)
    if count != len(saved):
        return saved
    # lodash _.zip pads the shorter list, so values past the inputs are kept
    return [value for d, value in itertools.zip_longest(legacy, saved) if d is None or not d.options.get("forceInput")]


# -- dynamic prompts -------------------------------------------------------------------------------
_COMMENTS = re.compile(r"/\*[\s\S]*?\*/|//[^\n\r\u2028\u2029]*")


def process_dynamic_prompt(text: str, rng: random.Random | None = None) -> str:
    """``{a|b|{c|d}}`` picks one option at random, C comments are removed, ``\\{`` escapes
    (``formatUtil.ts`` processDynamicPrompt, for STRING inputs with ``dynamicPrompts: true``)."""
    rng = rng or random.Random()
    text = _COMMENTS.sub("", text)
    i, result = 0, ""

    def escape() -> str:
        nonlocal i
        char = text[i] if i < len(text) else "undefined"  # JS reads past the end as undefined
        i += 1
        return "\\" + char

    def choice_block() -> str:
        nonlocal i
        options, choice, depth = [], "", 0
        while i < len(text):
            char = text[i]
            i += 1
            if char == "\\":
                choice += escape()
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                if not depth:
                    break
                depth -= 1
            elif char == "|" and not depth:
                options.append(choice)
                choice = ""
                continue
            choice += char
        options.append(choice)
        return process_dynamic_prompt(options[int(rng.random() * len(options))], rng)

    while i < len(text):
        char = text[i]
        i += 1
        if char == "\\":
            result += escape()
        elif char == "{":
            result += choice_block()
        else:
            result += char
    return re.sub(r"\\([{}|])", r"\1", result)


# -- graph -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Link:
    origin_id: Any
    origin_slot: int
    target_id: Any
    target_slot: int
    type: Any


@dataclasses.dataclass(frozen=True)
class Slot:
    name: str
    type: Any
    link: Any


def _links(workflow: dict) -> dict[Any, Link]:
    """Links in the array form ``[id, origin, origin_slot, target, target_slot, type]`` or as objects."""
    links = {}
    for item in workflow.get("links") or []:
        if isinstance(item, dict):
            links[item["id"]] = Link(item["origin_id"], item["origin_slot"], item["target_id"], item["target_slot"],
                                     item.get("type"))
        else:
            links[item[0]] = Link(item[1], item[2], item[3], item[4], item[5] if len(item) > 5 else None)
    return links


def _type_matches(a: Any, b: Any) -> bool:
    """``LiteGraph.isValidConnection``: '*'/'' match anything; comma lists match if any pair does."""
    a = 0 if a in ("", "*") else a
    b = 0 if b in ("", "*") else b
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_type_matches(x, y) for x in a.split(",") for y in b.split(","))


class _Converter:
    def __init__(self, workflow: dict, object_info: dict, rng: random.Random | None):
        self.object_info = object_info
        self.rng = rng
        self.links = _links(workflow)
        self.nodes = {node["id"]: node for node in workflow["nodes"]}
        self._check_supported(workflow)

    def _check_supported(self, workflow: dict) -> None:
        subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs") or []}
        group_nodes = set((workflow.get("extra") or {}).get("groupNodes") or {})
        for node in self.nodes.values():
            kind = node.get("type")
            if kind in subgraphs:
                raise WorkflowFormatError(
                    f"node #{node['id']} is a subgraph ({node.get('title') or kind}); subgraphs are not supported "
                    "by this converter: unpack it in the editor (right click > Unpack Subgraph) or export the "
                    "workflow with Workflow > Export (API)")
            if kind in group_nodes or str(kind).startswith(("workflow>", "workflow/")):
                raise WorkflowFormatError(
                    f"node #{node['id']} is a group node ({kind}); group nodes are not supported by this converter: "
                    "convert it to nodes in the editor or export the workflow with Workflow > Export (API)")
            if kind in FRONTEND_ONLY_NODES or node.get("mode") in (MUTED, BYPASSED):
                continue
            if kind not in self.object_info:
                raise WorkflowFormatError(
                    f"node type {kind} (node #{node['id']}) is not installed on the server (install the custom "
                    "node pack that provides it; for a frontend-only node of a JS extension, export the workflow "
                    "with Workflow > Export (API) instead)")
            for d in input_defs(self.object_info[kind]):
                if d.is_widget and d.widget_type in UNSUPPORTED_WIDGET_TYPES:
                    raise WorkflowFormatError(
                        f"node #{node['id']} ({kind}) has a {d.widget_type} widget whose value the editor computes "
                        "when queueing; export this workflow with Workflow > Export (API) instead")

    def slots(self, node: dict) -> list[Slot]:
        """The node's input slots in live-graph order: sockets, then every widget input, then inputs
        added by frontend code (``litegraphService.ts`` #addInputs and configure)."""
        saved = {s.get("name"): s for s in node.get("inputs") or []}
        node_def = self.object_info.get(node.get("type"))
        if node_def is None or node.get("type") in FRONTEND_ONLY_NODES:
            return [Slot(s.get("name"), s.get("type"), s.get("link")) for s in node.get("inputs") or []]
        defs = input_defs(node_def)
        ordered = [d for d in defs if not d.is_widget] + [d for d in defs if d.is_widget]
        slots = [Slot(d.name, d.type, (saved.get(d.name) or {}).get("link")) for d in ordered]
        names = {d.name for d in defs}
        return slots + [Slot(s.get("name"), s.get("type"), s.get("link"))
                        for s in node.get("inputs") or [] if s.get("name") not in names]

    def output_type(self, node: dict, slot: int) -> Any:
        node_def = self.object_info.get(node.get("type"))
        if node_def is not None and slot < len(node_def.get("output", [])):
            kind = node_def["output"][slot]
            return "COMBO" if isinstance(kind, list) else kind
        outputs = node.get("outputs") or []
        return outputs[slot].get("type") if slot < len(outputs) else None

    def resolve_input(self, node: dict, slot: Slot, visited: set, type: Any = None):
        """``ExecutableNodeDTO.resolveInput``: (origin id, origin slot) of a real node, or None."""
        key = (node["id"], "I", slot.name)
        if key in visited:
            raise WorkflowFormatError(f"circular link while resolving input {slot.name} of node #{node['id']}")
        visited.add(key)
        if slot.link is None:
            return None
        link = self.links.get(slot.link)
        if link is None:
            raise WorkflowFormatError(f"node #{node['id']} input {slot.name} refers to missing link {slot.link}")
        origin = self.nodes.get(link.origin_id)
        if origin is None:
            raise WorkflowFormatError(f"link {slot.link} into node #{node['id']} comes from missing node "
                                      f"#{link.origin_id}")
        return self.resolve_output(origin, link.origin_slot, type if type is not None else slot.type, visited)

    def resolve_output(self, node: dict, slot: int, type: Any, visited: set):
        key = (node["id"], "O", slot)
        if key in visited:
            raise WorkflowFormatError(f"circular link while resolving output {slot} of node #{node['id']}")
        visited.add(key)
        slots = self.slots(node)
        if node.get("mode") == BYPASSED:
            index = self.bypass_slot_index(node, slots, slot, type)
            return None if index == -1 else self.resolve_input(node, slots[index], visited)
        if node.get("type") in FRONTEND_ONLY_NODES:
            return self.resolve_input(node, slots[slot], visited, type) if slot < len(slots) else None
        return (node["id"], slot)

    def bypass_slot_index(self, node: dict, slots: list[Slot], slot: int, type: Any) -> int:
        """``#getBypassSlotIndex``: the same slot index if its type fits, else the first input of the
        consumer's exact type, else the first compatible input."""
        if type in ("*", ""):
            return slot if len(slots) > slot else 0
        output_type = self.output_type(node, slot)
        if slot < len(slots) and _type_matches(slots[slot].type, output_type) and _type_matches(slots[slot].type, type):
            return slot
        for i, s in enumerate(slots):
            if s.type == type:
                return i
        for i, s in enumerate(slots):
            if _type_matches(s.type, output_type) and _type_matches(s.type, type):
                return i
        return -1

    def primitive_values(self) -> dict[tuple[Any, str], Any]:
        """``PrimitiveNode.applyToGraph``: its first widget value replaces each linked widget's value."""
        values = {}
        for node in self.nodes.values():
            if node.get("type") != "PrimitiveNode" or not node.get("widgets_values"):
                continue
            value = node["widgets_values"][0]
            if (node.get("properties") or {}).get("Run widget replace on values") and "%" in str(value):
                raise WorkflowFormatError(
                    f"PrimitiveNode #{node['id']} uses 'Run widget replace on values' (%node.widget% text "
                    "replacement), which this converter does not reproduce; export with Workflow > Export (API)")
            for link_id in ((node.get("outputs") or [{}])[0].get("links") or []):
                link = self.links.get(link_id)
                target = self.nodes.get(link.target_id) if link else None
                for s in (target or {}).get("inputs") or []:
                    if s.get("link") == link_id:
                        widget = (s.get("widget") or {}).get("name") or s.get("name")
                        values[(target["id"], widget)] = value
        return values

    def convert(self) -> dict:
        primitives = self.primitive_values()
        prompt: dict[str, dict] = {}
        for node in self.nodes.values():
            kind = node.get("type")
            if kind in FRONTEND_ONLY_NODES or node.get("mode") in (MUTED, BYPASSED):
                continue
            node_def = self.object_info[kind]
            inputs: dict[str, Any] = {}
            dynamic = {d.name for d in input_defs(node_def) if d.widget_type == "STRING"
                       and d.options.get("dynamicPrompts") is True}
            for name, value in widget_values(node, node_def).items():
                value = primitives.get((node["id"], name), value)
                if name in dynamic and isinstance(value, str):
                    value = process_dynamic_prompt(value, self.rng)
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
            for slot in self.slots(node):
                resolved = self.resolve_input(node, slot, set())
                if resolved is not None:
                    inputs[slot.name] = [str(resolved[0]), int(resolved[1])]
            title = node.get("title") or node_def.get("display_name") or kind
            prompt[str(node["id"])] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
        for entry in prompt.values():  # inputs fed by muted nodes disappear, as in graphToPrompt
            for name, value in list(entry["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                    del entry["inputs"][name]
        return prompt


def to_api(workflow: dict, object_info: dict, rng: random.Random | None = None) -> dict:
    """API-format prompt for ``workflow``; API-format input is returned unchanged.

    ``object_info`` is the server's ``/object_info``; ``rng`` drives ``{a|b}`` dynamic prompts.
    """
    if is_api_format(workflow):
        return workflow
    if not is_ui_format(workflow):
        raise WorkflowFormatError("not a ComfyUI workflow: expected the editor's format (a 'nodes' list) or the "
                                  "API format ({id: {'class_type', 'inputs'}})")
    return _Converter(workflow, object_info, rng).convert()

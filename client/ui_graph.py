"""Build and edit editor-format (UI, version 0.4) workflows from a server's ``/object_info``.

Widget values always come from the node definitions (defaults) plus explicit values, in the frontend's
widget order (``workflow_format.input_defs``), so a workflow stays right when a node gains inputs.
Pure: no ComfyUI import. Used by ``scripts/make_workflows.py`` and ``client/tiny_swap.py``.
"""

from __future__ import annotations

from typing import Any

from .workflow_format import InputDef, input_defs

# Widgets the frontend adds after a node's inputs (useImageUploadWidget and friends): an input spec
# flag -> the value the editor saves for the extra 'upload' widget at the end of ``widgets_values``.
UPLOAD_WIDGETS = {"image_upload": "image"}

GROUP_COLOR = "#3f789e"
NODE_WIDTH = 340
GAP = 40
GROUP_PAD = 20
GROUP_TITLE = 50  # group title bar (font 24) plus the node's own title bar above its pos


class WidgetError(ValueError):
    """A widget value names an input the node does not have, or a widget without default got no value."""


def widget_inputs(node_def: dict) -> list[InputDef]:
    return [d for d in input_defs(node_def) if d.is_widget]


def widget_index(node_def: dict, name: str) -> int:
    """Position of widget ``name`` in ``widgets_values`` (control widgets take extra entries)."""
    position = 0
    for d in widget_inputs(node_def):
        if d.name == name:
            return position
        position += 1 + d.control_widgets
    raise WidgetError(f"{node_def.get('name', '?')} has no widget {name!r}")


def build_widgets_values(kind: str, node_def: dict, values: dict[str, Any]) -> list:
    """``widgets_values`` for a new ``kind`` node: ``values`` where given, else the definition's default.

    Raises when ``values`` names no widget of the node, or a widget has neither (a model-file combo
    must be given its file name)."""
    values = dict(values)
    result: list = []
    for d in widget_inputs(node_def):
        if d.name in values:
            result.append(values.pop(d.name))
        elif "default" in d.options or (d.widget_type == "COMBO" and d.frontend_default is not None):
            result.append(d.frontend_default)
        else:
            raise WidgetError(f"{kind}.{d.name} has no default; pass its value")
        # the control combo ('fixed' keeps the value as saved) and, for combos, its filter text
        result += ["fixed"] * min(d.control_widgets, 1) + [""] * max(d.control_widgets - 1, 0)
    if values:
        raise WidgetError(f"{kind} has no widget inputs {sorted(values)}")
    for d in widget_inputs(node_def):
        for flag, saved in UPLOAD_WIDGETS.items():
            if d.options.get(flag):
                result.append(saved)
    return result


def set_widget(node: dict, node_def: dict, name: str, value: Any) -> None:
    """Set one widget value of a saved node in place."""
    index = widget_index(node_def, name)
    values = node.setdefault("widgets_values", [])
    if isinstance(values, dict):
        values[name] = value
        return
    if index >= len(values):
        raise WidgetError(f"node #{node.get('id')} ({node.get('type')}) saved no value for widget {name!r}")
    values[index] = value


def estimated_size(node_def: dict) -> tuple[int, int]:
    """Roughly the frontend's ``computeSize``; the editor enlarges a node whose saved size is too small."""
    defs = input_defs(node_def)
    sockets = sum(1 for d in defs if not d.is_widget)
    rows = max(sockets, len(node_def.get("output", [])))
    widgets = [d for d in defs if d.is_widget]
    multiline = sum(1 for d in widgets if d.widget_type == "STRING" and d.options.get("multiline"))
    controls = sum(min(d.control_widgets, 1) for d in widgets)
    uploads = sum(1 for d in widgets for flag in UPLOAD_WIDGETS if d.options.get(flag))
    height = 16 + 22 * rows + 26 * (len(widgets) + controls + uploads) + 90 * multiline + 260 * uploads
    return NODE_WIDTH, max(height, 60)


class UIGraph:
    """Builds an editor workflow: nodes from ``/object_info`` definitions, links, and groups laid out as
    columns (one group per stage, left to right)."""

    def __init__(self, object_info: dict):
        self.object_info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []
        self.extra: dict = {}

    def add(self, kind: str, title: str | None = None, size: tuple[int, int] | None = None,
            properties: dict | None = None, **widgets) -> dict:
        """A node of ``kind``; ``widgets`` override the definition's defaults (by input name)."""
        node_def = self.object_info[kind]
        node = {
            "id": len(self.nodes) + 1, "type": kind, "pos": [0, 0],
            "size": list(size or estimated_size(node_def)), "flags": {}, "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": d.name, "type": d.type, "link": None} for d in input_defs(node_def)
                       if not d.is_widget],
            "outputs": [{"name": name, "type": kind_, "links": [], "slot_index": i}
                        for i, (name, kind_) in enumerate(zip(node_def["output_name"], node_def["output"]))],
            "properties": {"Node name for S&R": kind, **(properties or {})},
            "widgets_values": build_widgets_values(kind, node_def, widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def note(self, text: str, title: str = "Read me", size: tuple[int, int] = (520, 700)) -> dict:
        """A frontend-only Note node (not sent to the server)."""
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": [0, 0], "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [], "title": title,
                "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
        self.nodes.append(node)
        return node

    def connect(self, origin: dict, slot: int, target: dict, input_name: str) -> None:
        link_id = len(self.links) + 1
        kind = origin["outputs"][slot]["type"]
        names = [s["name"] for s in target["inputs"]]
        if input_name not in names:  # a widget input fed by a link gets a socket entry
            if input_name not in {d.name for d in widget_inputs(self.object_info[target["type"]])}:
                raise WidgetError(f"{target['type']} has no input {input_name!r}")
            target["inputs"].append({"name": input_name, "type": kind, "widget": {"name": input_name},
                                     "link": None})
            names.append(input_name)
        target_slot = names.index(input_name)
        if target["inputs"][target_slot]["link"] is not None:
            raise WidgetError(f"{target['type']}.{input_name} is already connected")
        target["inputs"][target_slot]["link"] = link_id
        origin["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, origin["id"], slot, target["id"], target_slot, kind])

    def group(self, title: str, *columns: list[dict], color: str = GROUP_COLOR) -> None:
        """A group of nodes in side-by-side columns, placed right of the previous group by :meth:`to_json`."""
        self.groups.append({"title": title, "columns": [list(c) for c in columns], "color": color})

    def _layout(self, left: list[dict]) -> list[dict]:
        """Place ``left`` (free nodes, e.g. the note) in the first column, then each group's columns."""
        x = 0
        for node in left:
            node["pos"] = [x, 0]
            x += node["size"][0] + GAP
        laid_out = []
        for i, spec in enumerate(self.groups):
            group_x = x
            x += GROUP_PAD
            bottom = 0
            for column in spec["columns"]:
                y = GROUP_TITLE
                width = max(n["size"][0] for n in column)
                for node in column:
                    node["pos"] = [x, y]
                    y += node["size"][1] + GAP
                bottom = max(bottom, y - GAP)
                x += width + GAP
            x += GROUP_PAD - GAP
            laid_out.append({"id": i + 1, "title": spec["title"],
                             "bounding": [group_x, -30, x - group_x, bottom + GROUP_PAD + 30],
                             "color": spec["color"], "font_size": 24, "flags": {}})
            x += GAP
        return laid_out

    def to_json(self, left: list[dict] = ()) -> dict:
        grouped = {id(n) for spec in self.groups for column in spec["columns"] for n in column}
        free = [n for n in self.nodes if id(n) not in grouped]
        if set(map(id, free)) != set(map(id, left)):
            raise ValueError(f"nodes in no group: {[n['type'] for n in free if n not in left]}")
        groups = self._layout(list(left))
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": groups, "config": {},
                "extra": {"ds": {"scale": 0.85, "offset": [40, 70]}, **self.extra}, "version": 0.4}

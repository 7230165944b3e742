"""Combo inputs checked against their options when a prompt is queued.

ComfyUI 0.3.64 checks a V1 node's combo values (``value_not_in_list``) but not a V3 node's, so a value typed
into an API prompt or ``run --set`` would otherwise reach the node unchecked. Each pack node with combos
declares ``validate_inputs`` naming exactly its combo inputs (ComfyUI skips its own checks only for the inputs
that function names, so ranges and types stay ComfyUI's) and returns :func:`check`'s answer: ``True``, or one
message naming the node, the input, the value and the allowed values, which ComfyUI reports as a refused prompt.
A combo fed by a link is not known at that time (``None``) and is checked where the node's config is built.
"""

from __future__ import annotations


def message(node_name: str, key: str, value, allowed) -> str:
    if not allowed:
        return f"{node_name}: {key} {value!r} is not an option; there are none (no such files are installed)"
    shown = ", ".join(map(str, allowed)) if len(allowed) <= 30 else f"one of {len(allowed)} options"
    return f"{node_name}: {key} {value!r} is not an option; choose one of: {shown}"


def problems(node_cls, **values) -> list[str]:
    """One line per value not among its combo input's options (``None`` = linked or absent: not checked).

    The schema is built afresh, so file lists (checkpoints, IP-Adapters) are current, as in /object_info."""
    schema = node_cls.define_schema()
    options = {spec.id: list(spec.options) for spec in schema.inputs if getattr(spec, "options", None) is not None}
    name = schema.display_name or schema.node_id
    return [message(name, key, value, options[key]) for key, value in values.items()
            if value is not None and value not in options[key]]


def check(node_cls, **values) -> bool | str:
    """``validate_inputs`` answer: True, or the problems joined into one message."""
    found = problems(node_cls, **values)
    return "; ".join(found) if found else True


def require(node_name: str, key: str, value, allowed) -> None:
    """Raise the same message at run time, for values that came through a link."""
    if value not in allowed:
        raise ValueError(message(node_name, key, value, list(allowed)))

"""UI -> API conversion rules that need no server: widget layout on synthetic node definitions (frontend 1.27),
dynamic prompts, and the format checks. The conversions against the real ``/object_info`` are in
``tests/server/test_workflow_format.py``."""

from __future__ import annotations

import random

import pytest

from comfyui_syncd.client.workflow_format import (InputDef, WorkflowFormatError, input_defs, is_api_format,
                                                  process_dynamic_prompt, to_api, widget_values)

pytestmark = pytest.mark.unit


def make_def(required, optional=None, order=None):
    node_def = {"input": {"required": required}, "input_order": {"required": order or list(required)}}
    if optional:
        node_def["input"]["optional"] = optional
        node_def["input_order"]["optional"] = list(optional)
    return node_def


@pytest.mark.parametrize("spec,name,extra", [
    (["INT", {}], "seed", 1),                                   # legacy name rule
    (["INT", {}], "noise_seed", 1),
    (["INT", {}], "steps", 0),
    (["INT", {"control_after_generate": True}], "value", 1),
    (["INT", {"control_after_generate": False}], "seed", 0),    # an explicit false wins over the name
    (["FLOAT", {}], "seed", 0),                                 # only INT widgets get the name rule
    (["COMBO", {"options": ["a", "b"], "control_after_generate": True}], "pick", 2),  # control + filter list
    ([["a", "b"], {"control_after_generate": True}], "pick", 2),
    ([["a", "b"], {}], "seed", 0),
])
def test_control_after_generate_rules(spec, name, extra):
    (d,) = input_defs(make_def({name: spec}))
    assert d.control_widgets == extra


def test_widget_order_follows_input_order_required_then_optional():
    node_def = make_def({"b": ["INT", {}], "model": ["MODEL", {}], "a": ["STRING", {}]},
                        optional={"c": ["BOOLEAN", {}], "mask": ["MASK", {}]}, order=["a", "model", "b"])
    assert [d.name for d in input_defs(node_def)] == ["a", "model", "b", "c", "mask"]
    values = widget_values({"id": 1, "type": "X", "widgets_values": ["text", 5, True]}, node_def)
    assert values == {"a": "text", "b": 5, "c": True}


def test_force_input_is_a_socket_and_legacy_values_are_dropped():
    node_def = make_def({"steps": ["INT", {"forceInput": True}], "name": ["STRING", {}]})
    assert not input_defs(node_def)[0].is_widget
    assert widget_values({"id": 1, "type": "X", "widgets_values": ["n"]}, node_def) == {"name": "n"}
    # before frontend 1.16 the forceInput input also stored a value (migrateWidgetsValues)
    assert widget_values({"id": 1, "type": "X", "widgets_values": [4, "n"]}, node_def) == {"name": "n"}


def test_widgets_values_by_name():
    node_def = make_def({"a": ["INT", {}], "b": ["STRING", {}]})
    assert widget_values({"id": 1, "type": "X", "widgets_values": {"b": "x", "a": 2}}, node_def) == {"a": 2, "b": "x"}


def test_dynamic_prompt_choices_use_the_rng():
    picks = {process_dynamic_prompt("{a|b|c}", random.Random(seed)) for seed in range(40)}
    assert picks == {"a", "b", "c"}
    rng = random.Random(3)
    first = int(random.Random(3).random() * 3)
    assert process_dynamic_prompt("x {a|b|c} y", rng) == f"x {'abc'[first]} y"
    assert process_dynamic_prompt("{a|{b|b}}", random.Random(0)) in {"a", "b"}
    assert process_dynamic_prompt(r"\{literal\|braces\}") == "{literal|braces}"


def test_input_def_default_for_new_widgets():
    assert InputDef("x", "INT", {}, False).frontend_default == 0
    assert InputDef("x", "COMBO", {"options": ["p", "q"]}, False).frontend_default == "p"
    assert InputDef("x", "STRING", {"default": "d"}, False).frontend_default == "d"


def test_api_format_passes_through_unchanged():
    """Returned as is, before ``object_info`` is looked at."""
    api = {"4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
           "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 1]}}}
    assert is_api_format(api)
    assert to_api(api, {}) is api


def test_not_a_workflow():
    with pytest.raises(WorkflowFormatError, match="not a ComfyUI workflow"):
        to_api({"foo": 1}, {})

"""UI -> API conversion on hand-written editor JSON, against the real server's /object_info.

Each case states the API graph the editor (frontend 1.27, ``graphToPrompt``) produces for it;
``test_same_as_the_real_frontend`` checks every case and the shipped workflows against the real
frontend in headless Chromium. The runnable cases are also queued, so the server agrees too.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil

import pytest

from comfyui_syncd.client.api import ComfyClient, PromptValidationError
from comfyui_syncd.client.workflow_format import WorkflowFormatError, to_api


# -- hand-written editor JSON ---------------------------------------------------------------------
def node(id, type, widgets=None, inputs=(), outputs=(), mode=0, **extra):
    """An editor node; inputs are (name, type, link) or (name, type, link, 'widget'); outputs (name, type, links)."""
    result = {
        "id": id, "type": type, "pos": [100 * id, 100], "size": [300, 120], "flags": {}, "order": id,
        "mode": mode, "properties": {"Node name for S&R": type},
        "inputs": [{"name": i[0], "type": i[1], "link": i[2], **({"widget": {"name": i[0]}} if len(i) > 3 else {})}
                   for i in inputs],
        "outputs": [{"name": o[0], "type": o[1], "links": list(o[2]), "slot_index": k} for k, o in enumerate(outputs)],
    }
    if widgets is not None:
        result["widgets_values"] = widgets
    result.update(extra)
    return result


def workflow(nodes, links):
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": max((l[0] for l in links), default=0),
            "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def pipeline(prefix="wf_test"):
    """Tiny SD1.5 txt2img: KSampler's seed stores a control value after it; the demo nodes' seeds opt out."""
    nodes = [
        node(1, "SynCDTinyDemoModel", ["sd15", 7, 32],
             outputs=[("MODEL", "MODEL", [1]), ("VAE", "VAE", [6])]),
        node(2, "SynCDTinyDemoTextEncode", ["sd15", "a photo of a dog", 3],
             outputs=[("CONDITIONING", "CONDITIONING", [2])]),
        node(3, "SynCDTinyDemoTextEncode", ["sd15", "", 0], outputs=[("CONDITIONING", "CONDITIONING", [3])]),
        node(4, "EmptyLatentImage", [64, 64, 1], outputs=[("LATENT", "LATENT", [4])]),
        node(5, "KSampler", [123, "increment", 2, 4.5, "euler", "normal", 1.0],
             inputs=[("model", "MODEL", 1), ("positive", "CONDITIONING", 2), ("negative", "CONDITIONING", 3),
                     ("latent_image", "LATENT", 4)],
             outputs=[("LATENT", "LATENT", [5])]),
        node(6, "VAEDecode", [], inputs=[("samples", "LATENT", 5), ("vae", "VAE", 6)],
             outputs=[("IMAGE", "IMAGE", [7])]),
        node(7, "SaveImage", [prefix], inputs=[("images", "IMAGE", 7)]),
    ]
    links = [[1, 1, 0, 5, 0, "MODEL"], [2, 2, 0, 5, 1, "CONDITIONING"], [3, 3, 0, 5, 2, "CONDITIONING"],
             [4, 4, 0, 5, 3, "LATENT"], [5, 5, 0, 6, 0, "LATENT"], [6, 1, 1, 6, 1, "VAE"], [7, 6, 0, 7, 0, "IMAGE"]]
    return workflow(nodes, links)


PIPELINE_API = {
    "1": {"class_type": "SynCDTinyDemoModel", "inputs": {"family": "sd15", "seed": 7, "width": 32}},
    "2": {"class_type": "SynCDTinyDemoTextEncode", "inputs": {"family": "sd15", "text": "a photo of a dog", "seed": 3}},
    "3": {"class_type": "SynCDTinyDemoTextEncode", "inputs": {"family": "sd15", "text": "", "seed": 0}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "5": {"class_type": "KSampler", "inputs": {
        "seed": 123, "steps": 2, "cfg": 4.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}},
    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 1]}},
    "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "wf_test", "images": ["6", 0]}},
}


def find(wf, node_id):
    return next(n for n in wf["nodes"] if n["id"] == node_id)


def relink(wf, link_id, target_id, target_slot):
    link = next(l for l in wf["links"] if l[0] == link_id)
    link[3], link[4] = target_id, target_slot


def case_bypassed_attention():
    """A bypassed SynCDSharedAttention between the model and KSampler: MODEL passes through (same slot)."""
    wf = pipeline()
    wf["nodes"].append(node(8, "SynCDSharedAttention", [3, "none", 0.0, 1.0, True, "all", "", "", "stacked",
                                                        "efficient"],
                            inputs=[("model", "MODEL", 1), ("foreground_masks", "MASK", None), ("clip", "CLIP", None)],
                            outputs=[("MODEL", "MODEL", [8])], mode=4))
    relink(wf, 1, 8, 0)
    wf["links"].append([8, 8, 0, 5, 0, "MODEL"])
    find(wf, 5)["inputs"][0]["link"] = 8
    find(wf, 1)["outputs"][0]["links"] = [1]
    return wf


def case_bypassed_sampler():
    """A bypassed KSampler: its LATENT output takes the first input of the exact type (latent_image, slot 3)."""
    wf = pipeline()
    find(wf, 5)["mode"] = 4
    return wf


def case_bypassed_decode():
    """A bypassed VAEDecode has no IMAGE input: SaveImage.images is left out (the server then refuses)."""
    wf = pipeline()
    find(wf, 6)["mode"] = 4
    return wf


def case_muted_attention():
    """A muted node is dropped and the inputs it fed disappear."""
    wf = case_bypassed_attention()
    find(wf, 8)["mode"] = 2
    return wf


def case_reroutes():
    """model -> Reroute -> Reroute -> KSampler; plus a Note, which is frontend-only."""
    wf = pipeline()
    relink(wf, 1, 9, 0)
    wf["nodes"] += [
        node(9, "Reroute", inputs=[("", "*", 1)], outputs=[("", "MODEL", [9])],
             properties={"showOutputText": False, "horizontal": False}),
        node(10, "Reroute", inputs=[("", "*", 9)], outputs=[("", "MODEL", [10])],
             properties={"showOutputText": False, "horizontal": False}),
        node(11, "Note", ["a note"], properties={"text": ""}),
    ]
    wf["links"] += [[9, 9, 0, 10, 0, "*"], [10, 10, 0, 5, 0, "MODEL"]]
    find(wf, 5)["inputs"][0]["link"] = 10
    return wf


def case_primitive():
    """A PrimitiveNode feeding the KSampler seed and a text-encode seed: its value replaces theirs."""
    wf = pipeline()
    wf["nodes"].append(node(12, "PrimitiveNode", [99, "fixed"],
                            outputs=[("INT", "INT", [11, 12])], properties={"Run widget replace on values": False}))
    find(wf, 12)["outputs"][0]["widget"] = {"name": "seed"}
    find(wf, 5)["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 11})
    find(wf, 2)["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 12})
    wf["links"] += [[11, 12, 0, 5, 4, "INT"], [12, 12, 0, 2, 0, "INT"]]
    return wf


def case_linked_widget():
    """A real node (PrimitiveInt) linked into a widget input: the link replaces the widget value."""
    wf = pipeline()
    wf["nodes"].append(node(13, "PrimitiveInt", [555, "fixed"], outputs=[("INT", "INT", [13])]))
    find(wf, 5)["inputs"].append({"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 13})
    wf["links"].append([13, 13, 0, 5, 4, "INT"])
    return wf


def case_dynamic_prompt():
    """CLIPTextEncode.text has dynamicPrompts: comments are stripped and {a|b} choices resolved."""
    wf = pipeline()
    wf["nodes"].append(node(14, "CLIPTextEncode", ["a {red|red} dog // a comment\nby /* hidden */ the sea \\{x\\}"],
                            inputs=[("clip", "CLIP", None)], outputs=[("CONDITIONING", "CONDITIONING", [])]))
    return wf


def expected(**changes):
    api = copy.deepcopy(PIPELINE_API)
    for key, value in changes.items():
        node_id, _, name = key.partition("_")
        if name:
            if value is None:
                api[node_id]["inputs"].pop(name)
            else:
                api[node_id]["inputs"][name] = value
        elif value is None:
            api.pop(node_id)
        else:
            api[node_id] = value
    return api


CASES = {
    "pipeline": (pipeline, expected()),
    "bypassed_attention": (case_bypassed_attention, expected()),
    "bypassed_sampler": (case_bypassed_sampler, expected(**{"5": None, "6_samples": ["4", 0]})),
    "bypassed_decode": (case_bypassed_decode, expected(**{"6": None, "7_images": None})),
    "muted_attention": (case_muted_attention, expected(**{"5_model": None})),
    "reroutes": (case_reroutes, expected()),
    "primitive": (case_primitive, expected(**{"5_seed": 99, "2_seed": 99})),
    "linked_widget": (case_linked_widget, expected(**{"5_steps": ["13", 0], "13": {
        "class_type": "PrimitiveInt", "inputs": {"value": 555}}})),
    "dynamic_prompt": (case_dynamic_prompt, expected(**{"14": {
        "class_type": "CLIPTextEncode", "inputs": {"text": "a red dog \nby  the sea {x}"}}})),
}


def strip_meta(api):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return ComfyClient(comfy_server.url).object_info()


# -- expected API graphs --------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_converts_like_the_editor(name, object_info):
    build, api = CASES[name]
    assert strip_meta(to_api(build(), object_info)) == api


def test_meta_title_is_the_node_title_or_display_name(object_info):
    wf = pipeline()
    find(wf, 5)["title"] = "My sampler"
    api = to_api(wf, object_info)
    assert api["5"]["_meta"] == {"title": "My sampler"}
    assert api["1"]["_meta"] == {"title": "SynCD Tiny Demo Model"}


@pytest.mark.parametrize("name", ["pipeline", "bypassed_attention", "reroutes", "primitive", "bypassed_sampler"])
def test_converted_graph_runs(name, object_info, comfy_client):
    api = to_api(CASES[name][0](), object_info)
    result = comfy_client.run(api, timeout=120)
    assert [f.node_id for f in result.files()] == ["7"]


def test_muted_input_is_reported_missing_by_the_server(object_info, comfy_client):
    with pytest.raises(PromptValidationError) as info:
        comfy_client.run(to_api(case_muted_attention(), object_info))
    errors = info.value.node_errors["5"]["errors"]
    assert {"type": "required_input_missing", "details": "model"}.items() <= errors[0].items()


def test_link_objects_convert_like_link_arrays(object_info):
    wf = case_reroutes()
    wf["links"] = [dict(zip(["id", "origin_id", "origin_slot", "target_id", "target_slot", "type"], l))
                   for l in wf["links"]]
    assert strip_meta(to_api(wf, object_info)) == PIPELINE_API


def test_short_widgets_values_keep_the_defaults(object_info):
    """A node saved before it gained inputs: the missing widgets keep their defaults, as in the editor."""
    wf = pipeline()
    find(wf, 5)["widgets_values"] = [123, "fixed", 2]
    inputs = to_api(wf, object_info)["5"]["inputs"]
    spec = object_info["KSampler"]["input"]["required"]
    assert inputs["steps"] == 2
    assert inputs["cfg"] == spec["cfg"][1]["default"]
    assert inputs["sampler_name"] == spec["sampler_name"][0][0]  # no default: the first option
    assert inputs["scheduler"] == spec["scheduler"][0][0]
    assert inputs["denoise"] == spec["denoise"][1]["default"]


# -- errors and pass-through ----------------------------------------------------------------------
def test_unknown_node_type_is_named(object_info):
    wf = pipeline()
    find(wf, 6)["type"] = "NoSuchDecoder"
    with pytest.raises(WorkflowFormatError, match=r"node type NoSuchDecoder \(node #6\) is not installed on the server"):
        to_api(wf, object_info)


def test_muted_unknown_node_is_dropped(object_info):
    wf = pipeline()
    wf["nodes"].append(node(20, "NoSuchNode", [1], mode=2))
    assert "20" not in to_api(wf, object_info)


def test_bypassed_unknown_node_passes_through_its_saved_slots(object_info):
    wf = case_bypassed_attention()
    find(wf, 8)["type"] = "SomeMissingModelPatch"
    assert strip_meta(to_api(wf, object_info)) == PIPELINE_API


def test_primitive_text_replacement_is_refused(object_info):
    wf = case_primitive()
    find(wf, 12)["widgets_values"] = ["%KSampler.steps%", "fixed"]
    find(wf, 12)["properties"]["Run widget replace on values"] = True
    with pytest.raises(WorkflowFormatError, match="PrimitiveNode #12 uses 'Run widget replace on values'"):
        to_api(wf, object_info)


def test_subgraph_is_refused_with_a_fix(object_info):
    wf = pipeline()
    wf["definitions"] = {"subgraphs": [{"id": "1b3e4c2a-0000-4000-8000-000000000000", "nodes": [], "links": []}]}
    find(wf, 6)["type"] = "1b3e4c2a-0000-4000-8000-000000000000"
    with pytest.raises(WorkflowFormatError, match=r"node #6 is a subgraph.*Unpack Subgraph"):
        to_api(wf, object_info)


def test_list_values_are_wrapped(object_info):
    wf = pipeline()
    find(wf, 7)["widgets_values"] = [["a", "b"]]
    assert to_api(wf, object_info)["7"]["inputs"]["filename_prefix"] == {"__value__": ["a", "b"]}


# -- the real frontend ----------------------------------------------------------------------------
CHROMIUM = os.environ.get("SYNCD_CHROMIUM", "/usr/bin/chromium")
SHIPPED = sorted((pathlib.Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))


@pytest.mark.browser
def test_same_as_the_real_frontend(object_info, comfy_server):
    """``app.loadGraphData`` + ``app.graphToPrompt`` in the bundled frontend give the same API graphs."""
    playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"needs Chromium at {CHROMIUM} (set SYNCD_CHROMIUM)")
    workflows = {name: build() for name, (build, _) in CASES.items()}
    workflows.update({path.name: json.loads(path.read_text()) for path in SHIPPED})
    with playwright.sync_playwright() as p:
        local_only = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"  # no look-ups off this machine
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", local_only])
        try:
            page = browser.new_page()
            page.goto(comfy_server.url)
            page.wait_for_function("window.app && window.app.graph && window.app.vueAppReady", timeout=60_000)
            for name, wf in workflows.items():
                theirs = page.evaluate(
                    "async (wf) => { await window.app.loadGraphData(wf, true, true, null);"
                    " return (await window.app.graphToPrompt()).output }", wf)
                assert strip_meta(to_api(wf, object_info)) == strip_meta(theirs), name
        finally:
            browser.close()

"""Regenerate workflows/*.json (editor format) from a server's /object_info, so widget orders are right.

    python scripts/make_workflows.py [--server URL]   # default: a private embedded server
"""

from __future__ import annotations

import argparse
import json
import pathlib

from comfyui_syncd.client.api import ComfyClient
from comfyui_syncd.client.workflow_format import input_defs

WORKFLOWS = pathlib.Path(__file__).resolve().parent.parent / "workflows"
PROMPT = "a photo of a dog on the beach"


class UIGraph:
    """Builds the editor's workflow JSON (version 0.4: node list plus link arrays)."""

    def __init__(self, object_info: dict):
        self.object_info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, kind: str, pos: tuple[int, int], size: tuple[int, int] = (315, 130), **widgets) -> dict:
        node_def = self.object_info[kind]
        values = []
        for d in input_defs(node_def):
            if not d.is_widget:
                continue
            if d.name in widgets:
                values.append(widgets.pop(d.name))
            elif "default" in d.options:
                values.append(d.options["default"])
            else:
                raise ValueError(f"{kind}.{d.name} has no default; pass it")
            values += ["fixed"] * min(d.control_widgets, 1) + [""] * max(d.control_widgets - 1, 0)
        if widgets:
            raise ValueError(f"{kind} has no widget inputs {sorted(widgets)}")
        node = {
            "id": len(self.nodes) + 1, "type": kind, "pos": list(pos), "size": list(size), "flags": {},
            "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": d.name, "type": d.type, "link": None} for d in input_defs(node_def)
                       if not d.is_widget],
            "outputs": [{"name": name, "type": kind_, "links": [], "slot_index": i}
                        for i, (name, kind_) in enumerate(zip(node_def["output_name"], node_def["output"]))],
            "properties": {"Node name for S&R": kind},
            "widgets_values": values,
        }
        self.nodes.append(node)
        return node

    def connect(self, origin: dict, slot: int, target: dict, input_name: str) -> None:
        link_id = len(self.links) + 1
        kind = origin["outputs"][slot]["type"]
        names = [s["name"] for s in target["inputs"]]
        if input_name not in names:  # a widget input fed by a link gets a socket entry
            target["inputs"].append({"name": input_name, "type": kind, "widget": {"name": input_name}, "link": None})
            names.append(input_name)
        target_slot = names.index(input_name)
        target["inputs"][target_slot]["link"] = link_id
        origin["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, origin["id"], slot, target["id"], target_slot, kind])

    def to_json(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}}, "version": 0.4}


def demo_workflow(object_info: dict, family: str, mask_mode: str, latent: str, cfg: float, prefix: str) -> dict:
    g = UIGraph(object_info)
    model = g.add("SynCDTinyDemoModel", (50, 100), (340, 150), family=family)
    shared = g.add("SynCDSharedAttention", (450, 100), (400, 680), images_per_subject=3, mask_mode=mask_mode,
                   prompt=PROMPT, subject_word="dog")
    positive = g.add("SynCDTinyDemoTextEncode", (50, 310), (340, 230), family=family, text=PROMPT)
    negative = g.add("SynCDTinyDemoTextEncode", (50, 590), (340, 230), family=family, text="")
    empty = g.add(latent, (50, 870), (340, 130), width=64, height=64, batch_size=3)
    sampler = g.add("KSampler", (900, 100), (315, 280), steps=4, cfg=cfg, sampler_name="euler", scheduler="normal")
    decode = g.add("VAEDecode", (1260, 100), (210, 50))
    save = g.add("SaveImage", (1520, 100), (400, 320), filename_prefix=prefix)
    g.connect(model, 0, shared, "model")
    g.connect(shared, 0, sampler, "model")
    g.connect(positive, 0, sampler, "positive")
    g.connect(negative, 0, sampler, "negative")
    g.connect(empty, 0, sampler, "latent_image")
    g.connect(sampler, 0, decode, "samples")
    g.connect(model, 1, decode, "vae")
    g.connect(decode, 0, save, "images")
    return g.to_json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="a running ComfyUI with this pack (default: start one)")
    args = parser.parse_args()
    if args.server:
        object_info = ComfyClient(args.server).object_info()
    else:
        from comfyui_syncd.client.embedded import EmbeddedServer

        with EmbeddedServer() as server:
            object_info = ComfyClient(server.url).object_info()
    workflows = {
        "syncd_tiny_demo_sd15.json": demo_workflow(object_info, "sd15", "automatic", "EmptyLatentImage", 5.0,
                                                   "syncd_demo"),
        "jedi_tiny_demo_flux.json": demo_workflow(object_info, "flux", "none", "EmptySD3LatentImage", 1.0,
                                                  "jedi_demo"),
    }
    for name, workflow in workflows.items():
        (WORKFLOWS / name).write_text(json.dumps(workflow, indent=2) + "\n")
        print(WORKFLOWS / name)


if __name__ == "__main__":
    main()

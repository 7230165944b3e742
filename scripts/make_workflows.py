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


def customization_workflow(object_info: dict, family: str, references: int, all_in_one: bool, prefix: str) -> dict:
    """SynCD customization: references encoded once, injected every step, normalized text+image guidance."""
    g = UIGraph(object_info)
    flux = family == "flux"
    # upstream defaults: SDXL s_txt 7.5 and s_img 8 rising by 5 over 50 steps; Flux true_cfg 1.5, image_cfg 1.0
    scales = dict(text_scale=1.5, image_scale_start=1.0, image_scale_end=1.0) if flux else {}
    model = g.add("SynCDTinyDemoModel", (50, 100), (340, 150), family=family)
    refs_in = g.add("SynCDTinyDemoReferences", (50, 300), (340, 130), count=references)
    refs = g.add("SynCDReferenceImages", (450, 300), (340, 100))
    ref_text = g.add("SynCDTinyDemoTextEncode", (50, 480), (340, 230), family=family, text="photo of a dog")
    apply = g.add("SynCDApplyReferences", (450, 100), (340, 180))
    positive = g.add("SynCDTinyDemoTextEncode", (50, 760), (340, 230), family=family, text=PROMPT)
    negative = g.add("SynCDTinyDemoTextEncode", (50, 1040), (340, 230), family=family, text="")
    empty = g.add("EmptySD3LatentImage" if flux else "EmptyLatentImage", (450, 760), (340, 130),
                  width=64, height=64, batch_size=1)
    decode = g.add("VAEDecode", (1360, 100), (210, 50))
    save = g.add("SaveImage", (1620, 100), (400, 320), filename_prefix=prefix)
    g.connect(refs_in, 0, refs, "images")
    g.connect(refs_in, 1, refs, "masks")
    g.connect(model, 1, refs, "vae")
    g.connect(model, 0, apply, "model")
    g.connect(refs, 0, apply, "references")
    g.connect(ref_text, 0, apply, "reference_conditioning")
    if not flux:  # the SDXL model's global image feature: IP-Adapter Plus on one reference (scale 0.6)
        ip_models = g.add("SynCDTinyDemoIPAdapter", (450, 1000), (340, 100))
        first = g.add("ImageFromBatch", (450, 1150), (340, 100), batch_index=0, length=1)
        ip = g.add("SynCDIPAdapterApply", (450, 1300), (340, 200), weight=0.6, reference_weight=1.0)
        g.connect(model, 0, ip_models, "model")
        g.connect(refs_in, 0, first, "image")
        g.connect(apply, 0, ip, "model")
        g.connect(ip_models, 0, ip, "ipadapter")
        g.connect(ip_models, 1, ip, "clip_vision")
        g.connect(first, 0, ip, "image")
        g.connect(refs, 0, ip, "references")
        apply = ip
    if all_in_one:
        sampler = g.add("SynCDCustomizationSampler", (900, 100), (380, 420), steps=4, sampler_name="euler",
                        scheduler="normal", **scales)
        g.connect(apply, 0, sampler, "model")
        g.connect(positive, 0, sampler, "positive")
        g.connect(negative, 0, sampler, "negative")
        g.connect(empty, 0, sampler, "latent_image")
        g.connect(sampler, 0, decode, "samples")
    else:
        guider = g.add("SynCDNormalizedGuider", (900, 100), (380, 250), **scales)
        noise = g.add("RandomNoise", (900, 400), (315, 82))
        select = g.add("KSamplerSelect", (900, 530), (315, 58), sampler_name="euler_ancestral")
        schedule = g.add("BasicScheduler", (900, 640), (315, 106), scheduler="normal", steps=4)
        sampler = g.add("SamplerCustomAdvanced", (1000, 800), (300, 110))
        g.connect(apply, 0, guider, "model")
        g.connect(positive, 0, guider, "positive")
        g.connect(negative, 0, guider, "negative")
        g.connect(apply, 0, schedule, "model")
        g.connect(noise, 0, sampler, "noise")
        g.connect(guider, 0, sampler, "guider")
        g.connect(select, 0, sampler, "sampler")
        g.connect(schedule, 0, sampler, "sigmas")
        g.connect(empty, 0, sampler, "latent_image")
        g.connect(sampler, 0, decode, "samples")
    g.connect(model, 1, decode, "vae")
    g.connect(decode, 0, save, "images")
    return g.to_json()


def jedi_inpainting_workflow(object_info: dict, family: str, prefix: str) -> dict:
    """JeDi personalization as inpainting: [2 references | 1 new image], coupled attention, image guidance."""
    g = UIGraph(object_info)
    model = g.add("SynCDTinyDemoModel", (50, 100), (340, 150), family=family)
    refs_in = g.add("SynCDTinyDemoReferences", (50, 300), (340, 130), count=2)
    joint = g.add("JeDiJointImageSet", (450, 300), (340, 130), images_to_generate=1)
    coupled = g.add("SynCDSharedAttention", (450, 480), (400, 680), images_per_subject=3,
                    mask_mode="foreground_masks", unmasked_first_step=True)
    positive = g.add("SynCDTinyDemoTextEncode", (50, 480), (340, 230), family=family, text=PROMPT)
    negative = g.add("SynCDTinyDemoTextEncode", (50, 760), (340, 230), family=family, text="")
    guider = g.add("JeDiImageGuider", (900, 100), (340, 120))
    noise = g.add("RandomNoise", (900, 260), (315, 82))
    select = g.add("KSamplerSelect", (900, 380), (315, 58), sampler_name="euler")
    schedule = g.add("BasicScheduler", (900, 480), (315, 106), scheduler="normal", steps=4)
    sampler = g.add("SamplerCustomAdvanced", (1000, 640), (300, 110))
    decode = g.add("VAEDecode", (1360, 100), (210, 50))
    save = g.add("SaveImage", (1620, 100), (400, 320), filename_prefix=prefix)
    g.connect(refs_in, 0, joint, "reference_images")
    g.connect(refs_in, 1, joint, "reference_masks")
    g.connect(model, 1, joint, "vae")
    g.connect(model, 0, coupled, "model")
    g.connect(joint, 1, coupled, "foreground_masks")
    g.connect(coupled, 0, guider, "model")
    g.connect(positive, 0, guider, "positive")
    g.connect(negative, 0, guider, "negative")
    g.connect(coupled, 0, schedule, "model")
    g.connect(noise, 0, sampler, "noise")
    g.connect(guider, 0, sampler, "guider")
    g.connect(select, 0, sampler, "sampler")
    g.connect(schedule, 0, sampler, "sigmas")
    g.connect(joint, 0, sampler, "latent_image")
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
        "syncd_customization_sdxl_1ref.json": customization_workflow(object_info, "sdxl", 1, False, "syncd_sdxl_1ref"),
        "syncd_customization_sdxl_3ref.json": customization_workflow(object_info, "sdxl", 3, True, "syncd_sdxl_3ref"),
        "syncd_customization_flux_1ref.json": customization_workflow(object_info, "flux", 1, False, "syncd_flux_1ref"),
        "syncd_customization_flux_3ref.json": customization_workflow(object_info, "flux", 3, True, "syncd_flux_3ref"),
        "jedi_inpainting_sd15.json": jedi_inpainting_workflow(object_info, "sd15", "jedi_inpainting"),
    }
    for name, workflow in workflows.items():
        (WORKFLOWS / name).write_text(json.dumps(workflow, indent=2) + "\n")
        print(WORKFLOWS / name)


if __name__ == "__main__":
    main()

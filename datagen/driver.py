"""``python -m comfyui_syncd datagen``: generate a SynCD dataset by queueing a shipped workflow once per object.

For every object of a prompts file (JSON Lines, :mod:`datagen.prompts`) the driver fills the workflow's data
generation slots, queues it to a ComfyUI server, reads back the images (and masks), optionally scores and filters
them, and writes the object to the dataset (:class:`core.dataset_format.DatasetWriter`: atomic per object).

* **Slots.** A workflow marks the nodes the driver fills or reads with ``properties["syncd_datagen"]``: ``prompt``
  (the first prompt, for every image), ``prompts`` (all, one per line, as upstream gives each image its own prompt:
  image j has prompt j mod n, the way ComfyUI repeats a conditioning's rows over the batch; SynCD Per-Image Prompts
  with ``prompt_per_image`` off uses the first for every image), ``subject_word`` (the category), ``seed`` (a
  per-object seed derived from ``--seed`` and the object id, so a retried object gives the same images), ``mesh``
  (rigid: the mesh file), ``images`` and ``masks`` (the output nodes whose files are the object's images and masks).
* **Resume, nothing lost, nothing duplicated.** An object is skipped when its metadata file exists; it is written
  exactly once, by this process, whichever server or Ray actor generated it; a crash mid-object leaves no visible
  half object.
* **Scale-out.** ``--server URL`` (repeatable, :mod:`client.pool`): one worker thread per server; an object that
  fails on a server is retried on another (``--retries``), a server that stops answering is dropped and its object
  requeued.
  ``--ray [ADDRESS]`` (:mod:`datagen.ray_backend`): one actor per GPU (or CPU) owning an embedded ComfyUI; objects
  are actor tasks with Ray's retries. With neither, one embedded ComfyUI is started.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import io
import json
import pathlib
import sys
import threading
from typing import Callable, Iterable, Optional

from ..core.dataset_format import DatasetWriter, sanitize_name
from ..core.filtering import PAPER_MIN_AESTHETIC, PAPER_MIN_DINO, subset_dino
from .prompts import dataset_captions

ROLE = "syncd_datagen"
SLOT_INPUTS = {"prompt": ("value", "text"), "prompts": ("value", "text"), "subject_word": ("subject_word",),
               "seed": ("seed", "noise_seed"), "mesh": ("mesh_path", "mesh", "mesh_name")}
OUTPUT_ROLES = ("images", "masks")
PER_IMAGE_SWITCH = "prompt_per_image"  # SynCD Per-Image Prompts' input: off = the first prompt for every image
WORKFLOWS = pathlib.Path(__file__).resolve().parents[1] / "workflows"
REPO_MESHES = pathlib.Path(__file__).resolve().parent / "meshes"  # the shipped procedural meshes
DEFAULT_WORKFLOWS = {"deformable": WORKFLOWS / "syncd_datagen_deformable_flux.json",
                     "rigid": WORKFLOWS / "syncd_datagen_rigid_flux.json"}
REQUIRED_KEYS = ("object_id", "category", "prompts")


class DatagenError(ValueError):
    """A prompts file, workflow or option the driver cannot use; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One line of the prompts file."""
    object_id: str
    category: str
    prompts: tuple
    kind: str = "deformable"
    mesh: Optional[str] = None
    extra: tuple = ()

    @property
    def record(self) -> dict:
        return dict(self.extra)


def read_prompts(path) -> list[ObjectSpec]:
    """Objects of a prompts JSON Lines file, in file order; DatagenError names the line that is wrong."""
    objects, seen = [], set()
    for number, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise DatagenError(f"{path}:{number}: not JSON ({exc})") from None
        missing = [k for k in REQUIRED_KEYS if not entry.get(k)]
        if missing:
            raise DatagenError(f"{path}:{number}: missing {', '.join(missing)}")
        if not isinstance(entry["prompts"], list) or not all(isinstance(p, str) for p in entry["prompts"]):
            raise DatagenError(f"{path}:{number}: 'prompts' must be a list of strings")
        kind = entry.get("kind", "deformable")
        if kind not in DEFAULT_WORKFLOWS:
            raise DatagenError(f"{path}:{number}: kind {kind!r} is not one of {', '.join(DEFAULT_WORKFLOWS)}")
        object_id = str(entry["object_id"])
        if sanitize_name(object_id) in seen:
            raise DatagenError(f"{path}:{number}: object_id {object_id!r} appears twice")
        seen.add(sanitize_name(object_id))
        extra = tuple((k, v) for k, v in entry.items()
                      if k in ("asset_id", "description", "negative_prompt", "objaverse_id"))
        mesh = entry.get("mesh")
        if mesh:  # relative to the prompts file, absolute for the servers
            mesh = str((pathlib.Path(path).resolve().parent / mesh).resolve())
        objects.append(ObjectSpec(object_id, str(entry["category"]).lower(), tuple(entry["prompts"]), kind,
                                  mesh, extra))
    return objects


def object_seed(seed: int, object_id: str) -> int:
    """A per-object seed: the same for every attempt at one object, different between objects."""
    digest = hashlib.sha256(f"{seed}:{object_id}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


def slots(workflow: dict) -> dict[str, list[dict]]:
    """role -> the UI nodes that carry it."""
    found: dict[str, list[dict]] = {}
    for node in workflow.get("nodes", []):
        role = (node.get("properties") or {}).get(ROLE)
        if role:
            found.setdefault(role, []).append(node)
    return found


def fill(workflow: dict, spec: ObjectSpec, seed: int, object_info: dict) -> dict:
    """A copy of the UI workflow with the object's values in its slots (the editor format, before conversion)."""
    from ..client.ui_graph import set_widget, widget_inputs

    workflow = copy.deepcopy(workflow)
    marked = slots(workflow)
    if "images" not in marked:
        raise DatagenError(f"the workflow marks no output node with properties.{ROLE} = 'images'")
    if "prompt" not in marked and "prompts" not in marked:
        raise DatagenError(f"the workflow marks no prompt node with properties.{ROLE} = 'prompt' or 'prompts'")
    if "prompts" in marked:
        bad = next((p for p in spec.prompts if not p.strip() or "\n" in p or "\r" in p), None)
        if bad is not None:
            raise DatagenError(f"object {spec.object_id!r}: prompt {bad!r} is blank or spans lines; the workflow takes "
                               f"one prompt per line")
    values = {"prompt": spec.prompts[0], "prompts": "\n".join(spec.prompts), "subject_word": spec.category,
              "seed": seed, "mesh": spec.mesh}
    for role, nodes in marked.items():
        if role in OUTPUT_ROLES:
            continue
        if role not in SLOT_INPUTS:
            raise DatagenError(f"unknown {ROLE} role {role!r} on node #{nodes[0].get('id')}")
        if values[role] is None:
            raise DatagenError(f"object {spec.object_id!r}: the workflow needs a {role} (rigid objects need 'mesh')")
        for node in nodes:
            node_def = object_info.get(node["type"])
            if node_def is None:
                raise DatagenError(f"node #{node.get('id')}: {node['type']} is not installed on the server")
            names = {d.name for d in widget_inputs(node_def)}
            name = next((n for n in SLOT_INPUTS[role] if n in names), None)
            if name is None:
                raise DatagenError(f"node #{node.get('id')} ({node['type']}) has no input for {role}")
            set_widget(node, node_def, name, values[role])
    return workflow


@dataclasses.dataclass
class Generated:
    """What one workflow run gave for one object: PNG bytes of its images and masks (masks may be empty)."""
    spec: ObjectSpec
    images: list
    masks: list
    prompts: list
    where: str = ""


def generate(client, workflow: dict, spec: ObjectSpec, seed: int, tiny: bool = False,
             timeout: Optional[float] = None) -> Generated:
    """Run the filled workflow for one object on ``client``'s server and download its images (and masks)."""
    from ..client.toy_swap import demo_swap
    from ..client.workflow_format import to_api

    object_info = client.object_info()
    if tiny:  # True: the toy-world model where it runs the workflow; "random": the random tiny models
        workflow, _, _ = demo_swap(workflow, object_info, random_only=tiny == "random")
    filled = fill(workflow, spec, seed, object_info)
    prompt = to_api(filled, object_info)
    result = client.run(prompt, timeout=timeout)
    ids = {role: {str(n["id"]) for n in nodes} for role, nodes in slots(filled).items() if role in OUTPUT_ROLES}
    found = {role: [] for role in OUTPUT_ROLES}
    for item in result.files():
        for role, node_ids in ids.items():
            if item.node_id in node_ids:
                found[role].append(client.view(item.filename, item.subfolder, item.type))
    if not found["images"]:
        raise DatagenError(f"object {spec.object_id!r}: the workflow saved no images")
    if found["masks"] and len(found["masks"]) != len(found["images"]):
        raise DatagenError(f"object {spec.object_id!r}: {len(found['masks'])} masks for {len(found['images'])} images")
    prompts = image_prompts(filled, spec, len(found["images"]), object_info)
    return Generated(spec, found["images"], found["masks"], prompts, client.url)


def image_prompts(filled: dict, spec: ObjectSpec, n_images: int, object_info: dict) -> list[str]:
    """The prompt each generated image was conditioned on: with a ``prompts`` slot (unless its SynCD Per-Image
    Prompts node has ``prompt_per_image`` off) image j has prompt j mod n, as ComfyUI repeats the conditioning's n
    rows over the batch and cuts them to it; otherwise the first prompt for every image."""
    from ..client.workflow_format import widget_values

    nodes = slots(filled).get("prompts", [])
    per_image = any(widget_values(node, object_info[node["type"]]).get(PER_IMAGE_SWITCH, True) is not False
                    for node in nodes)
    prompts = list(spec.prompts) if per_image else [spec.prompts[0]]
    return [prompts[j % len(prompts)] for j in range(n_images)]


Filter = Callable[[list, list], tuple]  # (images, masks) -> (kept indices, aesthetics, dino matrix)


class Writer:
    """Writes generated objects exactly once (thread-safe) and counts what happened."""

    def __init__(self, root, object_filter: Optional[Filter] = None, min_images: int = 2,
                 full_prompts: bool = False):
        self.dataset = DatasetWriter(root)
        self.filter, self.min_images, self.full_prompts = object_filter, min_images, full_prompts
        self.lock = threading.Lock()
        self.written, self.rejected, self.failed, self.skipped = [], [], {}, []

    def has(self, spec: ObjectSpec) -> bool:
        return self.dataset.has(spec.object_id)

    def write(self, generated: Generated) -> bool:
        """Filter and write one object; False when it was rejected or already written."""
        from PIL import Image

        spec = generated.spec
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data in generated.images]
        masks = [Image.open(io.BytesIO(data)).convert("L") for data in generated.masks] or None
        prompts = generated.prompts
        if not self.full_prompts:  # upstream stores the background captions, the description taken off (App. C)
            prompts = dataset_captions({"prompts": prompts, "kind": spec.kind, **dict(spec.extra)})
        aesthetics = dino = None
        keep = list(range(len(images)))
        if self.filter is not None:
            keep, aesthetics, dino = self.filter(images, masks)
        with self.lock:
            if self.dataset.has(spec.object_id):
                self.skipped.append(spec.object_id)
                return False
            if len(keep) < self.min_images:
                self.rejected.append(spec.object_id)
                return False
            pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
            dino_kept = None if dino is None else subset_dino(dino, keep)
            extra = {k: v for k, v in spec.extra}
            if spec.mesh:
                extra["mesh"] = pathlib.Path(spec.mesh).name
            self.dataset.write(spec.object_id, pick(images), pick(prompts), spec.category, masks=pick(masks),
                               aesthetics_scores=pick(aesthetics), dino_scores=dino_kept, extra=extra)
            self.written.append(spec.object_id)
            return True


def make_filter(dino_model=None, clip_model=None, aesthetic_head=None, min_dino: float = 0.7,
                min_aesthetic: float = 6.0) -> Optional[Filter]:
    """SynCD's filter (core/filtering.py) with transformers models from local folders, or None when no model is
    given (upstream's code runs with both filters off)."""
    if dino_model is None and clip_model is None:
        return None
    if (clip_model is None) != (aesthetic_head is None):
        raise DatagenError("the aesthetic filter needs both --clip-model (CLIP ViT-L/14) and --aesthetic-head")
    import numpy as np
    import torch
    import transformers

    from ..core import aesthetic, filtering

    dino = transformers.AutoModel.from_pretrained(dino_model, local_files_only=True).eval() if dino_model else None
    clip = head = None
    if clip_model:
        clip = transformers.CLIPVisionModelWithProjection.from_pretrained(clip_model, local_files_only=True).eval()
        head = aesthetic.load_head(aesthetic_head)

    def score(images, masks):
        pixels = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))
        mask = None if masks is None else torch.from_numpy(np.stack([np.asarray(m, dtype=np.float32) / 255.0
                                                                     for m in masks]))
        scores = aesthetic.aesthetic_scores(clip, head, pixels).tolist() if clip is not None else None
        pairs = filtering.dino_scores(dino, pixels, mask).tolist() if dino is not None else None
        keep = filtering.keep_images(scores, pairs, min_aesthetic, min_dino)
        return [i for i, k in enumerate(keep) if k], scores, pairs

    return score


def load_workflows(paths: dict) -> dict:
    workflows = {}
    for kind, path in paths.items():
        path = pathlib.Path(path)
        if path.is_file():
            workflows[kind] = json.loads(path.read_text())
    return workflows


def run_on_servers(urls: list[str], todo: list[ObjectSpec], workflows: dict, writer: Writer, seed: int,
                   tiny: bool, retries: int, timeout: Optional[float], progress=None) -> None:
    """``todo`` on the servers ``urls`` (:func:`client.pool.run_jobs`: one worker thread per server, failed objects
    move to another server, dead servers are dropped); a :class:`DatagenError` is not retried. Objects ``writer``
    already has are skipped; failures go to ``writer.failed``; ``progress(writer)`` after each finished object."""
    from ..client.pool import run_jobs

    def work(client, spec: ObjectSpec) -> None:
        if writer.has(spec):
            return
        writer.write(generate(client, workflows[spec.kind], spec, object_seed(seed, spec.object_id), tiny, timeout))

    def finished(spec: ObjectSpec, error: Optional[str]) -> None:
        if error is not None:
            writer.failed[spec.object_id] = error
        if progress is not None:
            progress(writer)

    failed = run_jobs(urls, todo, work, key=lambda spec: spec.object_id, retries=retries, progress=finished,
                      final=(DatagenError,))
    for object_id, error in failed.items():  # the objects no server was left to run
        writer.failed.setdefault(object_id, error)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comfyui_syncd datagen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", required=True, type=pathlib.Path, help="prompts file (JSON Lines), as written "
                        "by python -m comfyui_syncd.datagen.prompts")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="dataset folder (created; rerun to resume)")
    parser.add_argument("--deformable-workflow", type=pathlib.Path, default=DEFAULT_WORKFLOWS["deformable"],
                        help="workflow for deformable objects (default: the shipped Flux MSA workflow)")
    parser.add_argument("--rigid-workflow", type=pathlib.Path, default=DEFAULT_WORKFLOWS["rigid"],
                        help="workflow for rigid objects (default: the shipped depth + warp workflow)")
    parser.add_argument("--server", dest="servers", action="append", default=[], metavar="URL",
                        help="a running ComfyUI (repeatable: one worker per server); default: start one embedded")
    parser.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                        help="run on a Ray cluster (pip install 'comfyui-syncd[ray]'): one actor per GPU owns an "
                             "embedded ComfyUI; ADDRESS as ray.init takes it (default: auto / a local cluster)")
    parser.add_argument("--workers", type=int, default=None, help="Ray actors (default: the cluster's GPUs, or 1)")
    parser.add_argument("--comfyui", metavar="PATH", help="ComfyUI for embedded servers (default: as `run` finds it)")
    parser.add_argument("--tiny", action="store_true", help="run the workflows on the shipped toy-world model where it "
                        "can (deformable objects), else on the random-weight tiny demo models")
    parser.add_argument("--random-tiny", action="store_const", const="random", dest="tiny",
                        help="run the workflows on the random-weight tiny demo models")
    parser.add_argument("--seed", type=int, default=0, help="base seed; each object's seed derives from it and its id")
    parser.add_argument("--retries", type=int, default=2, help="attempts on other servers after a failure")
    parser.add_argument("--timeout", type=float, default=None, help="seconds one object may take on a server")
    parser.add_argument("--limit", type=int, default=None, help="only the first N objects of the prompts file")
    parser.add_argument("--min-images", type=int, default=2, help="an object needs this many kept images (upstream 2)")
    parser.add_argument("--dino-model", metavar="DIR", help="DINOv2 transformers folder (upstream: "
                        "dinov2-with-registers-large) for the pair filter; default: no DINOv2 filter (upstream's code)")
    parser.add_argument("--min-dino", type=float, default=PAPER_MIN_DINO,
                        help="an image needs a pair with DINOv2 similarity in [MIN, 0.98] (paper 0.7)")
    parser.add_argument("--clip-model", metavar="DIR", help="CLIP ViT-L/14 transformers folder for the aesthetic "
                        "filter (with --aesthetic-head); default: no aesthetic filter")
    parser.add_argument("--aesthetic-head", metavar="FILE", help="the LAION head sa_0_4_vit_l_14_linear.pth")
    parser.add_argument("--min-aesthetic", type=float, default=PAPER_MIN_AESTHETIC, help="paper: 6")
    parser.add_argument("--full-prompts", action="store_true",
                        help="store the full generation prompts in the dataset (upstream stores the background "
                             "captions, with the object description and the fixed suffix taken off)")
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        objects = read_prompts(args.prompts)[: args.limit]
    except (OSError, DatagenError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    workflows = load_workflows({"deformable": args.deformable_workflow, "rigid": args.rigid_workflow})
    missing = sorted({o.kind for o in objects} - set(workflows))
    if missing:
        print(f"error: no workflow for {', '.join(missing)} objects (give --{missing[0]}-workflow FILE)",
              file=sys.stderr)
        return 1
    try:
        object_filter = make_filter(args.dino_model, args.clip_model, args.aesthetic_head, args.min_dino,
                                    args.min_aesthetic)
    except (OSError, ValueError) as exc:
        print(f"error: cannot load the filter models: {exc}", file=sys.stderr)
        return 1
    writer = Writer(args.out, object_filter, min_images=args.min_images, full_prompts=args.full_prompts)
    todo = [o for o in objects if not writer.has(o)]
    print(f"{len(objects)} objects, {len(objects) - len(todo)} already in {args.out}, {len(todo)} to generate",
          flush=True)
    bar = progress_bar(len(todo))
    try:
        if args.ray is not None:
            from .ray_backend import run_on_ray

            run_on_ray(args.ray, todo, workflows, writer, args.seed, args.tiny, args.retries, args.timeout,
                       args.workers, args.comfyui, progress=bar)
        elif args.servers:
            run_on_servers(args.servers, todo, workflows, writer, args.seed, args.tiny, args.retries, args.timeout,
                           progress=bar)
        else:
            from ..client.embedded import EmbeddedServer

            with EmbeddedServer(args.comfyui) as server:
                run_on_servers([server.url], todo, workflows, writer, args.seed, args.tiny, args.retries,
                               args.timeout, progress=bar)
    except KeyboardInterrupt:
        print("interrupted: finished objects are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        bar(None)
    print(summary(writer, len(todo)))
    return 0 if not writer.failed else 1


def summary(writer: Writer, total: int) -> str:
    lines = [f"done: {len(writer.written)} written, {len(writer.rejected)} rejected by the filters, "
             f"{len(writer.failed)} failed, of {total}"]
    lines += [f"  failed {object_id}: {why}" for object_id, why in sorted(writer.failed.items())]
    return "\n".join(lines)


def progress_bar(total: int):
    """A tqdm bar with written/rejected/failed counts; call with None to close."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="object", desc="datagen", file=sys.stderr)
    lock = threading.Lock()

    def update(writer: Optional[Writer]) -> None:
        with lock:
            if writer is None:
                bar.close()
                return
            bar.update(1)
            bar.set_postfix(kept=len(writer.written), rejected=len(writer.rejected), failed=len(writer.failed))

    return update


def iter_written(root) -> Iterable[str]:
    """Object ids written in dataset ``root`` (for tests and summaries)."""
    from ..core.dataset_format import read_dataset

    return [record.object_id for record in read_dataset(root)]

"""``python -m comfyui_syncd eval``: run customization workflows on a DreamBooth-style benchmark and score them.

For every workflow (a table row), reference count, subject, prompt and seed the command fills the workflow's
slots (:mod:`evaluation.workflow`: the subject's first N photos as references, the prompt, the seed, the class
word), queues it on the ComfyUI servers and saves the generated images under
``OUT/<workflow>/<N>ref/<subject>/p<prompt>_s<seed>_<k>.png``. Images already there are not generated again, so a
rerun resumes. Then it scores every image (:mod:`core.metrics`: MDINOv2-I, CLIP-I, MCLIP-I, CLIP-T, DINO, MDINO,
TIFA, GeometricScore, each where its models are given) and writes ``results.md`` (SynCD Table 1 and JeDi Table 2
layouts), ``results.json`` (means and per-image scores) and ``OUT/grids/<workflow>_<N>ref_<subject>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import sys
import threading
from typing import Optional

from .dataset import Benchmark, EvalDatasetError, Subject, fill_template, read_benchmark
from .questions import load_question_file
from .scoring import MODEL_FLAGS, ModelLoadError, Scorer, load_image, load_models
from .workflow import (UPLOAD_FOLDER, EvalWorkflowError, Slots, fill, find_slots, parse_slot, png_bytes,
                       reference_frames, split_references, tiny)


@dataclasses.dataclass(frozen=True)
class Job:
    """One generation: a workflow (``method``) with ``references`` photos of ``subject``, one prompt, one seed."""
    method: str
    references: int
    subject: Subject
    prompt_index: int
    seed: int

    @property
    def key(self) -> tuple:
        return self.method, self.references, self.subject.name, self.prompt_index, self.seed

    def folder(self, out: pathlib.Path) -> pathlib.Path:
        return out / self.method / f"{self.references}ref" / self.subject.name

    @property
    def stem(self) -> str:
        return f"p{self.prompt_index:02d}_s{self.seed}"

    def images(self, out: pathlib.Path) -> list:
        """The saved generations (``_0`` is written last, so it marks a finished job)."""
        folder = self.folder(out)
        if not (folder / f"{self.stem}_0.png").is_file():
            return []
        return sorted(folder.glob(f"{self.stem}_*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


@dataclasses.dataclass
class Method:
    name: str
    workflow: dict
    slots: Optional[Slots] = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comfyui_syncd eval", description=__doc__.split("\n\n")[0],
                                     epilog="Metric models load from local folders through transformers; a metric "
                                            "whose models are not given is skipped and the table says so.")
    parser.add_argument("--workflow", dest="workflows", action="append", required=True, type=pathlib.Path,
                        metavar="W", help="customization workflow in editor format (repeatable: one table row each, "
                                          "named by the file name)")
    parser.add_argument("--dataset", required=True, type=pathlib.Path, metavar="DIR",
                        help="benchmark: DreamBooth's dataset/ folder (prompts_and_classes.txt) or a folder with "
                             "subjects.json / subjects.yaml (see README)")
    parser.add_argument("--server", dest="servers", action="append", default=[], metavar="URL",
                        help="a running ComfyUI (repeatable: one worker per server); default: start one embedded")
    parser.add_argument("--comfyui", metavar="PATH",
                        help="ComfyUI for the embedded server (default: as `run` finds it)")
    parser.add_argument("--tiny", action="store_true", help="run the workflows on the pack's tiny demo models "
                        "(the benchmark's reference images still go in)")
    parser.add_argument("--references", type=int, nargs="+", default=None, metavar="N",
                        help="reference counts (the subject's first N photos), e.g. 1 3; default: 1 3 for a "
                             "workflow with one reference LoadImage, else its number of LoadImage nodes")
    parser.add_argument("--seeds", type=int, default=4, help="images per subject and prompt (DreamBooth: 4)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; the others follow it")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("eval_output"), help="output folder "
                        "(rerun with the same folder to resume)")
    parser.add_argument("--unique-token", default=None, metavar="TEXT",
                        help="what {0} becomes in the prompts (DreamBooth's 'sks' for a fine-tuned model); default: "
                             "nothing ('a dog in the jungle'), as for encoder-based methods")
    parser.add_argument("--subjects", default=None, metavar="A,B", help="only these subjects")
    parser.add_argument("--max-prompts", type=int, default=None, metavar="N",
                        help="only each subject's first N prompts")
    parser.add_argument("--score-against", choices=("all", "inputs"), default="all",
                        help="identity metrics against all of the subject's photos (DreamBooth) or only the input "
                             "references")
    for kind, flag in MODEL_FLAGS.items():
        parser.add_argument(flag, dest=f"model_{kind}", metavar="PATH", help=MODEL_HELP[kind])
    parser.add_argument("--tifa-questions", type=pathlib.Path, metavar="FILE",
                        help="TIFA question file (JSON, TIFA's format); default: the prompts' own questions or "
                             "yes/no questions built from the DreamBooth templates")
    parser.add_argument("--box-threshold", type=float, default=0.35, help="Grounding DINO box threshold")
    parser.add_argument("--device", default=None, help="device for the metric models (default: cuda if available)")
    parser.add_argument("--slot", dest="slots", action="append", default=[], metavar="ROLE=ID[,ID]",
                        help="nodes of a role where the graph does not show them: references, prompt, "
                             "reference_prompt, subject_word, seed, images")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                        help="set an input of the API graph of every job, as in `run --set`")
    parser.add_argument("--retries", type=int, default=2, help="attempts on other servers after a failure")
    parser.add_argument("--timeout", type=float, default=None, help="seconds one image may take on a server")
    parser.add_argument("--score-only", action="store_true", help="generate nothing; score the images in --out")
    return parser


MODEL_HELP = {
    "dinov2": "DINOv2 folder (MDINOv2-I; SynCD: DINOv2, e.g. facebook/dinov2-large)",
    "clip": "CLIP folder with both towers (CLIP-I, MCLIP-I, CLIP-T; e.g. openai/clip-vit-large-patch14)",
    "dino": "DINO ViT folder (DINO, MDINO; DreamBooth: facebook/dino-vits16)",
    "detector": "Grounding DINO folder (object boxes for the masked metrics; e.g. IDEA-Research/grounding-dino-base)",
    "segmenter": "SAM folder (object masks from the boxes; e.g. facebook/sam-vit-huge)",
    "vqa": "BLIP VQA folder (TIFA; e.g. Salesforce/blip-vqa-capfilt-large)",
}


def plan(benchmark: Benchmark, methods: list, counts: dict, seeds: list, subjects: Optional[set],
         max_prompts: Optional[int]) -> list:
    jobs = []
    for method in methods:
        for count in counts[method.name]:
            for subject in benchmark.subjects:
                if subjects is not None and subject.name not in subjects:
                    continue
                if len(subject.images) < count:
                    raise EvalDatasetError(f"subject {subject.name!r} has {len(subject.images)} photos, fewer than "
                                           f"--references {count}")
                for index in range(len(subject.prompts[:max_prompts])):
                    jobs += [Job(method.name, count, subject, index, seed) for seed in seeds]
    return jobs


class Generator:
    """Runs one job on a server: uploads the references (once per server), fills, queues, saves the images."""

    def __init__(self, methods: dict, benchmark: Benchmark, out: pathlib.Path, args, scorer: Scorer):
        self.methods, self.benchmark, self.out, self.args, self.scorer = methods, benchmark, out, args, scorer
        self.lock = threading.Lock()
        self.frames: dict = {}
        self.uploaded: dict = {}

    def reference_files(self, job: Job) -> list:
        """PNG bytes per reference LoadImage node of the job's workflow (the masks: the subject's mask files, else
        the detected ones, else none)."""
        from PIL import Image

        with self.lock:
            key = (job.subject.name, job.references)
            if key not in self.frames:
                photos = []
                for path in job.subject.images[:job.references]:
                    with Image.open(path) as image:
                        photos.append(image.convert("RGB"))
                masks = [None if m is None else Image.fromarray((m.clamp(0, 1) * 255).byte().numpy(), "L")
                         for m in self.scorer.reference_masks(job.subject)[:job.references]]
                self.frames[key] = reference_frames(photos, masks)
            frames = self.frames[key]
        files, start = [], 0
        for size in split_references(job.references, len(self.methods[job.method].slots.references)):
            files.append(png_bytes(frames[start:start + size]))
            start += size
        return files

    def __call__(self, client, job: Job) -> None:
        from ..cli import apply_overrides
        from ..client.pool import JobError
        from ..client.workflow_format import to_api

        method = self.methods[job.method]
        object_info = client.object_info()
        names = []
        for i, data in enumerate(self.reference_files(job)):
            digest = hashlib.sha256(data).hexdigest()
            key = (client.url, digest)
            if key not in self.uploaded:  # the name carries the content hash: the same references are stored once
                name = f"{job.subject.name}_{job.references}ref_{i}_{digest[:16]}.png"
                self.uploaded[key] = client.upload_image(data, name, UPLOAD_FOLDER)
            names.append(self.uploaded[key])
        prompt = job.subject.prompts[job.prompt_index]
        text = fill_template(prompt.template, self.benchmark.unique_token, job.subject.class_word)
        workflow = fill(method.workflow, method.slots, object_info, text, job.subject.class_word, job.seed, names)
        if self.args.tiny:
            workflow = tiny(workflow, method.slots, object_info)
        graph = to_api(workflow, object_info)
        try:
            apply_overrides(graph, self.args.overrides, object_info)
        except ValueError as exc:
            raise JobError(str(exc)) from None
        result = client.run(graph, timeout=self.args.timeout)
        output = str(method.slots.nodes["images"][0])
        files = [f for f in result.files() if f.node_id == output]
        if method.slots.keep_last:
            files = files[-method.slots.keep_last:]
        if not files:
            raise JobError(f"{job.method}: the output node #{output} saved no images")
        images = [client.view(f.filename, f.subfolder, f.type) for f in files]
        folder = job.folder(self.out)
        folder.mkdir(parents=True, exist_ok=True)
        for k in list(range(1, len(images))) + [0]:  # _0 last: it marks the job done
            partial = folder / f".{job.stem}_{k}.png.part"
            partial.write_bytes(images[k])
            partial.replace(folder / f"{job.stem}_{k}.png")


def _progress(total: int, what: str):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="image", desc=what, file=sys.stderr)
    lock = threading.Lock()
    failures = [0]

    def update(job, error: Optional[str] = None) -> None:
        with lock:
            if job is None:
                bar.close()
                return
            failures[0] += error is not None
            bar.update(1)
            if failures[0]:
                bar.set_postfix(failed=failures[0])

    return update


def generate(jobs: list, generator: Generator, urls: list, retries: int) -> dict:
    """Run the jobs on the servers ``urls``; {job key: error} of the failed ones."""
    from ..client.api import PromptValidationError
    from ..client.pool import run_jobs

    bar = _progress(len(jobs), "generate")
    try:  # a workflow the server refuses is refused by every server: not retried
        return run_jobs(urls, jobs, generator, key=lambda j: j.key, retries=retries, progress=bar,
                        final=(PromptValidationError,))
    finally:
        bar(None)


def score(jobs: list, scorer: Scorer, out: pathlib.Path, against: str) -> list:
    """Per-image records of every saved generation of ``jobs``."""
    records = []
    done = [(job, job.images(out)) for job in jobs]
    bar = _progress(sum(len(images) for _, images in done), "score")
    try:
        for job, images in done:
            prompt = job.subject.prompts[job.prompt_index]
            reference_indices = range(job.references) if against == "inputs" else range(len(job.subject.images))
            for path in images:
                record = {"method": job.method, "references": job.references, "subject": job.subject.name,
                          "class": job.subject.class_word, "prompt_index": job.prompt_index,
                          "prompt": prompt.template, "kind": prompt.kind, "seed": job.seed,
                          "image": str(path.relative_to(out))}
                record.update(scorer.score(job.subject, prompt, load_image(path), reference_indices))
                records.append(record)
                bar(job)
    finally:
        bar(None)
    return records


def write_grids(jobs: list, out: pathlib.Path) -> None:
    from .report import grid

    groups: dict = {}
    for job in jobs:
        groups.setdefault((job.method, job.references, job.subject.name), []).append(job)
    for (method, count, name), members in groups.items():
        subject = members[0].subject
        rows: dict = {}
        for job in sorted(members, key=lambda j: (j.prompt_index, j.seed)):
            rows.setdefault(job.prompt_index, []).extend(job.images(out))
        shown = [(f"{i}: {fill_template(subject.prompts[i].template, '', subject.class_word)}", images)
                 for i, images in sorted(rows.items()) if images]
        if shown:
            grid(subject.images[:count], shown, out / "grids" / f"{method}_{count}ref_{name}.png")


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        benchmark = read_benchmark(args.dataset, args.unique_token)
        overrides = dict(parse_slot(text) for text in args.slots)
        question_file = load_question_file(args.tifa_questions) if args.tifa_questions else None
        methods = {}
        for path in args.workflows:
            try:
                workflow = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise EvalWorkflowError(f"cannot read --workflow {path}: {exc}") from None
            if path.stem in methods:
                raise EvalWorkflowError(f"two workflows are named {path.stem!r}; rename one (the name is its row)")
            methods[path.stem] = Method(path.stem, workflow)
        models = load_models({kind: getattr(args, f"model_{kind}") for kind in MODEL_FLAGS}, device)
    except (EvalDatasetError, EvalWorkflowError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    scorer = Scorer(models, args.box_threshold, question_file)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed + k for k in range(args.seeds)]
    subjects = set(args.subjects.split(",")) if args.subjects else None
    unknown = sorted((subjects or set()) - {s.name for s in benchmark.subjects})
    if unknown:
        print(f"error: --subjects {', '.join(unknown)}: not in {args.dataset} (subjects: "
              f"{', '.join(s.name for s in benchmark.subjects)})", file=sys.stderr)
        return 1
    failed: dict = {}
    try:
        if not args.score_only:
            failed = _generate(args, benchmark, methods, overrides, seeds, subjects, scorer, out)
            if failed is None:
                return 1
        counts = {m.name: _counts(args, m) for m in methods.values()}
        jobs = plan(benchmark, list(methods.values()), counts, seeds, subjects, args.max_prompts)
    except (EvalDatasetError, EvalWorkflowError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the saved images are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    records = score(jobs, scorer, out, args.score_against)
    skipped = models.skipped()
    notes = [f"{len(failed)} image(s) failed to generate; rerun to retry them"] if failed else []
    settings = {"dataset": str(args.dataset), "layout": benchmark.layout, "workflows": [str(p) for p in args.workflows],
                "references": counts, "seeds": seeds, "unique_token": benchmark.unique_token,
                "score_against": args.score_against, "models": models.paths, "tiny": args.tiny,
                "box_threshold": args.box_threshold}
    from .report import write_results

    write_results(out, records, skipped, settings, notes)
    write_grids(jobs, out)
    print(f"{len(records)} images scored; results in {out / 'results.md'}")
    for key, why in sorted(failed.items(), key=str):
        print(f"  failed {'/'.join(map(str, key))}: {why}", file=sys.stderr)
    return 0 if not failed else 1


def _counts(args, method: Method) -> list:
    """The reference counts of ``method``: --references, else by its LoadImage nodes, else (--score-only) the
    counts found in --out."""
    if args.references:
        return list(args.references)
    if method.slots is None:
        found = sorted(int(p.name[:-3]) for p in (args.out / method.name).glob("*ref") if p.name[:-3].isdigit())
        return found or [1]
    return [1, 3] if len(method.slots.references) == 1 else [len(method.slots.references)]


def _generate(args, benchmark, methods, overrides, seeds, subjects, scorer, out) -> Optional[dict]:
    """Find each workflow's slots with the server's node definitions, then generate what is missing; returns
    {job key: error}, or None when no server could be used."""
    from ..client.api import ComfyAPIError, ComfyClient
    from ..client.embedded import EmbeddedServer, EmbeddedServerError
    from ..comfy_path import ComfyUINotFoundError

    embedded = None
    try:
        if args.servers:
            urls = list(args.servers)
        else:
            embedded = EmbeddedServer(args.comfyui)
            print(f"starting ComfyUI from {embedded.comfyui} ...", file=sys.stderr, flush=True)
            embedded.start()
            urls = [embedded.url]
        object_info = ComfyClient(urls[0]).probe()
        for method in methods.values():
            method.slots = find_slots(method.workflow, object_info, overrides)
            print(f"{method.name}: {method.slots.describe(method.workflow)}", flush=True)
            for count in _counts(args, method):
                split_references(count, len(method.slots.references))
        counts = {m.name: _counts(args, m) for m in methods.values()}
        jobs = plan(benchmark, list(methods.values()), counts, seeds, subjects, args.max_prompts)
        todo = [job for job in jobs if not job.images(out)]
        print(f"{len(jobs)} images, {len(jobs) - len(todo)} already in {out}, {len(todo)} to generate", flush=True)
        if not todo:
            return {}
        return generate(todo, Generator(methods, benchmark, out, args, scorer), urls, args.retries)
    except (ComfyUINotFoundError, EmbeddedServerError, ComfyAPIError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    finally:
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    sys.exit(main())

"""``python -m comfyui_syncd run | bench | convert-checkpoint ...``: the pack's command line.

``run`` queues a workflow (editor or API format) to a ComfyUI server, or to a private server it
starts and stops itself, prints progress and saves the output files. ``run --tiny`` first swaps the
workflow's model and image loaders for the pack's tiny demo nodes (``client/tiny_swap.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys

# Subcommands implemented in their own module, which has ``main(argv: list[str] | None) -> int`` and
# is also runnable as ``python -m comfyui_syncd.<module>``. Add ``datagen`` here the same way.
DELEGATED = {"bench": "bench", "convert-checkpoint": "checkpoint_convert"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comfyui_syncd", description="ComfyUI-SynCD command line.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run a workflow on a ComfyUI server and save its outputs",
                              description=run_command.__doc__)
    run.add_argument("workflow", type=pathlib.Path, help="workflow JSON, as saved by the editor or in API format")
    run.add_argument("--server", metavar="URL",
                     help="a running ComfyUI, e.g. http://127.0.0.1:8188 (default: start a private one)")
    run.add_argument("--comfyui", metavar="PATH", help="ComfyUI checkout for the private server "
                     "(default: $COMFYUI_PATH, the ComfyUI this pack is installed in, or ~/comfy/ComfyUI)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                     help="set an input of the API graph (repeatable); VALUE is parsed as JSON, else taken as text")
    run.add_argument("--out", type=pathlib.Path, default=pathlib.Path("output"),
                     help="directory for the output files (default: ./output)")
    run.add_argument("--timeout", type=float, default=None, help="seconds to wait for the prompt (default: no limit)")
    run.add_argument("--tiny", action="store_true",
                     help="run on the pack's tiny demo models and demo images instead of the real loaders' files "
                          "(editor-format workflows only): any machine, no downloads, noise-like images; sizes "
                          "down to 64 px and at most 4 steps")
    for name, module in DELEGATED.items():
        commands.add_parser(name, add_help=False, help=f"see python -m comfyui_syncd.{module} --help")
    return parser


def parse_override(text: str) -> tuple[str, str, object]:
    """``'5.seed=42'`` -> ``('5', 'seed', 42)``; the value is JSON when it parses, else the raw text."""
    target, sep, raw = text.partition("=")
    node_id, dot, name = target.partition(".")
    if not sep or not dot or not node_id or not name:
        raise ValueError(f"--set {text!r}: expected NODE_ID.INPUT=VALUE, e.g. 3.seed=42")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return node_id, name, value


def apply_overrides(prompt: dict, overrides: list[str], object_info: dict) -> None:
    """Set ``--set`` values in the API graph; the node must exist and the input must be one of its inputs."""
    for text in overrides:
        node_id, name, value = parse_override(text)
        if node_id not in prompt:
            raise ValueError(f"--set {text!r}: no node {node_id} in the workflow (node ids: {', '.join(prompt)})")
        node = prompt[node_id]
        spec = object_info.get(node["class_type"], {}).get("input", {})
        known = set(node["inputs"]) | set(spec.get("required", {})) | set(spec.get("optional", {}))
        if name not in known:
            raise ValueError(f"--set {text!r}: node {node_id} ({node['class_type']}) has no input {name!r} "
                             f"(inputs: {', '.join(sorted(known))})")
        node["inputs"][name] = {"__value__": value} if isinstance(value, list) else value


def run_command(args: argparse.Namespace) -> int:
    """Queue WORKFLOW, follow its progress, save the outputs; exit status 1 if the server refuses or fails it."""
    from .client.api import ComfyAPIError, ComfyClient, ExecutionError, PromptValidationError
    from .client.tiny_swap import TinySwapError, tiny_swap
    from .client.workflow_format import WorkflowFormatError, is_api_format, to_api

    try:
        workflow = json.loads(args.workflow.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.workflow}: {exc}", file=sys.stderr)
        return 1
    if args.tiny and is_api_format(workflow):
        print(f"error: --tiny works on editor-format workflows (as in workflows/, or saved with Workflow > Save); "
              f"{args.workflow} is in API format, whose loaders it does not swap. Use the editor-format file.",
              file=sys.stderr)
        return 1

    def execute(url: str) -> int:
        nonlocal workflow
        client = ComfyClient(url)
        try:
            object_info = client.object_info()
            if args.tiny:
                workflow, swapped = tiny_swap(workflow, object_info)
                print(f"--tiny: {len(swapped)} change(s) for the tiny demo models:")
                for line in swapped:
                    print(f"  {line}")
            prompt = to_api(workflow, object_info)
            apply_overrides(prompt, args.overrides, object_info)
        except (WorkflowFormatError, TinySwapError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        extra = {} if is_api_format(workflow) or args.overrides else {"extra_pnginfo": {"workflow": workflow}}

        def progress(node_id: str, value: int, maximum: int) -> None:
            node = prompt.get(node_id, {})
            title = node.get("_meta", {}).get("title") or node.get("class_type", "?")
            print(f"{title} (#{node_id}): {value}/{maximum}", flush=True)

        try:
            result = client.run(prompt, on_progress=progress, timeout=args.timeout, extra_data=extra)
        except PromptValidationError as exc:
            print(f"error: the server refused the workflow: {exc}", file=sys.stderr)
            return 1
        except ExecutionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            if exc.traceback:
                print("server traceback (most recent call last):\n" + exc.traceback.rstrip(), file=sys.stderr)
            return 1
        except (ComfyAPIError, TimeoutError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        paths = client.download(result, args.out)
        for path in paths:
            print(path)
        if not paths:
            print("the workflow finished without output files", file=sys.stderr)
        return 0

    if args.server:
        return execute(args.server)
    from .client.embedded import EmbeddedServer, EmbeddedServerError
    from .comfy_path import ComfyUINotFoundError

    try:
        server = EmbeddedServer(args.comfyui)
        print(f"starting ComfyUI from {server.comfyui} ...", file=sys.stderr, flush=True)
        with server:
            return execute(server.url)
    except (ComfyUINotFoundError, EmbeddedServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(f".{DELEGATED[argv[0]]}", __package__)
        return module.main(argv[1:])
    args = build_parser().parse_args(argv)
    return run_command(args)

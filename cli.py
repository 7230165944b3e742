"""``python -m comfyui_syncd run | bench | convert-checkpoint ...``: the pack's command line.

``run`` queues a workflow (editor or API format) to a ComfyUI server, or to a private server it
starts and stops itself, prints progress and saves the output files. ``run --tiny`` first swaps the
workflow's loaders: for the shipped toy-world model where it can run the workflow (``client/toy_swap.py``), else
(or with ``--random-tiny``) for the pack's random-weight tiny demo nodes (``client/tiny_swap.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import signal
import sys
import threading
import uuid

# Subcommands implemented in their own module, which has ``main(argv: list[str] | None) -> int`` and
# is also runnable as ``python -m comfyui_syncd.<module>``.
DELEGATED = {"bench": "bench", "convert-checkpoint": "checkpoint_convert", "datagen": "datagen.driver",
             "toyworld": "toyworld.reproduce",
             "eval": "evaluation.driver"}


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
                     help="directory for the output files (default: ./output); an existing file is never "
                          "overwritten, the new one gets the next free number (name_00001_.png -> name_00002_.png)")
    run.add_argument("--timeout", type=float, default=None,
                     help="seconds to wait for the prompt once queued; then it is stopped and the exit status is "
                          "124 (default: no limit)")
    run.add_argument("--tiny", action="store_true",
                     help="run on the pack's tiny demo models and demo images instead of the real loaders' files "
                          "(editor-format workflows only): any machine, no downloads. The shipped workflows run "
                          "on the shipped toy-world models (small UNets: 128 px toy objects, 25 steps, cfg 5; a "
                          "rendered toy object as the reference; a Flux or Qwen-Image graph's flow shift and "
                          "FluxGuidance are bypassed); with --random-tiny, on random-weight tiny models of the "
                          "workflow's own architecture (noise-like images, 64 px, at most 4 steps)")
    run.add_argument("--random-tiny", action="store_true",
                     help="with --tiny: always the random-weight tiny models of the workflow's architecture, never "
                          "the toy-world model")
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


# Input types the frontend shows as widgets, i.e. that take a literal value; "*" accepts anything.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "WEBCAM", "*"}
TYPE_NAMES = {"INT": "an integer", "FLOAT": "a number", "BOOLEAN": "true or false", "STRING": "a string"}


def allowed_values(spec: list | tuple, value: object) -> str | None:
    """None if ``value`` suits an input with ``/object_info`` spec ``[type, options]``, else what it allows.

    Combos: V1 nodes give the option list as the type, V3 nodes type "COMBO" with ``options`` in the dict."""
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options")
        values = value if options.get("multi_select") and isinstance(value, list) else [value]
        if choices is None or all(item in choices for item in values):
            return None
        shown = ", ".join(json.dumps(choice) for choice in choices[:30])
        return "one of " + (shown + f", ... ({len(choices)} in all)" if len(choices) > 30 else shown)
    if kind not in WIDGET_TYPES:
        return f"a link from a {kind} output (connect it in the workflow; --set takes widget values)"
    if kind not in TYPE_NAMES:
        return None
    low, high = options.get("min"), options.get("max")
    wanted = {"INT": int, "FLOAT": (int, float), "BOOLEAN": bool, "STRING": str}[kind]
    right_type = isinstance(value, wanted) and (kind == "BOOLEAN" or not isinstance(value, bool))
    if right_type and (low is None or value >= low) and (high is None or value <= high):
        return None
    bounds = " and ".join(f"{op} {limit}" for op, limit in ((">=", low), ("<=", high)) if limit is not None)
    hint = " (JSON-quote a text that reads as a number, e.g. '\"42\"')" if kind == "STRING" else ""
    return f"{TYPE_NAMES[kind]} ({kind}{', ' + bounds if bounds else ''}){hint}"


def apply_overrides(prompt: dict, overrides: list[str], object_info: dict) -> None:
    """Set ``--set`` values in the API graph; ValueError unless the node exists, has the input, and the input's
    ``/object_info`` spec takes the value (combo option, type, min/max, a widget rather than a link)."""
    for text in overrides:
        node_id, name, value = parse_override(text)
        if node_id not in prompt:
            raise ValueError(f"--set {text!r}: no node {node_id} in the workflow (node ids: {', '.join(prompt)})")
        node = prompt[node_id]
        spec = object_info.get(node["class_type"], {}).get("input", {})
        specs = {**spec.get("optional", {}), **spec.get("required", {})}
        known = set(node["inputs"]) | set(specs)
        if name not in known:
            raise ValueError(f"--set {text!r}: node {node_id} ({node['class_type']}) has no input {name!r} "
                             f"(inputs: {', '.join(sorted(known))})")
        allowed = allowed_values(specs[name], value) if name in specs else None
        if allowed:
            raise ValueError(f"--set {text!r}: node {node_id} ({node['class_type']}) input {name!r} does not take "
                             f"{json.dumps(value)}; allowed: {allowed}")
        node["inputs"][name] = {"__value__": value} if isinstance(value, list) else value


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP during ``run``; ``note`` says what was left behind and cleaned up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.note = ""


def _interrupt_on_signals() -> dict:
    """Turn SIGINT/SIGTERM/SIGHUP (unless ignored) into :class:`Interrupted`, so ``with``/``finally`` cleanup runs;
    once one came, further ones are ignored so that they cannot cut the cleanup short. Returns the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    signums = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {sig: signal.getsignal(sig) for sig in signums}

    def handler(signum, frame):
        for sig in signums:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    for sig in signums:
        if previous[sig] is not signal.SIG_IGN:
            signal.signal(sig, handler)
    return previous


def run_command(args: argparse.Namespace) -> int:
    """Queue WORKFLOW, follow its progress, save the outputs. Exit status: 0 done, 1 error (refused, failed,
    unreachable server), 2 usage, 124 --timeout, 130/143/129 SIGINT/SIGTERM/SIGHUP. On --timeout or a signal the
    prompt is stopped: with --server it is interrupted or removed from the queue, the embedded server is shut down."""
    previous = _interrupt_on_signals()
    try:
        return _run(args)
    except Interrupted as exc:
        note = exc.note or ("" if args.server else "stopped the embedded ComfyUI")
        print("interrupted" + (f": {note}" if note else ""), file=sys.stderr, flush=True)
        return 128 + exc.signum
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> int:
    from .client.api import ComfyAPIError, ComfyClient, ExecutionError, PromptTimeout, PromptValidationError
    from .client.tiny_swap import TinySwapError
    from .client.toy_swap import demo_swap
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
            object_info = client.probe()
            if args.tiny:
                workflow, swapped, which = demo_swap(workflow, object_info, args.random_tiny)
                print(f"--tiny: {len(swapped)} change(s) for {which}:")
                for line in swapped:
                    print(f"  {line}")
            prompt = to_api(workflow, object_info)
            apply_overrides(prompt, args.overrides, object_info)
        except (ComfyAPIError, WorkflowFormatError, TinySwapError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        extra = {} if is_api_format(workflow) or args.overrides else {"extra_pnginfo": {"workflow": workflow}}

        def progress(node_id: str, value: int, maximum: int) -> None:
            node = prompt.get(node_id, {})
            title = node.get("_meta", {}).get("title") or node.get("class_type", "?")
            print(f"{title} (#{node_id}): {value}/{maximum}", flush=True)

        prompt_id = uuid.uuid4().hex  # chosen here, so that a prompt interrupted while queueing can be found

        def stop_prompt() -> str:
            """With --server, take our prompt off the server; says what was done."""
            if not args.server:
                return ""  # the embedded server is shut down anyway
            try:
                return f"prompt {prompt_id} on {client.url}: {client.cancel(prompt_id)}"
            except (OSError, ValueError) as exc:
                return f"could not stop prompt {prompt_id} on {client.url}: {exc}"

        try:
            result = client.run(prompt, on_progress=progress, timeout=args.timeout, extra_data=extra,
                                prompt_id=prompt_id)
            paths = client.download(result, args.out)
        except Interrupted as exc:
            exc.note = stop_prompt()
            raise
        except PromptTimeout as exc:
            note = stop_prompt()
            print(f"error: {exc}" + (f"; {note}" if note else ""), file=sys.stderr)
            return 124
        except PromptValidationError as exc:
            print(f"error: the server refused the workflow: {exc}", file=sys.stderr)
            return 1
        except ExecutionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            if exc.traceback:
                print("server traceback (most recent call last):\n" + exc.traceback.rstrip(), file=sys.stderr)
            return 1
        except ComfyAPIError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # the server went away (URLError, websocket, timeouts)
            print(f"error: lost the connection to {client.url}: {getattr(exc, 'reason', None) or exc}",
                  file=sys.stderr)
            return 1
        for path in paths:
            print(path)
        for node_id, text in result.texts():  # what the nodes show as text (a score table, a prompt list)
            title = prompt.get(node_id, {}).get("_meta", {}).get("title") or prompt.get(node_id, {}).get("class_type")
            print(f"#{node_id} {title}:\n{text}")
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

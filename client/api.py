"""A small ComfyUI HTTP + websocket client: queue an API graph, follow it, read its outputs.

Endpoints and messages follow ComfyUI's ``server.py`` / ``execution.py`` / ``main.py`` (Comfy-Org/ComfyUI).
The websocket is opened before queueing so no message of the prompt is missed; ``/history`` is the
source of truth once the server reports the prompt done (``executing`` with ``node: null``).
"""

from __future__ import annotations

import dataclasses
import json
import mimetypes
import pathlib
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable

ProgressCallback = Callable[[str, int, int], None]
"""Called with (node id, value, max) for every websocket ``progress`` message of the prompt."""


class ComfyAPIError(RuntimeError):
    """The server answered with an error (HTTP status, or a failed prompt)."""


class PromptValidationError(ComfyAPIError):
    """POST /prompt was refused (HTTP 400): ``error`` and ``node_errors`` are the server's."""

    def __init__(self, error: dict | str, node_errors: dict):
        self.error = error
        self.node_errors = node_errors or {}
        super().__init__(format_validation_error(error, self.node_errors))


class ExecutionError(ComfyAPIError):
    """A node raised while the prompt ran (websocket/history ``execution_error``)."""

    def __init__(self, data: dict):
        self.data = data
        self.prompt_id = data.get("prompt_id")
        self.node_id = str(data.get("node_id"))
        self.node_type = data.get("node_type")
        self.exception_type = data.get("exception_type", "")
        self.exception_message = data.get("exception_message", "")
        self.traceback = "".join(data.get("traceback") or [])
        super().__init__(f"node #{self.node_id} ({self.node_type}) failed: "
                         f"{self.exception_type}: {self.exception_message}".rstrip())


class ServerUnavailable(ComfyAPIError):
    """The URL does not answer, or does not answer like a ComfyUI server."""


class PromptTimeout(TimeoutError):
    """:meth:`ComfyClient.wait` gave up on the prompt (its ``timeout``); the prompt may still be on the server."""


class ExecutionInterrupted(ComfyAPIError):
    """The prompt was interrupted (``execution_interrupted``), e.g. by POST /interrupt."""

    def __init__(self, data: dict):
        self.data = data
        self.node_id = str(data.get("node_id"))
        self.node_type = data.get("node_type")
        super().__init__(f"prompt interrupted at node #{self.node_id} ({self.node_type})")


def format_validation_error(error: dict | str, node_errors: dict) -> str:
    """One line for the prompt-level error, then one line per node error, as the frontend lists them."""
    if isinstance(error, dict):
        head = error.get("message", "prompt refused")
        if error.get("details"):
            head += f": {error['details']}"
    else:
        head = str(error)
    lines = [head]
    for node_id, info in node_errors.items():
        for err in info.get("errors", []):
            detail = f": {err['details']}" if err.get("details") else ""
            lines.append(f"  node #{node_id} ({info.get('class_type', '?')}): {err.get('message', '')}{detail}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class OutputFile:
    """A file a node reported in its history outputs (``images``, ``gifs``, ``audio``, ...)."""

    node_id: str
    kind: str
    filename: str
    subfolder: str
    type: str


@dataclasses.dataclass
class PromptResult:
    prompt_id: str
    history: dict

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})

    def files(self) -> list[OutputFile]:
        """Every file-like output entry (a dict with ``filename`` and ``type``), in node order."""
        found = []
        for node_id, output in self.outputs.items():
            for kind, items in output.items():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict) and "filename" in item and "type" in item:
                        found.append(OutputFile(str(node_id), kind, item["filename"],
                                                item.get("subfolder", ""), item["type"]))
        return found


    def texts(self) -> list[tuple[str, str]]:
        """Every text a node showed (``ui.PreviewText``: a score table, a prompt list), as (node id, text)."""
        return [(str(node_id), item) for node_id, output in self.outputs.items()
                for item in output.get("text") or [] if isinstance(item, str)]


def normalize_url(url: str) -> str:
    """``host:port`` or ``http(s)://host:port/`` -> ``http(s)://host:port``."""
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


class ComfyClient:
    """Talks to one ComfyUI server; ``client_id`` routes the prompt's websocket messages to us."""

    def __init__(self, url: str, client_id: str | None = None, timeout: float = 30.0):
        self.url = normalize_url(url)
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout
        self._object_info: dict | None = None

    # -- HTTP -------------------------------------------------------------------------------------
    def _request(self, path: str, body: Any = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read()

    def get_json(self, path: str) -> Any:
        return json.loads(self._request(path))

    def post_json(self, path: str, body: Any) -> Any:
        raw = self._request(path, body)
        return json.loads(raw) if raw else None

    def probe(self) -> dict:
        """``/object_info``, or :class:`ServerUnavailable` saying why this URL is not a usable ComfyUI."""
        where = self.url + "/object_info"
        try:
            info = self.object_info()
        except urllib.error.HTTPError as exc:
            raise ServerUnavailable(f"{where} answered HTTP {exc.code} {exc.reason}: "
                                    f"{self.url} does not look like a ComfyUI server") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServerUnavailable(f"cannot reach {where}: {getattr(exc, 'reason', None) or exc}") from None
        except ValueError:
            raise ServerUnavailable(f"{where} did not answer JSON: "
                                    f"{self.url} does not look like a ComfyUI server") from None
        if not isinstance(info, dict) or "KSampler" not in info:
            self._object_info = None
            raise ServerUnavailable(f"{where} lists no ComfyUI nodes: {self.url} does not look like a ComfyUI server")
        return info

    def system_stats(self) -> dict:
        return self.get_json("/system_stats")

    def object_info(self, node_class: str | None = None) -> dict:
        """``/object_info`` (all node definitions, cached) or ``/object_info/{class}`` ({} if unknown)."""
        if node_class is not None:
            return self.get_json("/object_info/" + urllib.parse.quote(node_class, safe=""))
        if self._object_info is None:
            self._object_info = self.get_json("/object_info")
        return self._object_info

    def history(self, prompt_id: str) -> dict | None:
        """The history entry of one prompt, or None while it is not finished."""
        return self.get_json("/history/" + urllib.parse.quote(prompt_id, safe="")).get(prompt_id)

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return self._request("/view?" + query)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Interrupt ``prompt_id`` if it is the running prompt (ComfyUI >= 0.3.5x), or whatever runs."""
        self._request("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def cancel(self, prompt_id: str, timeout: float = 10.0) -> str:
        """Take ``prompt_id`` off the server: delete it while pending, interrupt it while running, until
        ``/queue`` no longer lists it (or ``timeout`` s); returns what was done, for a message."""
        done = "was neither running nor pending"
        deadline = time.monotonic() + timeout
        while True:
            queue = self.get_json("/queue")
            running = any(item[1] == prompt_id for item in queue.get("queue_running", []))
            pending = any(item[1] == prompt_id for item in queue.get("queue_pending", []))
            if not running and not pending:
                return done
            if time.monotonic() > deadline:
                return f"{done}, but it is still {'running' if running else 'pending'} after {timeout:g} s"
            if pending:
                self.post_json("/queue", {"delete": [prompt_id]})
                done = "removed it from the queue"
            if running:
                self.interrupt(prompt_id)
                done = "interrupted it"
            time.sleep(0.2)

    def upload_image(self, data: bytes, filename: str, subfolder: str = "", type: str = "input",
                     overwrite: bool = True) -> str:
        """POST /upload/image (multipart, as the editor's upload button sends it) into ``type``/``subfolder``;
        returns the value a ``LoadImage`` node takes (``subfolder/name``; the server may rename the file when
        ``overwrite`` is off and the name is taken)."""
        boundary = uuid.uuid4().hex
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        parts = [(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                  f"Content-Type: {content_type}\r\n\r\n").encode(), data, b"\r\n"]
        for name, value in (("subfolder", subfolder), ("type", type), ("overwrite", str(overwrite).lower())):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
                         .encode())
        parts.append(f"--{boundary}--\r\n".encode())
        request = urllib.request.Request(self.url + "/upload/image", data=b"".join(parts),
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            answer = json.loads(response.read())
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    # -- prompts ----------------------------------------------------------------------------------
    def queue_prompt(self, graph: dict, extra_data: dict | None = None, prompt_id: str | None = None) -> str:
        """POST /prompt; returns the prompt id. Raises :class:`PromptValidationError` on HTTP 400."""
        body = {"prompt": graph, "client_id": self.client_id, "extra_data": extra_data or {}}
        if prompt_id:
            body["prompt_id"] = prompt_id
        try:
            return self.post_json("/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                answer = json.loads(raw)
            except ValueError:
                raise ComfyAPIError(f"POST /prompt: HTTP {exc.code}: {raw[:500]!r}") from None
            if exc.code == 400 and isinstance(answer, dict) and "error" in answer:
                raise PromptValidationError(answer["error"], answer.get("node_errors", {})) from None
            raise ComfyAPIError(f"POST /prompt: HTTP {exc.code}: {answer}") from None

    def connect(self):
        """A websocket bound to this client id (``websocket-client``); close it when done."""
        import websocket  # the `websocket-client` distribution

        ws_url = "ws" + self.url[len("http"):] + "/ws?clientId=" + urllib.parse.quote(self.client_id)
        ws = websocket.WebSocket()
        try:
            ws.connect(ws_url, timeout=self.timeout)
        except websocket.WebSocketException as exc:
            raise ComfyAPIError(f"cannot open the websocket {ws_url}: {exc}") from None
        return ws

    def wait(self, ws, prompt_id: str, on_progress: ProgressCallback | None = None,
             timeout: float | None = None) -> PromptResult:
        """Follow ``ws`` until ``prompt_id`` is done; raise on an execution error or interrupt."""
        import websocket

        deadline = None if timeout is None else time.monotonic() + timeout
        ws.settimeout(1.0)
        failure: ComfyAPIError | None = None
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise PromptTimeout(f"prompt {prompt_id} did not finish within {timeout:g} s")
            try:
                frame = ws.recv()
            except websocket.WebSocketTimeoutException:
                if self.history(prompt_id) is not None:  # done, and we missed the message
                    break
                continue
            except (websocket.WebSocketConnectionClosedException, OSError) as exc:
                raise ComfyAPIError(f"lost the websocket to {self.url} while waiting for prompt {prompt_id}: "
                                    f"{exc or type(exc).__name__}") from exc
            if not isinstance(frame, str):
                continue  # binary preview images
            message = json.loads(frame)
            kind, data = message.get("type"), message.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "progress" and on_progress is not None:
                on_progress(str(data.get("node")), int(data["value"]), int(data["max"]))
            elif kind == "execution_error":
                failure = ExecutionError(data)
            elif kind == "execution_interrupted":
                failure = ExecutionInterrupted(data)
            elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
        history = self.history(prompt_id)
        if failure is not None:
            raise failure
        if history is None:
            raise ComfyAPIError(f"prompt {prompt_id} finished but /history/{prompt_id} is empty")
        _raise_for_status(history)
        return PromptResult(prompt_id, history)

    def run(self, graph: dict, on_progress: ProgressCallback | None = None, timeout: float | None = None,
            extra_data: dict | None = None, prompt_id: str | None = None) -> PromptResult:
        """Queue an API-format graph and wait for it; returns its history entry."""
        ws = self.connect()
        try:
            prompt_id = self.queue_prompt(graph, extra_data, prompt_id)
            return self.wait(ws, prompt_id, on_progress, timeout)
        finally:
            ws.close()

    def download(self, result: PromptResult, out_dir: str | pathlib.Path,
                 types: tuple[str, ...] = ("output", "temp")) -> list[pathlib.Path]:
        """Save every output file of ``result`` (of the given /view types) into ``out_dir``; returns the paths.

        An existing file is never overwritten: the name's last number counts up to a free one (ComfyUI's
        ``name_00001_.png`` -> ``name_00004_.png`` if 00002 and 00003 are taken too), see :func:`free_path`."""
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for item in result.files():
            if item.type not in types:
                continue
            path = (out / item.subfolder / item.filename).resolve()
            if not path.is_relative_to(out.resolve()):
                raise ComfyAPIError(f"output {item} would be written outside {out}")
            path.parent.mkdir(parents=True, exist_ok=True)
            data = self.view(item.filename, item.subfolder, item.type)
            while True:
                path = free_path(path)
                try:
                    with open(path, "xb") as file:  # exclusive: a concurrent run may take the same name
                        file.write(data)
                    break
                except FileExistsError:
                    continue
            paths.append(path)
        return paths


def free_path(path: pathlib.Path) -> pathlib.Path:
    """``path`` if no such file exists, else the first free name counting up its stem's last number (same
    width), or adding ``_1``, ``_2``, ... when it has none."""
    if not path.exists():
        return path
    match = re.search(r"(\d+)(?=\D*$)", path.stem)
    if match:
        head, digits, tail = path.stem[:match.start()], match.group(1), path.stem[match.end():]
    else:
        head, digits, tail = path.stem + "_", "0", ""
    number = int(digits)
    while True:
        number += 1
        candidate = path.with_name(f"{head}{number:0{len(digits)}d}{tail}{path.suffix}")
        if not candidate.exists():
            return candidate


def _raise_for_status(history: dict) -> None:
    """History records failures in ``status.messages`` even when the websocket message was missed."""
    status = history.get("status") or {}
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            raise ExecutionError(data)
        if kind == "execution_interrupted":
            raise ExecutionInterrupted(data)
    if status.get("status_str") == "error":
        raise ComfyAPIError(f"prompt failed: {status}")

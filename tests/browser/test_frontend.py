"""Browser smoke test: the real ComfyUI frontend, served by a real headless server with the pack loaded.

Headless Debian Chromium (``/usr/bin/chromium``; Playwright's own browser download needs a network)
driven by the Python ``playwright`` package. ``scripts/install_browser.sh`` installs both.

What is checked, in this order, on one page:

1. the page loads without console errors or page errors from the pack (errors that are known to
   come from the frontend itself on a fresh, offline install are listed but do not fail the test);
2. every node the pack registers (``/object_info``) is found by the node search box (double-click
   on the empty canvas, type the display name, Enter) and lands on the canvas as a node of that type;
3. every shipped workflow (``workflows/*.json``) loads with no missing node types, and the editor's
   missing-models dialog lists the model files its loaders name with a download URL;
4. ComfyUI's template browser lists the shipped workflows under the pack, with their thumbnails, and
   opening one from there loads it;
5. the ``--tiny`` form of a shipped workflow (``client/tiny_swap.py``), loaded with
   ``app.loadGraphData``, runs from the Run button and its image appears on the Save Image node;
6. screenshots of each step are saved to ``$SYNCD_TEST_ARTIFACTS`` (default ``<repo>/artifacts/``),
   with the browser console log.

How ComfyUI 0.3.64 finds a pack's templates (``app/custom_node_manager.py``): ``GET
/api/workflow_templates`` globs ``custom_nodes/*/<folder>/*.json`` for the folder names
``example_workflows``, ``example``, ``examples``, ``workflow`` and ``workflows``, keyed by the pack's folder
name, and each of those folders is served statically at ``/api/workflow_templates/<pack folder>/``. The pack
ships ``workflows/`` (a name on that list), so nothing is duplicated. Frontend 1.27 shows them in the
template browser under "Custom Nodes" > the pack's folder name, one card per file, with
``<name>.jpg`` from the same folder as the card image.

How frontend 1.27.x reports missing node types (``app.loadGraphData``): every node whose type is
not in ``LiteGraph.registered_node_types`` is collected into ``missingNodeTypes``, which is handed to
the extensions' ``afterConfigureGraph(missingNodeTypes)`` hook and, with the setting
``Comfy.Workflow.ShowMissingNodesWarning`` (default on), shown in the dialog
``global-load-workflow-warning`` whose list has the class ``comfy-missing-nodes``; the graph keeps
a placeholder ``LGraphNode`` with ``has_errors = true``. The test watches all three, and first
proves on a workflow with a made-up node type that it does see them.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import time
import urllib.parse
import urllib.request
import warnings

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO / "workflows"
CHROMIUM = os.environ.get("SYNCD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Resolve nothing but the local server: the frontend's look-ups of model download sizes never leave the machine.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
VIEWPORT = {"width": 1400, "height": 900}
TIMEOUT_MS = 20_000
PACK_PATTERN = re.compile(r"syncd", re.IGNORECASE)  # SynCD*, comfyui_syncd, /extensions/comfyui_syncd/
MISSING_PROBE_TYPE = "SynCDBrowserTestNoSuchNode"

# Settings sent to the server before the page opens. A fresh user otherwise gets the template
# browser on top of the canvas (the frontend sets TutorialCompleted itself after showing it once).
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.NodeSearchBoxImpl": "default",
}

# Console errors of the frontend itself that any fresh, offline install shows, with or without
# this pack (checked against a server without custom nodes). Listed in the test output, not failed.
# Fresh user: no user.css, no workflows/ or subgraphs/ user folders, no saved templates; no favicon.
HARMLESS_404_PATHS = {"/favicon.ico", "/user.css", "/api/userdata/user.css", "/api/userdata/comfy.templates.json"}
HARMLESS_404_USERDATA_DIRS = {"workflows", "subgraphs", "subgraphs/"}
# The missing-models dialog asks each listed download URL for its size; offline that fetch fails.
OFFLINE_DOWNLOAD_HOSTS = {"huggingface.co"}


def _browser_problem() -> str | None:
    """Why the browser test cannot run here, or None."""
    problems = []
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"Chromium is not installed at {CHROMIUM}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the Python package 'playwright' is not installed")
    if not problems:
        return None
    return "; ".join(problems) + " (run scripts/install_browser.sh)"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


_PROBLEM = _browser_problem()

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
except ImportError:  # the test is skipped (or fails in CI) before this is needed
    PlaywrightTimeoutError = TimeoutError

pytestmark = [
    pytest.mark.browser,
    # Skip at collection, before the session's ComfyUI server starts; in CI the test must fail instead.
    pytest.mark.skipif(_PROBLEM is not None and not _in_ci(), reason=f"browser test skipped: {_PROBLEM}"),
]


def _artifacts_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("SYNCD_TEST_ARTIFACTS") or REPO / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _http_json(url: str, data: dict | None = None) -> dict:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read().decode()
    return json.loads(raw) if raw.strip() else {}


def _is_harmless(entry: dict) -> bool:
    """A console message that is known to come from the frontend itself, unrelated to any pack."""
    if entry["kind"] == "console.error" and entry["text"].startswith("Failed to load resource: the server "
                                                                      "responded with a status of 404"):
        url = urllib.parse.urlsplit(entry["url"] or "")
        if url.path in HARMLESS_404_PATHS:
            return True
        if url.path == "/api/userdata":
            folder = urllib.parse.parse_qs(url.query).get("dir", [""])[0]
            return folder in HARMLESS_404_USERDATA_DIRS
        return False
    if entry["kind"] == "console.error" and entry["text"].startswith("Failed to load resource: net::ERR_"):
        return urllib.parse.urlsplit(entry["url"] or "").hostname in OFFLINE_DOWNLOAD_HOSTS
    if entry["kind"] == "console.error" and entry["text"].startswith("Error fetching file size: TypeError: "
                                                                      "Failed to fetch"):
        return True
    if entry["kind"] == "pageerror":
        # Frontend 1.27.10 bug: registering the core setting Comfy.Canvas.NavigationMode runs its
        # onChange, which sets Comfy.Canvas.LeftMouseClickBehavior before that one is registered.
        stack = entry["stack"] or ""
        frames = re.findall(r"\((https?://[^)]+)\)", stack)
        return (entry["text"] == "Cannot read properties of undefined (reading 'id')"
                and "addSetting" in stack and "onChange" in stack
                and bool(frames) and all("/assets/" in f for f in frames))
    return False


class Frontend:
    """One Chromium page on the ComfyUI frontend, recording everything the browser console says."""

    def __init__(self, page, url: str, node_ids: list[str]):
        self.page = page
        self.url = url
        self.node_ids = node_ids
        self.console: list[dict] = []
        self.artifacts = _artifacts_dir()
        self.screenshots: list[pathlib.Path] = []
        page.on("console", self._on_console)
        page.on("pageerror", self._on_pageerror)

    def _on_console(self, message) -> None:
        location = message.location or {}
        self.console.append({"kind": f"console.{message.type}", "text": message.text,
                             "url": location.get("url", ""), "line": location.get("lineNumber"), "stack": ""})

    def _on_pageerror(self, error) -> None:
        self.console.append({"kind": "pageerror", "text": error.message, "url": "",
                             "line": None, "stack": error.stack or ""})

    def mentions_pack(self, entry: dict) -> bool:
        blob = " ".join(str(entry[k]) for k in ("text", "url", "stack"))
        return bool(PACK_PATTERN.search(blob)) or any(node_id in blob for node_id in self.node_ids)

    def errors(self, since: int = 0) -> tuple[list[dict], list[dict]]:
        """(errors that fail the test, known harmless frontend errors) among console entries [since:]."""
        failing, harmless = [], []
        for entry in self.console[since:]:
            if entry["kind"] not in ("console.error", "pageerror"):
                continue
            if not self.mentions_pack(entry) and _is_harmless(entry):
                harmless.append(entry)
            else:
                failing.append(entry)
        return failing, harmless

    def assert_no_errors(self, since: int, doing: str) -> None:
        failing, harmless = self.errors(since)
        for entry in harmless:
            print(f"[browser] ignored frontend error while {doing}: {_describe(entry)}")
        if harmless:
            warnings.warn(f"{len(harmless)} console error(s) of the frontend itself while {doing} "
                          f"(unrelated to the pack, not failed): "
                          + "; ".join(_describe(e, short=True) for e in harmless), stacklevel=2)
        pack = [e for e in failing if self.mentions_pack(e)]
        assert not pack, f"console errors from the SynCD pack while {doing}:\n" + "\n".join(map(_describe, pack))
        assert not failing, (f"console errors while {doing} (not known to be harmless; if one is unrelated to "
                             f"the pack and unavoidable offline, add it to _is_harmless):\n"
                             + "\n".join(map(_describe, failing)))

    def screenshot(self, name: str) -> pathlib.Path:
        path = self.artifacts / f"frontend-{name}.png"
        self.page.screenshot(path=str(path))
        self.screenshots.append(path)
        print(f"[browser] screenshot {path}")
        return path

    def command(self, command_id: str) -> None:
        self.page.evaluate("async (id) => { await window.app.extensionManager.command.execute(id); }", command_id)

    def close_overlays(self) -> None:
        """Dismiss a leftover search box or dialog (a failed earlier step must not break the next one)."""
        for _ in range(3):
            if not self.page.locator(".p-dialog:visible").count():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)

    def dump_console(self) -> pathlib.Path:
        path = self.artifacts / "browser-console.log"
        with open(path, "w") as log:
            for e in self.console:
                log.write(_describe(e) + "\n")
        return path


def _describe(entry: dict, short: bool = False) -> str:
    where = f" @ {entry['url']}" + (f":{entry['line']}" if entry.get("line") else "") if entry["url"] else ""
    text = f"{entry['kind']}: {entry['text']}{where}"
    if entry["stack"] and not short:
        text += "\n    " + "\n    ".join(entry["stack"].splitlines()[1:6])
    return text


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """Requested before ``comfy_server`` so that a missing browser fails before the server starts."""
    if _PROBLEM is not None:
        pytest.fail(f"CI is set and the browser test cannot run: {_PROBLEM}")
    return CHROMIUM


@pytest.fixture(scope="module")
def pack_nodes(chromium_executable, comfy_server) -> dict[str, dict]:
    """The pack's node definitions as the server publishes them: {node_id: object_info entry}."""
    info = _http_json(comfy_server.url.rstrip("/") + "/object_info")
    nodes = {node_id: d for node_id, d in info.items()
             if "comfyui_syncd" in (d.get("python_module") or "").lower()
             or (d.get("category") or "").startswith("SynCD")}
    assert nodes, "the server's /object_info lists no node of the SynCD pack (python_module comfyui_syncd)"
    return nodes


@pytest.fixture(scope="module")
def reference_inputs(comfy_server) -> list[str]:
    """The input files the shipped workflows' Load Image nodes name, as a user provides them: a photo of a
    subject whose area was painted in the mask editor (alpha 0 there, so Load Image's MASK is the subject).
    Without them the editor's image previews ask the server for missing files (404)."""
    from PIL import Image, ImageDraw

    names = sorted({n["widgets_values"][0] for path in WORKFLOWS_DIR.glob("*.json")
                    for n in json.loads(path.read_text())["nodes"] if n["type"] in ("LoadImage", "LoadImageMask")})
    folder = comfy_server.base_dir / "input"
    folder.mkdir(exist_ok=True)
    for k, name in enumerate(names):
        image = Image.new("RGBA", (256, 256), (70 + 20 * k, 110, 150, 255))
        draw = ImageDraw.Draw(image)
        box = [60 + 8 * k, 70, 190 + 8 * k, 200]
        draw.ellipse(box, fill=(230, 180, 90, 255))
        alpha = Image.new("L", image.size, 255)
        ImageDraw.Draw(alpha).ellipse(box, fill=0)
        image.putalpha(alpha)
        image.save(folder / name)
    return names


@pytest.fixture(scope="module")
def frontend(chromium_executable, comfy_server, pack_nodes, reference_inputs, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    url = comfy_server.url.rstrip("/")
    for old in _artifacts_dir().glob("frontend-*.png"):  # no stale screenshots of an earlier run
        old.unlink()
    _http_json(url + "/api/settings", SETTINGS)
    profile = tmp_path_factory.mktemp("chromium-profile")
    fe = None
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=chromium_executable, headless=True, args=CHROMIUM_ARGS,
            viewport=VIEWPORT, service_workers="block")
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            fe = Frontend(page, url, sorted(pack_nodes))
            started = time.monotonic()
            page.goto(url + "/", wait_until="load")
            # The app is ready when the canvas exists and the pack's node definitions are registered.
            page.wait_for_function(
                """(ids) => window.app && window.app.graph && window.app.canvas && window.LiteGraph
                        && ids.every((id) => id in window.LiteGraph.registered_node_types)
                        && window.app.extensionManager && window.app.extensionManager.command""",
                arg=fe.node_ids, timeout=60_000)
            page.wait_for_load_state("networkidle")
            fe.load_seconds = time.monotonic() - started
            yield fe
        finally:
            if fe is not None:
                print(f"[browser] console log {fe.dump_console()}")
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


def test_page_loads_without_pack_errors(frontend):
    page = frontend.page
    print(f"[browser] frontend ready in {frontend.load_seconds:.1f} s at {frontend.url}")
    version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
    print(f"[browser] frontend version {version}")
    frontend.close_overlays()
    shot = frontend.screenshot("loaded")
    frontend.assert_no_errors(0, "loading the page")

    # The page really rendered: the canvas is laid out full-size and the screenshot is not blank.
    box = page.locator("#graph-canvas").bounding_box()
    assert box and box["width"] > 600 and box["height"] > 400, f"graph canvas not laid out: {box}"
    from PIL import Image

    with Image.open(shot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 64, f"{shot} looks blank ({len(colors)} colors)"


SEARCH_INPUT = ".comfy-vue-node-search-container input"
DOUBLE_CLICK_ATTEMPTS = 3
DOUBLE_CLICK_PAUSE_MS = 80

# The search results as shown: each option's display name (highlighted), category and source badge.
SEARCH_RESULTS_JS = """(name) => {
    const input = document.querySelector('.comfy-vue-node-search-container input');
    const options = [...document.querySelectorAll('.p-autocomplete-option')];
    const label = (o) => [...o.querySelectorAll('.option-display-name > div > span')]
        .map((s) => s.textContent.replace(/\\u00a0/g, ' ').trim()).find((t) => t) ?? '';
    const labels = options.map(label);
    const index = labels.indexOf(name);
    return {query: input ? input.value : null, index, labels: labels.slice(0, 8), count: options.length,
            focused: options.findIndex((o) => o.classList.contains('p-focus')),
            badges: index < 0 ? '' : (options[index].querySelector('.option-badges')?.textContent ?? '').trim()};
}"""


def _open_node_search(frontend: Frontend) -> None:
    """Double-click the empty canvas, as a user opens the node search box."""
    page = frontend.page
    # The previous search dialog must be gone (its closing transition would swallow the double-click).
    page.wait_for_function("() => !document.querySelector('.comfy-vue-node-search-container')")
    canvas = page.locator("#graph-canvas")
    box = canvas.bounding_box()
    position = {"x": box["width"] * 0.55, "y": box["height"] * 0.5}
    empty = page.evaluate("""([x, y]) => {
        const [gx, gy] = window.app.canvas.ds.convertOffsetToCanvas([x, y]);
        return !window.app.graph.getNodeOnPos(gx, gy);
    }""", [position["x"], position["y"]])
    assert empty, "the spot to double-click on the canvas is not empty"
    # LiteGraph (CanvasPointer) takes two pointer-downs 0 < dt < 300 ms apart (event timestamps) as a
    # double-click. Playwright's dblclick sends both clicks back to back, and on a loaded machine the
    # browser stamps them with the same time (dt = 0), so click twice with a human-like pause instead.
    # Should it still not open, a user would double-click again; so does the test.
    search = page.locator(SEARCH_INPUT).first
    x, y = box["x"] + position["x"], box["y"] + position["y"]
    page.evaluate("""() => { if (window.__syncdDowns) return; window.__syncdDowns = [];
        document.querySelector('#graph-canvas').addEventListener(
            'pointerdown', (e) => window.__syncdDowns.push(e.timeStamp), true); }""")
    for attempt in range(1, DOUBLE_CLICK_ATTEMPTS + 1):
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.up()
        page.wait_for_timeout(DOUBLE_CLICK_PAUSE_MS)
        page.mouse.down(click_count=2)
        page.mouse.up(click_count=2)
        try:
            search.wait_for(state="visible", timeout=3_000)
            break
        except PlaywrightTimeoutError:
            gap = page.evaluate("() => { const d = window.__syncdDowns; return d.length > 1 ? d.at(-1) - d.at(-2) : null; }")
            print(f"[browser] double-click {attempt} on the canvas did not open the node search "
                  f"({gap and round(gap)} ms between its pointer-downs)")
    else:
        frontend.screenshot("node-search-did-not-open")
        pytest.fail(f"{DOUBLE_CLICK_ATTEMPTS} double-clicks on the empty canvas did not open the node search box")
    page.wait_for_function(f"() => document.activeElement && document.activeElement.matches({SEARCH_INPUT!r})")


def _search_and_add(frontend: Frontend, node_id: str, display_name: str, screenshot: bool) -> dict:
    page = frontend.page
    _open_node_search(frontend)
    page.keyboard.type(display_name)
    # The results follow the typed text with a delay: wait until they show the whole query, list
    # the node, and stay the same for a moment.
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    previous = None
    while True:
        result = page.evaluate(SEARCH_RESULTS_JS, display_name)
        if result["query"] == display_name and result["index"] >= 0 and result == previous:
            break
        assert time.monotonic() < deadline, (
            f"the node search for {display_name!r} does not list {node_id} (results: {result})")
        previous = result
        page.wait_for_timeout(250)
    assert PACK_PATTERN.search(result["badges"]), (
        f"search result {display_name!r} is not attributed to the pack (badges {result['badges']!r})")
    if screenshot:
        frontend.screenshot("node-search")
    if result["focused"] == result["index"]:
        page.keyboard.press("Enter")
        how = "Enter on the top result"
    else:  # not the top hit: pick it from the list as a user would
        page.locator(".p-autocomplete-option").nth(result["index"]).click()
        how = f"click on result {result['index']} of {result['labels']}"
    page.wait_for_function("() => window.app.graph.nodes.length > 0")
    page.locator(SEARCH_INPUT).first.wait_for(state="hidden")
    added = page.evaluate("""() => window.app.graph.nodes.map((n) => ({
        id: n.id, type: n.type, title: n.title, comfyClass: n.constructor.comfyClass ?? null,
        has_errors: !!n.has_errors, pos: [n.pos[0], n.pos[1]]}))""")
    print(f"[browser] {node_id}: typed {display_name!r}, added with {how}: {added}")
    return {"added": added, "how": how}


def test_pack_nodes_added_from_node_search(frontend, pack_nodes):
    page = frontend.page
    frontend.close_overlays()
    since = len(frontend.console)
    frontend.command("Comfy.NewBlankWorkflow")
    page.wait_for_function("() => window.app.graph.nodes.length === 0")
    for i, (node_id, definition) in enumerate(sorted(pack_nodes.items())):
        display_name = definition.get("display_name") or node_id
        result = _search_and_add(frontend, node_id, display_name, screenshot=(i == 0))
        added = result["added"]
        assert len(added) == 1, f"searching {display_name!r} should add one node, the graph has {added}"
        node = added[0]
        assert node["type"] == node_id and node["comfyClass"] == node_id, (
            f"searching {display_name!r} added {node['type']!r}, expected {node_id!r}")
        assert not node["has_errors"], f"node {node_id} was added with has_errors"
        # Empty the canvas again for the next node.
        page.evaluate("() => { for (const n of [...window.app.graph.nodes]) window.app.graph.remove(n);"
                      " window.app.graph.setDirtyCanvas(true, true); }")
    frontend.assert_no_errors(since, "adding the pack's nodes from the node search")


PROBE_JS = """() => {
    if (window.__syncdMissingProbe) return;
    window.__syncdMissingProbe = [];
    window.app.registerExtension({
        name: 'SynCD.BrowserTest.MissingNodeProbe',
        afterConfigureGraph(missingNodeTypes) {
            window.__syncdMissingProbe.push((missingNodeTypes ?? []).map((t) => typeof t === 'object' ? t.type : t));
        },
    });
}"""

LOAD_JS = """async ([data, name, isApi]) => {
    const before = window.__syncdMissingProbe.length;
    if (isApi) window.app.loadApiJson(data, name);
    else await window.app.loadGraphData(data, true, true, name);
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    const registered = window.LiteGraph.registered_node_types;
    const nodes = [];
    const walk = (graph, where) => {
        for (const n of graph.nodes ?? graph._nodes ?? [])
            nodes.push({id: n.id, type: n.type, where, registered: n.type in registered, has_errors: !!n.has_errors});
    };
    walk(window.app.graph, 'root');
    for (const [id, sg] of window.app.graph.subgraphs ?? []) walk(sg, `subgraph ${sg.name || id}`);
    const apiMissing = isApi ? Object.values(data).map((n) => n.class_type).filter((t) => !(t in registered)) : [];
    const saved = window.app.graph.serialize();
    return {missing: window.__syncdMissingProbe.slice(before).flat().concat(apiMissing), nodes,
            widgets: Object.fromEntries(saved.nodes.map((n) => [String(n.id), n.widgets_values ?? null])),
            links: (saved.links ?? []).length};
}"""


def _missing_dialog(page, wait_ms: int) -> list[str]:
    """The node types listed by a visible missing-nodes dialog (empty when there is none)."""
    dialog = page.locator(".comfy-missing-nodes")
    try:
        dialog.first.wait_for(state="visible", timeout=wait_ms)
    except PlaywrightTimeoutError:  # no dialog
        return []
    return [t.strip() for t in dialog.first.locator(".p-listbox-option").all_inner_texts()]


def _missing_models_dialog(page, wait_ms: int) -> list[str]:
    """The 'folder / file' labels of a visible missing-models dialog, sorted (empty when there is none)."""
    dialog = page.locator(".comfy-missing-models")
    try:
        dialog.first.wait_for(state="visible", timeout=wait_ms)
    except PlaywrightTimeoutError:
        return []
    labels = dialog.first.locator(".p-listbox-option span[title]").all_inner_texts()
    return sorted(label.strip() for label in labels)


def _load(frontend: Frontend, data, name: str) -> dict:
    is_api = isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())
    frontend.page.evaluate(PROBE_JS)
    result = frontend.page.evaluate(LOAD_JS, [data, name, is_api])
    result["is_api"] = is_api
    return result


def test_shipped_workflows_load_without_missing_nodes(frontend, pack_nodes):
    page = frontend.page
    files = sorted(WORKFLOWS_DIR.glob("*.json"))
    assert files, f"no shipped workflows in {WORKFLOWS_DIR}"
    frontend.close_overlays()

    # 1. The checks see a missing node type in this frontend version.
    bogus = {"last_node_id": 1, "last_link_id": 0, "links": [], "groups": [], "config": {}, "extra": {},
             "version": 0.4, "nodes": [{"id": 1, "type": MISSING_PROBE_TYPE, "pos": [100, 100], "size": [300, 100],
                                        "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                                        "properties": {}, "widgets_values": []}]}
    since = len(frontend.console)
    probe = _load(frontend, bogus, "syncd-missing-node-selftest")
    listed = _missing_dialog(page, wait_ms=5_000)
    assert MISSING_PROBE_TYPE in probe["missing"], f"afterConfigureGraph did not report the missing type: {probe}"
    assert any(MISSING_PROBE_TYPE in t for t in listed), f"missing-nodes dialog did not list it: {listed}"
    assert [n for n in probe["nodes"] if n["has_errors"] or not n["registered"]], probe["nodes"]
    frontend.close_overlays()
    assert not page.locator(".comfy-missing-nodes:visible").count(), "missing-nodes dialog did not close"
    print(f"[browser] self-test: a made-up node type is reported by afterConfigureGraph, "
          f"has_errors and the missing-nodes dialog ({listed})")
    pageerrors = [e for e in frontend.console[since:] if e["kind"] == "pageerror"]
    assert not pageerrors, "page errors while loading the missing-node self-test:\n" + "\n".join(map(_describe, pageerrors))

    # 2. The shipped workflows.
    used_pack_types = set()
    for path in files:
        since = len(frontend.console)
        data = json.loads(path.read_text())
        result = _load(frontend, data, path.stem)
        listed = _missing_dialog(page, wait_ms=700)
        nodes = result["nodes"]
        bad = [n for n in nodes if n["has_errors"] or not n["registered"]]
        print(f"[browser] {path.name}: {len(nodes)} nodes ({'API' if result['is_api'] else 'UI'} format), "
              f"missing {result['missing']}, dialog {listed}")
        assert not result["missing"], f"{path.name}: missing node types {result['missing']}"
        assert not listed, f"{path.name}: the missing-nodes dialog lists {listed}"
        assert not bad, f"{path.name}: nodes with unregistered types or has_errors: {bad}"
        expected = len(data) if result["is_api"] else len(data.get("nodes", []))
        root = [n for n in nodes if n["where"] == "root"]
        assert len(root) == expected, f"{path.name}: {expected} nodes in the file, {len(root)} in the graph"
        if not result["is_api"]:
            # The frontend kept every link and maps every saved widget value onto a widget of the
            # node (a widgets_values list that does not fit the node's widgets would change here).
            assert result["links"] == len(data.get("links", [])), (
                f"{path.name}: {len(data.get('links', []))} links in the file, {result['links']} after loading")
            changed = {n["id"]: (n["widgets_values"], result["widgets"].get(str(n["id"])))
                       for n in data.get("nodes", []) if "widgets_values" in n
                       and n["widgets_values"] != result["widgets"].get(str(n["id"]))}
            assert not changed, f"{path.name}: widget values changed on load (file, frontend): {changed}"
        error_toasts = page.locator(".p-toast-message-error:visible").all_inner_texts()
        assert not error_toasts, f"{path.name}: error toasts {error_toasts}"
        # The loaders' properties.models (files with a download URL) show up in the missing-models dialog:
        # the server has no model files, so every one of them is missing.
        downloadable = sorted(f"{m['directory']} / {m['name']}" for n in data.get("nodes", [])
                              for m in (n.get("properties") or {}).get("models", []))
        assert _missing_models_dialog(page, wait_ms=5_000 if downloadable else 700) == downloadable, path.name
        frontend.close_overlays()
        used_pack_types |= {n["type"] for n in nodes} & set(pack_nodes)
        frontend.command("Comfy.Canvas.FitView")
        page.wait_for_timeout(150)
        frontend.screenshot(f"workflow-{path.stem}")
        frontend.assert_no_errors(since, f"loading {path.name}")
    print(f"[browser] pack node types used by the shipped workflows: {sorted(used_pack_types)}")
    assert used_pack_types, f"none of the shipped workflows uses a node of the pack ({sorted(pack_nodes)})"


def test_template_browser_lists_the_pack_workflows(frontend, comfy_server):
    """Workflow > Browse Templates: "Custom Nodes" > the pack's folder lists every shipped workflow with its
    thumbnail, and clicking a card loads that workflow (fetched from /api/workflow_templates/<pack>/)."""
    from comfyui_syncd.client.embedded import PACK_FOLDER  # the server's custom_nodes/<folder> for this pack

    page = frontend.page
    frontend.close_overlays()
    since = len(frontend.console)
    stems = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
    listed = _http_json(frontend.url + "/api/workflow_templates")
    assert sorted(listed.get(PACK_FOLDER, [])) == stems, f"/api/workflow_templates: {listed}"

    frontend.command("Comfy.BrowseTemplates")
    category = page.locator(f'li.p-listbox-option[aria-label="{PACK_FOLDER}"]')
    category.click()
    count = "() => document.querySelectorAll('[data-testid^=\"template-workflow-\"]').length"
    page.wait_for_function(f"(n) => ({count})() >= n", arg=min(len(stems), 12))
    for _ in range(20):  # the grid renders 12 cards and loads more as its end scrolls into view
        if page.evaluate(count) >= len(stems):
            break
        page.locator('[data-testid^="template-workflow-"]').last.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
    page.wait_for_function(f"(n) => ({count})() === n", arg=len(stems))
    shown = page.evaluate("() => [...document.querySelectorAll('[data-testid^=\"template-workflow-\"]')]"
                          ".map((c) => c.dataset.testid.slice('template-workflow-'.length))")
    assert sorted(shown) == stems, f"template cards {shown}"
    for stem in stems:  # cards load their image when scrolled into view
        card = page.locator(f'[data-testid="template-workflow-{stem}"]')
        card.scroll_into_view_if_needed()
        assert card.get_by_text(stem, exact=True).count(), f"card {stem} does not show its name"
        page.wait_for_function("(id) => { const img = document.querySelector(`[data-testid=\"${id}\"] img`);"
                               " return img && img.complete && img.naturalWidth === 512; }",
                               arg=f"template-workflow-{stem}")
    page.locator(f'[data-testid="template-workflow-{shown[0]}"]').scroll_into_view_if_needed()
    frontend.screenshot("template-browser")

    chosen = "jedi_coupled_attention_sd15"
    page.locator(f'[data-testid="template-workflow-{chosen}"]').click()
    expected = json.loads((WORKFLOWS_DIR / f"{chosen}.json").read_text())
    page.wait_for_function("(n) => !document.querySelector('[data-testid^=\"template-workflow-\"]')"
                           " && window.app.graph.nodes.length === n", arg=len(expected["nodes"]))
    loaded = page.evaluate("() => window.app.graph.nodes.map((n) => [n.id, n.type]).sort((a, b) => a[0] - b[0])")
    assert loaded == [[n["id"], n["type"]] for n in sorted(expected["nodes"], key=lambda n: n["id"])]
    missing = _missing_models_dialog(page, wait_ms=5_000)
    assert missing == ["checkpoints / v1-5-pruned-emaonly-fp16.safetensors"], missing
    frontend.screenshot("template-opened")
    frontend.close_overlays()
    frontend.assert_no_errors(since, "browsing the templates")


RUN_WORKFLOW = "syncd_customization_sdxl_1ref.json"


def test_run_button_runs_a_tiny_workflow(frontend, comfy_server):
    """The --tiny form of a shipped workflow, loaded into the page, runs from the Run button; the output image
    is shown on its Save Image node and is the file the server saved for that prompt."""
    from comfyui_syncd.client.tiny_swap import tiny_swap

    page = frontend.page
    frontend.close_overlays()
    since = len(frontend.console)
    info = _http_json(frontend.url + "/object_info")
    workflow, _ = tiny_swap(json.loads((WORKFLOWS_DIR / RUN_WORKFLOW).read_text()), info)
    save = next(n for n in workflow["nodes"] if n["type"] == "SaveImage")
    page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }",
                  [workflow, f"{pathlib.Path(RUN_WORKFLOW).stem} (tiny)"])
    assert _missing_models_dialog(page, wait_ms=700) == [], "the tiny form needs no model files"
    # Nodes off screen are not drawn and do not load their images: show the Save Image node.
    page.evaluate("""(id) => { const node = window.app.graph.getNodeById(id);
        window.app.canvas.ds.scale = 1; window.app.canvas.centerOnNode(node);
        window.app.canvas.setDirty(true, true); }""", save["id"])
    history_before = set(_http_json(frontend.url + "/api/history"))
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_function("""(id) => { const node = window.app.graph.getNodeById(id);
        return node && node.imgs && node.imgs.length === 1 && node.imgs[0].complete
            && node.imgs[0].naturalWidth === 64; }""", arg=save["id"], timeout=180_000)
    shown = page.evaluate("(id) => window.app.graph.getNodeById(id).imgs[0].src", save["id"])
    history = _http_json(frontend.url + "/api/history")
    new = [entry for prompt_id, entry in history.items() if prompt_id not in history_before]
    assert len(new) == 1 and new[0]["status"]["status_str"] == "success", new
    saved = new[0]["outputs"][str(save["id"])]["images"]
    assert len(saved) == 1 and saved[0]["type"] == "output"
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(shown).query)
    assert query["filename"] == [saved[0]["filename"]], (shown, saved)
    ran = {n["class_type"] for n in new[0]["prompt"][2].values()}
    assert {"SynCDTinyDemoModel", "SynCDApplyReferences", "SynCDIPAdapterApply", "SynCDNormalizedGuider"} <= ran
    page.wait_for_timeout(200)
    frontend.screenshot("run-tiny-workflow")
    frontend.assert_no_errors(since, "running the tiny workflow from the Run button")

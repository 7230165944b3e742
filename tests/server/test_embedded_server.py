"""EmbeddedServer and find_comfyui: the shared session server, and fake ComfyUIs for the failure paths."""

from __future__ import annotations

import pathlib
import textwrap
import urllib.request

import pytest

from comfyui_syncd import comfy_path as comfy_path_module
from comfyui_syncd.client.embedded import PACK_ROOT, EmbeddedServer, EmbeddedServerError, import_errors
from comfyui_syncd.comfy_path import ComfyUINotFoundError, find_comfyui

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_session_server_layout(comfy_server):
    assert PACK_ROOT == REPO
    link = comfy_server.base_dir / "custom_nodes" / "comfyui_syncd"
    assert link.is_symlink() and link.resolve() == REPO
    assert "Starting server" in comfy_server.log()
    with urllib.request.urlopen(comfy_server.url + "/system_stats") as response:
        assert response.status == 200


def fake_comfyui(tmp_path, body: str) -> pathlib.Path:
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text(textwrap.dedent(body))
    return root


def test_dead_server_raises_with_its_log(tmp_path):
    root = fake_comfyui(tmp_path, """
        import sys
        print("fake ComfyUI: torch is broken", flush=True)
        sys.exit(3)
    """)
    server = EmbeddedServer(root, startup_timeout=30)
    with pytest.raises(EmbeddedServerError, match=r"(?s)exited with code 3.*fake ComfyUI: torch is broken"):
        server.start()
    assert server.process is None and not server.base_dir.exists()


def test_server_without_the_pack_raises_with_the_import_error(tmp_path):
    """A server that answers /system_stats but has no SynCD nodes: the log's traceback is shown."""
    root = fake_comfyui(tmp_path, """
        import http.server, sys
        port = int(sys.argv[sys.argv.index("--port") + 1])
        base = sys.argv[sys.argv.index("--base-directory") + 1]
        print("Traceback (most recent call last):")
        print('  File "nodes.py", line 2131, in load_custom_node')
        print("ModuleNotFoundError: No module named 'einops'")
        print(f"Cannot import {base}/custom_nodes/comfyui_syncd module for custom nodes: No module named 'einops'",
              flush=True)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

        http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """)
    server = EmbeddedServer(root, startup_timeout=30)
    with pytest.raises(EmbeddedServerError) as info:
        server.start()
    message = str(info.value)
    assert "did not load" in message
    assert "No module named 'einops'" in message and "Traceback" in message
    assert server.process is None and not server.base_dir.exists()


def test_import_errors_picks_the_pack_traceback():
    log = "\n".join([
        "Traceback (most recent call last):", "  other", "ImportError: torchaudio",
        "Cannot import /x/comfy_extras/nodes_audio.py module for custom nodes: torchaudio",
        "Traceback (most recent call last):", '  File "/b/custom_nodes/comfyui_syncd/__init__.py"', "SyntaxError: x",
        "Cannot import /b/custom_nodes/comfyui_syncd module for custom nodes: x", "Starting server"])
    assert import_errors(log).splitlines() == log.splitlines()[4:8]


def test_find_comfyui_env(monkeypatch, tmp_path, comfy_path):
    monkeypatch.setenv("COMFYUI_PATH", str(comfy_path))
    assert find_comfyui() == comfy_path.resolve()
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    with pytest.raises(ComfyUINotFoundError, match="is not a ComfyUI checkout"):
        find_comfyui()


def test_find_comfyui_from_custom_nodes(monkeypatch, tmp_path):
    root = fake_comfyui(tmp_path, "")
    pack = root / "custom_nodes" / "comfyui_syncd"
    pack.mkdir(parents=True)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(comfy_path_module, "__file__", str(pack / "comfy_path.py"))
    assert find_comfyui() == root.resolve()


def test_find_comfyui_explains_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(comfy_path_module, "__file__", str(tmp_path / "pack" / "comfy_path.py"))
    monkeypatch.setattr(comfy_path_module, "DEFAULT_COMFYUI", tmp_path / "nothing")
    with pytest.raises(ComfyUINotFoundError) as info:
        find_comfyui()
    assert "COMFYUI_PATH" in str(info.value) and "~/comfy/ComfyUI" in str(info.value)

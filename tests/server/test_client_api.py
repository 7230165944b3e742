"""The HTTP + websocket client against the real headless server."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from comfyui_syncd.client.api import (ComfyClient, ExecutionError, PromptResult, PromptValidationError,
                                      format_validation_error, normalize_url)


def txt2img(steps=3, batch=2, width=32, prefix="client_test", family="sd15"):
    """Tiny model -> KSampler -> VAEDecode -> SaveImage, in API format."""
    latent = "EmptySD3LatentImage" if family == "flux" else "EmptyLatentImage"
    return {
        "1": {"class_type": "SynCDTinyDemoModel", "inputs": {"family": family, "seed": 0, "width": width}},
        "2": {"class_type": "SynCDTinyDemoTextEncode", "inputs": {"family": family, "text": "a dog", "seed": 0}},
        "3": {"class_type": "SynCDTinyDemoTextEncode", "inputs": {"family": family, "text": "", "seed": 0}},
        "4": {"class_type": latent, "inputs": {"width": 64, "height": 48, "batch_size": batch}},
        "5": {"class_type": "KSampler", "inputs": {
            "seed": 1, "steps": steps, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 1]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["6", 0]}},
    }


def test_object_info(comfy_client):
    info = comfy_client.object_info()
    assert {"SynCDTinyDemoModel", "SynCDTinyDemoTextEncode", "SynCDSharedAttention", "KSampler"} <= set(info)
    one = comfy_client.object_info("SynCDSharedAttention")
    assert one["SynCDSharedAttention"]["input_order"]["required"][0] == "model"
    assert comfy_client.object_info("NoSuchNode") == {}


def test_run_reports_progress_and_downloads_images(comfy_client, tmp_path):
    progress = []
    result = comfy_client.run(txt2img(steps=3, batch=2), on_progress=lambda *event: progress.append(event),
                              timeout=120)
    assert ("5", 3, 3) in progress
    assert [value for node, value, _ in progress if node == "5"] == [1, 2, 3]
    files = result.files()
    assert [(f.node_id, f.kind, f.type) for f in files] == [("7", "images", "output")] * 2
    paths = comfy_client.download(result, tmp_path / "out")
    assert [p.name for p in paths] == [f.filename for f in files]
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (64, 48)
            assert image.format == "PNG"
    assert result.history["status"]["status_str"] == "success"


def test_flux_latent_runs(comfy_client):
    result = comfy_client.run(txt2img(family="flux", steps=2, batch=1, prefix="client_flux"), timeout=120)
    (image,) = result.files()
    with Image.open(io.BytesIO(comfy_client.view(image.filename, image.subfolder, image.type))) as decoded:
        assert decoded.size == (64, 48)


def test_validation_error_carries_node_errors(comfy_client):
    graph = txt2img()
    del graph["5"]["inputs"]["model"]
    graph["5"]["inputs"]["steps"] = 0
    with pytest.raises(PromptValidationError) as info:
        comfy_client.run(graph)
    error = info.value
    assert error.error["type"] == "prompt_outputs_failed_validation"
    assert error.node_errors["5"]["class_type"] == "KSampler"
    assert {e["type"] for e in error.node_errors["5"]["errors"]} == {"required_input_missing",
                                                                     "value_smaller_than_min"}
    assert "node #5 (KSampler): Required input is missing: model" in str(error)


def test_prompt_without_outputs_is_refused(comfy_client):
    graph = txt2img()
    del graph["7"]
    with pytest.raises(PromptValidationError) as info:
        comfy_client.queue_prompt(graph)
    assert info.value.node_errors == {}
    assert info.value.error["type"] == "prompt_no_outputs"


def test_execution_error_names_the_node(comfy_client):
    graph = txt2img(width=48)  # valid for validation (step 16), refused by the UNet builder (multiple of 32)
    with pytest.raises(ExecutionError) as info:
        comfy_client.run(graph, timeout=120)
    error = info.value
    assert (error.node_id, error.node_type, error.exception_type) == ("1", "SynCDTinyDemoModel", "ValueError")
    assert "multiple of 32" in error.exception_message
    assert "node #1 (SynCDTinyDemoModel) failed" in str(error)
    assert "tiny_models.py" in error.traceback


def test_upload_image_gives_the_loadimage_value_and_the_same_bytes_back(comfy_client):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="PNG")
    data = buffer.getvalue()
    value = comfy_client.upload_image(data, "client_upload.png", "client_test")
    assert value == "client_test/client_upload.png"
    assert comfy_client.view("client_upload.png", "client_test", "input") == data
    assert comfy_client.upload_image(data, "client_upload.png") == "client_upload.png"  # no subfolder


def _wait_in_history(client, prompt_id):
    deadline = time.monotonic() + 120
    while client.history(prompt_id) is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_wait_falls_back_to_history_when_messages_were_missed(comfy_client):
    """A websocket opened after the prompt finished sees nothing; wait() then reads /history."""
    ok_id = comfy_client.queue_prompt(txt2img(steps=1, batch=1, prefix="client_late"))
    bad_id = comfy_client.queue_prompt(txt2img(width=48, prefix="client_late_bad"))
    _wait_in_history(comfy_client, ok_id)
    _wait_in_history(comfy_client, bad_id)
    late = ComfyClient(comfy_client.url)
    ws = late.connect()
    try:
        assert [f.node_id for f in late.wait(ws, ok_id, timeout=30).files()] == ["7"]
        with pytest.raises(ExecutionError, match="SynCDTinyDemoModel"):
            late.wait(ws, bad_id, timeout=30)
    finally:
        ws.close()


def test_files_lists_only_file_like_entries():
    result = PromptResult("p", {"outputs": {
        "3": {"images": [{"filename": "a.png", "subfolder": "x", "type": "output"}], "text": ["hello"]},
        "4": {"gifs": [{"filename": "b.mp4", "type": "temp", "format": "video/h264-mp4"}], "animated": [True]},
    }})
    assert [(f.node_id, f.kind, f.filename, f.subfolder, f.type) for f in result.files()] == [
        ("3", "images", "a.png", "x", "output"), ("4", "gifs", "b.mp4", "", "temp")]


def test_url_and_error_formatting():
    assert normalize_url("127.0.0.1:8188/") == "http://127.0.0.1:8188"
    assert normalize_url("https://host") == "https://host"
    text = format_validation_error({"message": "Prompt outputs failed validation", "details": ""},
                                   {"9": {"class_type": "VAEDecode", "errors": [
                                       {"message": "Required input is missing", "details": "vae"}]}})
    assert text.splitlines() == ["Prompt outputs failed validation",
                                 "  node #9 (VAEDecode): Required input is missing: vae"]

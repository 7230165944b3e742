"""The data-generation driver's pure parts: the prompts file, per-object seeds, the exactly-once writer, and
``run_on_servers``' bookkeeping on the job pool (``generate`` replaced: no server runs)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from comfyui_syncd.core.dataset_format import read_dataset
from comfyui_syncd.datagen import driver
from comfyui_syncd.datagen.driver import DatagenError, Generated, ObjectSpec, Writer, object_seed, read_prompts

pytestmark = pytest.mark.unit


def _line(**entry) -> str:
    base = {"object_id": "dog-1", "category": "Dog", "prompts": ["a dog on a beach", "a dog in a park"]}
    base.update(entry)
    return json.dumps(base)


def test_prompts_file_is_read_in_order_with_the_category_lowercased(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(_line() + "\n\n" + _line(object_id="mug-1", category="mug", kind="rigid", mesh="m.glb") + "\n")
    specs = read_prompts(path)
    assert [s.object_id for s in specs] == ["dog-1", "mug-1"]
    assert specs[0].category == "dog" and specs[0].kind == "deformable"
    assert specs[1].kind == "rigid" and specs[1].mesh == str(tmp_path / "m.glb")  # relative to the file


@pytest.mark.parametrize("line, message", [
    (_line(prompts=[]), "missing prompts"),
    (_line(kind="liquid"), "kind 'liquid'"),
    (_line(prompts="one"), "list of strings"),
    ("{not json", "not JSON"),
])
def test_a_bad_line_is_named(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(_line(object_id="ok") + "\n" + line + "\n")
    with pytest.raises(DatagenError, match=rf"p.jsonl:2: .*{message}"):
        read_prompts(path)


def test_duplicate_object_ids_are_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(_line() + "\n" + _line() + "\n")
    with pytest.raises(DatagenError, match="appears twice"):
        read_prompts(path)


def test_object_seed_is_stable_per_object_and_differs_between_objects():
    assert object_seed(0, "a") == object_seed(0, "a")
    assert len({object_seed(0, "a"), object_seed(0, "b"), object_seed(1, "a")}) == 3


PROMPT_BATCH = {"input": {"required": {"clip": ["CLIP"], "text": ["STRING", {"multiline": True}],
                                       "prompt_per_image": ["BOOLEAN", {"default": True}]}},
                "input_order": {"required": ["clip", "text", "prompt_per_image"]},
                "output": ["CONDITIONING", "STRING"], "output_name": ["CONDITIONING", "prompts"]}
PRIMITIVE = {"input": {"required": {"value": ["STRING", {"multiline": True}]}}, "input_order": {"required": ["value"]},
             "output": ["STRING"], "output_name": ["STRING"]}
SAVE = {"input": {"required": {"images": ["IMAGE"]}}, "input_order": {"required": ["images"]}, "output": [],
        "output_name": []}
OBJECT_INFO = {"SynCDPromptBatch": PROMPT_BATCH, "PrimitiveStringMultiline": PRIMITIVE, "SaveImage": SAVE}


def _workflow(kind: str, role: str, **widgets) -> dict:
    values = {"SynCDPromptBatch": ["", widgets.get("prompt_per_image", True)], "PrimitiveStringMultiline": [""]}[kind]
    return {"nodes": [{"id": 1, "type": kind, "inputs": [], "outputs": [], "widgets_values": values,
                       "properties": {"syncd_datagen": role}},
                      {"id": 2, "type": "SaveImage", "inputs": [], "outputs": [], "widgets_values": [],
                       "properties": {"syncd_datagen": "images"}}], "links": []}


@pytest.mark.parametrize("kind, role, widgets, n_prompts, expected", [
    ("SynCDPromptBatch", "prompts", {}, 3, [0, 1, 2]),                   # upstream: one prompt per image
    ("SynCDPromptBatch", "prompts", {}, 2, [0, 1, 0]),                   # ComfyUI repeats the rows over the batch
    ("SynCDPromptBatch", "prompts", {"prompt_per_image": False}, 3, [0, 0, 0]),  # one prompt for the set
    ("PrimitiveStringMultiline", "prompts", {}, 3, [0, 1, 2]),
    ("PrimitiveStringMultiline", "prompt", {}, 3, [0, 0, 0]),           # the first prompt only
])
def test_fill_and_the_prompt_stored_for_each_image(kind, role, widgets, n_prompts, expected):
    from comfyui_syncd.datagen.driver import fill, image_prompts

    spec = ObjectSpec("dog-1", "dog", tuple(f"a dog in scene {k}" for k in range(n_prompts)))
    filled = fill(_workflow(kind, role, **widgets), spec, 7, OBJECT_INFO)
    text = filled["nodes"][0]["widgets_values"][0]
    assert text == ("\n".join(spec.prompts) if role == "prompts" else spec.prompts[0])
    assert image_prompts(filled, spec, 3, OBJECT_INFO) == [spec.prompts[k] for k in expected]


def test_per_image_prompts_must_be_single_lines():
    from comfyui_syncd.datagen.driver import fill

    for bad in ("two\nlines", "  "):
        spec = ObjectSpec("dog-1", "dog", ("a dog", bad, "a dog too"))
        with pytest.raises(DatagenError, match="blank or spans lines"):
            fill(_workflow("SynCDPromptBatch", "prompts"), spec, 7, OBJECT_INFO)
    fill(_workflow("SynCDPromptBatch", "prompt"), ObjectSpec("dog-1", "dog", ("a dog", "  ")), 7, OBJECT_INFO)


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def _generated(object_id: str, n: int = 3) -> Generated:
    spec = ObjectSpec(object_id, "dog", tuple(f"a dog {k}" for k in range(n)))
    return Generated(spec, [_png(40 * k) for k in range(n)], [], list(spec.prompts))


def test_writer_writes_each_object_once(tmp_path):
    writer = Writer(tmp_path)
    assert writer.write(_generated("dog-1"))
    assert not writer.write(_generated("dog-1"))  # a retry that finished late is dropped
    assert writer.written == ["dog-1"] and writer.skipped == ["dog-1"]
    records = read_dataset(tmp_path)
    assert [r.object_id for r in records] == ["dog-1"] and len(records[0].images) == 3


def test_filter_keeps_the_chosen_images_and_rejects_objects_below_min_images(tmp_path):
    def keep_first_two(images, masks):
        return [0, 2], [6.5, 1.0, 6.1], [[1, .8, .7], [.8, 1, .6], [.7, .6, 1]]

    writer = Writer(tmp_path, object_filter=keep_first_two)
    assert writer.write(_generated("dog-1"))
    entry = json.loads((tmp_path / "dog-1_metadata.json").read_text())[0]
    assert entry["prompts"] == ["a dog 0", "a dog 2"]
    assert entry["dino_scores"] == [[0, .7], [0, 0]]  # upstream: the strict upper triangle
    assert sorted(entry["aesthetics_scores"].values()) == [6.1, 6.5]

    strict = Writer(tmp_path / "strict", object_filter=lambda i, m: ([1], None, None))
    assert not strict.write(_generated("dog-2"))
    assert strict.rejected == ["dog-2"] and read_dataset(tmp_path / "strict") == []


def test_dataset_keeps_upstreams_captions_without_the_description(tmp_path):
    spec = ObjectSpec("dog-9", "dog", ("a dog on a beach. a brown dog. wide angle shot",
                                       "a dog in a park. a brown dog. wide angle shot"),
                      extra=(("description", "a brown dog"),))
    generated = Generated(spec, [_png(0), _png(90)], [], list(spec.prompts))
    Writer(tmp_path / "a").write(generated)
    Writer(tmp_path / "b", full_prompts=True).write(generated)
    assert json.loads((tmp_path / "a" / "dog-9_metadata.json").read_text())[0]["prompts"] == [
        "a dog on a beach", "a dog in a park"]
    assert json.loads((tmp_path / "b" / "dog-9_metadata.json").read_text())[0]["prompts"] == list(spec.prompts)


def test_run_on_servers_skips_written_objects_and_does_not_retry_datagen_errors(tmp_path, monkeypatch):
    """An object already in the dataset is not generated; a DatagenError fails its object at once (no retry) into
    ``writer.failed``; the rest is written once; ``progress(writer)`` follows every object, failures already
    counted; with no server left the object fails saying so."""
    calls = []

    def fake_generate(client, workflow, spec, seed, tiny, timeout):
        calls.append(spec.object_id)
        if spec.object_id == "broken":
            raise DatagenError("the workflow saved no images")
        if spec.object_id == "lost":
            raise ConnectionError("connection refused")  # and the server does not answer: dropped
        return Generated(spec, [_png(0), _png(90)], [], list(spec.prompts))

    monkeypatch.setattr(driver, "generate", fake_generate)
    writer = Writer(tmp_path)
    writer.write(_generated("done"))
    todo = [ObjectSpec(name, "dog", ("a dog", "a dog")) for name in ("done", "broken", "new")]
    seen = []
    driver.run_on_servers(["http://127.0.0.1:1"], todo, {"deformable": {}}, writer, seed=0, tiny=False, retries=3,
                          timeout=None, progress=lambda w: seen.append((len(w.written), dict(w.failed))))
    assert sorted(calls) == ["broken", "new"]
    assert writer.failed == {"broken": "DatagenError: the workflow saved no images"}
    assert writer.written == ["done", "new"] and [r.object_id for r in read_dataset(tmp_path)] == ["done", "new"]
    assert len(seen) == 3 and seen[-1] == (2, writer.failed)

    lost = Writer(tmp_path / "lost")
    driver.run_on_servers(["http://127.0.0.1:1"], [ObjectSpec("lost", "dog", ("a dog",))], {"deformable": {}},
                          lost, seed=0, tiny=False, retries=3, timeout=None)
    assert lost.failed == {"lost": "no ComfyUI server left to run it"} and lost.written == []


@pytest.fixture(scope="module")
def filter_models(tmp_path_factory):
    """Tiny random DINOv2 and CLIP vision folders (the real transformers classes) and a LAION-style head."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("filter_models")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=224, patch_size=32)).save_pretrained(root / "dino")
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=224, patch_size=32,
                                                   projection_dim=16)).save_pretrained(root / "clip")
    head = torch.nn.Linear(16, 1)
    torch.save(head.state_dict(), root / "head.pth")
    return root


def test_driver_filter_scores_and_applies_upstreams_rule(filter_models, tmp_path):
    from comfyui_syncd.core import filtering
    from comfyui_syncd.datagen.driver import make_filter

    assert make_filter() is None  # upstream's code: filters off
    with pytest.raises(DatagenError, match="needs both"):
        make_filter(clip_model=filter_models / "clip")
    generated = _generated("dog-1")
    images = [Image.open(io.BytesIO(d)).convert("RGB") for d in generated.images]
    keep_all = make_filter(filter_models / "dino", filter_models / "clip", filter_models / "head.pth",
                           min_dino=-1.0, min_aesthetic=-1e9)
    kept, aesthetics, dino = keep_all(images, None)
    assert kept == [0, 1, 2] and len(aesthetics) == 3 and len(dino) == 3
    assert filtering.keep_images(aesthetics, dino, -1e9, -1.0) == [True] * 3
    writer = Writer(tmp_path / "all", keep_all)
    assert writer.write(generated)
    entry = json.loads((tmp_path / "all" / "dog-1_metadata.json").read_text())[0]
    assert sorted(entry["aesthetics_scores"].values()) == pytest.approx(sorted(aesthetics))
    strict = make_filter(filter_models / "dino", filter_models / "clip", filter_models / "head.pth",
                         min_aesthetic=max(aesthetics) + 1)
    writer = Writer(tmp_path / "none", strict)
    assert not writer.write(generated) and writer.rejected == ["dog-1"]

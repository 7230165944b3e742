"""The eval command's benchmark readers (DreamBooth and JSON/YAML layouts), TIFA questions, reference packing and
the results table."""

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageSequence

from comfyui_syncd.evaluation.dataset import EvalDatasetError, fill_template, read_benchmark
from comfyui_syncd.evaluation.questions import questions_for, template_questions
from comfyui_syncd.evaluation.report import aggregate, markdown
from comfyui_syncd.evaluation.workflow import EvalWorkflowError, png_bytes, reference_frames, split_references

pytestmark = pytest.mark.unit

OBJECT = ["in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
          "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
          "with a blue house in the background", "on top of a purple rug in a forest",
          "with a wheat field in the background", "with a tree and autumn leaves in the background",
          "with the Eiffel Tower in the background", "floating on top of water", "floating in an ocean of milk",
          "on top of green grass with sunflowers around it", "on top of a mirror",
          "on top of the sidewalk in a crowded street", "on top of a dirt road", "on top of a white rug"]
LIVE = OBJECT[:10] + ["wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf",
                      "wearing a black top hat and a monocle", "in a chef outfit", "in a firefighter outfit",
                      "in a police outfit", "wearing pink glasses", "wearing a yellow shirt",
                      "in a purple wizard outfit"]
PROPERTY = ["a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}"]


def prompt_list(rests):
    templates = [f"a {{0}} {{1}} {rest}" for rest in rests] + PROPERTY
    return "prompt_list = [\n" + ",\n".join(f"'{t}'.format(unique_token, class_token)" for t in templates) + "\n]\n"


def photos(folder, count, size=(40, 30)):
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", size, (10 * i, 0, 0)).save(folder / f"{i:02d}.jpg")


@pytest.fixture
def dreambooth(tmp_path):
    """A DreamBooth ``dataset/`` folder (its prompts_and_classes.txt format) with three subjects."""
    (tmp_path / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\nbackpack,backpack\ndog2,dog\nduck_toy,toy\n\n\nPrompts\n\nObject Prompts\n\n"
        + prompt_list(OBJECT) + "\n\nLive Subject Prompts\n\n" + prompt_list(LIVE))
    photos(tmp_path / "backpack", 6)
    photos(tmp_path / "dog2", 5)
    photos(tmp_path / "duck_toy", 4)
    (tmp_path / "duck_toy" / "masks").mkdir()
    Image.new("L", (40, 30), 255).save(tmp_path / "duck_toy" / "masks" / "01.png")
    return tmp_path


def test_dreambooth_layout(dreambooth):
    bench = read_benchmark(dreambooth, "sks")
    assert bench.layout == "dreambooth" and bench.unique_token == "sks"
    by_name = {s.name: s for s in bench.subjects}
    assert [s.name for s in bench.subjects] == ["backpack", "dog2", "duck_toy"]
    assert by_name["dog2"].class_word == "dog" and len(by_name["backpack"].images) == 6
    # objects: 20 background + 5 property prompts; live subjects (dogs, cats): 10 + 10 accessories + 5
    backpack, dog = by_name["backpack"].prompts, by_name["dog2"].prompts
    assert len(backpack) == len(dog) == 25
    assert [p.kind for p in backpack].count("background") == 20
    assert [p.kind for p in dog].count("background") == 10
    assert dog[10].template == "a {0} {1} wearing a red hat" and dog[10].kind == "property"
    assert fill_template(backpack[0].template, "sks", "backpack") == "a sks backpack in the jungle"
    assert fill_template(backpack[20].template, "", "backpack") == "a red backpack"
    duck = by_name["duck_toy"]
    assert duck.phrase == "rubber duck"  # SynCD App. C.4's descriptive detection name
    assert duck.mask_for(0) is None and duck.mask_for(1) == dreambooth / "duck_toy" / "masks" / "01.png"
    assert by_name["backpack"].phrase == "backpack"


def test_json_and_yaml_layouts(tmp_path):
    photos(tmp_path / "mug", 3)
    photos(tmp_path / "extra", 2)
    layout = {
        "unique_token": "",
        "prompts": ["a {0} {1} on a table", {"text": "a {0} {1} made of gold", "kind": "property",
                                               "questions": [{"question": "is the {1} golden?",
                                                              "choices": ["yes", "no"], "answer": "yes"}]}],
        "subjects": [{"name": "mug", "class": "mug"},
                     {"name": "cup", "class": "cup", "detect": "white cup", "images": ["extra/00.jpg"],
                      "prompts": ["a {0} {1} in the snow"]}],
    }
    (tmp_path / "subjects.json").write_text(json.dumps(layout))
    bench = read_benchmark(tmp_path)
    mug, cup = bench.subjects
    assert bench.layout == "json" and len(mug.images) == 3 and [p.kind for p in mug.prompts] == ["background",
                                                                                                  "property"]
    assert cup.images == (tmp_path / "extra" / "00.jpg",) and cup.phrase == "white cup"
    assert [p.template for p in cup.prompts] == ["a {0} {1} in the snow"]
    (q,) = questions_for(mug.prompts[1], "mug")
    assert q.question == "is the mug golden?" and q.answer == "yes"

    (tmp_path / "subjects.json").unlink()
    (tmp_path / "subjects.yaml").write_text("subjects:\n  - name: mug\n    class: mug\n"
                                            "prompts:\n  - a {0} {1} on a table\n")
    assert read_benchmark(tmp_path, unique_token="sks").subjects[0].prompts[0].template == "a {0} {1} on a table"

    (tmp_path / "subjects.yaml").write_text("subjects:\n  - name: mug\n    class: mug\n    images: [nope.jpg]\n"
                                            "prompts: [x]\n")
    with pytest.raises(EvalDatasetError, match="missing images"):
        read_benchmark(tmp_path)
    (tmp_path / "subjects.yaml").write_text("subjects:\n  - name: mug\n    class: mug\n"
                                            "prompts: [{text: x, kind: style}]\n")
    with pytest.raises(EvalDatasetError, match="kind 'style'"):
        read_benchmark(tmp_path)
    with pytest.raises(EvalDatasetError, match="prompts_and_classes.txt"):
        read_benchmark(tmp_path / "mug")


def test_tifa_questions_from_templates_and_a_question_file():
    background = template_questions("a {0} {1} in the jungle", "dog")
    assert [(q.question, q.answer) for q in background] == [("is there a dog?", "yes"),
                                                            ("is the dog in the jungle?", "yes")]
    assert [q.question for q in template_questions("a cube shaped {0} {1}", "can")] == ["is there a can?",
                                                                                        "is the can cube shaped?"]
    from comfyui_syncd.evaluation.dataset import Prompt

    file = {"a dog in the jungle": [{"caption": "a dog in the jungle", "question": "what animal is it?",
                                     "choices": ["dog", "cat"], "answer": "dog"}],
            "a red {0} {1}": [{"question": "what color is the {1}?", "choices": ["red", "blue"], "answer": "red"}]}
    assert [q.question for q in questions_for(Prompt("a {0} {1} in the jungle"), "dog", file)] == ["what animal is it?"]
    (q,) = questions_for(Prompt("a red {0} {1}", "property"), "can", file)
    assert q.question == "what color is the can?"
    assert len(questions_for(Prompt("a {0} {1} in the snow"), "dog", file)) == 2  # not in the file: templates


def test_references_split_over_loaders_and_pack_as_frames_with_alpha_masks():
    assert split_references(3, 1) == [3] and split_references(3, 3) == [1, 1, 1] and split_references(3, 2) == [2, 1]
    with pytest.raises(EvalWorkflowError, match="at least 2"):
        split_references(1, 2)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((80, 100), (70, 70))]
    mask = np.zeros((80, 100), np.uint8)
    mask[20:60, 30:70] = 255
    frames = reference_frames(images, [Image.fromarray(mask), None])
    decoded = [np.asarray(f.convert("RGBA")) for f in ImageSequence.Iterator(Image.open(io.BytesIO(png_bytes(frames))))]
    assert len(decoded) == 2 and all(d.shape == (70, 70, 4) for d in decoded)  # square, the smallest side
    assert np.array_equal(decoded[0], np.asarray(frames[0])) and np.array_equal(decoded[1], np.asarray(frames[1]))
    alpha = decoded[0][..., 3]
    assert alpha[35, 35] == 0 and alpha[2, 2] == 255  # LoadImage: MASK = 1 - alpha, so the subject is transparent
    assert (decoded[1][..., 3] == 0).all()  # no mask: the whole image is the subject


def test_results_table_layouts_and_geometric_score_of_means():
    rows = [{"method": "m", "references": 1, "kind": kind, "mdinov2_i": md, "tifa": t, "clip_t": 0.3, "clip_i": 0.8,
             "detected": det}
            for kind, md, t, det in (("background", 0.8, 1.0, True), ("property", 0.6, 0.5, False))]
    summary = aggregate(rows)
    row = summary["m"]["1"]
    assert row["MDINOv2-I (background)"] == 0.8 and row["MDINOv2-I (property)"] == 0.6
    assert row["GeometricScore"] == pytest.approx((0.75 * 0.7) ** 0.5) and row["DINO"] is None
    assert row["not_detected"] == 1
    text = markdown(summary, {"DINO": "no --dino"})
    assert "| 1-input | m | 0.800 | 0.600 | 0.300 | 0.750 | 0.725 |" in text
    assert "| m (1 input) | 0.300 | 0.800 | – | – | – |" in text
    assert "- DINO: skipped (no --dino)" in text and "no object detected in 1 image(s)" in text

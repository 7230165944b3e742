"""Benchmark folders for ``python -m comfyui_syncd eval``: the DreamBooth layout and a simpler JSON/YAML layout.

**DreamBooth** (google/dreambooth ``dataset/``): ``DIR/<subject>/*.jpg`` (4-6 photos) and
``DIR/prompts_and_classes.txt``: a ``subject_name,class`` table, then the "Object Prompts" and "Live Subject
Prompts" lists of ``'a {0} {1} in the jungle'.format(unique_token, class_token)`` lines. Live subjects are the
cats and dogs (DreamBooth §4.1); all others take the object prompts.

**JSON/YAML** (``DIR/subjects.json``, ``.yaml`` or ``.yml``, or that file itself)::

    unique_token: ""                      # optional: what {0} becomes in the generation prompt
    prompts:                              # the default prompt list; {0} unique token, {1} class word
      - "a {0} {1} in the jungle"         # a plain string: kind by the DreamBooth rule below
      - text: "a red {0} {1}"
        kind: property                    # background | property (SynCD Table 1's two MDINOv2-I columns)
        questions:                        # optional TIFA questions ({1} = the class word)
          - {question: "is the {1} red?", choices: ["yes", "no"], answer: "yes"}
    subjects:
      - name: duck
        class: toy
        detect: rubber duck               # optional detector phrase (default: the class word)
        images: [duck/1.jpg, duck/2.jpg]  # optional, relative to DIR (default: the images in DIR/<name>/)
        prompts: [...]                    # optional, replaces the default list for this subject

In both layouts a reference mask ``DIR/<subject>/masks/<image stem>.png`` (white = subject) is used where present,
in place of the detected one (SynCD corrects the references' masks by hand, App. C.4).

Prompt kinds (SynCD Table 1): a prompt is a *property change* when something comes before the subject
(``a red {0} {1}``) or it dresses the subject (``wearing``, ``outfit``); all others change the background.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Optional

from ..core.metrics import Question

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
LIVE_CLASSES = {"cat", "dog"}  # DreamBooth's live subjects: its cats and dogs
# SynCD App. C.4: "we modify the category names to be more descriptive" for detection.
DREAMBOOTH_DETECT_NAMES = {"duck_toy": "rubber duck", "fancy_boot": "white boot", "rc_car": "toy car"}
LAYOUT_FILES = ("subjects.json", "subjects.yaml", "subjects.yml")
KINDS = ("background", "property")


class EvalDatasetError(ValueError):
    """A benchmark folder the eval command cannot read; the message says what to fix."""


def prompt_kind(template: str) -> str:
    """``property`` when the template puts something before the subject or dresses it, else ``background``."""
    text = " ".join(template.split())
    if not text.startswith("a {0} {1}") or re.search(r"\b(wearing|outfit)\b", text):
        return "property"
    return "background"


def fill_template(template: str, unique_token: str, class_word: str) -> str:
    """``{0}`` → the unique token (may be empty), ``{1}`` → the class word; spaces collapsed."""
    return " ".join(template.replace("{0}", unique_token).replace("{1}", class_word).split())


@dataclasses.dataclass(frozen=True)
class Prompt:
    template: str
    kind: str = "background"
    questions: Optional[tuple] = None  # TIFA questions given with the prompt, {1} = the class word


@dataclasses.dataclass(frozen=True)
class Subject:
    name: str
    class_word: str
    images: tuple            # reference photos (paths), sorted
    prompts: tuple           # Prompt
    detect: str = ""         # detector phrase; "" = the class word
    masks: tuple = ()        # per image: a mask path or None

    @property
    def phrase(self) -> str:
        return self.detect or self.class_word

    def mask_for(self, index: int) -> Optional[pathlib.Path]:
        return self.masks[index] if index < len(self.masks) else None


@dataclasses.dataclass(frozen=True)
class Benchmark:
    root: pathlib.Path
    subjects: tuple
    unique_token: str = ""
    layout: str = "dreambooth"


def _images(folder: pathlib.Path) -> tuple:
    if not folder.is_dir():
        raise EvalDatasetError(f"no image folder {folder}")
    images = tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
    if not images:
        raise EvalDatasetError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def _masks(images: tuple) -> tuple:
    masks = []
    for image in images:
        candidate = image.parent / "masks" / (image.stem + ".png")
        masks.append(candidate if candidate.is_file() else None)
    return tuple(masks)


def read_benchmark(path, unique_token: Optional[str] = None) -> Benchmark:
    """The benchmark at ``path`` (a folder in either layout, or a subjects JSON/YAML file)."""
    path = pathlib.Path(path)
    if path.is_file():
        return _read_layout_file(path, unique_token)
    if (path / "prompts_and_classes.txt").is_file():
        return read_dreambooth(path, unique_token or "")
    for name in LAYOUT_FILES:
        if (path / name).is_file():
            return _read_layout_file(path / name, unique_token)
    raise EvalDatasetError(f"{path}: neither prompts_and_classes.txt (DreamBooth layout) nor "
                           f"{' / '.join(LAYOUT_FILES)} found")


# -- DreamBooth -------------------------------------------------------------------------------------------------
_PROMPT_LINE = re.compile(r"""^\s*(['"])(.*)\1\s*(\.format\([^)]*\))?\s*,?\s*$""")


def parse_prompts_and_classes(text: str) -> tuple[dict, dict]:
    """(subject → class, {"object": [...], "live": [...]} prompt templates) of a ``prompts_and_classes.txt``."""
    classes: dict[str, str] = {}
    prompts: dict[str, list] = {"object": [], "live": []}
    section = None
    for line in text.splitlines():
        stripped = line.strip()
        lower = stripped.lower()
        if lower == "subject_name,class":
            section = "classes"
            continue
        if lower.startswith("object prompts"):
            section = "object"
            continue
        if lower.startswith("live subject prompts"):
            section = "live"
            continue
        if section == "classes":
            if not stripped:
                section = None
            elif "," in stripped:
                name, word = stripped.split(",", 1)
                classes[name.strip()] = word.strip()
            continue
        if section in prompts:
            match = _PROMPT_LINE.match(line)
            if match:
                prompts[section].append(match.group(2))
    return classes, prompts


def read_dreambooth(root, unique_token: str = "") -> Benchmark:
    root = pathlib.Path(root)
    classes, prompts = parse_prompts_and_classes((root / "prompts_and_classes.txt").read_text(encoding="utf-8"))
    if not classes:
        raise EvalDatasetError(f"{root / 'prompts_and_classes.txt'}: no 'subject_name,class' table")
    if not prompts["object"]:
        raise EvalDatasetError(f"{root / 'prompts_and_classes.txt'}: no 'Object Prompts' list")
    subjects = []
    for name, word in classes.items():
        templates = prompts["live"] if word in LIVE_CLASSES and prompts["live"] else prompts["object"]
        images = _images(root / name)
        subjects.append(Subject(name, word, images, tuple(Prompt(t, prompt_kind(t)) for t in templates),
                                DREAMBOOTH_DETECT_NAMES.get(name, ""), _masks(images)))
    return Benchmark(root, tuple(subjects), unique_token, "dreambooth")


# -- JSON / YAML ------------------------------------------------------------------------------------------------
def parse_question(entry, where: str) -> Question:
    if not isinstance(entry, dict) or not {"question", "choices", "answer"} <= set(entry):
        raise EvalDatasetError(f"{where}: a TIFA question needs 'question', 'choices' and 'answer'")
    try:
        return Question(str(entry["question"]), tuple(str(c) for c in entry["choices"]), str(entry["answer"]),
                        str(entry.get("element_type", "")))
    except ValueError as exc:
        raise EvalDatasetError(f"{where}: {exc}") from None


def _prompt(entry, where: str) -> Prompt:
    if isinstance(entry, str):
        return Prompt(entry, prompt_kind(entry))
    if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
        raise EvalDatasetError(f"{where}: a prompt is a string or a mapping with 'text'")
    kind = entry.get("kind") or prompt_kind(entry["text"])
    if kind not in KINDS:
        raise EvalDatasetError(f"{where}: kind {kind!r}; expected one of {', '.join(KINDS)}")
    questions = entry.get("questions")
    if questions is not None:
        questions = tuple(parse_question(q, f"{where} question {i + 1}") for i, q in enumerate(questions))
    return Prompt(entry["text"], kind, questions)


def _read_layout_file(path: pathlib.Path, unique_token: Optional[str]) -> Benchmark:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - json.JSONDecodeError, yaml.YAMLError
        raise EvalDatasetError(f"{path}: cannot parse it: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("subjects"), list) or not data["subjects"]:
        raise EvalDatasetError(f"{path}: expected a mapping with a non-empty 'subjects' list")
    root = path.parent
    default = [_prompt(p, f"{path}: prompts[{i}]") for i, p in enumerate(data.get("prompts") or [])]
    subjects, seen = [], set()
    for i, entry in enumerate(data["subjects"]):
        where = f"{path}: subjects[{i}]"
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("class"):
            raise EvalDatasetError(f"{where}: needs 'name' and 'class'")
        name = str(entry["name"])
        if name in seen:
            raise EvalDatasetError(f"{where}: subject {name!r} appears twice")
        seen.add(name)
        if entry.get("images"):
            images = tuple(root / p for p in entry["images"])
            missing = [str(p) for p in images if not p.is_file()]
            if missing:
                raise EvalDatasetError(f"{where}: missing images {', '.join(missing)}")
        else:
            images = _images(root / name)
        masks = tuple(None if m is None else root / m for m in entry["masks"]) if entry.get("masks") else _masks(images)
        prompts = [_prompt(p, f"{where} prompts[{k}]") for k, p in enumerate(entry.get("prompts") or [])] or default
        if not prompts:
            raise EvalDatasetError(f"{where}: no prompts (give 'prompts' for the subject or at the top level)")
        subjects.append(Subject(name, str(entry["class"]), images, tuple(prompts), str(entry.get("detect") or ""),
                                masks))
    token = unique_token if unique_token is not None else str(data.get("unique_token") or "")
    return Benchmark(root, tuple(subjects), token, "json")

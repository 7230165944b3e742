"""TIFA questions per prompt: given with the prompt or in a question file, else built from DreamBooth's templates.

TIFA (Hu et al. 2023, §3) generates question-answer pairs from the prompt with a language model (GPT-3.5, or its
fine-tuned LLaMA-2) and keeps those UnifiedQA answers alike. That needs an LLM, so questions come from:

1. the prompt's own ``questions`` (JSON/YAML layout);
2. ``--tifa-questions FILE``: TIFA's format, a JSON list of ``{"caption", "question", "choices", "answer"}``
   entries (``tifa_v1.0_question_answers.json``), or a mapping caption → list of such entries. The caption is the
   prompt with the class word (``a dog in the jungle``) or the template (``a {0} {1} in the jungle``); ``{1}`` in
   questions, choices and answers becomes the class word;
3. otherwise :func:`template_questions`: the yes/no questions TIFA's generator asks of such prompts (is the object
   there; does it have the prompt's background or property). A deviation from TIFA: fewer, simpler questions.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

from ..core.metrics import Question
from .dataset import EvalDatasetError, Prompt, fill_template, parse_question

YES_NO = ("yes", "no")


def template_questions(template: str, class_word: str) -> tuple:
    """Yes/no questions of a DreamBooth-style template: ``is there a {class}?`` and, for ``a {0} {1} REST``,
    ``is the {class} REST?``; for ``a ADJ {0} {1}``, ``is the {class} ADJ?``; another prompt gets
    ``does the image show {prompt}?``."""
    text = " ".join(template.split())
    questions = [Question(f"is there a {class_word}?", YES_NO, "yes", "object")]
    head, marker, rest = text.partition("{0} {1}")
    if marker and head.strip().lower() == "a" and rest.strip():
        questions.append(Question(f"is the {class_word} {rest.strip()}?", YES_NO, "yes", "attribute"))
    elif marker and head.lower().startswith("a ") and not rest.strip():
        questions.append(Question(f"is the {class_word} {head[2:].strip()}?", YES_NO, "yes", "attribute"))
    elif not marker:
        questions.append(Question(f"does the image show {fill_template(text, '', class_word)}?", YES_NO, "yes",
                                  "other"))
    return tuple(questions)


def load_question_file(path) -> dict[str, list[dict]]:
    """caption → raw question entries of a TIFA question file (a list with ``caption`` keys, or a mapping)."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvalDatasetError(f"--tifa-questions {path}: {exc}") from None
    if isinstance(data, dict):
        return {" ".join(str(k).split()): list(v) for k, v in data.items()}
    if not isinstance(data, list):
        raise EvalDatasetError(f"--tifa-questions {path}: expected a list of TIFA entries or a caption mapping")
    found: dict[str, list[dict]] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "caption" not in entry:
            raise EvalDatasetError(f"--tifa-questions {path}: entry {i} has no 'caption'")
        found.setdefault(" ".join(str(entry["caption"]).split()), []).append(entry)
    return found


def _with_class(entry: dict, class_word: str) -> dict:
    def fill(value):
        return str(value).replace("{1}", class_word)

    return {**entry, "question": fill(entry.get("question", "")), "answer": fill(entry.get("answer", "")),
            "choices": [fill(c) for c in entry.get("choices") or []]}


def questions_for(prompt: Prompt, class_word: str, question_file: Optional[dict] = None) -> tuple:
    """The TIFA questions of ``prompt`` for a subject of ``class_word`` (the module docstring's order)."""
    if prompt.questions:
        return tuple(Question(q.question.replace("{1}", class_word), tuple(c.replace("{1}", class_word)
                                                                            for c in q.choices),
                              q.answer.replace("{1}", class_word), q.element_type) for q in prompt.questions)
    if question_file:
        caption = fill_template(prompt.template, "", class_word)
        entries = question_file.get(caption) or question_file.get(" ".join(prompt.template.split()))
        if entries:
            return tuple(parse_question(_with_class(e, class_word), f"--tifa-questions {caption!r}")
                         for e in entries)
    return template_questions(prompt.template, class_word)

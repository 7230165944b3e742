"""SynCD §3.1 prompt generation: per object one detailed description and K background captions, combined into
the final per-image prompts of a prompts file (JSON Lines) that the data-generation driver reads.

Upstream (nupurkmr9/syncd ``dataset/gen_prompts.py``, ``gen_deformable.py``, ``gen_rigid.py``,
``src/dataloader.py``; ``/work/shared/reference/syncd-official-code.md`` §2-3):

* **Deformable** (the 16 animal categories): the LLM is asked, per category, for background captions (with the
  category word; different backgrounds, another object in the scene, different styles) and for appearance
  descriptions (colour, subspecies, no background), 25 captions per request x 6 samples, temperature 0.6,
  top-p 0.9, up to 2048 new tokens. Objects loop descriptions x consecutive background K-tuples
  (``range(0, len - K, K)``); image i's prompt is ``"{background_i}. {description}. wide angle shot"``.
* **Rigid** (an asset with a Cap3D caption): the LLM writes 10 background captions for the caption (two few-shot
  objects). Each asset is used twice (repeat r = 0, 1 takes captions ``[min(L-K, K*r):][i % L]`` and needs
  ``L >= K*(r+1)``); the loader lowercases and strips 55 style phrases; image i's prompt is
  ``"{background_i} a natural image with the object on the ground."`` with the negative prompt
  ``"3d render, cartoon, low resolution, illustration, blurry"``.
* **Clean-up** of the LLM text (:func:`clean_captions`): split lines, strip digits and leading dots, lowercase,
  drop ``"``, drop meta lines, deduplicate.

Backends share one interface, :meth:`complete` of a :class:`CaptionRequest` -> raw texts (one per sample):
:class:`TransformersChat` (a local causal LM with its chat template), :class:`OpenAIChat` (``POST
/v1/chat/completions``, as llama.cpp, Ollama and vLLM servers speak it) and :class:`TemplateBackend` (offline,
the shipped lists of ``prompt_data/``, deterministic by seed).

Deviations from upstream (options keep upstream's behaviour where one exists): the category is lowercased
everywhere, so it is found verbatim in every prompt (upstream's capitalized category never matches its lowercase
prompts); lines without the category word are dropped, as are bullets ("- ", "* ") and meta lines ending in ":" or
starting "here are/sure/..."; duplicates are removed across all samples of a category in first-seen order
(upstream: a ``set`` per sample, whose order changes from run to run); LLM sampling is seeded.
``--strip-digits numbering`` keeps digits inside captions (upstream removes every digit), ``--style-words word``
strips the style phrases as whole words (upstream: plain substring replace), ``--all-groups`` keeps the last
background K-tuple that ``range(0, len - K, K)`` drops, ``--order diagonal`` varies description and backgrounds
from the first object on (upstream: all background tuples of description 0 first).

Pure Python (+ torch/transformers only for :class:`TransformersChat`); no ComfyUI import.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import pathlib
import random
import re
import sys
import time
import urllib.error
import urllib.request
from typing import Iterable, Iterator, Optional, Sequence

DATA_DIR = pathlib.Path(__file__).resolve().parent / "prompt_data"

# ---------------------------------------------------------------------------------------------- upstream numbers
UPSTREAM_ANIMALS = ("hamster", "rabbit", "fox", "parrot", "bird", "squirrel", "cat", "dog", "alpaca", "mouse",
                    "frog", "bear", "woodpecker", "duck", "fish", "monkey")  # dataset/assets/categories.txt
CAPTIONS_PER_REQUEST = 25        # deformable NUM_PROMPTS
SAMPLES_PER_REQUEST = 6          # deformable batch_size: 6 independent samples of the same request
RIGID_BACKGROUNDS = 10           # rigid NUM_PROMPTS, one sample per asset
RIGID_REPEATS = 2                # ObjaverseDataset(repeat_each_id=2)
IMAGES_PER_OBJECT = 3            # NUM
TEMPERATURE, TOP_P, MAX_NEW_TOKENS = 0.6, 0.9, 2048
DEFORMABLE_SUFFIX = "wide angle shot"
RIGID_SUFFIX = "a natural image with the object on the ground."
RIGID_NEGATIVE_PROMPT = "3d render, cartoon, low resolution, illustration, blurry"
RIGID_DEFAULT_CATEGORY = "object"  # the word upstream's rigid suffix uses for the subject
# src/dataloader.py PHRASES_TO_REMOVE: 55 entries, removed in this order by str.replace (leading spaces kept).
STYLE_PHRASES = tuple(("worn; low-poly; secluded; rustic; figurine; distinctive; retro-style; quirky; retro; "
                       "nostalgic; historic; peaceful; wondrous; mystical; in a magical kingdom, ; fantastical; "
                       "majestic; vibrant; tranquil; cartoon; industrial-chic; traditional; chic; vintage-inspired; "
                       "ornate; rendering; cozy; flying in the air; picturesque; futuristic; high-tech; fantasy "
                       "world; from the future; quaint; vintage; low poly number; legendary; striking; serene; bold "
                       "and graphic; stylish; lush; exotic; trendy; modern; minimalist; stunning; iconic; neon; "
                       "antique; charming; impressive; whimsical; bustling; gleaming").split(";"))
# gen_prompts.py clean_prompt: a line containing any of these is LLM chatter, not a caption.
UPSTREAM_META_MARKERS = ("suggestions", "note:", "captions", "**", "brief description", "detailed visual",
                         "additional captions", "meet your requirements!")
EXTRA_META_STARTS = ("here are", "here is", "here's", "sure", "certainly", "i hope", "let me know", "okay",
                     "ok,", "these captions", "these descriptions")

TASK_DESCRIPTION = "description"          # appearance of a category (deformable)
TASK_BACKGROUND = "background"            # backgrounds for a category (deformable)
TASK_ASSET_BACKGROUND = "asset_background"  # backgrounds for an asset's caption (rigid)
_SAFE_ID = re.compile(r"[^a-z0-9._-]+")


class PromptGenerationError(RuntimeError):
    """A backend, input file or option that cannot be used; the message says what to fix."""


# ------------------------------------------------------------------------------------------------- instructions
SYSTEM_PROMPT = ("You are an expert at writing captions for photographs and images of different kinds of "
                 "objects.")

_FACTUAL_RULES = (
    "Avoid unnecessary adjectives and words about emotions. Keep every caption factual, short and complete. "
    "Do not speculate about anything that is not visible in the image, such as how the image makes a viewer "
    "feel or what it inspires, and do not add interpretations such as \"this makes a fun scene\": describe only "
    "what the image shows.")


def _numbered(lines: Sequence[str]) -> str:
    return "\n".join(f"{i}. {line}" for i, line in enumerate(lines, start=1))


def background_instruction(category: str, num_prompts: int = CAPTIONS_PER_REQUEST) -> str:
    """Deformable background request (gen_prompts.py TEMPLATE_MESSAGE_USER_BG_ANIMALS structure: N captions
    containing the category word, a brief background, factual rules, 3 guidance points, 3 few-shot cat
    examples); our wording."""
    return (f"Write {num_prompts} captions for images of a {category}. Each caption must contain the word "
            f"\"{category}\". Each caption should briefly describe the background. {_FACTUAL_RULES}\n"
            f"Guidance for the captions:\n"
            + _numbered([f"show the {category} in different backgrounds and scenes.",
                         f"show the {category} together with another object in the scene.",
                         f"show the {category} in different styles of depiction."])
            + "\n\nExample captions for the category \"cat\":\n"
            + _numbered(["A photo of a tabby cat sitting on a stone path in a garden full of roses.",
                         "A cat lying next to a ball of yarn on a wooden floor.",
                         "A watercolor painting of a cat on a windowsill."]))


def description_instruction(category: str, num_prompts: int = CAPTIONS_PER_REQUEST) -> str:
    """Deformable description request (TEMPLATE_MESSAGE_USER_ANIMALS structure: N captions containing the
    category word with detailed visual information incl. colour and subspecies, no background, factual rules,
    3 few-shot cat examples); our wording."""
    return (f"Write {num_prompts} captions for images of a {category}. Each caption must contain the word "
            f"\"{category}\". Each caption should give detailed visual information about the {category}, "
            f"including its color and subspecies, and nothing about the background scene. {_FACTUAL_RULES}\n\n"
            "Example captions for the category \"cat\":\n"
            + _numbered(["The british shorthair cat has a dense blue-gray coat, round copper eyes and a broad "
                         "face.",
                         "The ragdoll cat has long white fur with seal-brown points on its ears, face and tail "
                         "and blue eyes.",
                         "The black bombay cat has a short glossy coat and golden eyes."]))


def asset_background_instruction(caption: str, num_prompts: int = RIGID_BACKGROUNDS) -> str:
    """Rigid background request for an asset's caption (TEMPLATE_MESSAGE_USER_BG_OBJECTS structure: N captions
    describing the background, factual rules, 2 guidance points, two few-shot objects with two examples each);
    our wording."""
    return (f"Write {num_prompts} captions for images of {caption}. Each caption should describe the "
            f"background. {_FACTUAL_RULES}\n"
            "Guidance for the captions:\n"
            + _numbered([f"show {caption} in different backgrounds and scenes.",
                         f"show {caption} together with another object in the scene."])
            + "\n\nExample captions for \"a green glass bottle\":\n"
            + _numbered(["A green glass bottle on a gravel path beside a low stone wall.",
                         "A green glass bottle standing next to a bowl of lemons on a kitchen table."])
            + "\n\nExample captions for \"a red pickup truck\":\n"
            + _numbered(["A red pickup truck parked in a barn with wooden walls.",
                         "A red pickup truck on a dirt road through a wheat field, with hills in the distance."]))


@dataclasses.dataclass(frozen=True)
class CaptionRequest:
    """One LLM request: ``samples`` independent answers to the same instruction about ``subject`` (a category,
    or an asset's caption for ``asset_background``)."""
    task: str
    subject: str
    num_prompts: int
    samples: int = 1
    seed: int = 0

    def messages(self) -> list[dict]:
        build = {TASK_DESCRIPTION: description_instruction, TASK_BACKGROUND: background_instruction,
                 TASK_ASSET_BACKGROUND: asset_background_instruction}[self.task]
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": build(self.subject, self.num_prompts)}]

    def sample_seed(self, index: int) -> int:
        """A seed per sample, stable across runs and backends."""
        return stable_int(f"{self.seed}:{self.task}:{self.subject}:{index}")


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    max_new_tokens: int = MAX_NEW_TOKENS


def stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------------ clean-up
def contains_word(text: str, word: str) -> bool:
    """``word`` (lowercase, may hold spaces) as a whole word of ``text``: "cat" in "a cat's toy", not in
    "a caterpillar" or "cats"."""
    return re.search(rf"(?<![a-z0-9]){re.escape(word)}(?![a-z0-9])", text) is not None


_BULLET = re.compile(r"^(?:[-*\u2022\u00b7>]+\s*|#+\s*|\(?\d+\s*[.):\]]\s*)+")


def clean_captions(texts: str | Iterable[str], require: Optional[str] = None, *, strip_digits: str = "all",
                   ) -> list[str]:
    """LLM answers -> captions (gen_prompts.py clean_prompt): one caption per line; leading bullets and numbering
    stripped; digits removed (``strip_digits="all"``, upstream, or only the numbering with ``"numbering"``);
    leading dots stripped; lowercased; ``"`` removed; meta lines dropped (upstream's markers, plus lines ending
    in ":" or opening with "here are", "sure", ...); lines without the lowercase ``require`` word dropped;
    duplicates dropped in first-seen order."""
    if strip_digits not in ("all", "numbering"):
        raise ValueError(f"strip_digits must be 'all' or 'numbering', not {strip_digits!r}")
    if isinstance(texts, str):
        texts = [texts]
    word = require.lower().strip() if require else None
    out, seen = [], set()
    for text in texts:
        for line in str(text).splitlines():
            line = _BULLET.sub("", line.strip())
            if strip_digits == "all":
                line = re.sub(r"[0-9]+", "", line)
            line = re.sub(r"^\.+", "", line.strip())
            line = line.lower().replace('"', "").strip()
            line = re.sub(r"^[\s\-*\u2022:]+", "", line).strip()   # what the numbering left ("1) - cat" -> "cat")
            if not line or any(m in line for m in UPSTREAM_META_MARKERS):
                continue
            if line.endswith(":") or line.startswith(EXTRA_META_STARTS):
                continue
            if word is not None and not contains_word(line, word):
                continue
            if line not in seen:
                seen.add(line)
                out.append(line)
    return out


def strip_style_phrases(text: str, mode: str = "upstream") -> str:
    """Rigid loader clean-up (src/dataloader.py clean_prompt): the 55 style phrases removed; ``upstream`` = plain
    ``str.replace`` in order (also inside longer words), ``word`` = whole words only, spaces collapsed, ``off``."""
    if mode == "off":
        return text
    if mode == "upstream":
        for phrase in STYLE_PHRASES:
            text = text.replace(phrase, "")
        return text
    if mode == "word":
        for phrase in sorted({p.strip(" ,") for p in STYLE_PHRASES}, key=len, reverse=True):
            text = re.sub(rf"(?<![a-z0-9-]){re.escape(phrase)}(?![a-z0-9-])", "", text)
        return re.sub(r"\s+", " ", re.sub(r"\s+,", ",", text)).strip()
    raise ValueError(f"style words mode must be 'upstream', 'word' or 'off', not {mode!r}")


# --------------------------------------------------------------------------------------------------- combination
def deformable_prompt(background: str, description: str) -> str:
    """gen_deformable.py: ``f'{bg}. {desc}. wide angle shot'``."""
    return f"{background}. {description}. {DEFORMABLE_SUFFIX}"


def rigid_prompt(background: str) -> str:
    """gen_rigid.py: ``f'{bg} a natural image with the object on the ground.'``."""
    return f"{background} {RIGID_SUFFIX}"


def dataset_captions(record: dict) -> list[str]:
    """The captions upstream stores in the dataset for a prompts-file record: its per-image prompts with the
    description and the fixed suffix taken off again (SynCD App. C: "we remove the object description from the
    prompt in the dataset"); a prompt in another form is returned unchanged."""
    out = []
    for prompt in record["prompts"]:
        tail = f". {record.get('description', '')}. {DEFORMABLE_SUFFIX}"
        if record.get("kind") == "rigid" and prompt.endswith(" " + RIGID_SUFFIX):
            prompt = prompt[: -len(RIGID_SUFFIX) - 1]
        elif prompt.endswith(tail):
            prompt = prompt[: -len(tail)]
        out.append(prompt)
    return out


def background_groups(backgrounds: Sequence[str], k: int, all_groups: bool = False) -> list[tuple[str, ...]]:
    """Consecutive K-tuples of backgrounds (gen_deformable.py ``range(0, len(prompts) - NUM, NUM)``, which also
    drops the last full tuple when len is a multiple of K; ``all_groups`` keeps it)."""
    stop = len(backgrounds) - k + 1 if all_groups else len(backgrounds) - k
    return [tuple(backgrounds[i:i + k]) for i in range(0, max(stop, 0), k)]


def object_pairs(n_descriptions: int, n_groups: int, order: str = "upstream") -> Iterator[tuple[int, int]]:
    """(description, background group) of each object. ``upstream``: every group of description 0, then of
    description 1, ...; ``diagonal``: description d with group (d + s) mod G for s = 0, 1, ... (same set of
    pairs, but the first objects differ in both)."""
    if order == "upstream":
        for d in range(n_descriptions):
            for g in range(n_groups):
                yield d, g
    elif order == "diagonal":
        for shift in range(n_groups):
            for d in range(n_descriptions):
                yield d, (d + shift) % n_groups
    else:
        raise ValueError(f"order must be 'upstream' or 'diagonal', not {order!r}")


def rigid_backgrounds_for_repeat(backgrounds: Sequence[str], k: int, repeat: int) -> Optional[list[str]]:
    """src/dataloader.py ObjaverseDataset: repeat r takes ``backgrounds[min(L - K, K*r):]``, image i the
    ``i % len``-th of those; None when ``L < K*(r+1)`` (upstream returns an empty sample)."""
    if len(backgrounds) < k * (repeat + 1):
        return None
    rest = list(backgrounds[min(len(backgrounds) - k, k * repeat):])
    return [rest[i % len(rest)] for i in range(k)]


def object_id_for(*parts: object) -> str:
    """``[a-z0-9._-]`` id from its parts ("guinea pig", 3 -> "guinea-pig-0003")."""
    pieces = [f"{p:04d}" if isinstance(p, int) else _SAFE_ID.sub("-", str(p).lower()).strip("-.") for p in parts]
    return "-".join(p for p in pieces if p) or "object"


# ------------------------------------------------------------------------------------------------------ backends
class ChatBackend:
    """LLM backends: ``chat(messages, n, sampling, seeds)`` -> n answers; :meth:`complete` is the shared
    interface (one answer per sample of a request)."""
    name = "llm"

    def chat(self, messages: list[dict], n: int, sampling: Sampling, seeds: Sequence[int]) -> list[str]:
        raise NotImplementedError

    def complete(self, request: CaptionRequest, sampling: Sampling) -> list[str]:
        seeds = [request.sample_seed(i) for i in range(request.samples)]
        return self.chat(request.messages(), request.samples, sampling, seeds)


class TransformersChat(ChatBackend):
    """A local causal LM (``AutoModelForCausalLM`` + the tokenizer's chat template), sampling as upstream
    (``do_sample``, temperature, top-p, ``max_new_tokens``; stops at EOS or ``<|eot_id|>``); fp32 by default as
    upstream. The n samples of a request are one ``generate`` call (``num_return_sequences``)."""
    name = "transformers"

    def __init__(self, path: str | os.PathLike, *, device: Optional[str] = None, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = os.path.expanduser(str(path))
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith(".")  # e.g. an HF cache entry
        if not pathlib.Path(path).exists() and not hub_id:
            raise PromptGenerationError(f"--model {path!r}: no such folder; give the folder of a transformers "
                                        "causal LM (e.g. a download of meta-llama/Meta-Llama-3-8B-Instruct)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            dtype_value = getattr(torch, dtype)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype_value)
        except (OSError, ValueError, AttributeError) as exc:
            raise PromptGenerationError(f"--model {path!r} could not be loaded as a transformers causal LM with "
                                        f"its tokenizer: {exc}") from exc
        if not getattr(self.tokenizer, "chat_template", None):
            raise PromptGenerationError(f"the tokenizer of {path!r} has no chat template; use an instruction-tuned "
                                        "(chat) model such as Meta-Llama-3-8B-Instruct")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        eos = self.tokenizer.eos_token_id
        self.stop_ids = [i for i in (eos, self.tokenizer.convert_tokens_to_ids("<|eot_id|>"))
                         if isinstance(i, int) and i != self.tokenizer.unk_token_id]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos

    def _encode(self, messages: list[dict]):
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
        except Exception as exc:  # templates that refuse a system turn (e.g. Gemma): fold it into the user turn
            if "system" not in str(exc).lower():
                raise
            folded = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            ids = self.tokenizer.apply_chat_template(folded, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
        return {k: v.to(self.device) for k, v in ids.items()}

    def chat(self, messages, n, sampling, seeds):
        import torch

        inputs = self._encode(messages)
        torch.manual_seed(int(seeds[0]) if seeds else 0)
        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=True, temperature=sampling.temperature,
                                      top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
                                      num_return_sequences=n, eos_token_id=self.stop_ids or None,
                                      pad_token_id=self.pad_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


class OpenAIChat(ChatBackend):
    """An OpenAI-compatible chat endpoint (llama.cpp ``llama-server``, Ollama, vLLM, ...): ``POST
    {url}/v1/chat/completions`` with urllib, one request per sample (``seed`` per sample; servers that ignore
    ``n`` still answer). Connection errors, timeouts, 429 and 5xx are retried ``retries`` times with doubling
    waits; other HTTP errors fail at once with the server's message."""
    name = "openai"

    def __init__(self, url: str, model: str, api_key: Optional[str] = None, *, timeout: float = 300.0,
                 retries: int = 3, backoff: float = 2.0):
        if not url or not re.match(r"^https?://", url):
            raise PromptGenerationError(f"--url {url!r}: give the server's http(s) address, e.g. "
                                        "http://127.0.0.1:8080 (llama.cpp), http://127.0.0.1:11434 (Ollama) or "
                                        "http://127.0.0.1:8000 (vLLM)")
        if not model:
            raise PromptGenerationError("--model: give the model name the server serves (e.g. llama3:8b-instruct "
                                        "for Ollama; llama.cpp accepts any name)")
        base = url.rstrip("/")
        if base.endswith("/chat/completions"):
            self.endpoint = base
        elif base.endswith("/v1"):
            self.endpoint = base + "/chat/completions"
        else:
            self.endpoint = base + "/v1/chat/completions"
        self.model, self.api_key = model, api_key
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    text = response.read().decode("utf-8", "replace")
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:500]
                problem = f"HTTP {exc.code}: {detail}"
                if exc.code == 429 or exc.code >= 500:
                    continue
                raise PromptGenerationError(f"{self.endpoint} refused the request ({problem}); check --model "
                                            "and --url") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
                continue
            try:
                return json.loads(text)
            except ValueError:
                raise PromptGenerationError(f"{self.endpoint} did not answer JSON: {text[:300]!r}") from None
        raise PromptGenerationError(f"{self.endpoint} failed {self.retries + 1} times (last: {problem}); is the "
                                    "server running and serving --model?")

    def chat(self, messages, n, sampling, seeds):
        answers = []
        for seed in seeds:
            body = {"model": self.model, "messages": messages, "temperature": sampling.temperature,
                    "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens, "seed": int(seed)}
            reply = self._post(body)
            try:
                answers.append(str(reply["choices"][0]["message"]["content"] or ""))
            except (KeyError, IndexError, TypeError):
                raise PromptGenerationError(f"{self.endpoint} answered without choices[0].message.content: "
                                            f"{json.dumps(reply)[:300]}") from None
        return answers


def read_list(name: str) -> list[str]:
    """A shipped list (``prompt_data/<name>``): one entry a line, ``#`` comments and blank lines skipped."""
    path = DATA_DIR / name
    return [s for s in (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
            if s and not s.startswith("#")]


def fill_slot(template: str, subject: str) -> str:
    """``{category}`` -> subject; "a {category}" becomes "an ..." before a vowel, and an asset caption's own
    article replaces the template's ("a {category}" + "a red mug" -> "a red mug")."""
    subject = subject.strip()
    own_article = re.match(r"^(a|an|the)\s+", subject, flags=re.I)

    def with_article(match):
        if own_article:
            return subject
        return ("an " if subject[:1].lower() in "aeiou" else "a ") + subject

    text = re.sub(r"\b(?:a|an) \{category\}", with_article, template)
    return text.replace("{category}", subject)


class TemplateBackend:
    """Offline prompts from the shipped lists (``prompt_data/``): descriptions per category, background templates
    with a ``{category}`` slot (animals: ``backgrounds_deformable.txt``, objects and assets:
    ``backgrounds_objects.txt``). A request's answer is the matching list shuffled by the request's seed (at most
    captions x samples lines), so a run is deterministic for a seed; it goes through the LLM answers' clean-up."""
    name = "template"

    def __init__(self, data_dir: Optional[os.PathLike] = None):
        self.data_dir = pathlib.Path(data_dir) if data_dir else DATA_DIR
        descriptions = json.loads((self.data_dir / "descriptions.json").read_text(encoding="utf-8"))
        self.descriptions = {k.lower(): v for k, v in descriptions.items() if not k.startswith("_")}
        self.animals = read_list("categories_deformable.txt")
        self.objects = read_list("categories_objects.txt")
        self.animal_backgrounds = read_list("backgrounds_deformable.txt")
        self.object_backgrounds = read_list("backgrounds_objects.txt")

    def complete(self, request: CaptionRequest, sampling: Sampling) -> list[str]:
        subject = request.subject.lower()
        if request.task == TASK_DESCRIPTION:
            if subject not in self.descriptions:
                raise PromptGenerationError(
                    f"the template backend has no descriptions for {subject!r}; shipped categories: "
                    f"{', '.join(sorted(self.descriptions))} (or use --backend transformers/openai)")
            lines = list(self.descriptions[subject])
        elif request.task == TASK_BACKGROUND:
            templates = self.object_backgrounds if subject in self.objects else self.animal_backgrounds
            lines = [fill_slot(t, subject) for t in templates]
        else:
            lines = [fill_slot(t, request.subject) for t in self.object_backgrounds]
        random.Random(request.sample_seed(0)).shuffle(lines)
        return ["\n".join(lines[: request.num_prompts * request.samples])]


# ----------------------------------------------------------------------------------------------------- pipeline
@dataclasses.dataclass
class Options:
    """Upstream's defaults; every other value is a deviation named in the module docstring."""
    images_per_object: int = IMAGES_PER_OBJECT
    objects_per_category: Optional[int] = None      # None: every (description, background group) pair
    captions_per_request: int = CAPTIONS_PER_REQUEST
    samples_per_request: int = SAMPLES_PER_REQUEST
    rigid_backgrounds: int = RIGID_BACKGROUNDS
    rigid_repeats: int = RIGID_REPEATS
    strip_digits: str = "all"
    style_words: str = "upstream"
    all_groups: bool = False
    order: str = "upstream"
    rigid_negative_prompt: Optional[str] = RIGID_NEGATIVE_PROMPT
    seed: int = 42
    sampling: Sampling = dataclasses.field(default_factory=Sampling)


class CaptionCache:
    """The cleaned captions of every request, in ``<out>.captions.json``: a resumed run reuses them instead of
    asking the LLM again (delete the file to regenerate)."""

    def __init__(self, path: Optional[pathlib.Path]):
        self.path = path
        self.data = {}
        if path is not None and path.exists():
            try:
                self.data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise PromptGenerationError(f"{path} is not valid JSON ({exc}); delete it to regenerate the "
                                            "captions") from None

    def get(self, key: str, make) -> list[str]:
        if key not in self.data:
            self.data[key] = make()
            if self.path is not None:
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
                os.replace(tmp, self.path)
        return list(self.data[key])


def cache_key(backend, options: Options, *subject: str) -> str:
    """What a request's cleaned captions depend on: backend, seed, clean-up rule, request sizes, subject."""
    return json.dumps([backend.name, options.seed, options.strip_digits, options.captions_per_request,
                       options.samples_per_request, options.rigid_backgrounds, *subject])


def request_captions(backend, request: CaptionRequest, options: Options, require: Optional[str]) -> list[str]:
    return clean_captions(backend.complete(request, options.sampling), require, strip_digits=options.strip_digits)


def deformable_records(backend, category: str, options: Options, cache: CaptionCache,
                       done: set[str] = frozenset(), warn=print) -> Iterator[dict]:
    """The objects of one category: descriptions x background groups (gen_deformable.py), in ``options.order``,
    the first ``objects_per_category``; ids ``<category>-NNNN``; ids in ``done`` are skipped (without asking the
    backend when all wanted ids are done)."""
    category = category.strip().lower()
    k, limit = options.images_per_object, options.objects_per_category
    if limit is not None and all(object_id_for(category, i + 1) in done for i in range(limit)):
        return
    key = cache_key(backend, options, category)
    descriptions = cache.get(f"{key}:{TASK_DESCRIPTION}", lambda: request_captions(
        backend, CaptionRequest(TASK_DESCRIPTION, category, options.captions_per_request,
                                options.samples_per_request, options.seed), options, category))
    backgrounds = cache.get(f"{key}:{TASK_BACKGROUND}", lambda: request_captions(
        backend, CaptionRequest(TASK_BACKGROUND, category, options.captions_per_request,
                                options.samples_per_request, options.seed), options, category))
    groups = background_groups(backgrounds, k, options.all_groups)
    available = len(descriptions) * len(groups)
    if available == 0 or (limit is not None and available < limit):
        warn(f"warning: {category}: {len(descriptions)} descriptions and {len(backgrounds)} background captions "
             f"with the word {category!r} give {available} objects of {k} images"
             + (f", fewer than the {limit} asked for" if limit is not None else ""))
    for index, (d, g) in enumerate(object_pairs(len(descriptions), len(groups), options.order)):
        if limit is not None and index >= limit:
            break
        object_id = object_id_for(category, index + 1)
        if object_id in done:
            continue
        description = descriptions[d]
        # kind names the generation pipeline: a category without a 3D asset (an animal, or one of the shipped
        # object categories) is generated text-only with attention masks, i.e. as "deformable".
        yield {"object_id": object_id, "category": category, "kind": "deformable",
               "description": description, "prompts": [deformable_prompt(bg, description) for bg in groups[g]]}


@dataclasses.dataclass(frozen=True)
class Asset:
    """One row of a rigid captions file."""
    asset_id: str
    caption: str
    category: Optional[str] = None
    mesh: Optional[str] = None


def read_assets(path: os.PathLike) -> list[Asset]:
    """Rigid captions: Cap3D's CSV (``uid,caption`` rows, no header), a CSV with a header naming ``asset_id``
    (or ``uid``/``objaverse_id``), ``caption`` and optionally ``category`` and ``mesh``, or JSON Lines with those
    keys. A relative mesh path is taken relative to the captions file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise PromptGenerationError(f"--rigid-captions {path}: no such file")
    rows: list[dict] = []
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(dict(json.loads(line), _line=number))
                except ValueError as exc:
                    raise PromptGenerationError(f"{path}:{number}: not JSON ({exc})") from None
    else:
        table = list(csv.reader(text.splitlines()))
        header = [h.strip().lower() for h in table[0]] if table else []
        if {"caption"} <= set(header):
            rows = [dict(zip(header, r), _line=i) for i, r in enumerate(table[1:], start=2) if r]
        else:
            rows = [{"asset_id": r[0], "caption": ",".join(r[1:]), "_line": i}
                    for i, r in enumerate(table, start=1) if r]
    assets = []
    for row in rows:
        asset_id = str(row.get("asset_id") or row.get("uid") or row.get("objaverse_id") or "").strip()
        caption = str(row.get("caption") or "").strip()
        if not asset_id or not caption:
            raise PromptGenerationError(f"{path}:{row['_line']}: needs an asset id (asset_id/uid) and a caption")
        mesh = str(row.get("mesh") or "").strip() or None
        if mesh and not pathlib.Path(mesh).is_absolute():
            mesh = str((path.parent / mesh).resolve())
        category = str(row.get("category") or "").strip().lower() or None
        assets.append(Asset(asset_id, caption, category, mesh))
    if not assets:
        raise PromptGenerationError(f"--rigid-captions {path}: no rows")
    return assets


def rigid_records(backend, asset: Asset, options: Options, cache: CaptionCache, done: set[str] = frozenset(),
                  warn=print) -> Iterator[dict]:
    """The objects of one asset (gen_prompts.py rigid + dataloader.py): background captions for its caption,
    style phrases stripped, ``rigid_repeats`` objects ``<asset>-<r>`` of K prompts ``"{bg} a natural image with
    the object on the ground."``. The category is the row's ``category`` (then required in the captions) or
    ``"object"`` (the suffix's word)."""
    k = options.images_per_object
    ids = [object_id_for(asset.asset_id, str(r)) for r in range(options.rigid_repeats)]
    if all(i in done for i in ids):
        return
    category = asset.category or RIGID_DEFAULT_CATEGORY
    require = asset.category  # None: "object" comes with the suffix
    key = cache_key(backend, options, "asset", asset.asset_id, asset.caption, require or "")
    backgrounds = cache.get(key, lambda: request_captions(
        backend, CaptionRequest(TASK_ASSET_BACKGROUND, asset.caption, options.rigid_backgrounds, 1, options.seed),
        options, require))
    backgrounds = [strip_style_phrases(b, options.style_words) for b in backgrounds]
    if require:  # a style phrase may have taken the category word ("figurine")
        backgrounds = [b for b in backgrounds if contains_word(b, require)]
    made = 0
    for repeat, object_id in enumerate(ids):
        chosen = rigid_backgrounds_for_repeat(backgrounds, k, repeat)
        if chosen is None:
            break
        made += 1
        if object_id in done:
            continue
        record = {"object_id": object_id, "category": category, "kind": "rigid", "description": asset.caption,
                  "prompts": [rigid_prompt(bg) for bg in chosen]}
        if asset.mesh:
            record["mesh"] = asset.mesh
        record["asset_id"] = asset.asset_id
        if options.rigid_negative_prompt:
            record["negative_prompt"] = options.rigid_negative_prompt
        yield record
    if made < options.rigid_repeats:
        warn(f"warning: asset {asset.asset_id}: {len(backgrounds)} background captions give {made} of "
             f"{options.rigid_repeats} objects of {k} images")


# ------------------------------------------------------------------------------------------------ prompts file
def validate_record(record: dict) -> None:
    """The prompts-file contract: raises ValueError naming what is wrong."""
    allowed = {"object_id", "category", "kind", "description", "prompts", "mesh", "asset_id", "negative_prompt"}
    if set(record) - allowed:
        raise ValueError(f"unknown keys {sorted(set(record) - allowed)}")
    if not re.fullmatch(r"[a-z0-9._-]+", str(record.get("object_id", ""))):
        raise ValueError(f"object_id {record.get('object_id')!r} is not [a-z0-9._-]+")
    category = record.get("category")
    if not isinstance(category, str) or not category or category != category.lower():
        raise ValueError(f"category {category!r} must be a non-empty lowercase string")
    if record.get("kind") not in ("deformable", "rigid"):
        raise ValueError(f"kind {record.get('kind')!r} must be 'deformable' or 'rigid'")
    if not isinstance(record.get("description"), str):
        raise ValueError("description must be a string")
    prompts = record.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    for p in prompts:
        if not contains_word(p, category):
            raise ValueError(f"prompt {p!r} lacks the category word {category!r}")
    for key in ("mesh", "asset_id", "negative_prompt"):
        if key in record and not isinstance(record[key], str):
            raise ValueError(f"{key} must be a string")
    if "mesh" in record and record["kind"] != "rigid":
        raise ValueError("mesh is for rigid objects only")


def existing_ids(path: pathlib.Path, warn=print) -> set[str]:
    """Object ids already in a prompts file. A last line cut off by a killed run is removed (the file then ends
    at its last complete line); any other unreadable line is an error."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        warn(f"warning: {path}: removing an incomplete last line left by an interrupted run")
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    ids = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids.add(str(json.loads(line)["object_id"]))
        except (ValueError, KeyError, TypeError):
            raise PromptGenerationError(f"{path}:{number}: not a prompts-file line (JSON with object_id); "
                                        "fix or remove it, or write to another --out") from None
    return ids


def resolve_categories(names: Sequence[str]) -> list[str]:
    """``animals`` (the 16 upstream categories), ``objects`` (the shipped object list), ``all``, or names."""
    out = []
    for name in names:
        for part in str(name).split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part == "animals":
                out += list(UPSTREAM_ANIMALS)
            elif part == "objects":
                out += read_list("categories_objects.txt")
            elif part == "all":
                out += list(UPSTREAM_ANIMALS) + read_list("categories_objects.txt")
            else:
                out.append(part)
    return list(dict.fromkeys(out))


def generate(out: os.PathLike, backend, options: Options, categories: Sequence[str] = (),
             assets: Sequence[Asset] = (), progress: bool = True, warn=None) -> int:
    """Append the objects of ``categories`` and ``assets`` to the prompts file ``out`` (skipping object ids
    already there); returns the number of lines written."""
    from tqdm import tqdm

    out = pathlib.Path(out)
    warn = warn or (lambda message: tqdm.write(message, file=sys.stderr))
    out.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(backend, TemplateBackend):
        missing = [c for c in categories if c.lower() not in backend.descriptions]
        if missing:
            raise PromptGenerationError(
                f"the template backend has no descriptions for {', '.join(missing)}; shipped categories: "
                f"{', '.join(sorted(backend.descriptions))} (or use --backend transformers/openai)")
    done = existing_ids(out, warn)
    # LLM answers are kept for a resumed run; the template backend is deterministic and needs no cache.
    cache = CaptionCache(None if isinstance(backend, TemplateBackend) else out.with_name(out.name + ".captions.json"))
    jobs = [("category", c) for c in categories] + [("asset", a) for a in assets]
    written = 0
    with open(out, "a", encoding="utf-8") as f, tqdm(jobs, desc="prompts", unit="subject",
                                                     disable=not progress, file=sys.stderr) as bar:
        for kind, job in bar:
            bar.set_postfix_str(job if kind == "category" else job.asset_id, refresh=False)
            records = (deformable_records(backend, job, options, cache, done, warn) if kind == "category"
                       else rigid_records(backend, job, options, cache, done, warn))
            for record in records:
                validate_record(record)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                done.add(record["object_id"])
                written += 1
    return written


# ---------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m comfyui_syncd.datagen.prompts",
        description="SynCD prompt generation (§3.1): per object a description and K background captions, "
                    "combined into the per-image prompts of a prompts file (JSON Lines) for the datagen driver. "
                    "Resumable: appends, skipping object ids already in --out.")
    p.add_argument("--out", required=True, type=pathlib.Path, help="prompts file (JSON Lines) to append to")
    p.add_argument("--backend", choices=("template", "transformers", "openai"), default="template",
                   help="template: shipped lists, offline (default); transformers: a local causal LM (--model "
                        "PATH); openai: an OpenAI-compatible chat server (--url, --model)")
    p.add_argument("--model", help="transformers: model folder; openai: the served model name")
    p.add_argument("--url", help="openai: server address, e.g. http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None, help="openai: bearer token, if the server wants one")
    p.add_argument("--categories", nargs="*", default=None,
                   help="category names, or 'animals' (the 16 upstream ones), 'objects' (the shipped object "
                        "list), 'all'; default: animals, or none when --rigid-captions is given")
    p.add_argument("--objects-per-category", type=int, default=None,
                   help="objects per category (default: every description x background-group pair, as upstream)")
    p.add_argument("--images-per-object", type=int, default=IMAGES_PER_OBJECT, help="K (upstream 3)")
    p.add_argument("--seed", type=int, default=42, help="seed of the LLM sampling and the template shuffles")
    p.add_argument("--rigid-captions", type=pathlib.Path, default=None,
                   help="rigid assets: Cap3D CSV (uid,caption), CSV with header asset_id,caption[,category,mesh] "
                        "or JSON Lines with those keys")
    p.add_argument("--rigid-backgrounds", type=int, default=RIGID_BACKGROUNDS, help="captions per asset (10)")
    p.add_argument("--rigid-repeats", type=int, default=RIGID_REPEATS, help="objects per asset (upstream 2)")
    p.add_argument("--rigid-negative-prompt", default=RIGID_NEGATIVE_PROMPT,
                   help="negative prompt of rigid objects ('' for none)")
    p.add_argument("--captions-per-request", type=int, default=CAPTIONS_PER_REQUEST, help="(25)")
    p.add_argument("--samples-per-request", type=int, default=SAMPLES_PER_REQUEST, help="(6)")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="(0.6)")
    p.add_argument("--top-p", type=float, default=TOP_P, help="(0.9)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="(2048)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="transformers: weights' dtype (upstream float32)")
    p.add_argument("--device", default=None, help="transformers: torch device (default cuda if available)")
    p.add_argument("--timeout", type=float, default=300.0, help="openai: seconds per request")
    p.add_argument("--retries", type=int, default=3, help="openai: retries after a failed request")
    p.add_argument("--strip-digits", choices=("all", "numbering"), default="all",
                   help="all: remove every digit of the LLM lines (upstream); numbering: only the list numbers")
    p.add_argument("--style-words", choices=("upstream", "word", "off"), default="upstream",
                   help="rigid: strip the 55 style phrases by substring (upstream), as whole words, or not")
    p.add_argument("--all-groups", action="store_true",
                   help="keep the last full background group that upstream's range(0, len-K, K) drops")
    p.add_argument("--order", choices=("upstream", "diagonal"), default="upstream",
                   help="upstream: all background groups of description 0 first; diagonal: vary both")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name in ("objects_per_category", "images_per_object", "rigid_backgrounds", "captions_per_request",
                     "samples_per_request", "max_new_tokens"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise PromptGenerationError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        if args.rigid_repeats < 1:
            raise PromptGenerationError("--rigid-repeats must be at least 1")
        options = Options(images_per_object=args.images_per_object, objects_per_category=args.objects_per_category,
                          captions_per_request=args.captions_per_request,
                          samples_per_request=args.samples_per_request, rigid_backgrounds=args.rigid_backgrounds,
                          rigid_repeats=args.rigid_repeats, strip_digits=args.strip_digits,
                          style_words=args.style_words, all_groups=args.all_groups, order=args.order,
                          rigid_negative_prompt=args.rigid_negative_prompt or None, seed=args.seed,
                          sampling=Sampling(args.temperature, args.top_p, args.max_new_tokens))
        if args.categories is None:
            categories = [] if args.rigid_captions else list(UPSTREAM_ANIMALS)
        else:
            categories = resolve_categories(args.categories)
        assets = read_assets(args.rigid_captions) if args.rigid_captions else []
        if not categories and not assets:
            raise PromptGenerationError("nothing to do: give --categories and/or --rigid-captions")
        if args.backend == "template":
            backend = TemplateBackend()
        elif args.backend == "transformers":
            if not args.model:
                raise PromptGenerationError("--backend transformers needs --model PATH (a chat model folder)")
            backend = TransformersChat(args.model, device=args.device, dtype=args.dtype)
        else:
            if not args.url:
                raise PromptGenerationError("--backend openai needs --url (e.g. http://127.0.0.1:8080)")
            backend = OpenAIChat(args.url, args.model, args.api_key, timeout=args.timeout, retries=args.retries)
        written = generate(args.out, backend, options, categories, assets, progress=not args.no_progress)
    except PromptGenerationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written} objects to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

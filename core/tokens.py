"""Finding the subject word's token positions with the model's own tokenizer (automatic masks, SynCD §3.2).

The official code matches the category's tokens case-sensitively and silently
falls back to fixed positions when that fails; here a missing word is an error.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

# Which tokenizer output conditions the diffusion model: Flux's context is T5, SDXL's is CLIP-L ‖ CLIP-G
# (same positions), SD1.5's is CLIP-L, Qwen-Image's is Qwen2.5-VL (after its chat-template prefix is dropped).
CONTEXT_TOKEN_KEYS = ("t5xxl", "l", "g", "qwen25_7b")
QWEN_KEY = "qwen25_7b"
QWEN_IM_START, QWEN_USER, QWEN_NEWLINE = 151644, 872, 198  # <|im_start|>, "user", "\n" in the Qwen2.5 vocabulary


def qwen_template_end(ids: Sequence) -> int:
    """How many leading tokens ComfyUI's Qwen-Image text encoder drops (the system prompt of its chat template):
    up to the second ``<|im_start|>``, plus ``user\n`` after it (``QwenImageTEModel.encode_token_weights``, ComfyUI
    ``comfy/text_encoders/qwen_image.py``); 0 without a template."""
    end, seen = -1, 0
    for i, token in enumerate(ids):
        if isinstance(token, int) and token == QWEN_IM_START and seen < 2:
            end, seen = i, seen + 1
    if end == -1:
        return 0
    if len(ids) > end + 3 and ids[end + 1] == QWEN_USER and ids[end + 2] == QWEN_NEWLINE:
        end += 3
    return end


def find_subsequence(haystack: Sequence[int], needle: Sequence[int]) -> Optional[int]:
    for start in range(len(haystack) - len(needle) + 1):
        if list(haystack[start:start + len(needle)]) == list(needle):
            return start
    return None


def subject_token_positions(tokenize: Callable[[str], list[int]], prompt: str, subject_word: str) -> tuple[int, ...]:
    """Positions of ``subject_word``'s tokens in ``prompt``'s token sequence (first occurrence).

    ``tokenize(text)`` returns the padded token ids exactly as the conditioning saw them; the word's own ids
    are its tokenization minus the ids an empty text also produces (start, end and padding tokens)."""
    word = subject_word.strip()
    if not word:
        raise ValueError("SynCD automatic masks need subject_word: the word naming the subject in the prompt, "
                         "e.g. 'dog'")
    prompt_ids = tokenize(prompt)
    specials = set(tokenize(""))
    # byte-level BPE (Qwen2.5) spells a word after a space with its own ids (" dog" ≠ "dog"); CLIP strips spaces
    spellings = (word, word.lower(), word.capitalize())
    for variant in dict.fromkeys(spellings + tuple(" " + w for w in spellings)):
        word_ids = [t for t in tokenize(variant) if t not in specials]
        start = find_subsequence(prompt_ids, word_ids) if word_ids else None
        if start is not None:
            return tuple(range(start, start + len(word_ids)))
    raise ValueError(f"SynCD automatic masks: the subject word {subject_word!r} is not in the prompt {prompt!r}; "
                     f"name a word that appears in the prompt")


def clip_tokenizer(clip) -> Callable[[str], list[int]]:
    """``tokenize(text) -> ids`` for a ComfyUI CLIP object, using the tokenizer that feeds the model's context.

    Duck-typed: ``clip.tokenize(text)`` returns ``{key: [[(id, weight, ...), ...], ...]}``; nothing is imported."""
    def tokenize(text: str) -> list:
        tokens = clip.tokenize(text)
        key = next((k for k in CONTEXT_TOKEN_KEYS if k in tokens), next(iter(tokens)))
        ids = [token_key(t[0]) for batch in tokens[key] for t in batch]
        return ids[qwen_template_end(ids):] if key == QWEN_KEY else ids
    return tokenize


def token_key(token) -> object:
    """A token id, or for a textual-inversion vector (ComfyUI puts the embedding's tensor in place of an id) a
    hashable key of its values, so ``embedding:name`` is found like any word."""
    if isinstance(token, int):
        return token
    if hasattr(token, "detach"):
        return ("embedding", hashlib.sha1(token.detach().float().cpu().numpy().tobytes()).hexdigest())
    return int(token)


# --- One prompt per image (SynCD data generation: each image of a set has its own background prompt) -------------

def prompt_lines(text: str) -> list[str]:
    """The prompts of a one-prompt-per-line text: every line stripped, blank lines dropped. SynCD Per-Image Prompts
    encodes these and the automatic masks locate the subject word in them, so both read a text the same way."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def rows_token_positions(per_prompt: Sequence[Sequence[int]], rows: int) -> list[tuple[int, ...]]:
    """The subject-token positions of each of ``rows`` consecutive latent images when a conditioning holds one
    prompt per row: image j has prompt j mod n, because ComfyUI fits a conditioning of n rows to a batch by
    repeating it and cutting it to the batch size (``comfy.utils.repeat_to_batch_size``)."""
    if not per_prompt:
        raise ValueError("no prompts to take subject-token positions from")
    return [tuple(per_prompt[j % len(per_prompt)]) for j in range(rows)]


def pad_token_chunks(prompts: Sequence[Sequence[Sequence[tuple]]], empty_chunk: Sequence[tuple],
                     pad_id=None) -> list[list[list[tuple]]]:
    """Make several prompts' tokenizations (per prompt: chunks of ``(id, weight[, word id])`` tuples, as a ComfyUI
    tokenizer gives them for one encoder) the same shape, so their encodings stack into one batch: every prompt gets
    as many chunks as the longest (a missing chunk is ``empty_chunk``, the tokenizer's chunk of the empty text), and
    chunk c of every prompt gets the length of the longest chunk c by appending ``(pad_id, 1.0)`` entries at its end,
    as the tokenizer pads a short prompt itself. Token positions stay where they were. Raises when padding is needed
    and ``pad_id`` is None."""
    n_chunks = max(len(chunks) for chunks in prompts)
    filled = [[list(chunks[c]) if c < len(chunks) else list(empty_chunk) for c in range(n_chunks)]
              for chunks in prompts]
    lengths = [max(len(chunks[c]) for chunks in filled) for c in range(n_chunks)]
    for chunks in filled:
        for chunk, length in zip(chunks, lengths):
            if len(chunk) == length:
                continue
            if pad_id is None:
                raise ValueError("the prompts tokenize to different lengths and the tokenizer's pad token is unknown")
            width = len(chunk[0]) if chunk else 2
            chunk.extend([(pad_id, 1.0) + (0,) * (width - 2)] * (length - len(chunk)))
    return filled

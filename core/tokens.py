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

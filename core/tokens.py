"""Finding the subject word's token positions with the model's own tokenizer (automatic masks, SynCD §3.2).

The official code matches the category's tokens case-sensitively and silently
falls back to fixed positions when that fails; here a missing word is an error.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

# Which tokenizer output conditions the diffusion model: Flux's context is T5, SDXL's is CLIP-L ‖ CLIP-G
# (same positions), SD1.5's is CLIP-L.
CONTEXT_TOKEN_KEYS = ("t5xxl", "l", "g")


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
    for variant in dict.fromkeys((word, word.lower(), word.capitalize())):
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
        return [token_key(t[0]) for batch in tokens[key] for t in batch]
    return tokenize


def token_key(token) -> object:
    """A token id, or for a textual-inversion vector (ComfyUI puts the embedding's tensor in place of an id) a
    hashable key of its values, so ``embedding:name`` is found like any word."""
    if isinstance(token, int):
        return token
    if hasattr(token, "detach"):
        return ("embedding", hashlib.sha1(token.detach().float().cpu().numpy().tobytes()).hexdigest())
    return int(token)

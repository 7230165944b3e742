"""DCI's two prompts and token sets, built from the prompt text and the model's tokenizer (DCI §3.3).

The auxiliary prompt replaces "V* <noun>" by an auxiliary noun and leaves the rest unaltered. T(P) = the positions
of "V* <noun>" in the concept prompt; T(Pa) = every word token of the auxiliary prompt except the auxiliary noun.
Each branch's re-softmax window is its prompt's word tokens: the start token is never in it, the end token and
padding only when asked (upstream: hand-typed ``--mask_custom``/``--length_custom`` indices counted after SOS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from .tokens import find_subsequence


@dataclass(frozen=True)
class BranchTokens:
    """One branch's positions in its token sequence (absolute, the start token is position 0 when present)."""

    window: tuple[int, ...]   # the positions re-softmaxed together
    tokens: tuple[int, ...]   # the positions whose mass is summed (eq. 3)


@dataclass(frozen=True)
class DualBranchTokens:
    auxiliary_prompt: str
    concept: BranchTokens     # T(P) in the concept prompt's window
    auxiliary: BranchTokens   # T(Pa) = the auxiliary window minus the auxiliary noun
    auxiliary_noun: tuple[int, ...]


def _prefix(prompt: str, concept: str) -> str:
    found = re.search(r"\s+".join(map(re.escape, concept.split())), prompt)
    return prompt[:found.start()] if found else prompt


def auxiliary_prompt(prompt: str, concept: str, noun: str) -> str:
    """``prompt`` with its first ``concept`` phrase ("V* dog") replaced by ``noun``; whitespace-insensitive."""
    words = concept.split()
    if not words:
        raise ValueError("DCI needs the concept phrase as written in the prompt, e.g. 'V* dog' or "
                         "'embedding:my_dog dog'")
    if not noun.strip():
        raise ValueError("DCI needs an auxiliary noun, e.g. 'dog' (the class the concept belongs to)")
    pattern = r"\s+".join(map(re.escape, words))
    found = re.search(pattern, prompt)
    if found is None:
        raise ValueError(f"DCI: the concept phrase {concept!r} is not in the prompt {prompt!r}; write it exactly as "
                         f"in the prompt")
    return prompt[:found.start()] + noun.strip() + prompt[found.end():]


def word_span(tokenize: Callable[[str], list], ids: Sequence) -> tuple[int, int]:
    """[start, stop) of the word tokens in ``ids``: after a start token if the tokenizer adds one, up to the end token
    (first chunk only)."""
    empty = tokenize("")
    start = 1 if tokenize("a")[0] == tokenize("b")[0] == empty[0] else 0
    end_id = empty[start]
    for i in range(start, len(ids)):
        if ids[i] == end_id:
            return start, i
    raise ValueError("DCI: the prompt has no end token in its first chunk; DCI works on prompts that fit one "
                     "text-encoder chunk (75 CLIP tokens)")


def phrase_positions(tokenize: Callable[[str], list], ids: Sequence, phrase: str, before: str) -> tuple[int, ...]:
    """Positions of ``phrase``'s tokens in ``ids``, searched from where the text ``before`` it ends (so an earlier
    occurrence of the same noun is not taken)."""
    specials = set(tokenize(""))
    phrase_ids = [t for t in tokenize(phrase) if t not in specials]
    skip = max(0, sum(1 for t in tokenize(before) if t not in specials) - 1)
    start = find_subsequence(ids[skip:], phrase_ids) if phrase_ids else None
    if start is None:
        raise ValueError(f"DCI: the tokens of {phrase!r} are not in the encoded prompt")
    return tuple(range(skip + start, skip + start + len(phrase_ids)))


def dual_branch_tokens(tokenize: Callable[[str], list], prompt: str, concept: str, noun: str,
                       include_end_tokens: bool = False) -> DualBranchTokens:
    """Both prompts' windows and token sets; ``include_end_tokens`` extends each window over end token and padding
    of the first chunk (upstream: a ``length_*`` past the last word)."""
    aux_prompt = auxiliary_prompt(prompt, concept, noun)
    before = aux_prompt[:aux_prompt.index(noun.strip(), len(_prefix(prompt, concept)))]
    concept_ids, aux_ids = tokenize(prompt), tokenize(aux_prompt)

    chunk = len(tokenize(""))
    for text, ids in ((prompt, concept_ids), (aux_prompt, aux_ids)):
        if len(ids) > chunk:
            raise ValueError(f"DCI: the prompt {text!r} is longer than one text-encoder chunk ({chunk} tokens with "
                             f"start and end); shorten it, DCI's token windows cover one chunk")

    def window(ids):
        start, stop = word_span(tokenize, ids)
        return tuple(range(start, chunk if include_end_tokens else stop))

    concept_window, aux_window = window(concept_ids), window(aux_ids)
    concept_tokens = phrase_positions(tokenize, concept_ids, concept, before)
    noun_tokens = phrase_positions(tokenize, aux_ids, noun, before)
    if not set(concept_tokens) <= set(concept_window):
        raise ValueError(f"DCI: the concept phrase {concept!r} lies outside the prompt's first chunk")
    rest = tuple(p for p in aux_window if p not in noun_tokens)
    return DualBranchTokens(aux_prompt, BranchTokens(concept_window, concept_tokens),
                            BranchTokens(aux_window, rest), noun_tokens)

"""Subject-word token positions (core.tokens, SynCD §3.2 automatic masks) with a hand-written tokenizer."""

import pytest

from comfyui_syncd.core.tokens import clip_tokenizer, find_subsequence, subject_token_positions

pytestmark = pytest.mark.unit

START, END = 1, 2
VOCAB = {w: i for i, w in enumerate(["a", "photo", "of", "dog", "Dog", "teddy", "bear", "-", "golden", "retriever",
                                     "runs", "and"], start=10)}


def tokenize(text: str, length: int = 12) -> list[int]:
    """Case-sensitive word pieces (like T5), '-' split off, start token, padded with the end token (like CLIP);
    unknown words give no tokens."""
    words = text.replace("-", " - ").split()
    ids = [START] + [VOCAB[w] for w in words if w in VOCAB] + [END]
    return ids + [END] * (length - len(ids))


def test_find_subsequence():
    assert find_subsequence([5, 1, 2, 1, 2], [1, 2]) == 1
    assert find_subsequence((5, 1, 2), (2, 5)) is None
    assert find_subsequence([1], [1, 2]) is None


def test_positions_skip_the_special_tokens():
    assert subject_token_positions(tokenize, "a photo of a dog", "dog") == (5,)  # <start> a photo of a dog
    assert subject_token_positions(tokenize, "a teddy bear and a dog", "teddy bear") == (2, 3)
    assert subject_token_positions(tokenize, "a golden-retriever runs", "golden-retriever") == (2, 3, 4)
    assert subject_token_positions(tokenize, "a dog and a dog", "dog") == (2,)  # the first occurrence
    assert subject_token_positions(tokenize, "a photo of a dog", " dog ") == (5,)


def test_the_word_may_differ_in_case():
    assert subject_token_positions(tokenize, "Dog runs", "dog") == (1,)   # capitalized
    assert subject_token_positions(tokenize, "a dog runs", "DOG") == (2,)  # lower case
    assert subject_token_positions(tokenize, "a Dog and a dog", "dog") == (5,)  # the word as given first


def test_missing_or_empty_words_are_errors():
    with pytest.raises(ValueError, match="the subject word 'cat' is not in the prompt 'a photo of a dog'"):
        subject_token_positions(tokenize, "a photo of a dog", "cat")  # no tokens of its own: never position 0
    with pytest.raises(ValueError, match="'bear' is not in the prompt"):
        subject_token_positions(tokenize, "a teddy", "bear")
    with pytest.raises(ValueError, match="need subject_word"):
        subject_token_positions(tokenize, "a dog", " ")


class TokenizingClip:
    """Duck-typed ComfyUI CLIP: ``tokenize`` gives {encoder key: batches of (id, weight, word id)}."""

    def __init__(self, keys):
        self.keys = keys

    def tokenize(self, text):
        ids = tokenize(text, length=8)
        return {key: [[(i + offset, 1.0, 0) for i in ids[:4]], [(i + offset, 1.0, 0) for i in ids[4:]]]
                for offset, key in enumerate(self.keys)}


@pytest.mark.parametrize("keys,chosen", [
    (("g", "l"), "l"),               # SDXL: CLIP-L and CLIP-G share the positions; L is read
    (("l", "t5xxl"), "t5xxl"),       # Flux: T5 conditions the model
    (("l",), "l"),                   # SD1.5
    (("qwen25_7b",), "qwen25_7b"),   # anything else: its only tokenizer
])
def test_clip_tokenizer_reads_the_context_tokenizer(keys, chosen):
    tok = clip_tokenizer(TokenizingClip(keys))
    offset = keys.index(chosen)
    assert tok("a photo of a dog") == [i + offset for i in tokenize("a photo of a dog", length=8)]  # batches joined
    assert subject_token_positions(tok, "a photo of a dog", "dog") == (5,)

"""One prompt per image (SynCD data generation): the per-row subject attention of the automatic masks, which prompt
each latent image has, the prompt lines and the token padding that lets per-line encodings stack into a batch."""

import math

import pytest
import torch

from comfyui_syncd.attention.masks import subject_attention, subject_attention_rows
from comfyui_syncd.core.tokens import pad_token_chunks, prompt_lines, rows_token_positions

pytestmark = pytest.mark.unit


def test_per_row_subject_attention_equals_each_row_alone():
    """Reference: every row through :func:`subject_attention` alone with its own positions (softmax over the text
    tokens, summed over the row's subject tokens, averaged over heads)."""
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(3, 2, 6, 4, generator=g) * 2, torch.randn(3, 2, 9, 4, generator=g) * 2
    positions = [(1,), (4, 5), (7,)]
    got = subject_attention_rows(image, text, positions)
    expected = torch.cat([subject_attention(image[b:b + 1], text[b:b + 1], positions[b]) for b in range(3)])
    torch.testing.assert_close(got, expected)
    assert (got[1:] - subject_attention(image, text, positions[0])[1:]).abs().max() > 1e-2, "row 0's tokens differ"
    same = subject_attention_rows(image, text, [(2, 3)] * 3)
    torch.testing.assert_close(same, subject_attention(image, text, [2, 3]))
    with pytest.raises(ValueError, match="for 2 rows, but the batch has 3"):
        subject_attention_rows(image, text, positions[:2])


def repeat_to_batch_size(n_rows: int, batch: int) -> list[int]:
    """Which conditioning row each latent gets, written out from ComfyUI's ``comfy.utils.repeat_to_batch_size``:
    more rows than latents are cut, fewer are repeated ceil(batch / rows) times and then cut."""
    rows = list(range(n_rows))
    if n_rows > batch:
        return rows[:batch]
    return (rows * math.ceil(batch / n_rows))[:batch]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 3, 5, 6])
def test_each_latent_gets_the_positions_of_the_prompt_comfyui_gives_it(n, batch):
    per_prompt = [(10 + i, 20 + i) for i in range(n)]
    assert rows_token_positions(per_prompt, batch) == [per_prompt[r] for r in repeat_to_batch_size(n, batch)]


def test_prompt_lines_strip_and_skip_blank_lines():
    assert prompt_lines("  a dog \r\n\n  \na cat\n") == ["a dog", "a cat"]
    assert prompt_lines("") == [] and prompt_lines(None) == []


def test_padding_keeps_positions_and_follows_the_tokenizer():
    """T5-like (one chunk, variable length): short rows end in pad tokens. CLIP-like (77-token chunks): a missing
    chunk is the empty text's chunk. Weights and word ids of padding are 1.0 and 0, as ComfyUI pads."""
    t5 = [[[(5, 1.0), (6, 1.2), (1, 1.0)]], [[(7, 1.0), (1, 1.0), (0, 1.0), (0, 1.0)]]]
    padded = pad_token_chunks(t5, empty_chunk=[(1, 1.0)], pad_id=0)
    assert padded[0] == [[(5, 1.0), (6, 1.2), (1, 1.0), (0, 1.0)]] and padded[1] == t5[1]
    clip = [[[(49406, 1.0, 0), (3, 1.0, 1), (49407, 1.0, 0)]],
            [[(49406, 1.0, 0), (4, 1.0, 1), (49407, 1.0, 0)], [(49406, 1.0, 0), (8, 1.0, 2), (49407, 1.0, 0)]]]
    empty = [(49406, 1.0, 0), (49407, 1.0, 0), (49407, 1.0, 0)]
    padded = pad_token_chunks(clip, empty_chunk=empty, pad_id=49407)
    assert padded[0] == [clip[0][0], empty] and padded[1] == clip[1]
    assert pad_token_chunks(clip[:1], empty, None) == [clip[0]], "nothing to pad, no pad token needed"
    with pytest.raises(ValueError, match="pad token is unknown"):
        pad_token_chunks(t5, [(1, 1.0)], None)

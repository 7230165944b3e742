"""DCI's DBIM (eqs. 3–5) and prompt/token sets, pure torch."""

import pytest
import torch

from comfyui_syncd.attention.dci import blend, dbim_reference, dbim_weight
from comfyui_syncd.core.dci_prompt import auxiliary_prompt, dual_branch_tokens

pytestmark = pytest.mark.unit


def random_probs(b, h, n, t, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, t, generator=gen) * 3).softmax(-1)


@pytest.mark.parametrize("strength", [-2.0, 0.0, 1.5])
def test_dbim_equals_the_official_per_head_loop(strength):
    b, h, n, t, d = 2, 3, 64, 77, 8
    probs_p, probs_a = random_probs(b, h, n, t, 0), random_probs(b, h, n, t, 1)
    gen = torch.Generator().manual_seed(2)
    out_p, out_a = torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen)
    # concept prompt: 9 word tokens after SOS, V* at 4,5 and noun at 6; auxiliary: 7 words, noun at 4
    w1 = dbim_weight(probs_p, probs_a, range(1, 10), (4, 5, 6), range(1, 8), (1, 2, 3, 5, 6, 7), strength)
    ours = blend(out_p, out_a, w1)
    expected = dbim_reference(probs_p, probs_a, out_p, out_a, 9, (4, 5, 6), 7, (4,), strength)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert ((w1 >= 0) & (w1 <= 1)).all() and w1.std() > 0.01  # a spatially varying mix


def test_lambda_to_minus_infinity_keeps_the_concept_branch_and_zero_still_blends():
    probs_p, probs_a = random_probs(1, 2, 16, 77, 3), random_probs(1, 2, 16, 77, 4)
    out_p, out_a = torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 4)
    w1 = dbim_weight(probs_p, probs_a, range(1, 6), (2, 3), range(1, 5), (1, 3, 4), strength=-1e9)
    assert torch.equal(blend(out_p, out_a, w1), out_p)
    w0 = dbim_weight(probs_p, probs_a, range(1, 6), (2, 3), range(1, 5), (1, 3, 4), strength=0.0)
    assert (w0 >= 0.5).all() and (w0 < 1).any()  # σ(a1) ≥ 0.5: λ = 0 still mixes the background in


def test_spatial_softmax_gain_makes_the_map_mean_depend_on_resolution():
    from comfyui_syncd.attention.dci import spatial_map

    for n in (64, 256):
        assert spatial_map(torch.rand(1, n)).mean().item() == pytest.approx(500 / n, rel=1e-5)


def words_tokenizer(text):
    """A whitespace tokenizer with start/end/padding like CLIP's (77 ids; 'teddy' and 'bear' stay two words)."""
    vocab = {}
    ids = [1] + [100 + vocab.setdefault(w, hash(w) % 10000) for w in text.lower().split()] + [2]
    return ids + [2] * (77 - len(ids))


@pytest.mark.parametrize("prompt,concept,noun,aux,concept_tokens,noun_tokens", [
    ("a V* dog in times square", "V* dog", "dog", "a dog in times square", (2, 3), (2,)),
    ("a dog next to a sks dog on the beach", "sks dog", "dog", "a dog next to a dog on the beach", (6, 7), (6,)),
    ("photo of a <new1> <new2> teddy bear", "<new1> <new2> teddy bear", "teddy bear", "photo of a teddy bear",
     (4, 5, 6, 7), (4, 5)),
])
def test_token_sets_match_hand_computed_ones(prompt, concept, noun, aux, concept_tokens, noun_tokens):
    t = dual_branch_tokens(words_tokenizer, prompt, concept, noun)
    assert t.auxiliary_prompt == aux
    assert t.concept.tokens == concept_tokens and t.auxiliary_noun == noun_tokens
    n_words, n_aux = len(prompt.split()), len(aux.split())
    assert t.concept.window == tuple(range(1, 1 + n_words))  # start token excluded, end and padding too
    assert t.auxiliary.window == tuple(range(1, 1 + n_aux))
    assert t.auxiliary.tokens == tuple(p for p in range(1, 1 + n_aux) if p not in noun_tokens)
    with_end = dual_branch_tokens(words_tokenizer, prompt, concept, noun, include_end_tokens=True)
    assert with_end.concept.window == tuple(range(1, 77))


def test_prompt_errors_name_the_fix():
    with pytest.raises(ValueError, match="'V\\* cat' is not in the prompt"):
        auxiliary_prompt("a V* dog", "V* cat", "cat")
    with pytest.raises(ValueError, match="auxiliary noun"):
        auxiliary_prompt("a V* dog", "V* dog", " ")
    assert auxiliary_prompt("a  V*   dog, running", "V* dog", "dog") == "a  dog, running"

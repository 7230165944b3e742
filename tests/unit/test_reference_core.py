"""Reference-feature injection core: gathered foreground keys equal the official dense-mask construction."""

import pytest
import torch
import torch.nn.functional as F

from comfyui_syncd.attention.shared import gather_foreground, reference_attention, reference_attention_reference

pytestmark = pytest.mark.unit


def setup(b=3, heads=2, lq=12, r=2, p=9, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, heads, lq, d, generator=g, dtype=torch.float64) for _ in range(3))
    rk, rv = (torch.randn(r, heads, p, d, generator=g, dtype=torch.float64) for _ in range(2))
    fg = torch.rand(r, p, generator=g) > 0.5
    return q, k, v, rk, rv, fg


def flat_refs(refs, b):
    r, h, p, d = refs.shape
    return refs.permute(1, 0, 2, 3).reshape(1, h, r * p, d).expand(b, -1, -1, -1)


@pytest.mark.parametrize("access", [[True, True, True], [False, True, False], [False, False, False]])
def test_gathered_equals_dense_mask(access):
    q, k, v, rk, rv, fg = setup()
    b = q.shape[0]
    access = torch.tensor(access)
    tk = gather_foreground(rk, fg, token_dim=2).unsqueeze(0).expand(b, -1, -1, -1)
    tv = gather_foreground(rv, fg, token_dim=2).unsqueeze(0).expand(b, -1, -1, -1)
    got = reference_attention(q, torch.cat([k, tk], 2), torch.cat([v, tv], 2), k.shape[2], access)
    want = reference_attention_reference(q, k, v, flat_refs(rk, b), flat_refs(rv, b), fg, access)
    torch.testing.assert_close(got, want)


def test_no_foreground_or_no_access_is_plain_attention():
    q, k, v, rk, rv, _ = setup(seed=1)
    plain = F.scaled_dot_product_attention(q, k, v)
    none = torch.zeros(rk.shape[0], rk.shape[2], dtype=torch.bool)
    tk = gather_foreground(rk, none, token_dim=2)
    assert tk.shape[1] == 0
    torch.testing.assert_close(reference_attention(q, k, v, k.shape[2], torch.ones(3, dtype=torch.bool)), plain)
    b = q.shape[0]
    dense = reference_attention_reference(q, k, v, flat_refs(rk, b), flat_refs(rv, b), none,
                                          torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(dense, plain)


def test_foreground_changes_the_output_of_rows_with_access_only():
    q, k, v, rk, rv, fg = setup(seed=2)
    tk = gather_foreground(rk, fg, token_dim=2).unsqueeze(0).expand(3, -1, -1, -1)
    tv = gather_foreground(rv, fg, token_dim=2).unsqueeze(0).expand(3, -1, -1, -1)
    out = reference_attention(q, torch.cat([k, tk], 2), torch.cat([v, tv], 2), k.shape[2],
                              torch.tensor([True, False, True]))
    plain = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out[1], plain[1])
    assert (out[0] - plain[0]).abs().max() > 1e-3 and (out[2] - plain[2]).abs().max() > 1e-3


def test_gather_foreground_token_layout():
    tokens = torch.arange(2 * 4).view(2, 4, 1).float()       # (R, P, C)
    fg = torch.tensor([[True, False, True, False], [False, False, False, True]])
    assert gather_foreground(tokens, fg).flatten().tolist() == [0, 2, 7]
    with pytest.raises(ValueError, match="foreground must be"):
        gather_foreground(tokens, fg[:, :3])

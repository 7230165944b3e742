"""SynCD eq. 1 / JeDi coupled attention core: efficient vs reference vs a per-query brute force."""

import itertools

import pytest
import torch

from comfyui_syncd.attention.rope import shift_axis
from comfyui_syncd.attention.shared import roll_slot, shared_attention, shared_attention_reference

pytestmark = pytest.mark.unit
IMPLS = [shared_attention, shared_attention_reference]


def brute_force(q, k, v, fg, n_text, key_shift=None):
    """Each query's softmax over exactly the keys eq. 1 allows, one query at a time."""
    n, heads, seq, d = q.shape
    out = torch.zeros_like(q)
    for i, h, t in itertools.product(range(n), range(heads), range(seq)):
        keys, values = [k[i, h]], [v[i, h]]
        if t >= n_text:
            for j in range(n):
                if j == i:
                    continue
                sel = torch.ones(seq - n_text, dtype=torch.bool) if fg is None else fg[j]
                kj = k[j, :, n_text:]
                if key_shift is not None:
                    kj = key_shift(kj, roll_slot(i, j, n))
                keys.append(kj[h][sel])
                values.append(v[j, h, n_text:][sel])
        keys, values = torch.cat(keys), torch.cat(values)
        w = (keys @ q[i, h, t] / d ** 0.5).softmax(0)
        out[i, h, t] = w @ values
    return out


def rand_case(n, n_text, p, seed, heads=2, d=8, fg_prob=0.5):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, heads, n_text + p, d, generator=g, dtype=torch.float64) for _ in range(3))
    fg = torch.rand(n, p, generator=g) < fg_prob
    return q, k, v, fg


@pytest.mark.parametrize("n,n_text,p,fg_prob", [(1, 0, 16, .5), (2, 0, 16, .5), (3, 4, 12, .3), (4, 6, 9, .7),
                                                 (5, 0, 7, 0.0), (3, 3, 10, 1.0)])
@pytest.mark.parametrize("masked", [True, False])
def test_efficient_reference_and_brute_force_agree(n, n_text, p, fg_prob, masked):
    q, k, v, fg = rand_case(n, n_text, p, seed=n * 100 + p)
    fg = fg if masked else None
    expected = brute_force(q, k, v, fg, n_text)
    for impl in IMPLS:
        torch.testing.assert_close(impl(q, k, v, fg, n_text), expected, rtol=1e-9, atol=1e-9)


def test_agreement_in_float32_and_with_key_shift():
    q, k, v, fg = rand_case(4, 5, 24, seed=7, heads=3, d=16)
    q, k, v = q.float(), k.float(), v.float()

    def shift(keys, slot):
        return shift_axis(keys, slot * 4, [4, 6, 6], 1, 10000)

    ref = brute_force(q.double(), k.double(), v.double(), fg, 5, shift).float()
    for impl in IMPLS:
        torch.testing.assert_close(impl(q, k, v, fg, 5, shift), ref, rtol=1e-4, atol=1e-5)
    # the shift really moves keys: without it the result differs
    assert not torch.allclose(shared_attention(q, k, v, fg, 5), ref, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_image_with_empty_mask_contributes_nothing(impl):
    q, k, v, fg = rand_case(4, 3, 12, seed=3)
    fg[2] = False
    base = impl(q, k, v, fg, 3)
    k2, v2, q2 = k.clone(), v.clone(), q.clone()
    k2[2].normal_(), v2[2].normal_(), q2[2].normal_()
    changed = impl(q2, k2, v2, fg, 3)
    others = [0, 1, 3]
    assert torch.equal(changed[others], base[others])
    assert not torch.allclose(changed[2], base[2])


@pytest.mark.parametrize("impl", IMPLS)
def test_without_masks_every_image_influences_every_other(impl):
    q, k, v, _ = rand_case(4, 2, 9, seed=5)
    base = impl(q, k, v, None, 2)
    for j in range(4):
        k2, v2 = k.clone(), v.clone()
        k2[j, :, 2:] += 1.0
        v2[j, :, 2:] += 1.0
        changed = impl(q, k2, v2, None, 2)
        for i in range(4):
            if i != j:
                assert (changed[i, :, 2:] - base[i, :, 2:]).abs().max() > 1e-3, (i, j)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_dependence_follows_the_mask_exactly(impl):
    q, k, v, fg = rand_case(3, 0, 16, seed=11)
    fg[:] = False
    fg[1, 3] = True  # a single foreground token of image 1
    base = impl(q, k, v, fg, 0)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 5] += 3.0  # a background token of image 1: invisible to the others
    v2[1, :, 5] += 3.0
    assert torch.equal(impl(q, k2, v2, fg, 0)[[0, 2]], base[[0, 2]])
    k3, v3 = k.clone(), v.clone()
    v3[1, :, 3] += 3.0  # the foreground token: visible to every query of images 0 and 2 (background included)
    changed = impl(q, k3, v3, fg, 0)
    assert ((changed[[0, 2]] - base[[0, 2]]).abs().amax(-1) > 1e-6).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_text_never_attends_across_images(impl):
    q, k, v, _ = rand_case(3, 5, 8, seed=13)
    base = impl(q, k, v, None, 5)
    k2, v2 = k.clone(), v.clone()
    k2[1].normal_(), v2[1].normal_()
    changed = impl(q, k2, v2, None, 5)
    assert torch.equal(changed[[0, 2], :, :5], base[[0, 2], :, :5])  # others' text queries untouched
    assert not torch.allclose(changed[[0, 2], :, 5:], base[[0, 2], :, 5:])  # image queries do see image 1
    # other images' text is never a key: changing only image 1's text keys leaves images 0 and 2 alone
    k3, v3 = k.clone(), v.clone()
    k3[1, :, :5].normal_(), v3[1, :, :5].normal_()
    assert torch.equal(impl(q, k3, v3, None, 5)[[0, 2]], base[[0, 2]])


def test_single_image_group_is_plain_attention():
    q, k, v, fg = rand_case(1, 2, 10, seed=17)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for impl in IMPLS:
        torch.testing.assert_close(impl(q, k, v, fg, 2), expected)


def test_bad_shapes_are_rejected():
    q, k, v, fg = rand_case(3, 0, 10, seed=1)
    with pytest.raises(ValueError, match="foreground must be"):
        shared_attention(q, k, v, fg[:, :5], 0)
    with pytest.raises(ValueError, match="leaves no image tokens"):
        shared_attention(q, k, v, None, 10)


# --- Consistent sets: [own ‖ group's others' foreground ‖ references' foreground] ----------------------------

def brute_force_with_references(q, k, v, fg, ref_k, ref_v, ref_fg, n_text, key_shift=None, text_shares=False):
    """Each query's softmax over exactly its allowed keys: own, the others' foreground (image queries, or all with
    text_shares), and the references' foreground tokens of its row."""
    n, heads, seq, d = q.shape
    out = torch.zeros_like(q)
    for i, h, t in itertools.product(range(n), range(heads), range(seq)):
        keys, values = [k[i, h]], [v[i, h]]
        if t >= n_text or text_shares:
            for j in range(n):
                if j == i:
                    continue
                sel = torch.ones(seq - n_text, dtype=torch.bool) if fg is None else fg[j]
                kj = k[j, :, n_text:]
                if key_shift is not None:
                    kj = key_shift(kj, roll_slot(i, j, n))
                keys.append(kj[h][sel])
                values.append(v[j, h, n_text:][sel])
        keys.append(ref_k[i, h][ref_fg[i]])
        values.append(ref_v[i, h][ref_fg[i]])
        keys, values = torch.cat(keys), torch.cat(values)
        w = (keys @ q[i, h, t] / d ** 0.5).softmax(0)
        out[i, h, t] = w @ values
    return out


@pytest.mark.parametrize("n,n_text,p,t,text_shares", [(1, 0, 12, 10, False), (3, 0, 12, 10, False),
                                                       (3, 4, 9, 7, False), (4, 3, 8, 6, True), (2, 0, 8, 0, False)])
@pytest.mark.parametrize("masked", [True, False])
def test_shared_reference_attention_efficient_dense_and_brute_force_agree(n, n_text, p, t, text_shares, masked):
    from comfyui_syncd.attention.shared import shared_reference_attention, shared_reference_attention_reference

    q, k, v, fg = rand_case(n, n_text, p, seed=n * 10 + p + t)
    fg = fg if masked else None
    g = torch.Generator().manual_seed(t)
    ref_k, ref_v = (torch.randn(n, 2, t, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ref_fg = torch.rand(n, t, generator=g) < 0.6
    ref_fg[:, :] = ref_fg[:1]  # one reference set for the whole group, as a chunk sees it
    expected = brute_force_with_references(q, k, v, fg, ref_k, ref_v, ref_fg, n_text, text_shares=text_shares)
    dense = shared_reference_attention_reference(q, k, v, fg, ref_k, ref_v, ref_fg, n_text, text_shares=text_shares)
    torch.testing.assert_close(dense, expected, rtol=1e-9, atol=1e-9)
    idx = ref_fg[0].nonzero().squeeze(1)  # the efficient form takes the gathered foreground tokens
    efficient = shared_reference_attention(q, k, v, fg, ref_k[:, :, idx], ref_v[:, :, idx], n_text,
                                           text_shares=text_shares)
    torch.testing.assert_close(efficient, expected, rtol=1e-9, atol=1e-9)


def test_shared_reference_attention_reduces_to_its_parts():
    """No reference tokens: Masked Shared Attention; a group of one: attention over [own ‖ references]."""
    from comfyui_syncd.attention.shared import reference_attention, shared_reference_attention

    q, k, v, fg = rand_case(3, 2, 10, seed=5)
    empty = k.new_zeros(3, 2, 0, 8)
    torch.testing.assert_close(shared_reference_attention(q, k, v, fg, empty, empty, 2),
                               shared_attention(q, k, v, fg, 2), rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    ref_k, ref_v = (torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(2))
    one = shared_reference_attention(q[:1], k[:1], v[:1], fg[:1], ref_k, ref_v, 2)
    want = reference_attention(q[:1], torch.cat([k[:1], ref_k], 2), torch.cat([v[:1], ref_v], 2), k.shape[2],
                               torch.ones(1, dtype=torch.bool), 2)
    torch.testing.assert_close(one, want, rtol=1e-12, atol=1e-12)


def test_shared_reference_attention_with_key_shift():
    from comfyui_syncd.attention.shared import shared_reference_attention, shared_reference_attention_reference

    q, k, v, fg = rand_case(3, 5, 24, seed=9, heads=3, d=16)
    g = torch.Generator().manual_seed(2)
    ref_k, ref_v = (torch.randn(3, 3, 6, 16, generator=g, dtype=torch.float64) for _ in range(2))

    def shift(keys, slot):
        return shift_axis(keys, slot * 4, [4, 6, 6], 1, 10000)

    expected = brute_force_with_references(q, k, v, fg, ref_k, ref_v, torch.ones(3, 6, dtype=torch.bool), 5, shift)
    for got in (shared_reference_attention(q, k, v, fg, ref_k, ref_v, 5, shift),
                shared_reference_attention_reference(q, k, v, fg, ref_k, ref_v, None, 5, shift)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)

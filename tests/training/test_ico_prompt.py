"""The ICO prompt: contexts, V*, noun and end contexts at upstream's positions, in input-embedding space (position
embeddings added exactly once), and which tensors receive gradient. Tiny diffusers models with ComfyUI's CLIP
tokenizer files (no ComfyUI import)."""

from __future__ import annotations

import pytest
import torch

from comfyui_syncd.training import data, ico, models

pytestmark = pytest.mark.comfy  # needs the ComfyUI checkout (its tokenizer files)

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    return models.load(tiny_sd15)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return models.load(tiny_sdxl)


def tables(parts, i=0):
    emb = models.text_model(parts.text_encoders[i]).embeddings
    return emb.token_embedding.weight.detach(), emb.position_embedding.weight.detach()


def word(parts, text, i=0):
    return models.word_ids(parts.tokenizers[i], text)


def test_prompt_layout_matches_upstream(sd15, ico_config):
    """[SOS] [I]_1 V*_1..3 <teddy bear> [I]_2 [EOS + padding], built by hand from the embedding tables: SOS, noun
    and suffix carry their own positions, V* the positions 1..3, the contexts the embeddings of "A" and "." at
    position 1 (upstream initialises both from the init words tokenised alone)."""
    cfg = ico_config()
    prompts = ico.IcoPrompts(sd15, cfg.concept, num_images=3)
    assert prompts.layout == {"M": 1, "S": 3, "noun": 2, "L": 1}
    tok, pos = tables(sd15)
    (a,), (dot,), teddy_bear = word(sd15, "A"), word(sd15, "."), word(sd15, "teddy bear")
    assert (a, dot, len(teddy_bear)) == (320, 269, 2)
    rows = [tok[BOS] + pos[0], tok[a] + pos[1]]
    rows += [tok[t] + pos[1 + s] for s, t in enumerate((43514, 47629, 42170))]  # V*: upstream's init tokens
    rows += [tok[t] + pos[5 + k] for k, t in enumerate(teddy_bear)]
    rows += [tok[dot] + pos[1]]
    rows += [tok[EOS] + pos[p] for p in range(8, 77)]  # EOS, then CLIP-L's padding (end tokens)
    expected = torch.stack(rows)
    out = prompts(torch.tensor([2, 0]))[0]
    assert out.shape == (2, 77, tok.shape[1])
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(out[1], expected, rtol=0, atol=1e-7)
    assert prompts.pool_ids(1)[0][0].tolist().index(EOS) == 8  # the pooled output is read at the EOS
    with torch.no_grad():  # each image has its own contexts: image 2's change nothing else
        prompts.ctx[0][2] += 1.0
        prompts.end_ctx[0][2] -= 1.0
    out2 = prompts(torch.tensor([2, 0]))[0]
    changed = (out2 != out).any(-1)
    assert changed[0].nonzero().flatten().tolist() == [1, 7] and not changed[1].any()


def test_random_context_init_as_upstream(sd15, ico_config):
    cfg = ico_config(concept={"prefix_init": None, "suffix_init": None, "num_tokens": 2})
    prompts = ico.IcoPrompts(sd15, cfg.concept, num_images=4)
    assert prompts.layout == {"M": 4, "S": 2, "noun": 2, "L": 2}
    assert prompts.ctx[0].shape == (4, 4, 32) and prompts.end_ctx[0].shape == (4, 2, 32)
    assert 0.01 < prompts.ctx[0].std().item() < 0.03  # N(0, 0.02^2)
    tok, _ = tables(sd15)
    torch.testing.assert_close(prompts.v_star[0], tok[[47629, 42170]])  # S=2: the last two upstream tokens


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_encoder_gets_the_sequence_with_positions_added_once(family, request, ico_config):
    """With no contexts and V* set to the token vectors of real words, the ICO prompt is exactly the ordinary
    encoding of "<words> <noun>": the transformer layers get the input embeddings as built (no second position
    embedding) and the family's outputs (SD1.5 last layer; SDXL penultimate layers + CLIP-G pooled) match
    transformers' own forward pass on the token ids."""
    parts = request.getfixturevalue(family)
    cfg = ico_config(concept={"prefix_init": None, "prefix_length": 0, "suffix_init": None, "suffix_length": 0})
    prompts = ico.IcoPrompts(parts, cfg.concept, num_images=1)
    words = "red shiny small"
    with torch.no_grad():
        for i in range(len(parts.text_encoders)):
            tok, _ = tables(parts, i)
            prompts.v_star[i].copy_(tok[word(parts, words, i)])
    seen = []
    layer0 = models.text_model(parts.text_encoders[0]).encoder.layers[0]
    handle = layer0.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            embeds = prompts(torch.tensor([0]))
            context, pooled = models.conditioning(parts, embeds, prompts.pool_ids(1))
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], embeds[0], rtol=0, atol=0)
    with torch.no_grad():
        outs = [enc(input_ids=models.tokenize(t, f"{words} teddy bear"), output_hidden_states=True)
                for t, enc in zip(parts.tokenizers, parts.text_encoders)]
    if family == "sd15":
        torch.testing.assert_close(context, outs[0].last_hidden_state, rtol=0, atol=1e-5)
        assert pooled is None
    else:
        torch.testing.assert_close(context, torch.cat([o.hidden_states[-2] for o in outs], -1), rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, outs[1].text_embeds, rtol=0, atol=1e-5)


def test_sdxl_prompts_have_v_star_and_contexts_per_encoder(sdxl, ico_config):
    cfg = ico_config()
    prompts = ico.IcoPrompts(sdxl, cfg.concept, num_images=2)
    assert [v.shape for v in prompts.v_star] == [(3, 32), (3, 64)]
    assert [c.shape for c in prompts.ctx] == [(2, 1, 32), (2, 1, 64)]
    suffix_g = prompts.piece("suffix", 1)
    tok_g, pos_g = tables(sdxl, 1)
    # CLIP-G pads with "!" (id 0) after its EOS, CLIP-L with end tokens
    torch.testing.assert_close(suffix_g[1], tok_g[0] + pos_g[9])
    torch.testing.assert_close(prompts.piece("suffix", 0)[1], tables(sdxl, 0)[0][EOS] + tables(sdxl, 0)[1][9])


def test_only_v_star_contexts_and_kv_receive_gradient(tiny_sd15, ico_config, reg_images):
    """A batch of reference image 1 and a regularisation image: V*, image 1's contexts and every attn2 to_k/to_v
    weight get gradient; other images' contexts get zeros; everything else (token table included) is frozen.
    The regularisation row is its caption's plain encoding."""
    cfg = ico_config(data={"reg_images": str(reg_images)})
    run = ico.prepare(cfg, resume=None)
    core = run.core
    trainable = {n for n, p in core.named_parameters() if p.requires_grad}
    kv = {n for n in trainable if n.startswith("unet.")}
    attn2 = [n for n, _ in core.unet.named_modules() if n.endswith("attn2")]
    assert len(attn2) == 7 and kv == {f"unet.{a}.to_{w}.weight" for a in attn2 for w in "kv"}
    assert trainable - kv == {"prompts.v_star.0", "prompts.ctx.0", "prompts.end_ctx.0"}
    examples = [run.dataset[(4, False)], run.dataset[(0, True)]]  # 2 regularisation images, 3 reference images
    assert [e["image_index"] for e in examples] == [1, -1] and examples[1]["caption"] == "a photo of a bear"
    batch = data.collate(examples)
    gen = torch.Generator().manual_seed(0)
    latents, noise, t, _ = ico.micro_batch_inputs(batch, run.parts.vae, run.parts.noise_scheduler, gen, "cpu", 64,
                                                  "sd15")
    index = torch.tensor(batch["image_index"])
    loss = run.model(latents, noise, t, index, batch["caption"])
    loss.backward()
    for name, p in core.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not models.text_model(run.parts.text_encoders[0]).embeddings.token_embedding.weight.requires_grad
    ctx_grad = core.prompts.ctx[0].grad
    assert ctx_grad[1].abs().sum() > 0 and ctx_grad[0].abs().sum() == 0 and ctx_grad[2].abs().sum() == 0
    end_grad = core.prompts.end_ctx[0].grad
    assert end_grad[1].abs().sum() > 0 and end_grad[[0, 2]].abs().sum() == 0
    with torch.no_grad():
        context, _ = core.conditioning(index, batch["caption"])
        plain, _ = models.encode_text(run.parts, ["a photo of a bear"])
        ico_row, _ = models.conditioning(run.parts, core.prompts(torch.tensor([1])), core.prompts.pool_ids(1))
    torch.testing.assert_close(context[1], plain[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(context[0], ico_row[0], rtol=0, atol=1e-6)


def test_sos_keys_and_values_carry_no_gradient():
    """The weight gradient of to_k/to_v with the SOS detach equals the full gradient minus the SOS token's part
    (dL/dk_0 outer c_0), as upstream's ``k = m*k + (1-m)*k.detach()`` with m zero at the first token."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    block = torch.nn.ModuleDict({"attn2": Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)})
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 8)

    def grads(detach):
        block.zero_grad()
        hooks = ico.detach_sos_kv(block) if detach else []
        outs = {}
        keep = [getattr(block.attn2, f"to_{w}").register_forward_hook(
            lambda m, a, o, w=w: (o.retain_grad(), outs.__setitem__(w, o))[1]) for w in "kv"]
        (block.attn2(x, encoder_hidden_states=ctx) ** 2).sum().backward()
        for h in hooks + keep:
            h.remove()
        return {w: getattr(block.attn2, f"to_{w}").weight.grad.clone() for w in "kv"}, outs

    full, outs = grads(False)
    detached, _ = grads(True)
    for w in "kv":
        sos_part = torch.einsum("bi,bj->ij", outs[w].grad[:, 0], ctx[:, 0])
        assert sos_part.abs().max() > 1e-4
        torch.testing.assert_close(detached[w], full[w] - sos_part, rtol=1e-5, atol=1e-6)

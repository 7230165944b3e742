"""Official SynCD checkpoint keys (core.checkpoint_keys) on synthetic state dicts with nupurkmr9/syncd's key names:
family detection, LoRA pairs, frozen and unknown keys, the report. Full size on the meta device (no memory)."""

import pytest
import torch

import synthetic_upstream_weights as W
from comfyui_syncd.core.checkpoint_keys import (FLUX_LORA_KEY, SDXL_IP_KEY, SDXL_LORA_KEY, CheckpointReport,
                                                UnmatchedKeysError, check_lora_shapes, count_other_keys,
                                                detect_family, lora_pairs, raise_unmatched)

pytestmark = pytest.mark.unit

SDXL_LORA_MODULES = 4 * 70          # attn1 to_q, to_k, to_v, to_out.0 of SDXL's 70 transformer blocks
FLUX_LORA_MODULES = 19 * 12 + 38 * 3


@pytest.fixture(scope="module")
def sdxl_sd():
    return W.syncd_sdxl_checkpoint(W.SDXL_UNET, 2048, device="meta")


@pytest.fixture(scope="module")
def flux_sd():
    return W.syncd_flux_checkpoint(**W.FLUX_DEV, device="meta")


def meta(*shape):
    return torch.empty(shape or (1,), device="meta")


def test_detect_family(sdxl_sd, flux_sd):
    assert detect_family(sdxl_sd) == "sdxl" and detect_family(flux_sd) == "flux"
    assert detect_family({k: v for k, v in sdxl_sd.items() if "_ip." in k}) == "sdxl"  # IP weights alone
    for sd in ({**sdxl_sd, **flux_sd}, {}, {"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": meta()}):
        with pytest.raises(ValueError, match="found neither the Flux LoRA .* nor the SDXL LoRA/IP-Adapter keys"):
            detect_family(sd)


def test_sdxl_lora_pairs_and_ip_keys_at_full_size(sdxl_sd):
    report = CheckpointReport("sdxl")
    pairs = lora_pairs(sdxl_sd, SDXL_LORA_KEY, report)
    assert len(pairs) == SDXL_LORA_MODULES and report.unmatched == []
    path = "mid_block.attentions.0.transformer_blocks.9.attn1.to_out.0"
    assert pairs[path]["A"] is sdxl_sd[f"unet.{path}.lora_A.default.weight"]
    assert pairs[path]["B"] is sdxl_sd[f"unet.{path}.lora_B.default.weight"]
    assert {p.rsplit(".attn1.", 1)[0] for p in pairs} == {p for p, _ in W.transformer_blocks(W.SDXL_UNET)}
    ip = {k: SDXL_IP_KEY.match(k) for k in sdxl_sd}
    ip = {k: m.group("attn", "kv") for k, m in ip.items() if m}
    assert len(ip) == 2 * 70 and len(sdxl_sd) == 4 * 2 * 70 + 2 * 70
    key = "unet.up_blocks.0.attentions.2.transformer_blocks.9.attn2.processor.attn_op.to_v_ip.0.weight"
    assert ip[key] == ("up_blocks.0.attentions.2.transformer_blocks.9.attn2", "v")


def test_flux_lora_pairs_at_full_size(flux_sd):
    report = CheckpointReport("flux")
    pairs = lora_pairs(flux_sd, FLUX_LORA_KEY, report)
    assert len(pairs) == FLUX_LORA_MODULES and report.unmatched == []
    assert {"transformer_blocks.18.ff_context.net.2", "transformer_blocks.0.attn.to_out.0",
            "single_transformer_blocks.37.attn.to_v"} <= pairs.keys()
    key = "transformer.base_model.model.single_transformer_blocks.37.attn.to_v.lora_B.default.weight"
    assert pairs["single_transformer_blocks.37.attn.to_v"]["B"] is flux_sd[key]


@pytest.mark.parametrize("pattern,key,module", [
    (SDXL_LORA_KEY, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),            # no unet. prefix, no adapter name
    (FLUX_LORA_KEY, "transformer_blocks.3.attn.add_k_proj.lora_B.weight", "transformer_blocks.3.attn.add_k_proj"),
    (FLUX_LORA_KEY, "transformer.single_transformer_blocks.0.attn.to_q.lora_A.default.weight",
     "single_transformer_blocks.0.attn.to_q"),
])
def test_prefixes_and_adapter_name_are_optional(pattern, key, module):
    assert pattern.match(key).group("module") == module


def test_key_patterns_keep_to_their_own_keys():
    assert not SDXL_LORA_KEY.match("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight")
    assert SDXL_IP_KEY.match("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_ip.weight")
    assert not FLUX_LORA_KEY.match("transformer.base_model.model.transformer_blocks.0.attn.to_q.base_layer.weight")


def test_half_pairs_are_reported_missing(sdxl_sd):
    path = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    sd = {k: v for k, v in sdxl_sd.items() if k != f"{path}.lora_B.default.weight"}
    report = CheckpointReport("sdxl")
    pairs = lora_pairs(sd, SDXL_LORA_KEY, report)
    assert len(pairs) == SDXL_LORA_MODULES - 1 and path.removeprefix("unet.") not in pairs
    assert report.unmatched == [f"{path.removeprefix('unet.')}.lora_B (missing)"]


def test_frozen_keys_are_counted_and_others_unmatched(sdxl_sd):
    frozen = ["vae.decoder.conv_in.weight", "text_encoder_2.text_model.final_layer_norm.weight",
              "image_encoder.vision_model.post_layernorm.bias",
              "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.base_layer.weight",
              "transformer.base_model.model.transformer_blocks.0.attn.to_q.base_layer.weight"]
    sd = {**sdxl_sd, **{k: meta() for k in [*frozen, "optimizer.step", "lora_te1_text_model.weight"]}}
    report = CheckpointReport("sdxl")
    count_other_keys(sd, [SDXL_LORA_KEY, SDXL_IP_KEY], report)
    assert report.frozen_skipped == len(frozen)
    assert report.unmatched == ["optimizer.step (unknown key)", "lora_te1_text_model.weight (unknown key)"]
    # trained weights are never taken for frozen ones: without the IP pattern the IP keys are unknown
    report = CheckpointReport("sdxl")
    count_other_keys(sdxl_sd, [SDXL_LORA_KEY], report)
    assert report.frozen_skipped == 0 and len(report.unmatched) == 2 * 70
    assert all(u.endswith("_ip.0.weight (unknown key)") for u in report.unmatched)


def test_check_lora_shapes():
    report = CheckpointReport("flux")
    assert check_lora_shapes("m", {"A": torch.zeros(4, 64), "B": torch.zeros(32, 4)}, 32, 64, report)
    assert report.unmatched == []
    assert not check_lora_shapes("ff.net.2", {"A": torch.zeros(4, 64), "B": torch.zeros(7, 4)}, 32, 64, report)
    assert not check_lora_shapes("a", {"A": torch.zeros(4, 64), "B": torch.zeros(32, 5)}, 32, 64, report)  # rank
    assert not check_lora_shapes("b", {"A": torch.zeros(4, 63), "B": torch.zeros(32, 4)}, 32, 64, report)
    assert not check_lora_shapes("c", {"A": torch.zeros(4, 64, 1), "B": torch.zeros(32, 4)}, 32, 64, report)
    assert report.unmatched[0] == "ff.net.2 (lora_A (4, 64), lora_B (7, 4) do not fit a 32x64 weight)"
    assert [u.split()[0] for u in report.unmatched] == ["ff.net.2", "a", "b", "c"]


def test_raise_unmatched_lists_the_keys():
    report = CheckpointReport("sdxl")
    raise_unmatched(report, "this SDXL model")  # nothing unmatched: no error
    report.unmatched = [f"key{i} (unknown key)" for i in range(25)]
    with pytest.raises(UnmatchedKeysError) as err:
        raise_unmatched(report, "this SDXL model")
    text = str(err.value)
    assert isinstance(err.value, ValueError)
    assert text.startswith("SynCD checkpoint: 25 keys do not match this SDXL model:\n  key0 (unknown key)\n")
    assert "key19 (unknown key)" in text and "key20" not in text and "... and 5 more" in text
    assert text.endswith("Use the official SynCD checkpoint with its base model family.")


def test_report_summary():
    assert CheckpointReport("flux", lora_modules=342, keys=684).summary() == \
        "SynCD flux checkpoint: 342 LoRA modules (684 keys, 0 unmatched)"
    assert CheckpointReport("sdxl", lora_modules=280, ip_layers=70, frozen_skipped=2, keys=702).summary() == \
        "SynCD sdxl checkpoint: 280 LoRA modules, 70 IP-Adapter to_k_ip/to_v_ip pairs, 2 frozen base weights " \
        "skipped (702 keys, 0 unmatched)"

"""IP-Adapter Plus in plain torch (core.ip_adapter_model): the Resampler against upstream's arithmetic, the file
layouts and the per-layer weights, on synthetic weights with tencent-ailab/IP-Adapter's key names."""

import pytest
import torch

import synthetic_upstream_weights as W
from comfyui_syncd.core.ip_adapter_model import (Resampler, check_plus_layout, ip_layers, layer_key,
                                                 split_flat_state_dict)

pytestmark = pytest.mark.unit

TINY_IP = dict(unet=W.TINY_SDXL_UNET, cross_dim=64, embedding_dim=32, dim=32, heads=1)  # tiny SDXL, tiny CLIP


@pytest.fixture(scope="module")
def ipadapter():
    return W.ipadapter_plus(**TINY_IP)


def test_resampler_matches_upstream_perceiver_math(ipadapter):
    """Our Resampler against a transcription of upstream's PerceiverAttention/FeedForward arithmetic."""
    sd = ipadapter["image_proj"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    ln = torch.nn.functional.layer_norm
    lat = sd["latents"].repeat(2, 1, 1)
    h = x @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    for i in range(4):
        p = f"layers.{i}."
        xs = ln(h, (32,), sd[p + "0.norm1.weight"], sd[p + "0.norm1.bias"])
        ls = ln(lat, (32,), sd[p + "0.norm2.weight"], sd[p + "0.norm2.bias"])
        q = ls @ sd[p + "0.to_q.weight"].T
        k, v = (torch.cat([xs, ls], 1) @ sd[p + "0.to_kv.weight"].T).chunk(2, -1)
        scale = 1 / 64 ** 0.25
        w = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), -1)
        lat = (w @ v) @ sd[p + "0.to_out.weight"].T + lat
        f = ln(lat, (32,), sd[p + "1.0.weight"], sd[p + "1.0.bias"]) @ sd[p + "1.1.weight"].T
        lat = torch.nn.functional.gelu(f) @ sd[p + "1.3.weight"].T + lat
    expected = ln(lat @ sd["proj_out.weight"].T + sd["proj_out.bias"], (64,), sd["norm_out.weight"],
                  sd["norm_out.bias"])
    torch.testing.assert_close(Resampler.from_state_dict(sd)(x), expected, rtol=1e-4, atol=1e-5)


def test_resampler_sizes_come_from_the_weights():
    sd = W.ipadapter_plus(W.TINY_SDXL_UNET, cross_dim=48, embedding_dim=24, dim=32, heads=2, depth=3,
                          num_queries=5)["image_proj"]
    model = Resampler.from_state_dict(sd)
    assert len(model.layers) == 3 and model.layers[0][0].heads == 2 and not model.training
    assert model(torch.zeros(2, 7, 24)).shape == (2, 5, 48)


def test_resampler_refuses_other_image_projections(ipadapter):
    sd = ipadapter["image_proj"]
    with pytest.raises(ValueError, match="image_proj has no 'latents'.*not an IP-Adapter Plus Resampler"):
        Resampler.from_state_dict({k: v for k, v in sd.items() if k != "latents"})
    with pytest.raises(ValueError, match="inner width 100 is not a multiple of the head size 64"):
        Resampler.from_state_dict({**sd, "layers.0.0.to_q.weight": torch.zeros(100, 32)})
    with pytest.raises(ValueError, match="do not fit an IP-Adapter Plus Resampler"):
        Resampler.from_state_dict({**sd, "layers.0.0.to_out.weight": torch.zeros(32, 65)})


def test_split_flat_state_dict_is_the_nested_layout(ipadapter):
    flat = {f"{part}.{k}": v for part in ("image_proj", "ip_adapter") for k, v in ipadapter[part].items()}
    nested = split_flat_state_dict(flat)
    assert nested.keys() == {"image_proj", "ip_adapter"}
    for part in nested:
        assert nested[part].keys() == ipadapter[part].keys()
        assert all(nested[part][k] is ipadapter[part][k] for k in ipadapter[part])
    with pytest.raises(ValueError, match=r"2 keys are neither image_proj\.\* nor ip_adapter\.\*, e\.g\. "
                                         r"image_proj, unet\.x"):
        split_flat_state_dict({**flat, "unet.x": torch.zeros(1), "image_proj": torch.zeros(1)})


def test_check_plus_layout(ipadapter):
    check_plus_layout(ipadapter)
    with pytest.raises(ValueError, match="expected a dict with 'image_proj' and 'ip_adapter'"):
        check_plus_layout({"image_proj": {}})
    with pytest.raises(ValueError, match="expected a dict"):
        check_plus_layout([ipadapter])
    plain = {"image_proj": {"proj.weight": torch.zeros(4, 4)}, "ip_adapter": ipadapter["ip_adapter"]}
    with pytest.raises(ValueError, match="not an IP-Adapter \\*Plus\\* model"):
        check_plus_layout(plain)
    with pytest.raises(ValueError, match="unexpected ip_adapter key"):
        check_plus_layout({**ipadapter, "ip_adapter": {"1.to_k_lora.down.weight": torch.zeros(1)}})


def test_ip_layers_in_upstream_order(ipadapter):
    sd = ipadapter["ip_adapter"]
    layers = ip_layers(dict(reversed(list(sd.items()))))  # key order does not matter: numbers do
    assert len(layers) == len(W.transformer_blocks(W.TINY_SDXL_UNET)) == len(sd) // 2
    for k, (to_k, to_v) in enumerate(layers):
        assert to_k is sd[layer_key(k, "k")] and to_v is sd[layer_key(k, "v")]
    assert layer_key(0, "k") == "1.to_k_ip.weight" and layer_key(69, "v") == "139.to_v_ip.weight"


def test_ip_layers_errors_name_the_layer():
    pair = {"to_k_ip": torch.zeros(8, 4), "to_v_ip": torch.zeros(8, 4)}

    def layers(*numbers, drop=None):
        return {f"{n}.{name}.weight": t for n in numbers for name, t in pair.items() if (n, name) != drop}

    with pytest.raises(ValueError, match=r"unexpected ip_adapter key '1\.to_k_ip\.bias'.*FaceID"):
        ip_layers({**layers(1), "1.to_k_ip.bias": torch.zeros(8)})
    with pytest.raises(ValueError, match=r"numbered \[2, 4\].*odd numbers 1, 3, 5"):
        ip_layers(layers(2, 4))
    with pytest.raises(ValueError, match=r"numbered \[1, 5\]"):
        ip_layers(layers(1, 5))
    with pytest.raises(ValueError, match="layer 3 lacks to_v_ip.weight"):
        ip_layers(layers(1, 3, drop=(3, "to_v_ip")))
    with pytest.raises(ValueError, match="layer 1 lacks to_k_ip.weight"):
        ip_layers(layers(1, drop=(1, "to_k_ip")))
    with pytest.raises(ValueError, match=r"layer 1 has to_k_ip \(8, 4\) and to_v_ip \(8, 5\)"):
        ip_layers({**layers(1), "1.to_v_ip.weight": torch.zeros(8, 5)})
    with pytest.raises(ValueError, match="both must be"):
        ip_layers({"1.to_k_ip.weight": torch.zeros(8), "1.to_v_ip.weight": torch.zeros(8)})

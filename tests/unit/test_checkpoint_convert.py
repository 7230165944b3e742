"""``python -m comfyui_syncd convert-checkpoint``: pickle -> safetensors with the same keys (no ComfyUI)."""

import subprocess
import sys

import pytest
import torch

from comfyui_syncd.checkpoint_convert import convert, main, read_weights


def lightning_checkpoint():
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(4, 8, generator=gen)
    state = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight": shared,
             "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default.weight":
                 torch.randn(8, 4, generator=gen).half(),
             "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.attn_op.to_k_ip.0.weight": shared[:2],
             "note": "not a tensor"}
    return {"state_dict": state, "epoch": 3, "global_step": 20000}


def test_round_trip_keeps_keys_and_values(tmp_path, capsys):
    src, dst = tmp_path / "sdxl_finetuned_20k.ckpt", tmp_path / "sdxl.safetensors"
    ckpt = lightning_checkpoint()
    torch.save(ckpt, src)
    assert main([str(src), str(dst)]) == 0
    out = read_weights(dst)
    tensors = {k: v for k, v in ckpt["state_dict"].items() if torch.is_tensor(v)}
    assert out.keys() == tensors.keys()
    assert all(torch.equal(out[k], v) and out[k].dtype == v.dtype for k, v in tensors.items())
    printed = capsys.readouterr().out
    assert "3 tensors (1 float16, 2 float32), 80 parameters" in printed and "dropped 1 non-tensor" in printed


def test_flat_state_dict_and_cli_entry(tmp_path):
    sd = {"transformer.base_model.model.transformer_blocks.0.attn.to_q.lora_A.default.weight": torch.ones(2, 3)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    done = subprocess.run([sys.executable, "-m", "comfyui_syncd", "convert-checkpoint",
                           str(tmp_path / "pytorch_model.bin"), str(tmp_path / "flux.safetensors")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert torch.equal(read_weights(tmp_path / "flux.safetensors")[next(iter(sd))], torch.ones(2, 3))


def test_refuses_arbitrary_pickles_and_bad_outputs(tmp_path, capsys):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.bin")
    assert main([str(tmp_path / "module.bin"), str(tmp_path / "out.safetensors")]) == 1
    assert "weights_only" in capsys.readouterr().err and not (tmp_path / "out.safetensors").exists()
    torch.save({"a": torch.zeros(1)}, tmp_path / "ok.bin")
    with pytest.raises(ValueError, match=".safetensors"):
        convert(tmp_path / "ok.bin", tmp_path / "out.bin")


def test_each_bad_file_gives_one_clear_line(tmp_path, capsys):
    torch.save({"a": torch.zeros(1)}, tmp_path / "ok.bin")
    (tmp_path / "notes.ckpt").write_text("hello, this is text\n")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"garbage")
    torch.save({"a": torch.zeros(1000)}, tmp_path / "whole.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:300])
    cases = {
        (tmp_path / "ok.bin", tmp_path / "missing" / "out.safetensors"): "output folder",
        (tmp_path / "notes.ckpt", tmp_path / "o1.safetensors"): "is not a PyTorch checkpoint",
        (tmp_path / "corrupt.safetensors", tmp_path / "o2.safetensors"): "is not a valid .safetensors file",
        (tmp_path / "truncated.pt", tmp_path / "o3.safetensors"): "damaged or truncated",
        (tmp_path / "absent.ckpt", tmp_path / "o4.safetensors"): "no such file",
    }
    for (src, dst), expected in cases.items():
        assert main([str(src), str(dst)]) == 1, src
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (src, err)
        assert "pickle" not in lines[0] or src.name == "notes.ckpt"  # pickle advice only where it applies
        assert not dst.exists()

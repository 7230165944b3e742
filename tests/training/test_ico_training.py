"""ICO training runs on tiny models: the loss goes down, a run killed with SIGKILL resumes from its last complete
checkpoint and ends bit-identical to an uninterrupted run, validation images and exports are written, SDXL
trains through both text encoders."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from ico_tiny_models import ico_raw
from script_runs import assert_same_tensors, killed_at_checkpoint_4, resumed_from_checkpoint_2, tensors

from comfyui_syncd.training import checkpoints, data, ico, loop, models

pytestmark = pytest.mark.comfy  # needs the ComfyUI checkout (its tokenizer files)


def test_a_few_steps_lower_the_loss(ico_config):
    """Mean loss over the same fixed batches, noise and timesteps before and after 10 steps; the frozen weights
    (UNet except attn2 k/v, text encoders with their token tables, VAE) do not move."""
    cfg = ico_config(train={"max_steps": 10, "learning_rate": 3.0e-2, "scale_lr": False})
    run = ico.prepare(cfg, resume=None)
    batch = data.collate([run.dataset[(i, False)] for i in range(3)])
    index = torch.tensor(batch["image_index"])
    frozen = {n: p.detach().clone() for n, p in run.core.named_parameters() if not p.requires_grad}
    vae = {n: p.detach().clone() for n, p in run.parts.vae.named_parameters()}

    def mean_loss():
        total = 0.0
        with torch.no_grad():
            for s in range(4):
                gen = torch.Generator().manual_seed(100 + s)
                inputs = ico.micro_batch_inputs(batch, run.parts.vae, run.parts.noise_scheduler, gen, "cpu", 64,
                                                "sd15")
                total += run.model(*inputs[:3], index, batch["caption"]).item()
        return total / 4

    before = mean_loss()
    batches = ico.loader(run)
    losses = [ico.train_step(run, batches) for _ in range(10)]
    after = mean_loss()
    assert run.step == 10 and all(map(torch.isfinite, torch.tensor(losses)))
    assert after < 0.95 * before, (before, after)
    for n, p in run.core.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(torch.equal(p, vae[n]) for n, p in run.parts.vae.named_parameters())


def test_learning_rates_follow_upstream_scaling(ico_config):
    cfg = ico_config(train={"batch_size": 3, "gradient_accumulation_steps": 2})
    run = ico.prepare(cfg, resume=None)
    lrs = [g["lr"] for g in run.optimizer.param_groups]
    assert lrs == pytest.approx([1e-5 * 6, 1e-5 * 6 * 10, 1e-5 * 6 * 10])  # base x batch x processes x accumulation
    assert len(run.optimizer.param_groups[0]["params"]) == 14 + 1  # 7 x (to_k, to_v) + V*


SCRIPT = "comfyui_syncd.training.ico"


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(tiny_sd15, concept_images, reg_images, tmp_path,
                                                               trained_sd15):
    """The script (run as ``python -m comfyui_syncd.training.ico``) killed (SIGKILL) while writing checkpoint 4:
    rerunning the same command resumes from step 2 (the half-written checkpoint 4 is ignored), redoes steps 3-6
    and ends with exports and optimizer state equal, bit for bit, to the in-process uninterrupted run."""
    out = tmp_path / "run"
    cfg_path = tmp_path / "ico.yaml"
    cfg_path.write_text(yaml.safe_dump(ico_raw(tiny_sd15, concept_images, reg_images, out)))
    args = ["--config", str(cfg_path), "--no-progress"]
    killed_at_checkpoint_4(SCRIPT, args, out)
    assert (out / "embeddings" / "myconcept_step000002.safetensors").is_file()
    assert not (out / "embeddings" / "myconcept.safetensors").exists()

    assert "steps 2..6" in resumed_from_checkpoint_2(SCRIPT, args, out)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004", "step_000006"]

    ref = trained_sd15.out
    # losses.jsonl: the killed run's steps 3-4 (after its last checkpoint) were dropped on resume and redone
    assert loop.read_losses(out) == loop.read_losses(ref) and sorted(loop.read_losses(out)) == list(range(1, 7))
    assert_same_tensors(out, ref, ["embeddings/myconcept.safetensors", "loras/myconcept.safetensors",
                                   "embeddings/myconcept_step000004.safetensors",
                                   "checkpoints/step_000006/trainable.safetensors"])
    opt_mine = torch.load(ckpts / "step_000006" / "optimizer.bin", weights_only=True)
    opt_ref = torch.load(ref / "checkpoints" / "step_000006" / "optimizer.bin", weights_only=True)
    assert opt_mine["param_groups"] == opt_ref["param_groups"]
    for i, state in opt_ref["state"].items():
        assert state["step"] == opt_mine["state"][i]["step"] == 6
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], opt_mine["state"][i][key])


def test_reference_run_outputs(trained_sd15):
    """Checkpoints, per-checkpoint exports and validation PNGs of the uninterrupted run; its concept moved."""
    out = trained_sd15.out
    assert trained_sd15.step == 6
    assert [p.name for p in checkpoints.complete(out)] == ["step_000002", "step_000004", "step_000006"]
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == [
        "myconcept.safetensors", "myconcept_step000002.safetensors", "myconcept_step000004.safetensors"]
    pngs = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert pngs == ["step000003_00.png", "step000003_01.png", "step000006_00.png", "step000006_01.png"]
    from PIL import Image

    with Image.open(out / "validation" / "step000006_01.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    emb = tensors(out / "embeddings" / "myconcept.safetensors")
    assert list(emb) == ["emb_params"] and emb["emb_params"].shape == (3, 32)
    tok = models.text_model(trained_sd15.parts.text_encoders[0]).embeddings.token_embedding.weight
    assert not torch.equal(emb["emb_params"], tok[list(ico.UPSTREAM_INIT_TOKEN_IDS)].float())
    diffs = tensors(out / "loras" / "myconcept.safetensors")
    assert len(diffs) == 14 and all(k.endswith((".attn2.to_k.diff", ".attn2.to_v.diff")) for k in diffs)
    assert all(v.abs().max() > 0 for v in diffs.values())
    config = json.loads((out / "config.json").read_text())
    assert config["concept"]["name"] == "myconcept" and config["train"]["max_steps"] == 6


def test_a_finished_run_rerun_does_no_steps(trained_sd15):
    """Resuming a run that reached max_steps trains nothing and rewrites the same exports."""
    from comfyui_syncd.training import config

    before = tensors(trained_sd15.out / "loras" / "myconcept.safetensors")
    run = ico.prepare(config.from_dict(ico.IcoConfig, config.to_dict(trained_sd15.cfg)))
    assert run.step == 6
    ico.train(run, progress=False)
    after = tensors(trained_sd15.out / "loras" / "myconcept.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sdxl_trains_both_text_encoders(trained_sdxl):
    out = trained_sdxl.out
    emb = tensors(out / "embeddings" / "myconcept.safetensors")
    assert sorted(emb) == ["clip_g", "clip_l"] and emb["clip_l"].shape == (3, 32) and emb["clip_g"].shape == (3, 64)
    core = trained_sdxl.core
    for i, key in enumerate(("clip_l", "clip_g")):
        assert torch.equal(emb[key], core.prompts.v_star[i].detach().float())
        tok = models.text_model(trained_sdxl.parts.text_encoders[i]).embeddings.token_embedding.weight
        assert not torch.equal(emb[key], tok[list(ico.UPSTREAM_INIT_TOKEN_IDS)].float())
    diffs = tensors(out / "loras" / "myconcept.safetensors")
    assert len(diffs) == 2 * (2 + 2 + 2 * 2)  # input 2 + middle 2 + output 2 x 2 transformer blocks
    assert sorted((out / "validation").glob("*.png"))

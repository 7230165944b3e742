"""What the training scripts (``ico``, ``syncd``, ``flux_incontext``) share: the prepared :class:`Run`, resuming it,
its micro-batch stream, the step loop :func:`train_loop` (config.json, loss log, progress bar, checkpoints,
exports) and the command line :func:`script_main`.

A script's run is a subclass of :class:`Run` with its own fields; the loop calls back into the script for what
differs (one optimizer step, the exports, the lines it prints, the validation grid — :mod:`.validation` —, ICO's
validation images).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from typing import Callable, Optional

import torch

from . import checkpoints, config as config_mod

LOSS_LOG = "losses.jsonl"


@dataclasses.dataclass
class Run:
    """A prepared run (for the scripts and for tests that drive steps themselves); scripts add their fields."""
    cfg: object
    accelerator: object
    parts: object
    model: torch.nn.Module           # prepared (possibly DDP-wrapped)
    optimizer: object
    dataset: object
    trainable: dict                  # name -> live trained parameter (what checkpoints store)
    step: int = dataclasses.field(default=0, kw_only=True)

    @property
    def core(self):
        """The model without accelerate's wrapper."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def out(self) -> pathlib.Path:
        return pathlib.Path(self.cfg.train.output_dir)


def resume(run: Run, checkpoint="auto") -> Run:
    """Load ``checkpoint`` into the prepared run: ``"auto"``, the newest complete checkpoint of the output dir if
    any; a path; or None for a fresh start."""
    if checkpoint == "auto":
        checkpoint = checkpoints.latest(run.out)
    if checkpoint:
        run.step = checkpoints.restore(run.accelerator, checkpoint)
        run.accelerator.print(f"resumed from {checkpoint} at step {run.step}")
    return run


def batches(run: Run, sampler: type, collate: Callable, flip_p: float = 0.0):
    """Micro-batches from the run's current step on (one per ``next``): ``sampler`` (a
    :class:`~comfyui_syncd.training.data.StepBatches`) over the run's dataset, this process's share."""
    t = run.cfg.train
    keys = sampler(len(run.dataset), t.batch_size, t.seed, flip_p, start=run.step * t.gradient_accumulation_steps,
                   rank=run.accelerator.process_index, world=run.accelerator.num_processes)
    workers = run.cfg.data.num_workers
    return iter(torch.utils.data.DataLoader(run.dataset, batch_sampler=keys, num_workers=workers,
                                            collate_fn=collate, persistent_workers=workers > 0))


class LossLog:
    """``losses.jsonl``: one ``{"step": s, "loss": l}`` line per optimizer step (the loss ``train_step`` returns).
    A resumed run drops the lines after its checkpoint's step (they are redone)."""

    def __init__(self, path: pathlib.Path, start: int):
        self.path = path
        kept = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    pass
        path.write_text("".join(k + "\n" for k in kept))

    def write(self, step: int, loss: float) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")


def read_losses(run_dir) -> dict[int, float]:
    """{step: loss} of a run's ``losses.jsonl``."""
    lines = (pathlib.Path(run_dir) / LOSS_LOG).read_text().splitlines()
    return {int(r["step"]): float(r["loss"]) for r in map(json.loads, lines) if r}


def has_tensorboard() -> bool:
    """Whether accelerate's TensorBoard tracker can run (``tensorboard`` or ``tensorboardX`` installed)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def accelerator(t, tensorboard: bool = False):
    """The run's Accelerator from its train config ``t`` (mixed precision, accumulation, project folder); with
    ``tensorboard`` it logs to TensorBoard under ``output_dir/logs``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
                       log_with="tensorboard" if tensorboard else None, project_config=ProjectConfiguration(
                           project_dir=t.output_dir, logging_dir=str(pathlib.Path(t.output_dir) / "logs")))


def train_loop(run: Run, name: str, train_step: Callable, export: Callable, *, loader: Callable, header: str,
               final_message: Callable, step_exports: bool = False, on_step: Optional[Callable] = None,
               trackers: Optional[str] = None, progress: bool = True, validation=None,
               make_grid: Optional[Callable] = None) -> Run:
    """Steps up to ``max_steps`` with the loss log, checkpoints and exports; the final exports.

    ``name`` labels the progress bar (loss and step rate); ``header`` is printed (main process) before the first
    step. ``train_step(run, batches)`` does one optimizer step on micro-batches of ``loader(run)`` and returns its
    loss. At every checkpoint (``checkpoint_every`` and the last step) ``export(run, "_stepNNNNNN")`` writes that
    step's files when ``step_exports`` (not at the last step: the final export follows); then, when ``validation``
    (a :class:`~comfyui_syncd.training.validation.ValidationConfig`) says the step is due, the main process writes
    ``make_grid(run)`` to ``validation/step_NNNNNN.png`` (and TensorBoard) without touching the training's RNG
    streams or modes; ``on_step(run, last)`` then runs on every process after each step. At the end the main
    process prints ``final_message(export(run))``. ``trackers``: accelerate's tracker project, started when the
    accelerator was built with ``log_with``."""
    from tqdm.auto import tqdm

    from . import validation as validation_mod

    t, acc = run.cfg.train, run.accelerator
    if acc.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(config_mod.to_dict(run.cfg), indent=1))
    tracking = bool(trackers and acc.log_with)
    if tracking:
        acc.init_trackers(trackers, config={k: v for k, v in dataclasses.asdict(t).items()
                                            if isinstance(v, (int, float, str, bool))})
    log = LossLog(run.out / LOSS_LOG, run.step) if acc.is_main_process else None
    acc.print(header)
    bar = tqdm(total=t.max_steps, initial=run.step, desc=name, unit="step",
               disable=not (progress and acc.is_main_process), dynamic_ncols=True)
    tensorboard = None
    if tracking and acc.is_main_process and any(getattr(tr, "name", None) == "tensorboard" for tr in acc.trackers):
        tensorboard = acc.get_tracker("tensorboard")
    micro_batches = loader(run) if run.step < t.max_steps else None
    while run.step < t.max_steps:
        loss = train_step(run, micro_batches)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss} at step {run.step}")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if log is not None:
            log.write(run.step, loss)
        if tracking:
            acc.log({"loss": loss}, step=run.step)
        last = run.step == t.max_steps
        if run.step % t.checkpoint_every == 0 or last:
            checkpoints.save(acc, run.out, run.step, keep=t.keep_checkpoints)
            if acc.is_main_process and step_exports and not last:
                export(run, f"_step{run.step:06d}")
        if make_grid is not None and validation is not None and validation_mod.due(validation, run.step, last):
            bar.set_description(f"{name} (validation)")
            validation_mod.run_validation(run, validation, make_grid, tensorboard)
            bar.set_description(name)
        if on_step is not None:
            on_step(run, last)
        acc.wait_for_everyone()
    bar.close()
    if acc.is_main_process:
        acc.print(final_message(export(run)))
    acc.wait_for_everyone()
    if tracking:  # last: accelerate's end_training also destroys the process group (no barrier works after it)
        acc.end_training()
    return run


def script_main(argv, prog: str, description: str, config_help: str, config_cls: type, prepare: Callable,
                train: Callable, errors: tuple = ()) -> int:
    """The command line ``<prog> --config CONFIG [--resume CHECKPOINT | --no-resume] [--no-progress]``: 2 (with
    the message on stderr) for config errors, missing files and ``errors``, else trains and returns 0."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--resume", default="auto", metavar="CHECKPOINT",
                        help="checkpoint folder to resume from; default: the newest one in the output dir, if any")
    parser.add_argument("--no-resume", action="store_true", help="start from step 0 even if checkpoints exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config, config_cls)
        run = prepare(cfg, resume=None if args.no_resume else args.resume)
    except (config_mod.ConfigError, FileNotFoundError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train(run, progress=not args.no_progress)
    return 0


def step_seed(seed: int, micro: int, rank: int, world: int = 1) -> int:
    """The random draws of micro-batch ``micro`` of process ``rank``: seeded by its place in the global stream of
    micro-batches (``micro x world + rank``, the data's order too), so N processes x accumulation A draw what one
    process x accumulation N·A draws."""
    return (seed * 1_000_003 + (micro * world + rank) * 7_919) % (2 ** 62)


def accumulated_step(run: Run, batches, model_inputs, max_grad_norm: float = 0.0) -> float:
    """One optimizer step of ``gradient_accumulation_steps`` micro-batches, ``run.model(**model_inputs(run, batch,
    generator))`` each; returns the mean micro-batch loss over all processes (every process calls this)."""
    import torch

    t, acc = run.cfg.train, run.accelerator
    losses = []
    for k in range(t.gradient_accumulation_steps):
        micro = run.step * t.gradient_accumulation_steps + k
        gen = torch.Generator(device=acc.device).manual_seed(
            step_seed(t.seed, micro, acc.process_index, acc.num_processes))
        inputs = model_inputs(run, next(batches), gen)
        with acc.accumulate(run.model), acc.autocast():
            loss = run.model(**inputs)
            acc.backward(loss)
            if max_grad_norm > 0 and acc.sync_gradients:
                acc.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad()
        losses.append(loss.detach().float())
    run.step += 1
    local = torch.stack(losses).mean()
    if acc.num_processes > 1:  # the global batch's mean: what one process with the same global batch logs
        return acc.gather(local[None].to(acc.device)).mean().item()
    return local.item()

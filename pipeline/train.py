"""Training entry point: `python -m pipeline.train CONFIG [key.sub=value ...]`.

Runs unchanged as one process or under torchrun / accelerate launch / srun.
Accelerate's `prepare` is the one place where distribution is applied; the data
loaders are deliberately not prepared: every rank reads its own shards.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import sys
import time
import uuid
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast, set_seed
from safetensors import SafetensorError
from torch import nn

from pipeline.accumulation import (
    ends_group,
    group_size,
    optimizer_steps_per_epoch,
    starts_group,
)
from pipeline.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_model_weights,
    load_rank_state,
    load_training,
    read_state,
    save_checkpoint,
)
from pipeline.config import Config, ConfigError, TrainConfig, load_config, save_config
from pipeline.data.decode import BadDataError
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.data.shards import ShardSet, resolve_shards
from pipeline.distributed import check_joined, check_launch
from pipeline.ema import EMA
from pipeline.evaluate import (
    Predictions,
    calibrate_threshold,
    compute_metrics,
    gather_predictions,
    predict,
    summary_table,
    task_of,
    write_results,
)
from pipeline.log import (
    MetricsLogger,
    code_version,
    describe_shard_set,
    format_duration,
    memory_gib,
    next_eval_epoch,
    setup_logging,
    start_wandb,
    step_line,
    steps_left,
)
from pipeline.losses import HeadLoss, build_loss, check_contract, prior_logits
from pipeline.model import build_model, init_head_bias
from pipeline.nonfinite import NonFiniteGuard, NonFiniteLossError
from pipeline.plots import SAMPLE_IMAGES, eval_media, sample_images
from pipeline.runtime import compile_model, images_to, sync_batchnorm, to_channels_last
from pipeline.schedule import Monitor, apply_verdict, build_monitor, build_scheduler
from pipeline.signals import REQUEUE_EXIT_CODE, StopRequest, ignore_stop_signals

log = logging.getLogger(__name__)


@dataclass
class Data:
    train: ShardSet
    evals: dict[str, ShardSet]


@dataclass
class Trainer:
    """Everything one training run holds; built by `build_trainer`."""

    config: Config
    accelerator: Accelerator
    run_dir: Path
    model: nn.Module
    loss_fn: HeadLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: Any
    eval_loaders: dict[str, Any]
    data: Data
    metrics: MetricsLogger
    state: dict[str, Any] = field(default_factory=dict)
    ema: EMA | None = None
    monitor: Monitor = field(default_factory=lambda: Monitor(None))
    nonfinite: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard("stop", 1))
    # Objects saved in checkpoints beside model and optimizer: name -> object with
    # state_dict() / load_state_dict() of tensors and plain values
    stateful: dict[str, Any] = field(default_factory=dict)
    stop: StopRequest = field(default_factory=StopRequest)
    last_lr: float = 0.0  # the LR the latest optimizer step used


# What loading a damaged or foreign checkpoint raises (safetensors, torch.load, json)
CHECKPOINT_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError,
                     pickle.UnpicklingError, SafetensorError)


class Stopped(Exception):
    """A stop signal ended the run after a checkpoint; the job should be requeued."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(load_config(args.config, args.overrides))
    except ConfigError as err:
        # Every rank finds the same mistake; one message is enough.
        if int(os.environ.get("RANK", "0")) == 0:
            setup_logging()
            log.error("%s", err)
        return 2
    except Stopped:
        ignore_stop_signals()
        return REQUEUE_EXIT_CODE
    except BadDataError as err:
        # Only the rank that read the bad data knows; its message names shard and key
        log.error("%s", err)
        return 1
    except NonFiniteLossError as err:
        # Every rank stops at the same step (the decision is shared), with one message
        if int(os.environ.get("RANK", "0")) == 0:
            log.error("%s", err)
        return 1
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pipeline train")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="overrides, key.sub=value")
    return parser


def train(config: Config) -> dict[str, dict[str, Any]]:
    """Train, evaluating and checkpointing every epoch; return the last eval results.

    Raises Stopped after saving a checkpoint when a stop signal came.
    """
    setup_logging(int(os.environ.get("RANK", "0")))
    data = build_data(config)
    accelerator = build_accelerator(config.train)
    trainer = build_trainer(config, accelerator, data)
    trainer.stop.install()
    try:
        results = run_epochs(trainer)
        check_replicas_identical(trainer)
    finally:
        stopped = trainer.stop.signal_name is not None
        trainer.metrics.close(stopped=stopped)
        if not stopped:
            # A stopped run keeps its handlers to the end: a second signal while wandb
            # finishes must not end the process by the signal instead of exit code 75
            trainer.stop.uninstall()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def run_epochs(trainer: Trainer) -> dict[str, dict[str, Any]]:
    config, state = trainer.config, trainer.state
    results: dict[str, dict[str, Any]] = {}
    if state.get("eval_pending"):
        results = evaluate_sets(trainer)  # a stop signal came between an epoch and its eval
        state["eval_pending"] = False
    if state["epoch"] >= config.train.epochs:
        log.info("this run already trained its %d epochs; nothing to do (raise train.epochs "
                 "to train on, or choose a new run.name)", state["epoch"])
    for epoch in range(state["epoch"] + 1, config.train.epochs + 1):
        # Checked here, so a resumed run that had stopped does not train on
        if trainer.monitor.stop_reason:
            log.info("stopping after epoch %d: %s", epoch - 1, trainer.monitor.stop_reason)
            break
        if not train_epoch(trainer, epoch):
            stop_run(trainer, "mid-epoch")
        state["epoch"], state["step_in_epoch"] = epoch, 0
        due = epoch % config.train.eval_every_epochs == 0 or epoch == config.train.epochs
        if due and trainer.stop.agreed():
            state["eval_pending"] = True  # evaluate first thing after the restart
            stop_run(trainer, "before the evaluation of the epoch")
        if due:
            results = evaluate_sets(trainer)
        save(trainer, best=due and trainer.monitor.last_was_best)
        if trainer.stop.agreed():
            stop_run(trainer, "at the end of an epoch", saved=True)
    return results


def stop_run(trainer: Trainer, where: str, saved: bool = False) -> None:
    """Save (unless just saved) and raise Stopped: the launcher should requeue the job."""
    if not saved:
        save(trainer)
    log.warning("stopped by %s %s, %s: checkpoint saved; exiting with code %d so the "
                "job is requeued", trainer.stop.signal_name, where,
                describe_position(trainer.state, trainer.train_loader.steps_per_epoch),
                REQUEUE_EXIT_CODE)
    raise Stopped


def describe_position(state: dict[str, Any], steps_per_epoch: int) -> str:
    if state["step_in_epoch"]:
        done = f"epoch {state['epoch'] + 1} at step {state['step_in_epoch']} of {steps_per_epoch}"
    else:
        done = f"epoch {state['epoch']} done"
    return f"{done} (global step {state['global_step']})"


def trainer_checkpoint(trainer: Trainer, state: dict[str, Any],
                       rank_state: dict[str, Any]) -> Checkpoint:
    """The trainer's live objects, as a checkpoint saves or restores them."""
    acc = trainer.accelerator
    return Checkpoint(model=acc.unwrap_model(trainer.model), optimizer=trainer.optimizer,
                      scheduler=trainer.scheduler, scaler=acc.scaler,
                      stateful=trainer.stateful, state=state, rank_state=rank_state)


def save(trainer: Trainer, best: bool = False) -> Path:
    acc = trainer.accelerator
    ckpt = trainer_checkpoint(trainer, dict(trainer.state, world_size=acc.num_processes),
                              trainer.train_loader.position())
    config_text = (trainer.run_dir / "config.yaml").read_text()
    return save_checkpoint(acc, trainer.run_dir, ckpt, config_text,
                           trainer.config.train.keep_checkpoints, best=best)


def build_accelerator(config: TrainConfig) -> Accelerator:
    """Accelerate on GPUs when present, else gloo on the CPU; refuse a lonely rank."""
    cpu = not torch.cuda.is_available()
    if cpu and config.mixed_precision == "fp16":
        raise ConfigError(
            "train.mixed_precision=fp16 needs a GPU; on the CPU use train.mixed_precision=no"
        )
    check_launch()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=config.mixed_precision,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=30))],
    )
    check_joined(accelerator.num_processes, accelerator.process_index)
    return accelerator


def build_trainer(config: Config, accelerator: Accelerator, data: Data) -> Trainer:
    set_seed(config.run.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    log.info("world size %d, rank %d, device %s", world, rank, accelerator.device)
    train_loader = build_train_loader(
        config.data, data.train, rank=rank, world_size=world, seed=config.run.seed
    )
    eval_loaders = {
        name: build_eval_loader(config.data, shards, rank=rank, world_size=world,
                                batch_size=config.eval.batch_size)
        for name, shards in data.evals.items()
    }
    model, loss_fn = build_model_and_loss(config, data)
    loss_fn = loss_fn.to(accelerator.device)
    run_dir = prepare_run_dir(config, accelerator)

    model, optimizer, scheduler, ema = build_model_runtime(
        config, accelerator, model, train_loader.steps_per_epoch)
    monitor = build_monitor(config)
    nonfinite = NonFiniteGuard(config.train.on_nonfinite_loss,
                               config.train.max_consecutive_nonfinite)
    stateful = {"monitor": monitor, "nonfinite": nonfinite, **({"ema": ema} if ema else {})}
    trainer = Trainer(config, accelerator, run_dir, model, loss_fn, optimizer, scheduler,
                      train_loader, eval_loaders, data, MetricsLogger(None), ema=ema,
                      monitor=monitor, nonfinite=nonfinite, stateful=stateful)
    trainer.state = resume_if_possible(trainer)
    trainer.metrics = build_metrics_logger(config, accelerator, run_dir, trainer.state)
    return trainer


def build_model_runtime(config: Config, accelerator: Accelerator, model: nn.Module,
                        steps_per_epoch: int) -> tuple[nn.Module, Any, Any, EMA | None]:
    """The model as it trains (layout, SyncBatchNorm, compile, DDP), its EMA copy, the
    optimizer and the LR schedule, sized in optimizer steps."""
    # Order matters: the EMA copy keeps plain BatchNorm, DDP wraps the compiled module
    model = to_channels_last(model, config.train)
    ema = build_ema(config, model, accelerator.device)
    model = sync_batchnorm(model, config.model.sync_batchnorm, accelerator.num_processes,
                           on_gpu=accelerator.device.type == "cuda")
    steps = optimizer_steps_per_epoch(steps_per_epoch, config.train.grad_accum_steps)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, config.train.epochs * steps)
    model = compile_model(model, config.train)

    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler, ema


def build_ema(config: Config, model: nn.Module, device: torch.device) -> EMA | None:
    if config.train.ema_decay is None:
        return None
    log.info("EMA of the weights, decay %s; evaluated as <set>_ema", config.train.ema_decay)
    return EMA(model, config.train.ema_decay).to(device)


def build_model_and_loss(config: Config, data: Data) -> tuple[nn.Module, HeadLoss]:
    model = build_model(config.model)
    counts = data.train.manifest.get("class_counts", [])
    if config.model.init_bias_from_prior:
        init_head_bias(model, prior_logits(config, counts, data.train.num_samples))
    loss_fn = build_loss(config, data.train.label_format, counts, data.train.num_samples)
    preflight(config, data.train, model, loss_fn)
    return model, loss_fn


def build_data(config: Config) -> Data:
    """Resolve every shard set and check the head/loss contract before any heavy work."""
    if not config.data.train:
        raise ConfigError("data.train is not set; give the training shard folder")
    train_set = resolve_shards(config.data.train, key="data.train")
    evals = {
        name: resolve_shards(spec, key=f"data.eval.{name}")
        for name, spec in config.data.eval.items()
    }
    check_contract(config, train_set.num_classes, train_set.label_format)
    for name, shards in evals.items():
        if shards.class_names != train_set.class_names:
            raise ConfigError(
                f"data.eval.{name} has classes {shards.class_names} but data.train has "
                f"{train_set.class_names}; eval sets must use the training classes"
            )
    return Data(train=train_set, evals=evals)


def prepare_run_dir(config: Config, accelerator: Accelerator) -> Path:
    """Create the run folder, or check a resumed one was trained with this config."""
    run_dir = config.run_dir.resolve()
    check_resume_compatible(config, run_dir)
    log.info("run folder %s", run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return run_dir


def preflight(config: Config, shards: ShardSet, model: nn.Module, loss_fn: HeadLoss) -> None:
    """Run one small batch through model and loss, so a mismatch shows now, not in an hour."""
    probe = config.data.model_copy(update={"num_workers": 0, "batch_size": 2})
    loader = build_eval_loader(probe, shards, rank=0, world_size=1)
    batch = next(iter(loader))
    model.eval()
    try:
        with torch.no_grad():
            logits = model(loader.normalize(batch["image"]))
            loss_fn.to("cpu")(logits, batch["label"])
    except (ValueError, RuntimeError) as err:
        raise ConfigError(
            f"a first batch failed in model + loss: images {tuple(batch['image'].shape)}, "
            f"labels {tuple(batch['label'].shape)} {batch['label'].dtype}; {err}"
        ) from None
    finally:
        model.train()


# What a resumed run must share with the run that wrote its checkpoints.
RESUME_KEYS = ("model", "loss", "optim", "data.train", "data.image_size", "data.batch_size",
               "run.seed")


def resume_source(config: Config, run_dir: Path) -> Path | None:
    """The checkpoint to start from: the run folder's latest, else train.resume_from."""
    own = latest_checkpoint(run_dir)
    if own is not None or config.train.resume_from is None:
        return own
    path = config.train.resume_from.expanduser().resolve()
    if not (path / "model.safetensors").is_file() or not (path / "training.pt").is_file():
        raise ConfigError(
            f"train.resume_from={str(path)!r} is not a checkpoint folder (no "
            "model.safetensors and training.pt); give RUN/checkpoints/step-N"
        )
    return path


def check_resume_compatible(config: Config, run_dir: Path) -> None:
    checkpoint = resume_source(config, run_dir)
    if checkpoint is None:
        return
    saved_config = checkpoint / "config.yaml"
    if not saved_config.is_file():
        saved_config = run_dir / "config.yaml"
    if not saved_config.is_file():
        return
    saved = load_config(saved_config).model_dump(mode="json")
    wanted = config.model_dump(mode="json")
    changes = [f"{key}: {old!r} -> {new!r}" for key, old, new in _differences(saved, wanted)
               if key.startswith(RESUME_KEYS)]
    if changes:
        raise ConfigError(
            f"checkpoint {checkpoint} was trained with another config, so it cannot resume:\n  "
            + "\n  ".join(changes)
            + "\nchoose a new run.name, or remove the run folder to start again"
        )
    log.info("resuming from checkpoint %s", checkpoint)


def _differences(old: Any, new: Any, prefix: str = ""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip("."), old, new


def build_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and norm layers: decaying them only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=config.optim.lr, momentum=config.optim.momentum)
    return torch.optim.AdamW(groups, lr=config.optim.lr)


def resume_if_possible(trainer: Trainer) -> dict[str, Any]:
    """Continue from the run folder's latest checkpoint, mid-epoch where it was saved.

    A checkpoint that does not load (damaged, or holding more than tensors and
    plain values) is passed over for the one before it, on every rank alike.
    """
    fresh = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "wandb_run_id": None}
    first = resume_source(trainer.config, trainer.run_dir)
    if first is None:
        return fresh
    acc = trainer.accelerator
    for checkpoint in [first, *older_checkpoints(first, trainer.run_dir)]:
        loaded = load_attempt(trainer, checkpoint)
        ok = torch.tensor([float(loaded is not None)], device=acc.device)
        if acc.reduce(ok, "sum").item() == acc.num_processes:
            break
    else:
        raise ConfigError(
            f"no checkpoint of {first.parent} could be loaded (see the warnings above); "
            "remove the damaged ones, or the run folder to start again"
        )
    state, position = loaded
    state = fresh | state
    if checkpoint.parent.parent != trainer.run_dir:
        state["wandb_run_id"] = None  # another run's checkpoint: this is a new wandb run
    if state["step_in_epoch"] and not continue_epoch(trainer, state, position):
        restart_epoch(trainer, state)
    log.info("resumed from %s: %s", checkpoint,
             describe_position(state, trainer.train_loader.steps_per_epoch))
    return state


def load_attempt(trainer: Trainer, checkpoint: Path) -> tuple[dict, dict | None] | None:
    """(trainer state, this rank's data position), or None (warned) if it does not load."""
    acc = trainer.accelerator
    try:
        load_training(checkpoint, trainer_checkpoint(trainer, {}, {}))
        # The schedule's LR from its position, even if the run's length changed
        seek_scheduler(trainer.scheduler, trainer.scheduler.last_epoch)
        return read_state(checkpoint), load_rank_state(checkpoint, acc.process_index)
    except CHECKPOINT_ERRORS as err:
        log.warning("checkpoint %s cannot be loaded: %s", checkpoint, checkpoint_error(err))
        return None


def older_checkpoints(first: Path, run_dir: Path) -> list[Path]:
    """The run folder's complete checkpoints older than `first`, newest first."""
    if first.parent != run_dir / "checkpoints":
        return []  # train.resume_from: only that one
    done = [p for p in first.parent.glob("step-*") if not p.name.endswith(".partial")]
    return sorted((p for p in done if p.name < first.name), reverse=True)


def checkpoint_error(err: BaseException) -> str:
    if isinstance(err, pickle.UnpicklingError):
        # torch's own text suggests weights_only=False, which would run the file's code
        return ("a file holds objects other than tensors and plain values; refused "
                "unread (only checkpoints from a trusted source should ever be unpickled)")
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def continue_epoch(trainer: Trainer, state: dict[str, Any], position: dict | None) -> bool:
    """Put the loader where the checkpoint's epoch stopped; False if it cannot be."""
    saved_world = state.get("world_size")
    if position is None or saved_world != trainer.accelerator.num_processes:
        log.warning("the checkpoint was written by %s processes and this run has %d: the "
                    "interrupted epoch %d starts again from its beginning (exact mid-epoch "
                    "continuation needs the same world size)", saved_world,
                    trainer.accelerator.num_processes, state["epoch"] + 1)
        return False
    try:
        trainer.train_loader.resume(position)
    except ValueError as err:
        log.warning("the interrupted epoch starts again from its beginning: %s", err)
        return False
    return True


def restart_epoch(trainer: Trainer, state: dict[str, Any]) -> None:
    """Start the interrupted epoch over; the LR schedule goes back to its start."""
    state["step_in_epoch"] = 0
    steps = optimizer_steps_per_epoch(trainer.train_loader.steps_per_epoch,
                                      trainer.config.train.grad_accum_steps)
    seek_scheduler(trainer.scheduler, state["epoch"] * steps)


def seek_scheduler(scheduler: Any, step: int) -> None:
    """Put a schedule at optimizer step `step` (both schedules compute LRs from it)."""
    scheduler.last_epoch = step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_lr() outside step() warns; it is exact here
        lrs = scheduler.get_lr()
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def build_metrics_logger(config, accelerator, run_dir, state) -> MetricsLogger:
    """The job's one metrics file and wandb run, on the main process; all ranks leave together."""
    metrics = MetricsLogger(None)
    if accelerator.is_main_process:
        # Kept in trainer_state.json, so a resumed job continues the same wandb run
        state["wandb_run_id"] = state.get("wandb_run_id") or uuid.uuid4().hex[:8]
        info = run_info(config)
        log.info("code %s; data %s", json.dumps(info["code"]), json.dumps(info["data"]))
        run = start_wandb(config, run_dir, state["wandb_run_id"], info)
        metrics = MetricsLogger(run_dir / "metrics.jsonl", run)
    # wandb's start is bounded by wandb.init_timeout_s: the other ranks wait for it
    # here, well inside the process group's timeout, not at their first collective
    accelerator.wait_for_everyone()
    return metrics


def run_info(config: Config) -> dict[str, Any]:
    """Code version and data checksums, recorded with the run's config."""

    def describe(spec: str, key: str) -> dict[str, Any]:
        return describe_shard_set(resolve_shards(spec, key=key, must_exist=False))

    data = {"train": describe(config.data.train, "data.train"),
            "eval": {name: describe(spec, f"data.eval.{name}")
                     for name, spec in config.data.eval.items()}}
    return {"code": code_version(), "data": data}


def train_epoch(trainer: Trainer, epoch: int) -> bool:
    """One epoch of exactly `steps_per_epoch` steps on every rank, or the rest of it.

    Returns False when a stop signal ended the epoch early (at a step boundary,
    the same one on every rank).
    """
    cfg, acc = trainer.config, trainer.accelerator
    loader = trainer.train_loader
    if not (loader.epoch == epoch and 0 < loader.step < loader.steps_per_epoch):
        loader.set_epoch(epoch)  # else resume_if_possible put the loader mid-epoch
    every = cfg.train.checkpoint_every_steps
    trainer.model.train()
    window = Window()
    for batch in islice(loader, loader.steps_per_epoch - loader.step):
        step = loader.step  # this batch's number in the epoch, from 1
        window.data_ready()
        result = train_step(trainer, batch, step)
        trainer.state["global_step"] += int(result.stepped)
        trainer.state["step_in_epoch"] = step
        window.step_done(result.loss, len(batch["label"]))
        if step % cfg.run.log_every_steps == 0 or step == loader.steps_per_epoch:
            log_progress(trainer, window, epoch, step)
            # The next window starts where this one ended: logging's cost counts too
            window = Window(start=window.mark)
        if step == loader.steps_per_epoch:
            break  # the epoch's end is handled (and checkpointed) by the caller
        if not result.stepped:
            continue  # mid-accumulation: no checkpoint can hold half a group's gradients
        if trainer.stop.agreed():
            return False
        if every and trainer.state["global_step"] % every == 0:
            save(trainer)
    acc.wait_for_everyone()
    return True


@dataclass
class StepResult:
    """One micro-batch's outcome.

    `stepped`: its accumulation group ended here, with an optimizer step or with one
    skipped for a non-finite loss. Either way the gradients are cleared, the run's
    step counter advances, and the state is whole for a checkpoint.
    """

    loss: torch.Tensor
    stepped: bool


def train_step(trainer: Trainer, batch: dict[str, Any], micro_step: int) -> StepResult:
    """Forward and backward one micro-batch (`micro_step`: 1-based within the epoch);
    step at the end of its accumulation group (rule in pipeline/accumulation.py)."""
    steps, k = trainer.train_loader.steps_per_epoch, trainer.config.train.grad_accum_steps
    if starts_group(micro_step, steps, k):
        trainer.nonfinite.begin_group(trainer.model)
    last = ends_group(micro_step, steps, k)
    loss = forward_backward(trainer, batch, 1 / group_size(micro_step, steps, k), sync=last)
    trainer.nonfinite.observe(loss)
    if not last:
        return StepResult(loss, stepped=False)

    where = (f"optimizer step {trainer.state['global_step'] + 1} "
             f"(epoch {trainer.state['epoch'] + 1}, micro-batch {micro_step})")
    if not trainer.nonfinite.should_skip(trainer.accelerator, trainer.model, where):
        optimizer_step(trainer)
    trainer.last_lr = trainer.optimizer.param_groups[0]["lr"]  # the step's, for the log
    # A skipped step still advances the schedule: it stays aligned with the epochs
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, stepped=True)


def forward_backward(trainer: Trainer, batch: dict[str, Any], scale: float,
                     sync: bool) -> torch.Tensor:
    """The loss of one micro-batch (unscaled); its gradient, times `scale`, accumulates."""
    acc = trainer.accelerator
    pixels = images_to(batch["image"], acc.device, trainer.config.train.channels_last)
    images = trainer.train_loader.normalize(pixels)
    labels = batch["label"].to(acc.device, non_blocking=True)
    # DDP averages gradients over ranks only on a group's last micro-batch
    with nullcontext() if sync else acc.no_sync(trainer.model):
        loss = trainer.loss_fn(trainer.model(images), labels)
        acc.backward(loss * scale)
    return loss.detach()


def optimizer_step(trainer: Trainer) -> None:
    clip = trainer.config.train.grad_clip_norm
    if clip:
        trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), clip)
    trainer.optimizer.step()
    # fp16: the grad scaler skips steps whose gradients overflowed
    if trainer.ema is not None and not getattr(trainer.optimizer, "step_was_skipped", False):
        trainer.ema.update(trainer.accelerator.unwrap_model(trainer.model))


class Window:
    """Timings and loss over the steps between two log lines.

    `data_s` is the time spent waiting for batches; `elapsed_s` runs from `start`
    to the end of the last step.
    """

    def __init__(self, start: float | None = None) -> None:
        self.mark = time.perf_counter()
        self.start = self.mark if start is None else start
        self.data_s = 0.0
        self.steps = 0
        self.samples = 0
        self.loss_sum: torch.Tensor | float = 0.0

    @property
    def elapsed_s(self) -> float:
        return max(1e-9, self.mark - self.start)

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.data_s += now - self.mark
        self.mark = now

    def step_done(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum = self.loss_sum + loss
        self.steps += 1
        self.samples += samples
        self.mark = time.perf_counter()


def log_progress(trainer: Trainer, window: Window, epoch: int, step: int) -> None:
    """Reduce the window over ranks; print the step line, record metrics, watch the loader."""
    shared = reduce_window(trainer.accelerator, window, trainer.train_loader)
    values = progress_values(trainer, window, epoch, step, shared)
    log.info("%s", step_line(values))
    steps = trainer.train_loader.steps_per_epoch
    metrics = {
        "train/loss": values["loss"], "train/lr": values["lr"],
        "train/epoch": epoch - 1 + step / steps,
        "perf/images_per_s": values["images_per_s"],
        "perf/images_per_s_per_process": window.samples / window.elapsed_s,
        "perf/data_wait_pct": values["data_wait_pct"], "perf/step_s": values["step_s"],
        "perf/memory_gib": values["memory_gib"],
        "train/nonfinite_steps": trainer.nonfinite.skipped,
        **{COUNT_KEYS.get(name, f"data/{name}"): value for name, value in shared["counts"].items()},
    }
    trainer.metrics.log(metrics, step=trainer.state["global_step"])
    if trainer.accelerator.is_main_process:
        warning = trainer.metrics.data_wait.add(
            shared["data_wait"] * window.elapsed_s, window.elapsed_s, window.steps,
            trainer.config.data.num_workers, trainer.config.data.draft_decode)
        if warning:
            log.warning("%s", warning)


# The loader's bad-data counts (decode.Tally), summed over ranks since the job started
COUNT_KEYS = {"good": "data/good_samples", "bad": "data/bad_samples",
              "bad_shards": "data/bad_shards", "small": "data/small_images"}


def reduce_window(acc: Accelerator, window: Window, loader: Any) -> dict[str, Any]:
    """One collective: the mean loss and data-wait share over ranks, summed bad counts."""
    counter = getattr(loader, "bad_counts", None)  # loaders that count bad data offer it
    counts = counter() if callable(counter) else {}
    loss = torch.as_tensor(window.loss_sum, device=acc.device).double().reshape(1)
    local = torch.tensor([window.data_s / window.elapsed_s, *counts.values()],
                         dtype=torch.float64, device=acc.device)
    total = acc.reduce(torch.cat([loss / window.steps, local]), "sum").tolist()
    return {
        "loss": total[0] / acc.num_processes,
        "data_wait": total[1] / acc.num_processes,
        "counts": {name: int(value) for name, value in zip(counts, total[2:])},
    }


def progress_values(trainer: Trainer, window: Window, epoch: int, step: int,
                    shared: dict[str, Any]) -> dict[str, Any]:
    """The step line's fields; ETAs count training steps only, from this window's pace."""
    acc, cfg = trainer.accelerator, trainer.config
    steps = trainer.train_loader.steps_per_epoch
    step_s = window.elapsed_s / window.steps
    eval_epoch = next_eval_epoch(epoch, cfg.train.eval_every_epochs, cfg.train.epochs)
    to_eval = steps_left(epoch, step, steps, eval_epoch) * step_s
    return {
        "epoch": epoch, "epochs": cfg.train.epochs, "step": step, "steps": steps,
        "loss": shared["loss"], "lr": trainer.last_lr,
        "images_per_s": window.samples * acc.num_processes / window.elapsed_s,
        "step_s": step_s, "data_wait_pct": 100 * shared["data_wait"],
        "memory_gib": memory_gib(),
        "eval_eta": format_duration(to_eval) if trainer.eval_loaders else "-",
        "eta": format_duration(steps_left(epoch, step, steps, cfg.train.epochs) * step_s),
    }


def evaluate_sets(trainer: Trainer) -> dict[str, dict[str, Any]]:
    """Score every eval set exactly once over all ranks, with the EMA's weights too (as
    `<set>_ema`); log and record the metrics (main process), then update the monitor."""
    preds, lost = predict_sets(trainer, trainer.model)
    ema_preds = predict_sets(trainer, trainer.ema.module) if trainer.ema else None
    results: dict[str, dict[str, Any]] = {}
    # metrics are computed and reported once, on the main process
    if trainer.accelerator.is_main_process:
        results = score_sets(trainer.config, preds, lost, trainer.data.evals)
        if ema_preds is not None:
            ema = score_sets(trainer.config, *ema_preds, trainer.data.evals)
            results.update({f"{name}_ema": metrics for name, metrics in ema.items()})
        report_eval(trainer, results, preds)
    watch_monitor(trainer, results)
    return results


def report_eval(trainer: Trainer, results: dict[str, dict[str, Any]],
                preds: dict[str, Predictions]) -> None:
    if not results:
        return
    log.info("evaluation after epoch %d:\n%s", trainer.state["epoch"], summary_table(results))
    flat = {f"eval/{name}/{k}": v for name, m in results.items() for k, v in scalars(m)}
    trainer.metrics.log(flat, step=trainer.state["global_step"])
    write_results(results, trainer.run_dir / "eval_results")
    log_eval_charts(trainer, results, preds)


def watch_monitor(trainer: Trainer, results: dict[str, dict[str, Any]]) -> None:
    """Every rank's monitor takes the value the main process read, so all decide alike."""
    monitor, acc = trainer.monitor, trainer.accelerator
    if monitor.key is None:
        return
    name, _, metric = monitor.key.partition("/")
    value = results.get(name, {}).get(metric) if acc.is_main_process else None
    found = isinstance(value, (int, float))
    shared = torch.tensor([float(value) if found else 0.0, float(found)],
                          dtype=torch.float64, device=acc.device)
    value, found = broadcast(shared, from_process=0).tolist()
    if not found:
        known = sorted(k for k, v in results.get(name, {}).items()
                       if isinstance(v, (int, float)))
        raise ConfigError(f"train.monitor={monitor.key!r}: eval set {name!r} has no scalar "
                          f"metric {metric!r}; metrics: {known or 'see eval_results.json'}")
    verdict = monitor.update(value)
    log.info("%s = %.6g%s (best %s)", monitor.key, value,
             ", a new best" if verdict.new_best else "", monitor.best)
    apply_verdict(verdict, monitor, trainer.scheduler, trainer.config.optim.min_lr)


def predict_sets(trainer: Trainer, model: nn.Module
                 ) -> tuple[dict[str, Predictions], dict[str, int]]:
    return gather_sets(trainer.accelerator, model, trainer.config.loss.name,
                       trainer.eval_loaders, trainer.data.evals)


def gather_sets(accelerator, model, loss_name: str, loaders, shard_sets
                ) -> tuple[dict[str, Predictions], dict[str, int]]:
    """Every set's predictions gathered from all ranks, and the samples skipped as bad."""
    bare = accelerator.unwrap_model(model)
    sync_buffers(bare)
    preds, lost = {}, {}
    for name, loader in loaders.items():
        # Rank 0's bar shows its share; the ranks' shares differ by at most a shard
        label = f"eval {name}" if accelerator.is_main_process else None
        local = predict(bare, loader, loss_name, accelerator.device, progress=label)
        # Samples the skip policy dropped are counted, so exactly-once still holds
        bad = torch.tensor([loader.epoch_counts()["bad"]], device=accelerator.device)
        lost[name] = int(accelerator.reduce(bad, "sum").item())
        expected = shard_sets[name].num_samples - lost[name]
        preds[name] = gather_predictions(local, expected, name)
    return preds, lost


def score_sets(config: Config, preds: dict[str, Predictions], lost: dict[str, int],
               shard_sets: dict[str, ShardSet]) -> dict[str, dict[str, Any]]:
    """Metrics of every set, with the threshold calibrated on one of them."""
    threshold = _calibrated_threshold(config, preds)
    results = {}
    for name, pred in preds.items():
        results[name] = compute_metrics(pred, config.loss.name, shard_sets[name].class_names,
                                        config.eval.threshold, threshold)
        results[name]["bad_samples"] = lost[name]
    return results


def scalars(metrics: dict[str, Any]) -> list[tuple[str, float]]:
    """A set's numbers, per-class ones as `<metric>/<class>` (e.g. per_class_accuracy/face)."""
    found = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            found += [(f"{key}/{name}", v) for name, v in value.items()
                      if isinstance(v, (int, float))]
        elif isinstance(value, (int, float)):
            found.append((key, value))
    return found


def log_eval_charts(trainer: Trainer, results: dict[str, dict[str, Any]],
                    preds: dict[str, Predictions]) -> None:
    """wandb charts of this evaluation (main process); a failure costs the charts only."""
    if trainer.metrics.wandb_run is None:
        return
    cfg, names = trainer.config, trainer.data.train.class_names
    first = next(iter(preds))
    try:
        media = eval_media(results, preds, names, cfg.loss.name)
        batch = sample_batch(cfg, trainer.data.evals[first])
        media[f"eval/{first}/samples"] = sample_images(batch, preds[first], names, cfg.loss.name)
        trainer.metrics.log_media(media, step=trainer.state["global_step"])
    except Exception as err:  # charts are a view; training and the numbers go on
        log.warning("wandb charts of this evaluation skipped: %s", err)


def sample_batch(config: Config, shard_set: ShardSet) -> dict[str, Any]:
    """The first samples of an eval set, read again in this process (no worker start)."""
    probe = config.data.model_copy(update={"num_workers": 0})
    loader = build_eval_loader(probe, shard_set, rank=0, world_size=1,
                               batch_size=SAMPLE_IMAGES)
    return next(iter(loader))


def run_evaluation(accelerator, model, config, loaders, shard_sets) -> dict[str, dict]:
    """Predict every set, choose the calibrated threshold on one, then compute metrics."""
    preds, lost = gather_sets(accelerator, model, config.loss.name, loaders, shard_sets)
    if not accelerator.is_main_process:
        return {}  # metrics are computed and reported once, on the main process
    return score_sets(config, preds, lost, shard_sets)


def _calibrated_threshold(config: Config, preds: dict) -> float | None:
    if not preds or config.eval.calibrate == "none":
        return None
    if task_of(config.loss.name, config.model.num_classes) != "binary":
        return None  # a second threshold only means something for a binary head
    name = config.eval.calibration_set or next(iter(preds))
    if name not in preds:
        raise ConfigError(f"eval.calibration_set={name!r} is not an eval set; one of {list(preds)}")
    threshold = calibrate_threshold(preds[name], config.eval.calibrate, config.eval.target_fpr)
    if threshold is not None:
        log.info("calibrated threshold %.4f (%s on %r)", threshold, config.eval.calibrate, name)
    return threshold


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics.

    DDP syncs buffers at the start of each forward, so after the last training
    step every rank holds statistics of its own last batch; evaluating with them
    would make metrics depend on the number of processes.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def check_replicas_identical(trainer: Trainer) -> None:
    """Every rank must end with the same weights; a difference means a broken group."""
    acc = trainer.accelerator
    bare = acc.unwrap_model(trainer.model)
    sync_buffers(bare)
    tensors = [*bare.parameters(), *bare.buffers()]
    checksum = torch.stack([t.detach().double().sum() for t in tensors]).sum()
    sums = acc.gather(checksum.to(acc.device).reshape(1)).cpu()
    if not torch.allclose(sums, sums[0].expand_as(sums), rtol=0, atol=0):
        raise RuntimeError(f"ranks ended with different parameters: checksums {sums.tolist()}")
    log.info("parameters identical on all %d ranks (checksum %.6f)", len(sums),
             sums[0].item())


def evaluate_run(run_dir: Path, checkpoint: str | None, sets: dict[str, str] | None,
                 overrides: list[str] = ()) -> dict[str, dict[str, Any]]:
    """`pipeline eval`: load a run's config and checkpoint, evaluate the given sets."""
    config = load_config(run_dir / "config.yaml", list(overrides))
    accelerator = build_accelerator(config.train)
    setup_logging(accelerator.process_index)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if ckpt is None or not ckpt.is_dir():
        raise ConfigError(f"no checkpoint in {run_dir}; pass --checkpoint or train first")
    specs = sets or config.data.eval
    if not specs:
        raise ConfigError("no eval set: set data.eval in the config or pass --set NAME=SHARDS")
    shard_sets = {n: resolve_shards(s, key=f"data.eval.{n}") for n, s in specs.items()}
    model = build_model(config.model.model_copy(update={"weights": None}))
    load_model_weights(model, ckpt)
    model.to(accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    loaders = {n: build_eval_loader(config.data, s, rank=rank, world_size=world,
                                    batch_size=config.eval.batch_size)
               for n, s in shard_sets.items()}
    results = run_evaluation(accelerator, model, config, loaders, shard_sets)
    if accelerator.is_main_process:
        suffix = "-".join(["", *sets]) if sets else ""
        stem = run_dir / f"eval-{ckpt.name}{suffix}"
        write_results(results, stem)
        log.info("results:\n%s", summary_table(results))
        log.info("run folder  %s", run_dir)
        log.info("checkpoint  %s", ckpt)
        log.info("results     %s.json, %s.csv", stem, stem.name)
        for wandb_run in sorted((run_dir / "wandb").glob("*run-*")):
            log.info("wandb run   %s (upload: wandb sync %s)", wandb_run, wandb_run)
    return results


if __name__ == "__main__":
    sys.exit(main())

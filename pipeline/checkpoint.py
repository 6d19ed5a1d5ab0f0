"""Checkpoints: everything a run needs to continue, appearing complete or not at all.

Layout in the run folder:
  checkpoints/step-00000130/        one checkpoint, named by the global step
    model.safetensors               weights (no pickle at all)
    training.pt                     optimizer, scheduler, grad scaler, other state
    rank-00000.pt ...               per rank: RNG states and the loader's data position
    trainer_state.json              epoch, step in epoch, global step, world size, wandb id
    config.yaml                     the resolved config of the run that wrote it
  checkpoints/latest                the name of the newest complete checkpoint
  checkpoints/best                  the name of the best one by train.monitor (if any)

A checkpoint is written to `<name>.partial` and renamed once every rank has
written its part, so a crash mid-write leaves the previous one as `latest`.
Every `.pt` file holds only tensors and plain values and is read with
`torch.load(weights_only=True)`: loading a checkpoint never runs its code.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.pt"


@dataclass
class Checkpoint:
    """What `save_checkpoint` writes; every field is the caller's live object."""

    model: nn.Module  # unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any  # torch.amp.GradScaler or None
    stateful: dict[str, Any]  # name -> object with state_dict / load_state_dict
    state: dict[str, Any]  # trainer_state.json: plain JSON values
    rank_state: dict[str, Any]  # this rank's data position (plain values)


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:08d}"


def save_checkpoint(accelerator: Any, run_dir: Path, ckpt: Checkpoint, config_text: str,
                    keep: int = 2, best: bool = False) -> Path:
    """Every rank writes its part into `.partial`; rank 0 publishes it by renaming."""
    folder = run_dir / "checkpoints"
    final = folder / checkpoint_name(ckpt.state["global_step"])
    partial = folder / f"{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()

    rank = accelerator.process_index
    _save_torch({"rng": rng_state(), "data": ckpt.rank_state}, partial / rank_file(rank))
    if accelerator.is_main_process:
        _save_main_parts(ckpt, partial, config_text)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        publish(folder, partial, final, best)
        log.info("checkpoint saved to %s%s", final, " (best so far)" if best else "")
        prune_checkpoints(folder, keep)
    accelerator.wait_for_everyone()
    return final


def _save_main_parts(ckpt: Checkpoint, partial: Path, config_text: str) -> None:
    # safetensors wants contiguous tensors; channels_last weights are not
    weights = {k: v.detach().contiguous() for k, v in ckpt.model.state_dict().items()}
    save_file(weights, str(partial / MODEL_FILE))
    training = {
        "optimizer": ckpt.optimizer.state_dict(),
        "scheduler": ckpt.scheduler.state_dict(),
        "scaler": ckpt.scaler.state_dict() if ckpt.scaler is not None else None,
        "stateful": {name: obj.state_dict() for name, obj in ckpt.stateful.items()},
    }
    _save_torch(training, partial / TRAINING_FILE)
    (partial / "config.yaml").write_text(config_text)
    (partial / STATE_FILE).write_text(json.dumps(ckpt.state, indent=1))


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def publish(folder: Path, partial: Path, final: Path, best: bool) -> None:
    """Make `partial` the newest checkpoint: rename it, then move the pointers."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    _write_pointer(folder, "latest", final.name)
    if best:
        _write_pointer(folder, "best", final.name)


def _write_pointer(folder: Path, pointer: str, name: str) -> None:
    tmp = folder / f"{pointer}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, folder / pointer)


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints and the best one."""
    done = sorted(p for p in folder.glob("step-*") if not p.name.endswith(".partial"))
    protected = {read_pointer(folder, "latest"), read_pointer(folder, "best")}
    for old in done[:-keep] if keep > 0 else done:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)
    # Only rank 0 publishes, one checkpoint at a time: any .partial now is a crash's
    for stale in folder.glob("*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def read_pointer(folder: Path, pointer: str) -> str | None:
    path = folder / pointer
    return path.read_text().strip() if path.is_file() else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    name = read_pointer(run_dir / "checkpoints", "latest")
    path = run_dir / "checkpoints" / name if name else None
    return path if path is not None and path.is_dir() else None


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def load_training(checkpoint: Path, ckpt: Checkpoint) -> None:
    """Restore weights, optimizer, scheduler, scaler and the other stateful objects."""
    load_model_weights(ckpt.model, checkpoint)
    training = torch.load(checkpoint / TRAINING_FILE, weights_only=True, map_location="cpu")
    ckpt.optimizer.load_state_dict(training["optimizer"])
    ckpt.scheduler.load_state_dict(training["scheduler"])
    if ckpt.scaler is not None and training["scaler"] is not None:
        ckpt.scaler.load_state_dict(training["scaler"])
    for name, obj in ckpt.stateful.items():
        if name in training["stateful"]:
            obj.load_state_dict(training["stateful"][name])
        else:
            log.warning("checkpoint %s has no state for %r; it starts afresh", checkpoint, name)


def load_rank_state(checkpoint: Path, rank: int) -> dict[str, Any] | None:
    """Restore this rank's RNG states; return its data position (None if absent)."""
    path = checkpoint / rank_file(rank)
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=True, map_location="cpu")
    set_rng_state(saved["rng"])
    return saved["data"]


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch generator states, as tensors and plain values."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load only the weights of a checkpoint (safetensors: nothing is unpickled)."""
    files = sorted(checkpoint.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in checkpoint {checkpoint}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    model.load_state_dict(state)

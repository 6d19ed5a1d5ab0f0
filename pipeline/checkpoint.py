"""Checkpoints: Accelerate state per epoch, written so it appears complete or not at all.

Layout in the run folder:
  checkpoints/epoch-0003/      Accelerate state (model.safetensors, optimizer, RNG, ...)
  checkpoints/epoch-0003/trainer_state.json   epoch, global step, wandb run id
  checkpoints/latest           the name of the newest complete checkpoint
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


def save_checkpoint(accelerator: Any, run_dir: Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Save on every rank (each keeps its RNG state); rank 0 publishes it by renaming."""
    folder = run_dir / "checkpoints"
    final = folder / f"epoch-{state['epoch']:04d}"
    partial = folder / f"{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _write_pointer(folder, final.name)
        log.info("checkpoint saved to %s", final)
        prune_checkpoints(folder, keep)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (names sort by epoch)."""
    done = sorted(p for p in folder.glob("epoch-*") if not p.name.endswith(".partial"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _write_pointer(folder: Path, name: str) -> None:
    tmp = folder / "latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, folder / "latest")


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_model_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load only the weights of a checkpoint (safetensors: nothing is unpickled)."""
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in checkpoint {checkpoint}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    model.load_state_dict(state)

"""Logging: rank-aware console logs, a JSON-lines metrics file, and wandb.

Only the main process talks by default; other ranks log warnings and errors,
prefixed with their rank. Metrics go to `metrics.jsonl` in the run folder always,
and to wandb when it is on, so runs compare with or without wandb.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def setup_logging(rank: int = 0, all_ranks: bool = False) -> None:
    """Configure the root logger once per process."""
    level = logging.INFO if rank == 0 or all_ranks else logging.WARNING
    prefix = f"[rank {rank}] " if rank else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
    )
    handler._pipeline = True  # replaced on the next call; other handlers are left alone
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_pipeline", False)]
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("accelerate", "wandb", "urllib3", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def step_line(values: dict[str, Any]) -> str:
    """The fixed-format progress line; every field always present, with units."""
    return (
        "epoch {epoch}/{epochs} step {step}/{steps} | loss {loss:.4f} | lr {lr:.2e} | "
        "{images_per_s:.1f} img/s | data {data_wait_pct:.0f}% | mem {memory_gib:.2f} GiB | "
        "eta {eta}".format(**values)
    )


def memory_gib() -> float:
    """GPU memory allocated when CUDA is in use, else this process's resident memory."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/statm") as stream:
            pages = int(stream.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return 0.0


class MetricsLogger:
    """Writes scalars to `metrics.jsonl` and, when given a run, to wandb (main process only)."""

    def __init__(self, path: Path | None, wandb_run: Any = None) -> None:
        self.path = path
        self.wandb_run = wandb_run
        self._stream = path.open("a") if path is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._stream is not None:
            record = {"step": step, "time": round(time.time(), 3), **metrics}
            self._stream.write(json.dumps(record) + "\n")
            self._stream.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def resolve_wandb_mode(mode: str) -> str:
    """Decide online/offline/disabled before init, so wandb never prompts for a login."""
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def start_wandb(config: Any, run_dir: Path, run_id: str | None = None) -> Any:
    """Start the job's single wandb run (call on the main process only); None when disabled."""
    mode = resolve_wandb_mode(config.wandb.mode)
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        log.warning("wandb.mode=online but WANDB_API_KEY is unset; logging offline instead")
        mode = "offline"
    if mode == "disabled":
        return None
    _keep_wandb_files_in(run_dir)

    import wandb

    run = wandb.init(
        project=config.wandb.project,
        entity=config.wandb.entity,
        group=config.wandb.group,
        tags=config.wandb.tags or None,
        name=config.run.name,
        id=run_id,
        resume="allow" if run_id else None,
        dir=str(run_dir),
        mode=mode,
        config=config.model_dump(mode="json"),
        settings=wandb.Settings(console="off", silent=True),
    )
    log.info("wandb %s run %s in %s", mode, run.id, run.dir)
    return run


def _keep_wandb_files_in(run_dir: Path) -> None:
    # wandb writes caches and settings under the home folder unless told otherwise;
    # keep them with the run, and never let an error exit wait on a report upload.
    base = run_dir / "wandb"
    base.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_CACHE_DIR", str(base / "cache"))
    os.environ.setdefault("WANDB_CONFIG_DIR", str(base / "config"))
    os.environ.setdefault("WANDB_DATA_DIR", str(base / "data"))
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")

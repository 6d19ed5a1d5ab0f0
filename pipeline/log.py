"""Logging: rank-aware console logs, a JSON-lines metrics file, and wandb.

Only the main process talks by default; other ranks log warnings and errors,
prefixed with their rank. Metrics go to `metrics.jsonl` in the run folder always,
and to wandb when it is on, so runs compare with or without wandb.

wandb never prompts and never holds training: the mode is decided before init,
init is bounded by wandb.init_timeout_s, and a failed online start falls back
to an offline run (one warning) that `wandb sync` uploads later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The loader is called the bottleneck when training waits for data this share
# of the time, judged over at least this many steps, at most once per interval.
DATA_WAIT_WARN_PCT = 20.0
DATA_WAIT_MIN_STEPS = 20
DATA_WAIT_WARN_EVERY_S = 600.0


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


# ---- the progress line


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def step_line(values: dict[str, Any]) -> str:
    """The fixed-format progress line; every field always present, with units.

    `eval_eta` and `eta` are durations as text: to the end of the next
    evaluation's epoch and to the end of the run (training steps only).
    """
    return (
        "epoch {epoch}/{epochs} step {step}/{steps} | loss {loss:.4f} | lr {lr:.2e} | "
        "{images_per_s:.1f} img/s | {step_s:.3f} s/step | data {data_wait_pct:.0f}% | "
        "mem {memory_gib:.2f} GiB | eval in {eval_eta} | eta {eta}".format(**values)
    )


def steps_left(epoch: int, step: int, steps_per_epoch: int, until_epoch: int) -> int:
    """Steps from `step` of `epoch` to the end of epoch `until_epoch` (both 1-based)."""
    return max(0, (until_epoch - epoch) * steps_per_epoch + steps_per_epoch - step)


def next_eval_epoch(epoch: int, every_epochs: int, epochs: int) -> int:
    """The first epoch >= `epoch` that ends with an evaluation (the last one always does)."""
    return min(epochs, -(-epoch // every_epochs) * every_epochs)


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


class DataWaitWatch:
    """Says when the loader holds training back: a message at most once per `every_s`.

    Windows are pooled until `min_steps` steps are seen, then judged and reset, so
    one slow batch (workers starting at an epoch) does not trigger a warning alone.
    """

    def __init__(self, threshold_pct: float = DATA_WAIT_WARN_PCT,
                 min_steps: int = DATA_WAIT_MIN_STEPS, every_s: float = DATA_WAIT_WARN_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold_pct, self.min_steps, self.every_s = threshold_pct, min_steps, every_s
        self.clock = clock
        self.quiet_until = float("-inf")
        self.wait_s = self.total_s = 0.0
        self.steps = 0

    def add(self, wait_s: float, total_s: float, steps: int, num_workers: int,
            draft_decode: bool = True) -> str | None:
        """Pool one window; return a warning text when the pooled share is too high."""
        self.wait_s += wait_s
        self.total_s += total_s
        self.steps += steps
        if self.steps < self.min_steps or self.total_s <= 0:
            return None
        wait, total, pooled = self.wait_s, self.total_s, self.steps
        self.wait_s = self.total_s = 0.0
        self.steps = 0
        pct, now = 100 * wait / total, self.clock()
        if pct < self.threshold_pct or now < self.quiet_until:
            return None
        self.quiet_until = now + self.every_s
        return bottleneck_message(pct, wait, total, pooled, num_workers, self.threshold_pct,
                                  draft_decode)


def bottleneck_message(pct: float, wait_s: float, total_s: float, steps: int,
                       num_workers: int, threshold_pct: float = DATA_WAIT_WARN_PCT,
                       draft_decode: bool = True) -> str:
    draft = "" if draft_decode else "; reduced-size JPEG decoding (data.draft_decode=true)"
    return (
        f"the data loader is the bottleneck: training waited for data {pct:.0f}% of the time "
        f"over the last {steps} steps ({wait_s:.1f} of {total_s:.1f} s; warning above "
        f"{threshold_pct:.0f}%). Remedies: more loader workers (data.num_workers, now "
        f"{num_workers}); smaller stored images (resize them near data.image_size before "
        f"sharding){draft}. On a CPU run the workers share the cores with training"
    )


# ---- metrics.jsonl and wandb


class MetricsLogger:
    """Writes scalars to `metrics.jsonl` and, when given a run, to wandb (main process only).

    A wandb error during the run is logged once and ends wandb logging; the
    JSON-lines file goes on, so training never stops for its logger.
    """

    def __init__(self, path: Path | None, wandb_run: Any = None) -> None:
        self.path = path
        self.wandb_run = wandb_run
        self.data_wait = DataWaitWatch()
        self._stream = path.open("a") if path is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._stream is not None:
            record = {"step": step, "time": round(time.time(), 3), **metrics}
            self._stream.write(json.dumps(record) + "\n")
            self._stream.flush()
        self._to_wandb(metrics, step)

    def log_media(self, media: dict[str, Any], step: int) -> None:
        """Plots, tables and images: wandb only (the JSON-lines file holds scalars)."""
        self._to_wandb(media, step)

    def _to_wandb(self, items: dict[str, Any], step: int) -> None:
        if self.wandb_run is None or not items:
            return
        try:
            self.wandb_run.log(items, step=step)
        except Exception as err:  # any wandb failure: keep training, keep metrics.jsonl
            log.warning("wandb stopped logging (%s); metrics.jsonl goes on", err)
            self.wandb_run = None

    def close(self, stopped: bool = False) -> None:
        """`stopped`: the run was stopped by a signal to be requeued (not failed)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self.wandb_run is not None:
            # Called from the trainer's `finally`: an exception in flight marks the run
            # failed, unless it is the stop before a requeue
            failed = sys.exc_info()[0] not in (None, SystemExit) and not stopped
            run, self.wandb_run = self.wandb_run, None
            try:
                run.finish(exit_code=1 if failed else 0)
            except Exception as err:  # e.g. its service died of the job's SIGTERM
                log.warning("wandb did not finish cleanly (%s); metrics.jsonl has every "
                            "value; an offline run can still be synced", err)


# The values wandb itself accepts in WANDB_MODE
WANDB_ENV_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")


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


def start_wandb(config: Any, run_dir: Path, run_id: str | None = None,
                info: dict[str, Any] | None = None) -> Any:
    """Start the job's single wandb run (main process only); None when disabled.

    `info` (code version, data checksums) is logged beside the resolved config.
    Online start-up is bounded by wandb.init_timeout_s; on failure the run starts
    offline with the same id, with one warning.
    """
    _drop_invalid_env_mode(config.wandb.mode)
    mode = resolve_wandb_mode(config.wandb.mode)
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        log.warning("wandb.mode=online but WANDB_API_KEY is unset; logging offline instead")
        mode = "offline"
    if mode == "disabled":
        return None
    _keep_wandb_files_in(run_dir)
    run_config = {**config.model_dump(mode="json"), "run_info": info or {}}
    if mode == "online":
        try:
            return _init_wandb(config, run_dir, run_id, "online", run_config)
        except Exception as err:  # wandb raises its own errors, timeouts and OS errors
            log.warning("wandb could not start online within %.0f s (%s); logging offline",
                        config.wandb.init_timeout_s, str(err).splitlines()[0])
            _forget_failed_init()
    try:
        return _init_wandb(config, run_dir, run_id, "offline", run_config)
    except Exception as err:  # a local failure (disk, permissions) must not stop training
        log.warning("wandb could not start offline either (%s); metrics.jsonl only", err)
        return None


def _drop_invalid_env_mode(config_mode: str) -> None:
    # wandb validates WANDB_MODE itself and refuses to start on a bad value, even
    # when init is given a mode: a typo in the environment must not cost the run
    value = os.environ.get("WANDB_MODE")
    if value is None or value.strip().lower() in WANDB_ENV_MODES:
        return
    log.warning("WANDB_MODE=%r is not a wandb mode (one of %s); ignoring it, wandb.mode=%s "
                "decides", value, ", ".join(WANDB_ENV_MODES), config_mode)
    del os.environ["WANDB_MODE"]


def _init_wandb(config: Any, run_dir: Path, run_id: str | None, mode: str,
                run_config: dict[str, Any]) -> Any:
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
        config=run_config,
        settings=wandb.Settings(
            console="off", silent=True, init_timeout=config.wandb.init_timeout_s
        ),
    )
    log.info("wandb %s run %s in %s", mode, run.id, Path(run.dir).parent)
    if mode == "offline":
        log.info("upload it later with: wandb sync %s", Path(run.dir).parent)
    return run


def _forget_failed_init() -> None:
    # The failed run still holds its id in wandb's service; a fresh service lets
    # the offline run reuse the id (so a later online resume continues it).
    import wandb

    try:
        wandb.teardown()
    except Exception as err:  # teardown of a broken service may fail too; go on
        log.debug("wandb teardown after a failed init: %s", err)


def _keep_wandb_files_in(run_dir: Path) -> None:
    # wandb writes caches and settings under the home folder unless told otherwise;
    # keep them with the run, never print a login banner, and never let an error
    # exit wait on a report upload.
    base = run_dir / "wandb"
    base.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_CACHE_DIR", str(base / "cache"))
    os.environ.setdefault("WANDB_CONFIG_DIR", str(base / "config"))
    os.environ.setdefault("WANDB_DATA_DIR", str(base / "data"))
    os.environ.setdefault("WANDB_ARTIFACT_DIR", str(base / "artifacts"))
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    os.environ.setdefault("WANDB_SILENT", "true")


# ---- what a run was made from


def code_version() -> dict[str, Any]:
    """The package version, and the git commit when the source is a git checkout."""
    try:
        version = metadata.version("pipeline")
    except metadata.PackageNotFoundError:
        version = "unknown"
    info: dict[str, Any] = {"package": version}
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        info["git"] = _git(root, "describe", "--always", "--tags")
        changes = _git(root, "status", "--porcelain", "--untracked-files=no")
        info["git_modified"] = bool(changes) if changes is not None else None
    return info


def _git(root: Path, *args: str) -> str | None:
    # GIT_OPTIONAL_LOCKS=0: never touch the index, others may be using the checkout
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                              text=True, timeout=10, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def describe_shard_set(shard_set: Any) -> dict[str, Any]:
    """Size and checksums of a shard set: the manifest's sha256 and that of the shards read.

    manifest_sha256 is that of the `manifest.json` file (of its canonical JSON for
    remote sets); shards_sha256 covers the name and listed sha256 of each shard
    selected, so a pattern that picks a subset gets its own digest.
    """
    manifest_file = Path(str(shard_set.root)) / "manifest.json"
    if manifest_file.is_file():
        manifest_bytes = manifest_file.read_bytes()
    else:
        manifest_bytes = json.dumps(shard_set.manifest, sort_keys=True).encode()
    shards = hashlib.sha256()
    for shard in shard_set.shards:
        shards.update(f"{Path(shard.url).name} {shard.sha256}\n".encode())
    return {
        "num_shards": len(shard_set.shards),
        "num_samples": shard_set.num_samples,
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "shards_sha256": shards.hexdigest(),
    }

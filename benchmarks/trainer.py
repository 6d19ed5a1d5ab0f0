"""Trainer overhead: the full training loop against a bare one, and loading hidden by compute.

    .venv/bin/python benchmarks/trainer.py [--rounds R] [--arch A] [--image-size S]
                                           [--batch B] [--workers W] [--step-ms MS]
                                           [--shards N] [--workdir DIR]

P3       images/s of `train_epoch` (real loader over shards, Accelerate, optimizer,
         scheduler, metrics.jsonl, an offline wandb run, the step line) / images/s of
         a bare forward/backward/step on synthetic tensors: same model, batch, image
         size and threads, same process. The two are paired step by step (a bare step
         runs, timed, right after each trainer step, and is taken out of the loop's
         time), because other jobs change this machine's speed within seconds. Timed
         from each epoch's first batch; the epoch row includes starting the loader's
         workers. CPU: CPU seconds per image (this process, loader workers, wandb).
overlap  the loop with the model step replaced by a sleep emulating an accelerator
         step: it should reach min(loader rate, emulated rate), i.e. loading runs
         while the step runs. Rows: a --step-ms sleep, and a sleep 3x shorter than
         the loader's batch time (the loader is then the limit). The emulated rate
         is that of the same sleeps alone, measured: a busy machine wakes late.

Data: scikit-learn's bundled digits (8x8, resized up), written as shards; the first
--shards of them (200 samples each) make an epoch. Nothing is downloaded.
The table goes to stdout, the trainer's own log to stderr. Medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # the shard writer's progress bars

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

import pipeline.train as trainer_module  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.writer import add_shard_arguments, run_shard  # noqa: E402
from pipeline.log import setup_logging  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.train import Trainer, build_accelerator, build_data, build_trainer  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per side")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="loader workers")
    parser.add_argument("--shards", type=int, default=1, help="training shards of 200 (1-8)")
    parser.add_argument("--step-ms", type=float, default=50.0, help="emulated step")
    parser.add_argument("--workdir", type=Path, help="keep shards and run here")
    return parser.parse_args()


# ---- setup


def write_digits(folder: Path, shards: int) -> str:
    """scikit-learn's 1,797 digits as shards of 200 (80% in train); the first `shards`
    training shards as a pattern: an epoch short enough for a slow CPU."""
    parser = argparse.ArgumentParser()
    add_shard_arguments(parser)
    run_shard(parser.parse_args(["embedded:digits", "--out", str(folder),
                                 "--val-fraction", "0.2", "--maxcount", "200"]))
    first = json.loads((folder / "train" / "manifest.json").read_text())["shards"][0]["file"]
    prefix = first.removesuffix(".tar")[:-6]
    return f"{folder / 'train'}/{prefix}{{000000..{shards - 1:06d}}}.tar"


def build_config(args: argparse.Namespace, train: str, out: Path) -> Config:
    return load_config(None, [
        f"data.train={train}", f"run.output_dir={out}", "run.name=bench",
        "run.log_every_steps=10", f"model.arch={args.arch}", "model.num_classes=10",
        "loss.name=cross_entropy", f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
        f"train.epochs={4 * args.rounds + 2}", "wandb.mode=offline",
        "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]",
    ])


class FirstBatchClock:
    """The trainer's loader, noting when each epoch's first batch arrives."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.first_batch_at = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, batch in enumerate(self.loader):
            if index == 0:
                self.first_batch_at = time.perf_counter()
            yield batch


# ---- the two sides of P3


def cpu_seconds() -> np.ndarray:
    """CPU seconds of this process, of its finished children (loader workers, joined at
    the end of each epoch) and of its running ones (wandb's service)."""
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    running = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            running += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return np.array([time.process_time(), done.ru_utime + done.ru_stime, running])


def time_full_epoch(trainer: Trainer, epoch: int) -> tuple[float, float, np.ndarray]:
    """Seconds of `train_epoch`: the epoch, from its first batch, and CPU seconds."""
    cpu, began = cpu_seconds(), time.perf_counter()
    trainer_module.train_epoch(trainer, epoch)
    ended = time.perf_counter()
    trainer.state["epoch"] = epoch
    return ended - began, ended - trainer.train_loader.first_batch_at, cpu_seconds() - cpu


class BareLoop:
    """Forward, backward and step on one synthetic batch: the compute alone."""

    def __init__(self, config: Config) -> None:
        torch.manual_seed(0)
        self.model = build_model(config.model).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.optim.lr)
        size, batch = config.data.image_size, config.data.batch_size
        self.images = torch.randn(batch, 3, size, size)
        self.labels = torch.randint(0, config.model.num_classes, (batch,))
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def step(self) -> tuple[float, float]:
        """(seconds, CPU seconds of this process) of one step."""
        cpu, began = time.process_time(), time.perf_counter()
        loss = self.loss_fn(self.model(self.images), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began, time.process_time() - cpu


class PairedStep:
    """Stands in for train.train_step: the real step, then one bare step, timed.

    Other jobs change this machine's speed within seconds; timing a bare step
    right after each trainer step cancels that drift, which whole-epoch
    alternation did not (ratios of 0.58 to 1.18 between runs).
    """

    def __init__(self, bare: BareLoop) -> None:
        self.bare, self.real = bare, trainer_module.train_step
        self.seconds = self.cpu = 0.0

    def __call__(self, trainer: Trainer, batch: dict[str, Any],
                 micro_step: int) -> trainer_module.StepResult:
        result = self.real(trainer, batch, micro_step)
        seconds, cpu = self.bare.step()
        self.seconds, self.cpu = self.seconds + seconds, self.cpu + cpu
        return result


def paired_epoch(trainer: Trainer, paired: PairedStep, epoch: int) -> dict[str, Any]:
    """One epoch of the full loop with paired bare steps; each side's share apart."""
    paired.seconds = paired.cpu = 0.0
    epoch_s, steady_s, cpu = time_full_epoch(trainer, epoch)
    return {"full": steady_s - paired.seconds, "epoch": epoch_s - paired.seconds,
            "bare": paired.seconds, "bare_cpu": np.array([paired.cpu, 0.0, 0.0]),
            "full_cpu": cpu - np.array([paired.cpu, 0.0, 0.0])}


def measure_p3(trainer: Trainer, bare: BareLoop, rounds: int) -> dict[str, Any]:
    """Per round (an epoch), bare time / full-loop time; medians and the range."""
    steps = trainer.train_loader.steps_per_epoch
    images = steps * trainer.config.data.batch_size
    time_full_epoch(trainer, 1)  # warm-up: first allocations, first worker start
    paired = PairedStep(bare)
    trainer_module.train_step = paired  # train_epoch looks it up at each call
    try:
        runs = [paired_epoch(trainer, paired, epoch) for epoch in range(2, rounds + 2)]
    finally:
        trainer_module.train_step = paired.real
    ratios = [r["bare"] / r["full"] for r in runs]
    return {
        "steps": steps, "bare": images / statistics.median(r["bare"] for r in runs),
        "steady": images / statistics.median(r["full"] for r in runs),
        "epoch": images / statistics.median(r["epoch"] for r in runs),
        "p3": statistics.median(ratios), "p3_range": (min(ratios), max(ratios)),
        "p3_epoch": statistics.median(r["bare"] / r["epoch"] for r in runs),
        "bare_cpu": np.median([r["bare_cpu"] for r in runs], axis=0) / images,
        "full_cpu": np.median([r["full_cpu"] for r in runs], axis=0) / images,
    }


# ---- overlap


def loader_rate(trainer: Trainer, epoch: int) -> float:
    """Images/s of the training loader alone (workers started, then timed)."""
    loader = trainer.train_loader
    loader.set_epoch(epoch)
    batches = iter(islice(loader, loader.steps_per_epoch))
    next(batches)
    began, count = time.perf_counter(), 0
    for batch in batches:
        count += len(batch["label"])
    return count / (time.perf_counter() - began)


def emulated_rate(trainer: Trainer, epoch: int, step_s: float) -> float:
    """Images/s of `train_epoch` with each model step replaced by a `step_s` sleep."""
    real_step = trainer_module.train_step

    def sleeping_step(_trainer: Trainer, _batch: dict[str, Any],
                      _micro_step: int) -> trainer_module.StepResult:
        time.sleep(step_s)
        return trainer_module.StepResult(torch.zeros(()), stepped=True)

    trainer_module.train_step = sleeping_step  # train_epoch looks it up at each call
    try:
        _, steady_s, _ = time_full_epoch(trainer, epoch)
    finally:
        trainer_module.train_step = real_step
    steps = trainer.train_loader.steps_per_epoch
    return steps * trainer.config.data.batch_size / steady_s


def sleep_rate(steps: int, batch: int, step_s: float) -> float:
    """Images/s of sleeping alone: a busy machine wakes a sleeper late."""
    began = time.perf_counter()
    for _ in range(steps):
        time.sleep(step_s)
    return steps * batch / (time.perf_counter() - began)


def measure_overlap(trainer: Trainer, step_ms: float, rounds: int,
                    first_epoch: int) -> list[dict[str, float]]:
    batch, steps = trainer.config.data.batch_size, trainer.train_loader.steps_per_epoch
    epoch = first_epoch
    loader_ips = statistics.median(loader_rate(trainer, epoch + i) for i in range(rounds))
    rows = []
    for step_s in (step_ms / 1000, batch / loader_ips / 3):
        epoch += rounds
        loop, alone = [], []
        for index in range(rounds):
            loop.append(emulated_rate(trainer, epoch + index, step_s))
            alone.append(sleep_rate(steps, batch, step_s))
        rows.append({"step_ms": 1000 * step_s, "loader": loader_ips,
                     "emulated": statistics.median(alone), "loop": statistics.median(loop)})
    return rows


# ---- report


def print_report(args: argparse.Namespace, p3: dict[str, Any],
                 overlap: list[dict[str, float]]) -> None:
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, no GPU used; load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"model {args.arch}, {args.image_size} px, batch {args.batch}, {args.workers} "
          f"loader worker(s), {p3['steps']} steps per epoch, medians of {args.rounds} rounds")
    print()
    low, high = p3["p3_range"]
    print(f"{'measure':<44} {'img/s':>9} {'ratio':>7}")
    print(f"{'bare forward/backward/step':<44} {p3['bare']:>9.1f}")
    print(f"{'full loop, from the first batch':<44} {p3['steady']:>9.1f} "
          f"{p3['p3']:>7.3f}  P3 (target >= 0.97); rounds {low:.3f}-{high:.3f}")
    print(f"{'full loop, whole epoch (workers start)':<44} {p3['epoch']:>9.1f} "
          f"{p3['p3_epoch']:>7.3f}")
    bare_cpu, full_cpu = p3["bare_cpu"].sum(), p3["full_cpu"].sum()
    print(f"{'CPU, bare / full loop, all processes':<44} {'':>9} "
          f"{bare_cpu / full_cpu:>7.3f}")
    print()
    print("CPU ms per image       main  workers  wandb  total")
    for name, cpu in (("bare loop", p3["bare_cpu"]), ("full loop", p3["full_cpu"])):
        main, workers, wandb = 1000 * cpu
        print(f"{name:<20} {main:>6.1f} {workers:>8.1f} {wandb:>6.1f} {1000 * cpu.sum():>6.1f}")
    print()
    print(f"{'overlap: emulated step':<24} {'loader':>9} {'emulated':>9} {'loop':>9} "
          f"{'loop / min':>10}")
    for row in overlap:
        best = min(row["loader"], row["emulated"])
        print(f"{row['step_ms']:>19.1f} ms {row['loader']:>9.1f} {row['emulated']:>9.1f} "
              f"{row['loop']:>9.1f} {row['loop'] / best:>10.3f}")


def run_all(args: argparse.Namespace, workdir: Path) -> tuple[dict, list]:
    train = write_digits(workdir / "digits", args.shards)
    config = build_config(args, train, workdir / "runs")
    trainer = build_trainer(config, build_accelerator(config.train), build_data(config))
    trainer.train_loader = FirstBatchClock(trainer.train_loader)
    try:
        p3 = measure_p3(trainer, BareLoop(config), args.rounds)
        overlap = measure_overlap(trainer, args.step_ms, args.rounds, args.rounds + 2)
    finally:
        trainer.metrics.close()
    return p3, overlap


def main() -> None:
    args = parse_args()
    setup_logging()
    logging.getLogger("pipeline.data").setLevel(logging.WARNING)  # per-epoch data notes
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        p3, overlap = run_all(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="trainer-bench-") as tmp:
            p3, overlap = run_all(args, Path(tmp))
    print_report(args, p3, overlap)


if __name__ == "__main__":
    sys.exit(main())

"""Train and eval loaders: each rank reads its own shards, one reader per worker.

Per reader: its shard slices (split.py) -> tar samples (webdataset's tar
stages on a stream opened by shards.open_shard), only wanted members ->
shuffle of ENCODED samples (bounded memory, C-11) -> decode -> transform ->
batch. A torch DataLoader runs one reader per worker process (batch_size=None,
the readers batch themselves). This loader is not handed to accelerate's
`prepare`: that would make rank 0 read everything and dispatch (C-15).

Training follows the remainder rule of split.py: every reader yields exactly
its quota of full batches, so every rank yields exactly steps_per_epoch batches
(C-12, C-13). The quota is cut after decoding, so skipped bad samples are made
up by reading on. Randomness (shard order, shuffle buffer, augmentation) comes
from generators seeded with (seed, epoch, rank, worker), augmentation from one
seeded per sample position: a run repeats.

Mid-epoch resume. The batches of a rank come in one fixed order, round robin
over its readers (`batch_order`); the loader puts them in that order whatever
order the worker processes deliver them in. Each batch says how many encoded
samples its reader had consumed, so `position()` is enough to continue the
epoch: on `resume`, each reader skips that many encoded samples without
decoding them (the shuffle replays the same way) and yields the rest of its
quota. Skipped samples are read again from the shards, not decoded.

Bad data (decode.py's policy): each reader counts what it skips in a Tally and
sends the change with every batch under "counts"; the loader, in the main
process, removes it from the batch, sums it (`bad_counts()`) and stops the run
when the rank's bad share passes data.max_bad_fraction.

Batch legend: B batch, S image side. {"image": uint8 [B,3,S,S] (the loader's
`normalize` makes the model's float input of it, on the device),
"label": int64 [B] (or float32, by label format), "key": list[str] of B}.
"""

from __future__ import annotations

import itertools
import logging
import random
import signal
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle

from pipeline.config import ConfigError, DataConfig
from pipeline.data.decode import (
    BadCounts,
    BadDataError,
    BadDataPolicy,
    DecodedSample,
    DraftTarget,
    Tally,
    build_draft_target,
    decode_samples,
)
from pipeline.data.labels import collate_labels
from pipeline.data.shards import SHARD_ERRORS, ShardSet, error_text, tar_samples
from pipeline.data.split import (
    ReaderPlan,
    ShardSlice,
    plan_eval,
    plan_resampled_epoch,
    plan_train_epoch,
    seeded_rng,
    stable_seed,
    steps_per_epoch,
    train_summary,
)
from pipeline.data.transforms import build_eval_transform, build_normalize, build_train_transform

log = logging.getLogger(__name__)

Batch = dict[str, Any]


@dataclass(frozen=True)
class ReadOptions:
    """How a reader reads, decodes and judges samples; sent to worker processes."""

    num_classes: int
    label_format: str
    image_size: int
    on_bad_sample: str
    draft: DraftTarget | None
    cache_dir: Path | None
    fetch_timeout_s: float
    checksums: dict[str, str | None]


def build_read_options(data_cfg: DataConfig, shard_set: ShardSet, train: bool) -> ReadOptions:
    return ReadOptions(
        num_classes=shard_set.num_classes,
        label_format=shard_set.label_format,
        image_size=data_cfg.image_size,
        on_bad_sample=data_cfg.on_bad_sample,
        draft=build_draft_target(data_cfg, train),
        cache_dir=data_cfg.cache_dir,
        fetch_timeout_s=data_cfg.fetch_timeout_s,
        checksums={shard.url: shard.sha256 for shard in shard_set.shards},
    )


class TrainLoader:
    """Exactly steps_per_epoch full batches per epoch, the same count on every rank."""

    def __init__(
        self, data_cfg: DataConfig, shard_set: ShardSet, *, rank: int, world_size: int, seed: int
    ):
        self.data_cfg = data_cfg
        self.shard_set = shard_set
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_readers = max(1, data_cfg.num_workers)
        self.steps_per_epoch = steps_per_epoch(
            shard_set.num_samples, world_size, data_cfg.batch_size
        )
        self.transform = build_train_transform(data_cfg)
        self.normalize = build_normalize(data_cfg)
        self.options = build_read_options(data_cfg, shard_set, train=True)
        self.counts = BadCounts(data_cfg, f"rank {rank} train")
        self.epoch = 0
        self.step = 0  # batches of this epoch handed out so far
        self.consumed: list[int] = [0] * self.num_readers  # encoded samples, per reader

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shard order, shuffle and augmentation come next."""
        self.epoch, self.step = epoch, 0
        self.consumed = [0] * self.num_readers

    def position(self) -> dict[str, Any]:
        """Where this rank is in the epoch: enough for `resume` to continue it exactly."""
        return {"epoch": self.epoch, "step": self.step, "consumed": list(self.consumed),
                "world_size": self.world_size, "readers": self.num_readers,
                "counts": dict(self.counts.total)}

    def resume(self, position: dict[str, Any]) -> None:
        """Continue the epoch of `position` (from `position()`) at its next batch."""
        if (position["world_size"], position["readers"]) != (self.world_size, self.num_readers):
            raise ValueError(
                f"position of {position['world_size']} ranks x {position['readers']} readers "
                f"cannot continue on {self.world_size} x {self.num_readers}"
            )
        self.epoch, self.step = position["epoch"], position["step"]
        self.consumed = list(position["consumed"])
        # The job's running bad-data counts go on from where they were
        self.counts.total.update(position.get("counts", {}))

    def plans(self, epoch: int) -> list[ReaderPlan]:
        """What each of this rank's readers reads in `epoch`."""
        if self.data_cfg.resampled:
            return plan_resampled_epoch(
                self.shard_set.shards,
                world_size=self.world_size,
                num_readers=self.num_readers,
                batch_size=self.data_cfg.batch_size,
            )
        return plan_train_epoch(
            self.shard_set.shards,
            rank=self.rank,
            world_size=self.world_size,
            num_readers=self.num_readers,
            batch_size=self.data_cfg.batch_size,
            seed=self.seed,
            epoch=epoch,
        )

    def bad_counts(self) -> dict[str, int]:
        """This rank's totals so far: good, bad, bad_shards, small (see decode.Tally)."""
        return dict(self.counts.total)

    def epoch_counts(self) -> dict[str, int]:
        """This rank's counts in the latest (or current) epoch."""
        return dict(self.counts.epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        plans = self.plans(self.epoch)
        order = batch_order([plan.quota_batches for plan in plans])
        done = [order[: self.step].count(reader) for reader in range(len(plans))]
        stream = _TrainStream(self, plans, self.epoch, done, list(self.consumed))
        self.counts.start_epoch((len(order) - self.step) * self.data_cfg.batch_size,
                                read_once=False)
        arrived: dict[tuple[int, int], Batch] = {}
        for batch in _data_loader(stream, self.data_cfg.num_workers):
            self.counts.add(batch.pop("counts"))
            if "image" not in batch:
                continue  # a reader's closing counts
            arrived[batch.pop("reader"), batch.pop("index")] = batch
            # Hand batches out in the fixed order, whatever order the workers keep
            while self.step < len(order) and (order[self.step], done[order[self.step]]) in arrived:
                reader = order[self.step]
                ready = arrived.pop((reader, done[reader]))
                done[reader] += 1
                self.consumed[reader] = ready.pop("consumed")
                self.step += 1
                if self.step == self.steps_per_epoch:
                    # Callers stop after the last step, so the code after it may never run
                    self.counts.log_epoch(self.data_cfg.image_size)
                yield ready
        if self.step != self.steps_per_epoch or arrived:
            # Unequal counts would hang DDP on the other ranks: stop loudly instead
            raise RuntimeError(
                f"rank {self.rank} yielded {self.step} batches in epoch {self.epoch}, "
                f"expected {self.steps_per_epoch}"
            )


def batch_order(quotas: Sequence[int]) -> list[int]:
    """The reader of each batch of an epoch: round robin over readers with batches left."""
    left, order = list(quotas), []
    while any(left):
        for reader, count in enumerate(left):
            if count:
                order.append(reader)
                left[reader] -= 1
    return order


class _TrainStream(IterableDataset):
    """One epoch of one rank; each DataLoader worker runs its own reader.

    `done[r]` batches of reader r were handed out already and `consumed[r]`
    encoded samples went into them: a resumed epoch skips both.
    """

    def __init__(self, loader: TrainLoader, plans: list[ReaderPlan], epoch: int,
                 done: list[int], consumed: list[int]):
        self.plans, self.done, self.consumed = plans, done, consumed
        self.seed_parts = (loader.seed, epoch, loader.rank)
        self.batch_size = loader.data_cfg.batch_size
        self.shuffle_buffer = loader.data_cfg.shuffle_buffer
        self.resampled = loader.data_cfg.resampled
        self.options = loader.options
        self.transform = loader.transform

    def __iter__(self) -> Iterator[Batch]:
        worker = _worker_index(len(self.plans))
        plan = self.plans[worker]
        parts = (*self.seed_parts, worker)
        buffer_size = min(self.shuffle_buffer, plan.num_samples)
        reader = _Reader(self.options, reader=worker, first_batch=self.done[worker])
        source = reader.resampled if self.resampled else reader.passes
        encoded = reader.count(source(plan.slices, buffer_size, seeded_rng(*parts, "shuffle")))
        reader.skip(encoded, self.consumed[worker])
        # Cut after decoding, so skipped samples are made up by reading on
        left = (plan.quota_batches - self.done[worker]) * self.batch_size
        decoded = itertools.islice(reader.decode(encoded), left)
        # One generator per sample position, so skipping samples keeps the rest's draws
        augment = stable_seed(*parts, "augment")
        tensors = ((s, self.transform(s.image, random.Random(augment + reader.consumed)))
                   for s in decoded)
        return reader.batches(tensors, self.batch_size, keep_partial=False)


class EvalLoader:
    """Every readable sample of the set exactly once over all ranks and workers."""

    def __init__(
        self,
        data_cfg: DataConfig,
        shard_set: ShardSet,
        *,
        rank: int,
        world_size: int,
        batch_size: int | None = None,
    ):
        self.num_workers = data_cfg.num_workers
        self.image_size = data_cfg.image_size
        self.batch_size = batch_size or data_cfg.batch_size
        self.transform = build_eval_transform(data_cfg)
        self.normalize = build_normalize(data_cfg)
        self.options = build_read_options(data_cfg, shard_set, train=False)
        self.counts = BadCounts(data_cfg, f"rank {rank} eval")
        self.plans = plan_eval(
            shard_set.shards,
            rank=rank,
            world_size=world_size,
            num_readers=max(1, data_cfg.num_workers),
        )
        # This rank's share; ranks differ, so no per-batch collective may be used
        self.num_samples = sum(plan.num_samples for plan in self.plans)
        self.num_batches = sum(-(-p.num_samples // self.batch_size) for p in self.plans)

    def bad_counts(self) -> dict[str, int]:
        """This rank's totals over every pass so far; `bad` samples were not scored."""
        return dict(self.counts.total)

    def epoch_counts(self) -> dict[str, int]:
        """This rank's counts in the latest pass over the set."""
        return dict(self.counts.epoch)

    def __len__(self) -> int:
        """Batches if no sample is skipped; skipped ones can make it fewer."""
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        self.counts.start_epoch(self.num_samples, read_once=True)
        for batch in _data_loader(_EvalStream(self), self.num_workers):
            self.counts.add(batch.pop("counts"))
            if "image" in batch:
                # Eval order does not matter: every sample is scored once, by key
                for name in ("reader", "index", "consumed"):
                    del batch[name]
                yield batch
        self.counts.log_epoch(self.image_size)


class _EvalStream(IterableDataset):
    def __init__(self, loader: EvalLoader):
        self.plans = loader.plans
        self.batch_size = loader.batch_size
        self.options = loader.options
        self.transform = loader.transform

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plans[_worker_index(len(self.plans))]
        reader = _Reader(self.options)
        encoded = itertools.chain.from_iterable(reader.read(p) for p in plan.slices)
        tensors = ((s, self.transform(s.image)) for s in reader.decode(encoded))
        return reader.batches(tensors, self.batch_size, keep_partial=True)


class _Reader:
    """The stages of one reader (one worker), with its Tally and bad-data policy."""

    def __init__(self, options: ReadOptions, reader: int = 0, first_batch: int = 0):
        self.options = options
        self.tally = Tally()
        self.policy = BadDataPolicy(options.on_bad_sample, self.tally)
        self.reader, self.next_batch = reader, first_batch
        self.consumed = 0  # encoded samples taken from the (shuffled) stream
        self.skipped = 0  # of those, skipped undecoded by a resume

    def count(self, encoded: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in encoded:
            self.consumed += 1
            yield sample

    def skip(self, counted: Iterator[dict[str, Any]], samples: int) -> None:
        """Pass over the first `samples` encoded samples without decoding them."""
        for _ in itertools.islice(counted, samples):
            self.skipped += 1

    def read(self, piece: ShardSlice) -> Iterator[dict[str, Any]]:
        """Encoded samples of one shard slice; a shard that fails goes to the policy."""
        count = 0
        try:
            opts = self.options
            samples = tar_samples(
                piece.url, opts.cache_dir, opts.fetch_timeout_s, opts.checksums.get(piece.url)
            )
            # Stop at the manifest's count: a longer shard must not add samples
            stop = piece.shard_samples
            for sample in itertools.islice(samples, piece.offset, stop, piece.stride):
                count += 1
                yield sample
        except ConfigError:
            raise
        except SHARD_ERRORS as error:
            missing = piece.num_samples - count
            self.policy.shard_failed(piece.url, error_text(error), missing)
            return
        if count < piece.num_samples:
            # A tar cut at a member boundary ends quietly: only the count tells
            reason = f"ended after {count} of its {piece.num_samples} samples (truncated?)"
            self.policy.shard_failed(piece.url, reason, piece.num_samples - count)

    def decode(self, encoded: Iterable[dict[str, Any]]) -> Iterator[DecodedSample]:
        opts = self.options
        for sample in decode_samples(
            encoded, opts.num_classes, opts.label_format, self.policy, opts.draft
        ):
            self.tally.good += 1
            if min(sample.image.size) < opts.image_size:
                self.tally.small += 1
            yield sample

    def passes(
        self, slices: Sequence[ShardSlice], buffer_size: int, rng: random.Random
    ) -> Iterator[dict[str, Any]]:
        """Pass after pass over the slices, each in a new shard order and shuffled.

        Passes after the first are the top-up. Each pass is shuffled on its own,
        so a repeat never leaves before every sample of the pass before it has.
        """
        while True:
            order = list(slices)
            rng.shuffle(order)
            used_before = self.tally.good + self.skipped
            encoded = itertools.chain.from_iterable(self.read(p) for p in order)
            yield from _shuffle(encoded, buffer_size, rng)
            # Each pass drains its buffer, so its samples are decoded (or skipped) by now
            if self.tally.good + self.skipped == used_before:
                self._no_progress([piece.url for piece in order], "a whole pass")

    def resampled(
        self, slices: Sequence[ShardSlice], buffer_size: int, rng: random.Random
    ) -> Iterator[dict[str, Any]]:
        """Shards drawn with replacement, weighted by their sample counts."""
        return _shuffle(self._draws(slices, buffer_size, rng), buffer_size, rng)

    def _draws(
        self, slices: Sequence[ShardSlice], buffer_size: int, rng: random.Random
    ) -> Iterator[dict[str, Any]]:
        weights = [piece.num_samples for piece in slices]
        # Filling the buffer takes up to buffer_size draws before anything decodes
        patience = buffer_size + 10 * len(slices)
        idle, good = 0, self.tally.good
        while True:
            yield from self.read(rng.choices(slices, weights)[0])
            idle = 0 if self.tally.good > good else idle + 1
            good = self.tally.good
            if idle > patience:
                self._no_progress([piece.url for piece in slices], f"{idle} shard draws")

    def _no_progress(self, urls: list[str], span: str) -> None:
        # Without this, a reader whose every sample is bad would read forever
        raise BadDataError(
            f"shards {urls[:5]}{' ...' if len(urls) > 5 else ''} gave no usable sample "
            f"in {span} ({self.tally.bad} bad; last: {self.tally.last_bad or 'none'}); "
            "check them with `pipeline verify SHARDS --deep`"
        )

    def batches(
        self, items: Iterable[tuple[DecodedSample, torch.Tensor]], batch_size: int,
        keep_partial: bool,
    ) -> Iterator[Batch]:
        """Batches with this reader's count changes; a closing counts-only item."""
        items = iter(items)
        while chunk := list(itertools.islice(items, batch_size)):
            if len(chunk) < batch_size and not keep_partial:
                break
            yield {
                "image": torch.stack([image for _, image in chunk]),
                "label": collate_labels([s.label for s, _ in chunk], self.options.label_format),
                "key": [s.key for s, _ in chunk],
                "counts": self.tally.take(),
                "reader": self.reader,
                "index": self.next_batch,
                "consumed": self.consumed,
            }
            self.next_batch += 1
        if self.tally.pending():
            yield {"counts": self.tally.take()}


def build_train_loader(
    data_cfg: DataConfig, shard_set: ShardSet, *, rank: int, world_size: int, seed: int
) -> TrainLoader:
    loader = TrainLoader(data_cfg, shard_set, rank=rank, world_size=world_size, seed=seed)
    _log_train_plan(loader)
    return loader


def build_eval_loader(
    data_cfg: DataConfig,
    shard_set: ShardSet,
    *,
    rank: int,
    world_size: int,
    batch_size: int | None = None,
) -> EvalLoader:
    loader = EvalLoader(
        data_cfg, shard_set, rank=rank, world_size=world_size, batch_size=batch_size
    )
    log.debug(
        "rank %d evaluates %d samples in %d batches from %s",
        rank,
        loader.num_samples,
        loader.num_batches,
        shard_set.root,
    )
    return loader


def _data_loader(stream: IterableDataset, num_workers: int) -> DataLoader:
    # Workers are started afresh each epoch (no persistent_workers) so that
    # set_epoch reaches them; pinned memory only helps a CUDA device.
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        worker_init_fn=_outlive_stop_signals if num_workers else None,
    )


# How long a loader worker lives on after SIGTERM, unless shut down normally first
WORKER_GRACE_S = 60


def _outlive_stop_signals(worker_id: int) -> None:
    """Let a worker survive the job's stop signal while its trainer saves.

    Slurm signals every process of a job step, the loader's workers too. A worker
    killed by SIGTERM fails its trainer at once (PyTorch raises from its SIGCHLD
    handler, wherever the trainer is), before the step boundary where the ranks
    agree to stop and save. So a worker ignores SIGUSR1 and, on SIGTERM, only
    arms an alarm that ends it WORKER_GRACE_S later: the trainer shuts it down
    normally before then, and a stuck one still goes.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _end_later)


def _end_later(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the default action ends the process
    signal.alarm(WORKER_GRACE_S)


def _worker_index(num_plans: int) -> int:
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
    assert num_workers == num_plans, f"{num_workers} workers for {num_plans} plans"
    return worker


def _shuffle(samples: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    if buffer_size <= 1:
        return samples
    # initial=buffer_size: fill the buffer before the first sample leaves it,
    # else the first batches come mostly from the first shard
    return wds_shuffle(buffer_size, initial=buffer_size, rng=rng)(samples)


def _log_train_plan(loader: TrainLoader) -> None:
    plans = loader.plans(0)
    log.debug(
        "rank %d epoch 0 reads %s samples per worker, quotas %s batches",
        loader.rank,
        [p.num_samples for p in plans],
        [p.quota_batches for p in plans],
    )
    if loader.rank == 0:
        for line in train_summary(loader.shard_set, loader.data_cfg, loader.world_size):
            log.info("%s", line)

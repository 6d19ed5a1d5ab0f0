"""Train and eval loaders: each rank reads its own shards, one reader per worker.

Per reader: its shard slices (split.py) -> tar samples (webdataset's tar
stages on a file opened here), only wanted members ->
shuffle of ENCODED samples (bounded memory, C-11) -> decode -> transform ->
batch. A torch DataLoader runs one reader per worker process (batch_size=None,
the readers batch themselves). This loader is not handed to accelerate's
`prepare`: that would make rank 0 read everything and dispatch (C-15).

Training follows the remainder rule of split.py: every reader yields exactly
its quota of full batches, so every rank yields exactly steps_per_epoch batches
(C-12, C-13). Randomness (shard order, shuffle buffer, augmentation) comes from
generators seeded with (seed, epoch, rank, worker): a run repeats, epochs differ.

Batch legend: B batch, S image side. {"image": float32 [B,3,S,S],
"label": int64 [B], "key": list[str] of B}.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.config import DataConfig
from pipeline.data.decode import DecodedSample, decode_samples, wanted_member
from pipeline.data.shards import ShardSet
from pipeline.data.split import (
    ReaderPlan,
    ShardSlice,
    plan_eval,
    plan_train_epoch,
    seeded_rng,
    steps_per_epoch,
)
from pipeline.data.transforms import build_eval_transform, build_train_transform

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class ShardReadError(RuntimeError):
    """Shards yield no samples although their manifest lists some."""


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
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shard order, shuffle and augmentation come next."""
        self.epoch = epoch

    def plans(self, epoch: int) -> list[ReaderPlan]:
        """What each of this rank's readers reads in `epoch`."""
        return plan_train_epoch(
            self.shard_set.shards,
            rank=self.rank,
            world_size=self.world_size,
            num_readers=self.num_readers,
            batch_size=self.data_cfg.batch_size,
            seed=self.seed,
            epoch=epoch,
        )

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        stream = _TrainStream(self, self.plans(self.epoch), self.epoch)
        count = 0
        for batch in _data_loader(stream, self.data_cfg.num_workers):
            count += 1
            yield batch
        if count != self.steps_per_epoch:
            # Unequal counts would hang DDP on the other ranks: stop loudly instead
            raise RuntimeError(
                f"rank {self.rank} yielded {count} batches in epoch {self.epoch}, "
                f"expected {self.steps_per_epoch}"
            )


class _TrainStream(IterableDataset):
    """One epoch of one rank; each DataLoader worker runs its own reader."""

    def __init__(self, loader: TrainLoader, plans: list[ReaderPlan], epoch: int):
        self.plans = plans
        self.seed_parts = (loader.seed, epoch, loader.rank)
        self.batch_size = loader.data_cfg.batch_size
        self.shuffle_buffer = loader.data_cfg.shuffle_buffer
        self.num_classes = loader.shard_set.num_classes
        self.transform = loader.transform

    def __iter__(self) -> Iterator[Batch]:
        worker = _worker_index(len(self.plans))
        plan = self.plans[worker]
        parts = (*self.seed_parts, worker)
        buffer_size = min(self.shuffle_buffer, plan.num_samples)
        encoded = _passes(plan.slices, buffer_size, seeded_rng(*parts, "shuffle"))
        decoded = decode_samples(encoded, self.num_classes)
        # Cut after decoding, so a future skip policy still fills the quota
        decoded = itertools.islice(decoded, plan.quota_batches * self.batch_size)
        augment_rng = seeded_rng(*parts, "augment")
        tensors = ((s, self.transform(s.image, augment_rng)) for s in decoded)
        return _batches(tensors, self.batch_size, keep_partial=False)


class EvalLoader:
    """Every sample of the set exactly once over all ranks and workers, in order."""

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
        self.batch_size = batch_size or data_cfg.batch_size
        self.num_classes = shard_set.num_classes
        self.transform = build_eval_transform(data_cfg)
        self.plans = plan_eval(
            shard_set.shards,
            rank=rank,
            world_size=world_size,
            num_readers=max(1, data_cfg.num_workers),
        )
        # This rank's share; ranks differ, so no per-batch collective may be used
        self.num_samples = sum(plan.num_samples for plan in self.plans)
        self.num_batches = sum(-(-p.num_samples // self.batch_size) for p in self.plans)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(_data_loader(_EvalStream(self), self.num_workers))


class _EvalStream(IterableDataset):
    def __init__(self, loader: EvalLoader):
        self.plans = loader.plans
        self.batch_size = loader.batch_size
        self.num_classes = loader.num_classes
        self.transform = loader.transform

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plans[_worker_index(len(self.plans))]
        encoded = itertools.chain.from_iterable(_read_slice(p) for p in plan.slices)
        decoded = decode_samples(encoded, self.num_classes)
        tensors = ((s, self.transform(s.image)) for s in decoded)
        return _batches(tensors, self.batch_size, keep_partial=True)


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
    )


def _worker_index(num_plans: int) -> int:
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
    assert num_workers == num_plans, f"{num_workers} workers for {num_plans} plans"
    return worker


def _read_slice(piece: ShardSlice) -> Iterator[dict[str, Any]]:
    """Encoded samples of one shard slice; unwanted tar members are never read."""
    return itertools.islice(_tar_samples(piece.url), piece.offset, None, piece.stride)


def _tar_samples(path: str) -> Iterator[dict[str, Any]]:
    # Opened here as a plain file, not by webdataset's gopen, which would run
    # a shard named "pipe:..." as a shell command
    with open(path, "rb") as stream:
        source = [{"url": path, "stream": stream}]
        yield from group_by_keys(tar_file_expander(source, select_files=wanted_member))


def _passes(
    slices: Sequence[ShardSlice], buffer_size: int, rng: random.Random
) -> Iterator[dict[str, Any]]:
    """Pass after pass over the slices, each in a new shard order and shuffled.

    Passes after the first are the top-up. Each pass is shuffled on its own, so
    a repeat never leaves before every sample of the pass before it has.
    """
    while True:
        order = list(slices)
        rng.shuffle(order)
        encoded = itertools.chain.from_iterable(_read_slice(p) for p in order)
        count = 0
        for sample in _shuffle(encoded, buffer_size, rng):
            count += 1
            yield sample
        if count == 0:
            urls = [piece.url for piece in order]
            raise ShardReadError(f"shards {urls} yielded no samples; check or rewrite them")


def _shuffle(samples: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    if buffer_size <= 1:
        return samples
    # initial=buffer_size: fill the buffer before the first sample leaves it,
    # else the first batches come mostly from the first shard
    return wds_shuffle(buffer_size, initial=buffer_size, rng=rng)(samples)


def _batches(
    items: Iterable[tuple[DecodedSample, torch.Tensor]], batch_size: int, keep_partial: bool
) -> Iterator[Batch]:
    items = iter(items)
    while chunk := list(itertools.islice(items, batch_size)):
        if len(chunk) < batch_size and not keep_partial:
            return
        yield {
            "image": torch.stack([image for _, image in chunk]),
            "label": torch.tensor([s.label for s, _ in chunk], dtype=torch.int64),
            "key": [s.key for s, _ in chunk],
        }


def _log_train_plan(loader: TrainLoader) -> None:
    cfg, shards = loader.data_cfg, loader.shard_set
    plans = loader.plans(0)
    log.debug(
        "rank %d epoch 0 reads %s samples per worker, quotas %s batches",
        loader.rank,
        [p.num_samples for p in plans],
        [p.quota_batches for p in plans],
    )
    if loader.rank != 0:
        return
    used = loader.steps_per_epoch * cfg.batch_size * loader.world_size
    log.info(
        "train: %d samples in %d shards, %d rank(s) x batch %d -> %d steps per epoch "
        "(%d samples per epoch). Each reader yields its quota of full batches: surplus "
        "samples are dropped (different ones each epoch), a shortfall is topped up by "
        "re-reading its own shards reshuffled.",
        shards.num_samples,
        len(shards.shards),
        loader.world_size,
        cfg.batch_size,
        loader.steps_per_epoch,
        used,
    )
    _log_buffer_memory(cfg, shards)


def _log_buffer_memory(cfg: DataConfig, shards: ShardSet) -> None:
    sizes = [entry.get("bytes", 0) for entry in shards.manifest.get("shards", [])]
    if not sizes or not shards.num_samples:
        return
    mean_bytes = sum(sizes) / shards.manifest.get("num_samples", shards.num_samples)
    per_rank = cfg.shuffle_buffer * max(1, cfg.num_workers) * mean_bytes
    log.info(
        "shuffle buffers hold about %.1f MiB of encoded samples per rank "
        "(%d x %d worker(s) x %.0f KiB)",
        per_rank / 2**20,
        cfg.shuffle_buffer,
        max(1, cfg.num_workers),
        mean_bytes / 1024,
    )

"""Who reads what: shards to ranks, then to each rank's loader workers.

Pure functions: rank, world size and worker count are passed in, nothing is
read from the environment, so every rule here is unit-tested without processes.

Assignment. Shards go to ranks by greedy packing on sample counts: largest
first, each onto the least-loaded rank. Equal sizes and equal loads are ordered
by a shuffle seeded with (seed, epoch), so the assignment is the same on every
rank for one epoch and changes from one epoch to the next. The shards of a rank
are then packed onto its workers the same way. Loads end within one shard of
each other.

Fewer shards than readers. Then whole shards cannot go round, so the samples
are split instead: reader r of n keeps the samples whose running index over the
concatenated shards is r modulo n (a stride and an offset per shard). Every
reader gets total//n or total//n + 1 samples and none is left empty, which is
what makes webdataset's "No samples found" impossible here.

Remainder rule. Every rank runs steps_per_epoch = total // (world_size *
batch_size) steps, each of full batches; the steps of a rank are split as evenly
as possible over its workers that hold samples (the batch quota). A reader that
holds more samples than quota * batch_size stops there and drops the rest;
shard order and sample order are reshuffled every epoch, so a different
remainder is dropped each time. A reader that holds fewer tops up by reading its
own shards again, reshuffled. Equal step counts on every rank are what keep DDP
from hanging at the end of an epoch when shards are unequal.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.config import ConfigError
from pipeline.data.shards import Shard


@dataclass(frozen=True)
class ShardSlice:
    """The samples of one shard a reader keeps: indices offset, offset+stride, ..."""

    url: str
    shard_samples: int
    offset: int = 0
    stride: int = 1

    @property
    def num_samples(self) -> int:
        return len(range(self.offset, self.shard_samples, self.stride))


@dataclass(frozen=True)
class ReaderPlan:
    """What one reader (a rank's worker) reads in one epoch."""

    slices: tuple[ShardSlice, ...]
    quota_batches: int = 0

    @property
    def num_samples(self) -> int:
        return sum(piece.num_samples for piece in self.slices)


def seeded_rng(*parts: object) -> random.Random:
    """A Random seeded from parts; the same in every process (no hash salt)."""
    return random.Random(stable_seed(*parts))


def stable_seed(*parts: object) -> int:
    text = "/".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


def whole_shards(shards: Sequence[Shard]) -> list[ShardSlice]:
    """Shards as slices that keep every sample; empty shards are left out."""
    return [ShardSlice(s.url, s.num_samples) for s in shards if s.num_samples > 0]


def assign(
    slices: Sequence[ShardSlice], num_parts: int, rng: random.Random
) -> list[list[ShardSlice]]:
    """Split slices over num_parts readers: greedy packing, or by stride if too few."""
    if num_parts < 1:
        raise ValueError(f"num_parts={num_parts} must be at least 1")
    if len(slices) < num_parts:
        return [split_by_stride(slices, part, num_parts) for part in range(num_parts)]
    return pack_greedy(slices, num_parts, rng)


def pack_greedy(
    slices: Sequence[ShardSlice], num_parts: int, rng: random.Random
) -> list[list[ShardSlice]]:
    """Largest first onto the least-loaded part; ties in the order rng gives."""
    order = list(slices)
    rng.shuffle(order)
    order.sort(key=lambda piece: piece.num_samples, reverse=True)  # stable sort
    priority = list(range(num_parts))
    rng.shuffle(priority)
    loads = [(0, priority[part], part) for part in range(num_parts)]
    heapq.heapify(loads)
    parts: list[list[ShardSlice]] = [[] for _ in range(num_parts)]
    for piece in order:
        load, prio, part = heapq.heappop(loads)
        parts[part].append(piece)
        heapq.heappush(loads, (load + piece.num_samples, prio, part))
    return parts


def split_by_stride(slices: Sequence[ShardSlice], part: int, num_parts: int) -> list[ShardSlice]:
    """The samples of part `part` when every num_parts-th sample goes to it.

    The running index counts kept samples over all slices in order, so parts
    differ by at most one sample overall, not one per shard.
    """
    kept = []
    start = 0
    for piece in slices:
        first = (part - start) % num_parts
        sub = ShardSlice(
            piece.url,
            piece.shard_samples,
            offset=piece.offset + piece.stride * first,
            stride=piece.stride * num_parts,
        )
        if sub.num_samples > 0:
            kept.append(sub)
        start += piece.num_samples
    return kept


def steps_per_epoch(total_samples: int, world_size: int, batch_size: int) -> int:
    """Full batches every rank runs per epoch; raises ConfigError when none fit."""
    steps = total_samples // (world_size * batch_size)
    if steps < 1:
        raise ConfigError(
            f"data.batch_size={batch_size} with {world_size} process(es) needs at least "
            f"{world_size * batch_size} training samples per step, but the shards hold "
            f"{total_samples}; lower data.batch_size to at most "
            f"{max(1, total_samples // world_size)} or run fewer processes"
        )
    return steps


def batch_quotas(steps: int, samples_per_reader: Sequence[int]) -> list[int]:
    """Split steps as evenly as possible over the readers that hold samples."""
    live = [index for index, count in enumerate(samples_per_reader) if count > 0]
    if not live:
        raise ValueError("no reader holds any sample")
    quotas = [0] * len(samples_per_reader)
    base, extra = divmod(steps, len(live))
    for position, index in enumerate(live):
        quotas[index] = base + (1 if position < extra else 0)
    return quotas


def plan_train_epoch(
    shards: Sequence[Shard],
    *,
    rank: int,
    world_size: int,
    num_readers: int,
    batch_size: int,
    seed: int,
    epoch: int,
) -> list[ReaderPlan]:
    """The plans of rank's readers for one epoch of training, quotas included."""
    total = sum(s.num_samples for s in shards)
    steps = steps_per_epoch(total, world_size, batch_size)
    per_rank = assign(whole_shards(shards), world_size, seeded_rng(seed, epoch))
    per_reader = assign(per_rank[rank], num_readers, seeded_rng(seed, epoch, rank))
    counts = [sum(p.num_samples for p in slices) for slices in per_reader]
    quotas = batch_quotas(steps, counts)
    return [ReaderPlan(tuple(s), q) for s, q in zip(per_reader, quotas)]


def plan_eval(
    shards: Sequence[Shard], *, rank: int, world_size: int, num_readers: int
) -> list[ReaderPlan]:
    """The plans of rank's readers for evaluation: every sample exactly once."""
    per_rank = assign(whole_shards(shards), world_size, seeded_rng("eval"))
    per_reader = assign(per_rank[rank], num_readers, seeded_rng("eval", rank))
    return [ReaderPlan(tuple(slices)) for slices in per_reader]

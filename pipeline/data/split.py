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
as possible over its workers that hold samples, extra batches to those holding
the most (the batch quota). A reader that
holds more samples than quota * batch_size stops there and drops the rest;
shard order and sample order are reshuffled every epoch, so a different
remainder is dropped each time. A reader that holds fewer tops up by reading its
own shards again, reshuffled. Equal step counts on every rank are what keep DDP
from hanging at the end of an epoch when shards are unequal.

Resampled mode (`data.resampled`). Every reader draws shards from the whole
set with replacement, weighted by sample count, and yields its quota of the
same steps_per_epoch. Ranks may then read the same shard in one epoch, and an
epoch sees some samples twice and others not at all: approximate, by design.

`add_plan_arguments` and `run_plan` are the `pipeline plan` command, which
shows these plans for a config and world size without reading any shard.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.config import ConfigError, DataConfig, load_config
from pipeline.data.shards import Shard, ShardSet, resolve_shards

log = logging.getLogger(__name__)


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
    """Split steps as evenly as possible over the readers that hold samples.

    The extra batches of an uneven split go to the readers holding the most
    samples, so that the fewest samples are topped up or dropped.
    """
    live = [index for index, count in enumerate(samples_per_reader) if count > 0]
    if not live:
        raise ValueError("no reader holds any sample")
    quotas = [0] * len(samples_per_reader)
    base, extra = divmod(steps, len(live))
    richest = sorted(live, key=lambda index: (-samples_per_reader[index], index))
    for position, index in enumerate(richest):
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


def plan_resampled_epoch(
    shards: Sequence[Shard], *, world_size: int, num_readers: int, batch_size: int
) -> list[ReaderPlan]:
    """Resampled mode: every reader may draw any shard; the rank's steps split evenly."""
    total = sum(s.num_samples for s in shards)
    steps = steps_per_epoch(total, world_size, batch_size)
    every = tuple(whole_shards(shards))
    return [ReaderPlan(every, q) for q in batch_quotas(steps, [1] * num_readers)]


# ---- the `pipeline plan` command


def describe_train_plan(
    shard_set: ShardSet, cfg: DataConfig, *, world_size: int, seed: int, epoch: int
) -> list[str]:
    """Lines saying which shards each rank and worker reads in one training epoch."""
    readers = max(1, cfg.num_workers)
    total, batch = shard_set.num_samples, cfg.batch_size
    steps = steps_per_epoch(total, world_size, batch)
    lines = [
        f"train {shard_set.root}: {total} samples in {len(shard_set.shards)} shard(s); "
        f"{world_size} rank(s) x {readers} worker(s), batch {batch} -> {steps} steps per "
        f"epoch, {steps * batch * world_size} samples per epoch (epoch {epoch})"
    ]
    for rank in range(world_size):
        lines += _rank_lines(shard_set, cfg, world_size, readers, seed, epoch, rank)
    return lines


def _rank_lines(shard_set, cfg, world_size, readers, seed, epoch, rank) -> list[str]:
    batch = cfg.batch_size
    if cfg.resampled:
        plans = plan_resampled_epoch(
            shard_set.shards, world_size=world_size, num_readers=readers, batch_size=batch
        )
        quotas = [p.quota_batches for p in plans]
        return [f"rank {rank}: batches per worker {quotas}, shards drawn with replacement "
                f"from all {len(shard_set.shards)} (data.resampled)"]
    plans = plan_train_epoch(
        shard_set.shards, rank=rank, world_size=world_size, num_readers=readers,
        batch_size=batch, seed=seed, epoch=epoch,
    )
    steps = sum(p.quota_batches for p in plans)
    lines = [f"rank {rank}: {steps} steps from {sum(p.num_samples for p in plans)} samples"]
    return lines + [_reader_line(w, p, batch) for w, p in enumerate(plans)]


def describe_eval_plan(
    name: str, shard_set: ShardSet, cfg: DataConfig, world_size: int
) -> list[str]:
    """Lines saying which samples each rank and worker scores (each exactly once)."""
    readers = max(1, cfg.num_workers)
    lines = [f"eval {name} {shard_set.root}: {shard_set.num_samples} samples, each scored once"]
    for rank in range(world_size):
        plans = plan_eval(shard_set.shards, rank=rank, world_size=world_size, num_readers=readers)
        lines.append(f"rank {rank}: {sum(p.num_samples for p in plans)} samples")
        lines += [_reader_line(w, p, None) for w, p in enumerate(plans)]
    return lines


def _reader_line(worker: int, plan: ReaderPlan, batch_size: int | None) -> str:
    pieces = " ".join(_slice_text(piece) for piece in plan.slices) or "nothing"
    if batch_size is None:
        return f"  worker {worker}: {plan.num_samples} samples: {pieces}"
    used = plan.quota_batches * batch_size
    change = used - plan.num_samples
    note = f"tops up {change}" if change > 0 else f"drops {-change}" if change else "uses all"
    return (
        f"  worker {worker}: {plan.quota_batches} batches = {used} of {plan.num_samples} "
        f"samples ({note}): {pieces}"
    )


def _slice_text(piece: ShardSlice) -> str:
    name = piece.url.rsplit("/", 1)[-1]
    if piece.stride == 1 and piece.offset == 0:
        return f"{name}({piece.num_samples})"
    return f"{name}[{piece.offset}::{piece.stride}]({piece.num_samples})"


def train_summary(shard_set: ShardSet, cfg: DataConfig, world_size: int) -> list[str]:
    """What the trainer logs at start: steps, the remainder rule, the bad-data policy,
    and the memory the shuffle buffers take (C-11)."""
    steps = steps_per_epoch(shard_set.num_samples, world_size, cfg.batch_size)
    how = (
        "Shards are drawn with replacement (data.resampled): an epoch is approximate."
        if cfg.resampled
        else "Each reader yields its quota of full batches: surplus samples are dropped "
        "(different ones each epoch), a shortfall is topped up by re-reading its own "
        "shards reshuffled."
    )
    policy = (
        "strict (the first one stops the run)" if cfg.on_bad_sample == "strict"
        else f"skipped, counted and logged, at most {cfg.max_bad_fraction:.2%} of a rank's"
    )
    lines = [
        f"train: {shard_set.num_samples} samples in {len(shard_set.shards)} shards, "
        f"{world_size} rank(s) x batch {cfg.batch_size} -> {steps} steps per epoch "
        f"({steps * cfg.batch_size * world_size} samples per epoch). {how} "
        f"Bad samples: {policy}."
    ]
    return lines + _buffer_memory(shard_set, cfg)


def _buffer_memory(shard_set: ShardSet, cfg: DataConfig) -> list[str]:
    manifest = shard_set.manifest
    sizes = [entry.get("bytes", 0) for entry in manifest.get("shards", [])]
    if not sizes or not shard_set.num_samples:
        return []
    mean_bytes = sum(sizes) / manifest.get("num_samples", shard_set.num_samples)
    workers = max(1, cfg.num_workers)
    per_rank = cfg.shuffle_buffer * workers * mean_bytes
    return [
        f"shuffle buffers hold about {per_rank / 2**20:.1f} MiB of encoded samples per "
        f"rank ({cfg.shuffle_buffer} x {workers} worker(s) x {mean_bytes / 1024:.0f} KiB)"
    ]


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="overrides, key.sub=value")
    parser.add_argument("--world-size", type=int, required=True, help="processes in all")
    parser.add_argument("--epoch", type=int, default=0, help="epoch whose plan to show")


def run_plan(args: argparse.Namespace) -> int:
    """`pipeline plan`: log the shard assignment; reads manifests, never shards."""
    if args.world_size < 1:
        raise ConfigError(f"--world-size {args.world_size} must be at least 1")
    config = load_config(args.config, args.overrides)
    if not config.data.train:
        raise ConfigError("data.train is not set; give the training shard folder")
    train = resolve_shards(config.data.train, key="data.train")
    lines = train_summary(train, config.data, args.world_size)
    lines += describe_train_plan(
        train, config.data, world_size=args.world_size, seed=config.run.seed, epoch=args.epoch
    )
    for name, spec in config.data.eval.items():
        shards = resolve_shards(spec, key=f"data.eval.{name}")
        lines += describe_eval_plan(name, shards, config.data, args.world_size)
    for line in lines:
        log.info("%s", line)
    return 0

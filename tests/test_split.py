"""Shard splitting as pure functions: ranks, workers, steps and quotas."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pipeline.config import ConfigError, DataConfig
from pipeline.data.shards import Shard, ShardSet
from pipeline.data.split import (
    ShardSlice,
    assign,
    batch_quotas,
    describe_eval_plan,
    describe_train_plan,
    plan_eval,
    plan_resampled_epoch,
    plan_train_epoch,
    seeded_rng,
    steps_per_epoch,
    whole_shards,
)


def make_shards(sizes: list[int]) -> list[Shard]:
    return [Shard(f"s{index:03d}.tar", size) for index, size in enumerate(sizes)]


def sample_ids(slices: list[ShardSlice]) -> list[tuple[str, int]]:
    """Every (shard, sample index) a list of slices reads."""
    return [
        (piece.url, index)
        for piece in slices
        for index in range(piece.offset, piece.shard_samples, piece.stride)
    ]


def all_train_plans(shards, world_size, num_readers, batch_size=1, seed=0, epoch=0):
    return [
        plan_train_epoch(
            shards,
            rank=rank,
            world_size=world_size,
            num_readers=num_readers,
            batch_size=batch_size,
            seed=seed,
            epoch=epoch,
        )
        for rank in range(world_size)
    ]


@pytest.mark.parametrize("world_size", [2, 3, 5, 8])
def test_greedy_loads_within_one_shard(world_size):
    sizes = [random.Random(world_size).randint(1, 500) for _ in range(40)]
    parts = assign(whole_shards(make_shards(sizes)), world_size, seeded_rng(0, 0))
    loads = [sum(p.num_samples for p in part) for part in parts]
    assert max(loads) - min(loads) <= max(sizes)
    assert sum(loads) == sum(sizes)


def test_assignment_deterministic_for_seed_and_epoch():
    shards = make_shards([10] * 12 + [3, 7, 7])
    first = all_train_plans(shards, 3, 2, seed=5, epoch=4)
    again = all_train_plans(shards, 3, 2, seed=5, epoch=4)
    assert first == again


def test_assignment_differs_across_epochs_and_seeds():
    shards = make_shards([10] * 12)
    by_epoch = {str(all_train_plans(shards, 3, 2, epoch=e)) for e in range(5)}
    by_seed = {str(all_train_plans(shards, 3, 2, seed=s)) for s in range(5)}
    assert len(by_epoch) > 1 and len(by_seed) > 1


@pytest.mark.parametrize("world_size,num_readers", [(1, 1), (2, 2), (4, 3), (3, 1)])
def test_every_shard_read_by_one_rank_per_epoch(world_size, num_readers):
    shards = make_shards([7, 50, 13, 30, 22, 8, 41, 19, 5, 11, 60, 2])
    plans = all_train_plans(shards, world_size, num_readers, epoch=3)
    per_rank = [{p.url for reader in rank for p in reader.slices} for rank in plans]
    assert sum(len(urls) for urls in per_rank) == len(shards)
    assert set().union(*per_rank) == {s.url for s in shards}


@pytest.mark.parametrize(
    "sizes,world_size,num_readers",
    [([5], 2, 1), ([7, 3], 3, 2), ([4, 4, 4], 2, 4), ([1, 1, 9], 4, 1), ([50], 8, 4)],
)
def test_within_shard_split_covers_each_sample_once(sizes, world_size, num_readers):
    shards = make_shards(sizes)
    for plans in (
        [r for rank in all_train_plans(shards, world_size, num_readers) for r in rank],
        [
            r
            for rank in range(world_size)
            for r in plan_eval(shards, rank=rank, world_size=world_size, num_readers=num_readers)
        ],
    ):
        ids = [i for reader in plans for i in sample_ids(list(reader.slices))]
        assert Counter(ids) == Counter((s.url, i) for s in shards for i in range(s.num_samples))
        assert all(reader.num_samples == len(sample_ids(list(reader.slices))) for reader in plans)


def test_stride_split_balances_samples_not_shards():
    # 3 shards for 4 ranks: each rank gets 1/4 of the running sample index
    shards = make_shards([1, 1, 9])
    plans = all_train_plans(shards, 4, 1)
    assert sorted(rank[0].num_samples for rank in plans) == [2, 3, 3, 3]


def test_no_reader_left_empty_when_samples_suffice():
    # What webdataset fails on with "No samples found": fewer shards than readers
    plans = all_train_plans(make_shards([5, 3]), 4, 2)
    assert all(reader.num_samples > 0 for rank in plans for reader in rank)


def test_reader_without_samples_gets_no_quota():
    # A rank's single 2-sample shard over 4 workers leaves 2 workers empty
    plans = all_train_plans(make_shards([6, 2]), 2, 4)
    for rank in plans:
        assert sum(r.quota_batches for r in rank) == 4
        assert all(r.quota_batches == 0 for r in rank if r.num_samples == 0)


def test_steps_formula():
    assert steps_per_epoch(100, 2, 8) == 6
    assert steps_per_epoch(16, 2, 8) == 1
    assert steps_per_epoch(1000, 3, 7) == 47


def test_too_large_batch_names_key_numbers_and_fix():
    with pytest.raises(ConfigError) as error:
        steps_per_epoch(15, 2, 8)
    message = str(error.value)
    assert "data.batch_size=8" in message and "15" in message and "16" in message
    assert "at most 7" in message


@pytest.mark.parametrize("steps,counts", [(6, [5, 5]), (7, [9, 1, 4]), (2, [3, 0, 0, 4])])
def test_quotas_even_and_sum_to_steps(steps, counts):
    quotas = batch_quotas(steps, counts)
    assert sum(quotas) == steps
    live = [q for q, c in zip(quotas, counts) if c > 0]
    assert max(live) - min(live) <= 1
    assert all(q == 0 for q, c in zip(quotas, counts) if c == 0)


def test_the_extra_batch_goes_to_the_reader_with_more_samples():
    # 3 batches of 8 over readers of 12 and 14 samples: the 14 takes 2 (tops up 2),
    # not the 12 (which would top up 4 while the other dropped 6)
    assert batch_quotas(3, [12, 14]) == [1, 2]
    assert batch_quotas(5, [4, 9, 9, 1]) == [1, 2, 1, 1]  # ties: the first reader


@pytest.mark.parametrize("world_size,num_readers", [(2, 2), (3, 4), (8, 2)])
def test_every_rank_gets_the_same_steps(world_size, num_readers):
    shards = make_shards([7, 50, 13, 30])
    plans = all_train_plans(shards, world_size, num_readers, batch_size=3)
    expected = steps_per_epoch(100, world_size, 3)
    assert [sum(r.quota_batches for r in rank) for rank in plans] == [expected] * world_size


def test_resampled_plan_every_reader_may_draw_any_shard():
    shards = make_shards([7, 50, 13, 30, 0])
    plans = plan_resampled_epoch(shards, world_size=3, num_readers=4, batch_size=5)
    assert sum(p.quota_batches for p in plans) == steps_per_epoch(100, 3, 5) == 6
    assert max(p.quota_batches for p in plans) - min(p.quota_batches for p in plans) <= 1
    assert all({p.url for p in plan.slices} == {s.url for s in shards[:4]} for plan in plans)


def shard_set(sizes: list[int]) -> ShardSet:
    entries = [{"file": f"s{i:03d}.tar", "num_samples": n} for i, n in enumerate(sizes)]
    manifest = {"class_names": ["a", "b"], "shards": entries}
    return ShardSet("/data/set", manifest, tuple(make_shards(sizes)))


def test_describe_train_plan_names_shards_steps_drops_and_top_ups():
    cfg = DataConfig(batch_size=4, num_workers=2)
    lines = describe_train_plan(shard_set([2, 30]), cfg, world_size=2, seed=0, epoch=0)
    text = "\n".join(lines)
    assert "32 samples in 2 shard(s); 2 rank(s) x 2 worker(s), batch 4 -> 4 steps" in text
    # 2 shards for 4 readers: strided slices; the small shard's readers top up
    assert "s000.tar[0::2](1)" in text and "tops up 7" in text and "drops 7" in text
    assert sum(line.startswith("rank ") for line in lines) == 2


def test_describe_plans_resampled_and_eval():
    cfg = DataConfig(batch_size=4, num_workers=2, resampled=True)
    text = "\n".join(describe_train_plan(shard_set([8, 8]), cfg, world_size=1, seed=0, epoch=3))
    assert "batches per worker [2, 2]" in text and "with replacement" in text
    lines = describe_eval_plan("val", shard_set([5]), cfg, world_size=2)
    assert lines[1:] == [
        "rank 0: 3 samples", "  worker 0: 2 samples: s000.tar[0::4](2)",
        "  worker 1: 1 samples: s000.tar[2::4](1)",
        "rank 1: 2 samples", "  worker 0: 1 samples: s000.tar[1::4](1)",
        "  worker 1: 1 samples: s000.tar[3::4](1)",
    ]


def test_plan_command_reads_manifests_only(tmp_path, faces_shards, caplog):
    import argparse
    import logging

    from pipeline.data.split import add_plan_arguments, run_plan

    config = tmp_path / "c.yaml"
    config.write_text(
        f"data:\n  train: {faces_shards / 'train'}\n  eval: {{val: {faces_shards / 'val'}}}\n"
    )
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    with caplog.at_level(logging.INFO):
        args = [str(config), "data.batch_size=8", "--world-size", "4"]
        assert run_plan(parser.parse_args(args)) == 0
    assert "160 samples in 4 shard(s); 4 rank(s) x 2 worker(s), batch 8 -> 5 steps" in caplog.text
    assert "rank 3: 5 steps" in caplog.text and "eval val" in caplog.text
    with pytest.raises(ConfigError, match="--world-size 0"):
        run_plan(parser.parse_args([str(config), "--world-size", "0"]))

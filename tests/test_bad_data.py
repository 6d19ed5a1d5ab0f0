"""Bad data (C-08, C-09, C-10): skip counts and logs, strict stops, a limit stops.

Tiny shard sets of real LFW crops with broken members written on purpose; ranks
are simulated in one process, and most loaders run without worker processes.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter

import pytest
from loader_support import good_records, lfw_images, truncate, write_records
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.decode import (
    BadDataError,
    BadDataPolicy,
    RateLimitedLog,
    SampleError,
    Tally,
    check_bad_fraction,
    decode_samples,
)
from pipeline.data.loader import build_eval_loader, build_train_loader


def config(**overrides) -> DataConfig:
    values = dict(image_size=16, batch_size=4, num_workers=0, shuffle_buffer=8)
    return DataConfig(**(values | overrides))


def jpeg(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def truncated_jpeg(index: int) -> bytes:
    data = jpeg(lfw_images()[index])
    return data[: len(data) * 2 // 3]


def bad_records(count: int, prefix: str = "bad") -> list[dict]:
    return [
        {"__key__": f"{prefix}-{i:04d}", "jpg": truncated_jpeg(i), "cls": b"0"}
        for i in range(count)
    ]


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


@pytest.fixture()
def third_bad(tmp_path):
    """12 samples, 4 of them truncated JPEGs: 3 steps of 4 need a top-up."""
    records = good_records(8) + bad_records(4)
    return write_records(tmp_path / "set", [records[::2], records[1::2]])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_counts_and_fills_the_quota_c10(third_bad, num_workers):
    cfg = config(max_bad_fraction=0.5, num_workers=num_workers)
    loader = build_train_loader(cfg, third_bad, rank=0, world_size=1, seed=0)
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [4, 4, 4]
    assert not any(key.startswith("bad") for key in keys_of(batches))
    assert all(set(b) == {"image", "label", "key"} for b in batches)
    counts = loader.bad_counts()
    assert counts["good"] == 12 and counts["bad"] >= 4 and counts["bad_shards"] == 0


def test_bad_fraction_over_the_limit_stops_with_numbers_and_key(third_bad):
    loader = build_train_loader(config(), third_bad, rank=0, world_size=1, seed=0)
    with pytest.raises(BadDataError) as error:
        list(loader)
    message = str(error.value)
    assert "data.max_bad_fraction=0.01" in message and "'bad-00" in message
    assert "raw-00000" in message and re.search(r"\d+ bad of \d+ samples read", message)


def test_strict_stops_at_the_first_bad_sample_naming_key_and_shard(third_bad):
    loader = build_train_loader(
        config(on_bad_sample="strict", num_workers=1), third_bad, rank=0, world_size=1, seed=0
    )
    with pytest.raises(BadDataError, match=r"sample 'bad-\d+' in shard '.*raw-00000\d\.tar'"):
        list(loader)


@pytest.mark.parametrize(
    "members,reason",
    [
        ({"cls": b"0"}, "no image member"),
        ({"png": "good"}, "no label member"),
        ({"jpg": b"\xff\xd8\xff\xe0 not a jpeg", "cls": b"0"}, "cannot decode"),
        ({"jpg": "truncated", "cls": b"0"}, "cannot decode"),
        ({"png": "good", "cls": b"7"}, "outside 0..1"),
    ],
)
def test_each_bad_sample_kind_is_skipped_and_logged(members, reason, caplog):
    good = good_records(2)
    fill = {"good": good[0]["png"], "truncated": truncated_jpeg(0)}
    bad = {k: fill.get(v, v) if isinstance(v, str) else v for k, v in members.items()}
    samples = [dict(s, __url__="shards/x-000003.tar") for s in good]
    samples.insert(1, {"__key__": "k-7", "__url__": "shards/x-000003.tar"} | bad)
    tally = Tally()
    with caplog.at_level(logging.WARNING):
        out = list(decode_samples(samples, 2, "index", BadDataPolicy("skip", tally)))
    assert [s.key for s in out] == [good[0]["__key__"], good[1]["__key__"]]
    assert tally.bad == 1 and tally.last_bad.startswith("sample 'k-7' in shard")
    assert reason in caplog.text and "'k-7'" in caplog.text and "x-000003.tar" in caplog.text


def test_ten_thousand_bad_samples_do_not_flood_the_log(caplog):
    now = [0.0]
    warn = RateLimitedLog(logging.getLogger("test.bad"), first=5, interval_s=30,
                          clock=lambda: now[0])
    policy = BadDataPolicy("skip", Tally(), warn)
    with caplog.at_level(logging.WARNING):
        for index in range(10_000):
            policy(SampleError(f"k{index}", "s.tar", "cannot decode"))
        now[0] = 31.0
        policy(SampleError("last", "s.tar", "cannot decode"))
    assert len(caplog.records) == 6
    assert "9995 similar warnings held back" in caplog.records[-1].getMessage()
    assert policy.tally.bad == 10_001


@pytest.fixture()
def truncated_tar(tmp_path):
    """3 shards of 20; the middle one cut to half its bytes (a partial copy)."""
    shards = [good_records(20, 20 * n, prefix=p) for n, p in enumerate("abc")]
    shard_set = write_records(tmp_path / "set", shards)
    path = shard_set.shards[1].url
    truncate(path, len(open(path, "rb").read()) // 2)
    return shard_set


def test_truncated_tar_readable_samples_used_every_rank_finishes_c09(truncated_tar):
    # A rank holding only the cut shard re-reads it to top up, meeting its
    # missing half again each pass: hence the high limit for this tiny set
    cfg = config(max_bad_fraction=0.9)
    seen, counts = Counter(), Counter()
    for rank in (0, 1):
        loader = build_train_loader(cfg, truncated_tar, rank=rank, world_size=2, seed=0)
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch == 60 // 8
        seen.update(key[0] for key in keys_of(batches))
        counts.update(loader.bad_counts())
    assert counts["bad_shards"] >= 1 and counts["bad"] >= 1
    assert seen["b"] > 0  # the readable start of the cut shard is used


def test_truncated_tar_strict_names_the_shard(truncated_tar):
    loader = build_eval_loader(config(on_bad_sample="strict"), truncated_tar, rank=0,
                               world_size=1)
    with pytest.raises(BadDataError, match=r"shard '.*raw-000001\.tar'"):
        list(loader)


def test_eval_scores_every_readable_sample_once_and_counts_the_rest(truncated_tar):
    loader = build_eval_loader(config(max_bad_fraction=0.5), truncated_tar, rank=0,
                               world_size=1)
    for _ in range(2):  # counts add up over passes; epoch_counts are the last pass
        keys = keys_of(loader)
        counts = loader.epoch_counts()
        assert len(set(keys)) == len(keys) and len(keys) + counts["bad"] == 60
        assert {k[0] for k in keys} == {"a", "b", "c"} and counts["bad_shards"] == 1
    assert loader.bad_counts()["bad"] == 2 * counts["bad"]


def test_bad_samples_after_the_last_batch_are_still_counted(tmp_path):
    shard_set = write_records(tmp_path / "set", [good_records(5) + bad_records(1)])
    loader = build_eval_loader(config(max_bad_fraction=0.5), shard_set, rank=0, world_size=1)
    assert [len(b["key"]) for b in loader] == [4, 1]
    assert loader.bad_counts()["bad"] == 1


def test_unreadable_shard_file_follows_the_policy(tmp_path):
    shard_set = write_records(tmp_path / "set", [good_records(8), good_records(8, 8)])
    (tmp_path / "set" / "raw-000001.tar").unlink()
    loader = build_eval_loader(config(max_bad_fraction=0.6), shard_set, rank=0, world_size=1)
    assert len(keys_of(loader)) == 8
    assert loader.bad_counts() | {"small": 0} == {
        "good": 8, "bad": 8, "bad_shards": 1, "small": 0
    }
    strict = build_eval_loader(config(on_bad_sample="strict"), shard_set, rank=0, world_size=1)
    with pytest.raises(BadDataError, match="raw-000001.tar.*FileNotFoundError: No such file"):
        list(strict)


def test_a_reader_with_nothing_usable_stops_instead_of_looping(tmp_path):
    shard_set = write_records(tmp_path / "set", [bad_records(8)])
    loader = build_train_loader(config(max_bad_fraction=0.99), shard_set, rank=0,
                                world_size=1, seed=0)
    with pytest.raises(BadDataError, match="gave no usable sample in a whole pass"):
        list(loader)


@pytest.mark.parametrize("image_size,small", [(32, 12), (16, 0)])
def test_images_smaller_than_the_crop_are_counted_and_resized_up_c08(
    tmp_path, image_size, small
):
    shard_set = write_records(tmp_path / "set", [good_records(12)])  # 25 x 25 px
    loader = build_train_loader(config(image_size=image_size), shard_set, rank=0,
                                world_size=1, seed=0)
    batches = list(loader)
    assert batches[0]["image"].shape == (4, 3, image_size, image_size)
    assert loader.bad_counts()["small"] == small


def test_bad_fraction_message_and_threshold():
    check_bad_fraction(1, 100, 0.01, "x", "rank 0 train")  # exactly at the limit: fine
    with pytest.raises(BadDataError) as error:
        check_bad_fraction(2, 100, 0.01, "sample 'k' in shard 's.tar'", "rank 3 train")
    message = str(error.value)
    for part in ("rank 3 train", "2 bad of 100", "2.00%", "'k'", "s.tar", "verify"):
        assert part in message

"""`pipeline verify SHARDS [--deep]`: check a shard set against its manifest.

One sequential read per shard checks: the file opens and reads to its end as a
tar, its size and SHA-256 match the manifest, it holds the number of samples
the manifest lists, every sample has an image and a label member, every label
parses in the manifest's label_format and is in range, and no key repeats
anywhere in the set. With --deep every image is decoded as the loader would.
When the whole set is checked, the manifest's totals and class counts are
compared with what was read. Exit code 0: clean; 1: problems (each logged).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from tqdm import tqdm

from pipeline.data.decode import IMAGE_EXTENSIONS, SampleError, decode_sample, wanted_member
from pipeline.data.labels import parse_label
from pipeline.data.shards import (
    SHARD_ERRORS,
    Shard,
    ShardSet,
    error_text,
    open_shard,
    resolve_shards,
)
from pipeline.data.tar import tar_samples_of

log = logging.getLogger(__name__)

MAX_LOGGED = 50  # problems logged one by one; the rest are only counted


@dataclass
class SetCheck:
    """What has been read so far over the whole set."""

    shard_set: ShardSet
    deep: bool
    problems: list[str] = field(default_factory=list)
    key_shard: dict[str, str] = field(default_factory=dict)
    labels: Counter = field(default_factory=Counter)


class _HashingReader:
    """A read-only stream that hashes and counts every byte read through it."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.digest = hashlib.sha256()
        self.num_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.num_bytes += len(data)
        return data

    def drain(self) -> None:
        """Read what the tar reader left (end blocks, padding) into the hash."""
        while self.read(1 << 20):
            pass


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="shard folder, its manifest.json, a pattern or a URL")
    parser.add_argument("--deep", action="store_true", help="also decode every image")


def run_verify(args: argparse.Namespace) -> int:
    """`pipeline verify`: 0 when the set is clean, 1 when problems were found."""
    shard_set = resolve_shards(args.shards, key="SHARDS", must_exist=False)
    problems = verify_shard_set(shard_set, deep=args.deep)
    for problem in problems[:MAX_LOGGED]:
        log.warning("%s", problem)
    if len(problems) > MAX_LOGGED:
        log.warning("... and %d more problems", len(problems) - MAX_LOGGED)
    what = "decoded and checked" if args.deep else "checked (add --deep to decode images)"
    if problems:
        log.error("%s: %d problem(s) in %d shard(s) %s", args.shards, len(problems),
                  len(shard_set.shards), what)
        return 1
    log.info("%s: %d samples in %d shard(s) %s: no problems", args.shards,
             shard_set.num_samples, len(shard_set.shards), what)
    return 0


def verify_shard_set(shard_set: ShardSet, deep: bool = False) -> list[str]:
    """Every problem found in the set, one line each, naming shard and key."""
    check = SetCheck(shard_set, deep)
    entries = {entry["file"]: entry for entry in shard_set.manifest["shards"]}
    with tqdm(total=shard_set.num_samples, unit="img", desc="verify") as progress:
        for shard in shard_set.shards:
            entry = entries[shard.url.rsplit("/", 1)[-1]]
            verify_shard(shard, entry, check, progress)
    if len(shard_set.shards) == len(entries):
        check.problems += _manifest_totals(shard_set.manifest, check.labels)
    return check.problems


def verify_shard(shard: Shard, entry: dict[str, Any], check: SetCheck, progress: tqdm) -> None:
    """Read one shard to its end, checking its samples, count, size and checksum."""
    name = shard.url.rsplit("/", 1)[-1]
    try:
        with open_shard(shard.url) as stream:
            reader = _HashingReader(stream)
            count = _check_samples(reader, shard, name, check, progress)
            reader.drain()  # a broken tar is still sized and hashed: both tell what changed
    except SHARD_ERRORS as error:
        check.problems.append(f"{name}: cannot be read: {error_text(error)}")
        return
    if count is not None and count != shard.num_samples:
        check.problems.append(f"{name}: holds {count} samples, the manifest lists "
                              f"{shard.num_samples}")
    check.problems += _file_problems(name, entry, reader)


def _check_samples(reader: _HashingReader, shard: Shard, name: str, check: SetCheck,
                   progress: tqdm) -> int | None:
    """The shard's sample count, or None (with the problem noted) if its tar breaks."""
    count, skipped = 0, Counter()

    def wanted(member: str) -> bool:
        keep = wanted_member(member)
        if not keep:
            skipped[member.rsplit("/", 1)[-1].partition(".")[2] or member] += 1
        return keep

    try:
        # The loader's own tar reader and member filter: verify accepts what training reads
        for sample in tar_samples_of(reader, shard.url, wanted):
            count += 1
            progress.update(1)
            _check_sample(sample, name, check)
    except SHARD_ERRORS as error:
        check.problems.append(f"{name}: unreadable after {count} samples: {error_text(error)}")
        return None
    finally:
        if skipped:
            log.warning("%s: members the loader never reads (skipped unread, never "
                        "unpickled): %s", name, dict(skipped))
    return count


def _file_problems(name: str, entry: dict[str, Any], reader: _HashingReader) -> list[str]:
    problems = []
    if "bytes" in entry and reader.num_bytes != entry["bytes"]:
        problems.append(f"{name}: {reader.num_bytes} bytes, the manifest lists {entry['bytes']}")
    if "sha256" in entry and reader.digest.hexdigest() != entry["sha256"]:
        problems.append(f"{name}: SHA-256 differs from the manifest's (changed or damaged)")
    if "sha256" not in entry:
        log.info("%s: the manifest has no sha256 for it, so its bytes are not checked", name)
    return problems


def _check_sample(sample: dict[str, Any], name: str, check: SetCheck) -> None:
    key = str(sample["__key__"])
    first = check.key_shard.get(key)
    if first is None:
        check.key_shard[key] = name
    else:
        where = "earlier in this shard" if first == name else f"also in {first}"
        check.problems.append(f"{name}: key {key!r} repeats ({where})")
    shards = check.shard_set
    problem = _sample_problem(sample, shards.num_classes, shards.label_format, check.deep)
    if problem:
        check.problems.append(f"{name}: sample {key!r}: {problem}")
    elif shards.label_format == "index":
        check.labels[int(sample["cls"])] += 1


def _sample_problem(sample: dict[str, Any], num_classes: int, fmt: str, deep: bool) -> str:
    if not any(ext in sample for ext in IMAGE_EXTENSIONS):
        return f"no image member (one of {IMAGE_EXTENSIONS})"
    if "cls" not in sample:
        return "no label member (.cls)"
    text = sample["cls"].decode("utf-8", errors="replace").strip()
    try:
        parse_label(text, fmt, num_classes)
    except ValueError as error:
        return f"bad {fmt} label {text!r}: {error}"
    if deep:
        try:
            decode_sample(sample, num_classes, fmt)
        except SampleError as error:
            return str(error).split(": ", 1)[-1]
    return ""


def _manifest_totals(manifest: dict[str, Any], labels: Counter) -> list[str]:
    problems = []
    listed = sum(int(e["num_samples"]) for e in manifest["shards"])
    if manifest.get("num_samples", listed) != listed:
        problems.append(f"manifest: num_samples {manifest['num_samples']} but its shards "
                        f"list {listed}")
    counts = manifest.get("class_counts")
    if counts and manifest.get("label_format", "index") == "index":
        found = [labels.get(index, 0) for index in range(len(counts))]
        if found != list(counts):
            problems.append(f"manifest: class_counts {counts} but the shards hold {found}")
    return problems

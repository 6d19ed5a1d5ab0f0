"""Write samples into a shard set: `<name>-%06d.tar` files plus `manifest.json`.

Each sample is stored as `<key>.<png|jpg|...>` (the encoded image), `<key>.cls`
(the class index as text) and `<key>.json` (metadata such as the source file).
Keys are generated (`<name>-<index>`), so dots or odd characters in source file
names never reach the tar member names; the original name is kept as metadata.

The set is written into `<out>.partial/` and renamed to `<out>/` only when every
shard and the manifest are complete, so a crash never leaves a set that looks
finished.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from pipeline.config import ConfigError
from pipeline.data.shards import MANIFEST_FORMAT, MANIFEST_NAME

IMAGE_EXTENSIONS = ("jpg", "png", "webp", "bmp", "tif", "gif")


@dataclass
class ShardSample:
    """One encoded image with its class index and free-form metadata."""

    image: bytes
    image_ext: str
    label: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _OpenShard:
    path: Path
    writer: wds.TarWriter
    num_samples: int = 0
    num_bytes: int = 0


def safe_name(name: str) -> str:
    """A name usable in shard file names and sample keys: letters, digits, '_' and '-'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "shards"


def write_shard_set(
    samples: Iterable[ShardSample],
    out_dir: Path,
    name: str,
    class_names: list[str],
    maxcount: int = 10_000,
    maxsize: int = 1 << 30,
    total: int | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `samples` as a shard set in `out_dir`; return the manifest."""
    out_dir = Path(out_dir)
    _check_limits(maxcount, maxsize)
    _prepare_output(out_dir, overwrite)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    name = safe_name(name)
    entries, counts = _write_tars(samples, partial, name, class_names, maxcount, maxsize, total)
    manifest = _manifest(name, class_names, entries, counts, extra or {})
    (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))

    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return manifest


def _check_limits(maxcount: int, maxsize: int) -> None:
    if maxcount < 1:
        raise ConfigError(f"maxcount={maxcount} must be at least 1 sample per shard")
    if maxsize < 1024:
        raise ConfigError(f"maxsize={maxsize} bytes is too small for a shard; use >= 1024")


def _prepare_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"output folder {str(out_dir)!r} is not empty; choose another, or pass --overwrite"
        )


def _write_tars(samples, folder, name, class_names, maxcount, maxsize, total):
    entries: list[dict[str, Any]] = []
    counts = [0] * len(class_names)
    shard: _OpenShard | None = None
    for index, sample in enumerate(tqdm(samples, total=total, desc=f"shard {name}", unit="img")):
        _check_label(sample, class_names)
        if shard is None or shard.num_samples >= maxcount or shard.num_bytes >= maxsize:
            if shard is not None:
                entries.append(_close(shard))
            shard = _open(folder, name, len(entries))
        _write_one(shard, f"{name}-{index:08d}", sample)
        counts[sample.label] += 1
    if shard is not None:
        entries.append(_close(shard))
    if not entries:
        raise ConfigError(f"no samples to write for {name!r}; is the input empty?")
    return entries, counts


def _check_label(sample: ShardSample, class_names: list[str]) -> None:
    if not 0 <= sample.label < len(class_names):
        source = sample.meta.get("source", "?")
        raise ConfigError(
            f"label {sample.label} of {source!r} is outside 0..{len(class_names) - 1} "
            f"(classes {class_names}); fix the label or the class list"
        )


def _open(folder: Path, name: str, number: int) -> _OpenShard:
    path = folder / f"{name}-{number:06d}.tar"
    return _OpenShard(path=path, writer=wds.TarWriter(str(path), encoder=False))


def _write_one(shard: _OpenShard, key: str, sample: ShardSample) -> None:
    ext = "jpg" if sample.image_ext.lower() in ("jpeg", "jpg") else sample.image_ext.lower()
    meta = json.dumps(sample.meta, sort_keys=True).encode()
    record = {"__key__": key, ext: sample.image, "cls": str(sample.label).encode(), "json": meta}
    shard.writer.write(record)
    shard.num_samples += 1
    shard.num_bytes += len(sample.image) + len(meta) + 3 * 512


def _close(shard: _OpenShard) -> dict[str, Any]:
    shard.writer.close()
    return {
        "file": shard.path.name,
        "num_samples": shard.num_samples,
        "bytes": shard.path.stat().st_size,
        "sha256": _sha256(shard.path),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(name, class_names, entries, counts, extra) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "num_samples": sum(e["num_samples"] for e in entries),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "class_counts": counts,
        "label_format": "index",
        "shards": entries,
        **extra,
    }

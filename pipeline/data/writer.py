"""Write samples into a shard set: `<name>-%06d.tar` files plus `manifest.json`.

Each sample is stored as `<key>.<png|jpg|...>` (the encoded image), `<key>.cls`
(the class index as text) and `<key>.json` (metadata such as the source file).
Keys are generated (`<name>-<index>`), so dots or odd characters in source file
names never reach the tar member names; the original name is kept as metadata.

The set is written into `<out>.partial/` and renamed to `<out>/` only when every
shard and the manifest are complete, so a crash never leaves a set that looks
finished. Tar members carry a fixed mtime, so the same input, seed and limits
give byte-identical shards.

`add_shard_arguments` and `run_shard` are the `pipeline shard` command.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import re
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from pipeline.config import ConfigError
from pipeline.data.labels import format_label
from pipeline.data.shards import MANIFEST_FORMAT, MANIFEST_NAME
from pipeline.data.sources import (
    SOURCE_KINDS,
    ShardSample,
    open_source,
    shuffled,
    stratified_split,
)

__all__ = ["ShardSample", "add_shard_arguments", "run_shard", "write_shard_set"]

log = logging.getLogger(__name__)

# The image members the loader decodes (pipeline/data/decode.py).
IMAGE_EXTENSIONS = ("jpg", "png", "webp", "bmp")
DEFAULT_MAXCOUNT = 10_000
DEFAULT_MAXSIZE = 1_000_000_000
MAX_NAME_CHARS = 64  # keeps `<name>-<8 digits>.<ext>` within the 100 characters of a ustar name
TAR_MTIME = 946684800  # 2000-01-01, fixed so that shards are reproducible
_BLOCK = tarfile.BLOCKSIZE
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(?:([kmgt])(i?)b?|b?)\s*$", re.IGNORECASE)


def safe_name(name: str) -> str:
    """A name usable in shard file names and sample keys: letters, digits, '_' and '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:MAX_NAME_CHARS]
    return cleaned or "shards"


def write_shard_set(
    samples: Iterable[ShardSample],
    out_dir: Path,
    name: str,
    class_names: list[str],
    maxcount: int = DEFAULT_MAXCOUNT,
    maxsize: int = DEFAULT_MAXSIZE,
    total: int | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `samples` as a shard set in `out_dir`; return the manifest.

    A shard holds at most `maxcount` samples and `maxsize` bytes (a sample
    bigger than `maxsize` gets a shard of its own). Raises ConfigError.
    """
    out_dir = Path(out_dir).resolve()  # `--out .` has no name to put `.partial` after
    check_limits(maxcount, maxsize)
    check_output(out_dir, overwrite)
    partial = _fresh_partial(out_dir)
    with _removed_on_error(partial):
        manifest = _write_into(partial, samples, name, class_names, (maxcount, maxsize), total)
        manifest.update(extra or {})
        (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    _publish(partial, out_dir)
    return manifest


def check_limits(maxcount: int, maxsize: int) -> None:
    if maxcount < 1:
        raise ConfigError(f"maxcount={maxcount} must be at least 1 sample per shard")
    if maxsize < tarfile.RECORDSIZE:
        raise ConfigError(
            f"maxsize={maxsize} bytes is below the {tarfile.RECORDSIZE} bytes that even "
            "an empty tar file takes; use a larger --maxsize"
        )


# ---- the output folder: refuse to clobber anything but a shard set


def check_output(out_dir: Path, overwrite: bool) -> None:
    """Raise ConfigError unless `out_dir` is absent, empty, or a shard set to overwrite."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output {str(out_dir)!r} is a file; give a folder for the shards")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ConfigError(
            f"output folder {str(out_dir)!r} is not empty; choose another, or pass --overwrite"
        )
    if not (_holds_only_shard_files(out_dir, depth=1) and _holds_manifest(out_dir)):
        raise ConfigError(
            f"--overwrite only replaces a shard set written by `pipeline shard`, and "
            f"{str(out_dir)!r} holds other files; empty it yourself or choose another folder"
        )


def _holds_only_shard_files(folder: Path, depth: int) -> bool:
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            if depth == 0 or not _holds_only_shard_files(entry, depth - 1):
                return False
        elif entry.name != MANIFEST_NAME and entry.suffix != ".tar":
            return False
    return True


def _holds_manifest(folder: Path) -> bool:
    candidates = [folder, folder / "train", folder / "val"]
    return any(_is_manifest(d / MANIFEST_NAME) for d in candidates)


def _is_manifest(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _fresh_partial(out_dir: Path) -> Path:
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        # Left by an interrupted run; removed only if it holds nothing but shard files.
        if not _holds_only_shard_files(partial, depth=2):
            raise ConfigError(
                f"{str(partial)!r} exists and holds more than shard files; remove it yourself"
            )
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


@contextlib.contextmanager
def _removed_on_error(folder: Path) -> Iterator[None]:
    """Delete the unfinished folder if the block raises, then re-raise."""
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _publish(partial: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        partial.rename(out_dir)
        return
    # The folder itself stays (it may be the working directory or a mount point);
    # its contents are swapped, the manifest last, so it never looks finished early.
    for entry in out_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for entry in sorted(partial.iterdir(), key=lambda p: p.name == MANIFEST_NAME):
        entry.rename(out_dir / entry.name)
    partial.rmdir()


# ---- tar writing


@dataclass
class _OpenShard:
    path: Path
    writer: wds.TarWriter
    num_samples: int = 0
    content_bytes: int = 0


@dataclass
class _SetWriter:
    folder: Path
    name: str
    class_names: list[str]
    maxcount: int
    maxsize: int
    entries: list[dict[str, Any]] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)
    formats: set[str] = field(default_factory=set)
    label_formats: set[str] = field(default_factory=set)
    shard: _OpenShard | None = None

    def add(self, key: str, sample: ShardSample) -> None:
        _check_label(sample, self.class_names)
        ext = _normalise_ext(sample.image_ext)
        if ext not in IMAGE_EXTENSIONS:
            raise ConfigError(
                f"image type {ext!r} of {sample.meta.get('source', key)!r} cannot be decoded "
                f"by the loader; convert it to one of {IMAGE_EXTENSIONS}"
            )
        record = {
            "__key__": key,
            ext: sample.image,
            "cls": format_label(sample.label).encode(),
            "json": json.dumps(sample.meta, sort_keys=True).encode(),
        }
        record_bytes = sum(_member_bytes(len(v)) for k, v in record.items() if k != "__key__")
        if self._needs_new_shard(record_bytes):
            self._close_shard()
            self.shard = _open(self.folder, self.name, len(self.entries))
        self.shard.writer.write(record)
        self.shard.num_samples += 1
        self.shard.content_bytes += record_bytes
        self._count(sample.label)
        self.formats.add(ext)

    def _count(self, label: int | list[int]) -> None:
        if isinstance(label, int):
            self.class_counts[label] += 1
            self.label_formats.add("index")
            return
        # Vectors: class_counts holds the positives of each class.
        for index, value in enumerate(label):
            self.class_counts[index] += int(value)
        self.label_formats.add("one_hot" if sum(label) == 1 else "multi_hot")

    def _needs_new_shard(self, record_bytes: int) -> bool:
        if self.shard is None or self.shard.num_samples >= self.maxcount:
            return True
        size_after = _tar_file_bytes(self.shard.content_bytes + record_bytes)
        return size_after > self.maxsize

    def _close_shard(self) -> None:
        if self.shard is not None:
            self.entries.append(_close(self.shard))
            self.shard = None

    def finish(self) -> list[dict[str, Any]]:
        self._close_shard()
        if not self.entries:
            raise ConfigError(f"no samples to write for {self.name!r}; is the input empty?")
        return self.entries


def _write_into(folder, samples, name, class_names, limits, total) -> dict[str, Any]:
    name = safe_name(name)
    writer = _SetWriter(folder, name, list(class_names), *limits)
    writer.class_counts = [0] * len(class_names)
    progress = tqdm(samples, total=total, desc=f"shard {name}", unit="img")
    for index, sample in enumerate(progress):
        writer.add(f"{name}-{index:08d}", sample)
    entries = writer.finish()
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "num_samples": sum(e["num_samples"] for e in entries),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "class_counts": writer.class_counts,
        "label_format": _label_format(writer.label_formats),
        "image_format": ",".join(sorted(writer.formats)),
        "shards": entries,
    }


def _normalise_ext(ext: str) -> str:
    ext = ext.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _member_bytes(size: int) -> int:
    """Bytes a tar member takes: a header block plus the data padded to whole blocks."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _tar_file_bytes(content_bytes: int) -> int:
    # tarfile ends an archive with two zero blocks and pads it to a whole record.
    record = tarfile.RECORDSIZE
    return -(-(content_bytes + 2 * _BLOCK) // record) * record


def _check_label(sample: ShardSample, class_names: list[str]) -> None:
    label, source = sample.label, sample.meta.get("source", "?")
    if isinstance(label, int):
        if not 0 <= label < len(class_names):
            raise ConfigError(
                f"label {label} of {source!r} is outside 0..{len(class_names) - 1} "
                f"(classes {class_names}); fix the label or the class list"
            )
        return
    if len(label) != len(class_names) or any(v not in (0, 1) for v in label):
        raise ConfigError(
            f"label {list(label)} of {source!r} is not a 0/1 vector of {len(class_names)} "
            f"values (classes {class_names}); fix the label or the class list"
        )


def _label_format(formats: set[str]) -> str:
    # A set mixing one-hot and multi-hot rows is multi-hot; indices never mix with vectors.
    if formats == {"index"} or not formats:
        return "index"
    if "index" in formats:
        raise ConfigError("labels mix class indices and 0/1 vectors; use one kind per set")
    return "multi_hot" if "multi_hot" in formats else "one_hot"


def _open(folder: Path, name: str, number: int) -> _OpenShard:
    path = folder / f"{name}-{number:06d}.tar"
    writer = wds.TarWriter(str(path), encoder=False, mtime=TAR_MTIME)
    return _OpenShard(path=path, writer=writer)


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


# ---- the `pipeline shard` command


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="image folder, CNNDetection folder, .csv/.jsonl list, or embedded:faces|digits",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for the shard set")
    parser.add_argument("--name", help="shard and key prefix (default: from SOURCE)")
    parser.add_argument("--kind", default="auto", choices=("auto", *SOURCE_KINDS))
    parser.add_argument(
        "--maxcount", type=_positive_int, default=DEFAULT_MAXCOUNT, help="samples per shard"
    )
    parser.add_argument(
        "--maxsize",
        type=_size_arg,
        default=DEFAULT_MAXSIZE,
        help="bytes per shard; 500MB and 1GB are powers of 1000, 1GiB of 1024 (default 1GB)",
    )
    parser.add_argument(
        "--val-fraction",
        type=_fraction_arg,
        default=None,
        help="write <out>/train and <out>/val, this share of each class in val",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the sample order and split")
    parser.add_argument(
        "--image-format",
        choices=("png", "jpg"),
        default=None,
        help="encoding of embedded arrays (default png); files keep their own bytes",
    )
    parser.add_argument(
        "--class-names",
        type=_name_list,
        default=None,
        help="comma-separated class names in label order (folder and list inputs)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a shard set already in --out"
    )


def run_shard(args: argparse.Namespace) -> int:
    """Write the shard set(s) `args` describe; return 0. Raises ConfigError on bad input."""
    out = Path(args.out).resolve()
    limits = {"maxcount": args.maxcount, "maxsize": parse_size(args.maxsize)}
    check_limits(**limits)
    source = open_source(args.source, args.kind, args.image_format, args.class_names)
    check_output(out, args.overwrite)
    name = args.name or source.default_name
    extra = {"source": {"kind": source.kind, "path": source.location}, "seed": args.seed}

    if args.val_fraction is None:
        order = shuffled(len(source), args.seed)
        manifest = write_shard_set(
            source.samples(order),
            out,
            name,
            source.class_names,
            total=len(order),
            overwrite=args.overwrite,
            extra=extra,
            **limits,
        )
        _log_summary(manifest, out)
        return 0

    train, val = stratified_split(source.labels, args.val_fraction, args.seed)
    extra["val_fraction"] = args.val_fraction
    # Both parts go into one partial folder, so train never appears without val.
    partial = _fresh_partial(out)
    with _removed_on_error(partial):
        for part, order in (("train", train), ("val", val)):
            manifest = write_shard_set(
                source.samples(order),
                partial / part,
                f"{name}-{part}",
                source.class_names,
                total=len(order),
                extra={**extra, "split": part},
                **limits,
            )
            _log_summary(manifest, out / part)
    _publish(partial, out)
    return 0


def _log_summary(manifest: dict[str, Any], folder: Path) -> None:
    counts = ", ".join(
        f"{name}={count}" for name, count in zip(manifest["class_names"], manifest["class_counts"])
    )
    log.info(
        "wrote %d samples in %d shard(s) to %s; classes: %s; manifest: %s",
        manifest["num_samples"],
        len(manifest["shards"]),
        folder,
        counts,
        folder / MANIFEST_NAME,
    )
    for name, count in zip(manifest["class_names"], manifest["class_counts"]):
        if count == 0:
            log.warning("class %r has no samples in %s", name, folder)


def parse_size(text: str | int) -> int:
    """Bytes from `123`, `500MB`, `1.5G` (powers of 1000) or `64KiB`, `1GiB` (of 1024)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"size {text!r} is not a number of bytes such as 500MB or 1GiB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    power = "kmgt".index(unit.lower()) + 1 if unit else 0
    return int(float(number) * base**power)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _fraction_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1")
    return value


def _name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r} must be distinct, non-empty class names separated by commas"
        )
    return names

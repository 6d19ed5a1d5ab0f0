"""Samples out of a plain tar stream, reading only a member's name, size and type.

webdataset's reader goes through `tarfile`, which parses every header field in
Python: about 0.45 ms a sample here, a sixth of decoding one. This reader does
what the loader needs and no more, and groups members into samples the way
webdataset does (key = the path up to the first dot of the file name; the rest,
lower-cased, is the member's extension), so a shard reads the same either way.

Understood: ustar and old-style headers, GNU long names (`L`), pax path records
(`x`); other special members (links, directories, global pax) are skipped.
Every header's checksum is verified. A stream that ends inside a member raises
tarfile.ReadError; compressed tars are refused (shards are plain `.tar`).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from typing import IO, Any

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def tar_members(stream: IO[bytes], wanted: Callable[[str], bool]
                ) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular member whose name `wanted` accepts."""
    long_name: str | None = None
    while True:
        header = _read(stream, BLOCK, at_start=True)
        if header is None or header == bytes(BLOCK):
            return  # end of archive (a zero block, or the stream's end between members)
        _check(header)
        kind, size = header[156:157], _size(header)
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"L", b"x"):
            long_name = _long_name(kind, _read(stream, padded)[:size]) or long_name
            continue
        name = long_name or _name(header)
        long_name = None
        if kind in REGULAR and wanted(name):
            yield name, _read(stream, padded)[:size]
        else:
            _skip(stream, padded)


def tar_samples_of(stream: IO[bytes], url: str, wanted: Callable[[str], bool]
                   ) -> Iterator[dict[str, Any]]:
    """Members grouped into webdataset samples: {"__key__", "__url__", ext: bytes}."""
    sample: dict[str, Any] | None = None
    for name, data in tar_members(stream, wanted):
        match = _KEY_EXT.match(name)
        if match is None:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {ext}")
        sample[ext] = data
    if sample is not None:
        yield sample


def _read(stream: IO[bytes], size: int, at_start: bool = False) -> bytes | None:
    data = stream.read(size)
    while 0 < len(data) < size:  # pipes and sockets may return less than asked
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    if at_start and not data:
        return None
    if len(data) < size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _skip(stream: IO[bytes], size: int) -> None:
    while size > 0:
        size -= len(_read(stream, min(size, 1 << 20)))


def _check(header: bytes) -> None:
    if header[:2] == b"\x1f\x8b":
        raise tarfile.ReadError("compressed tar: shards must be plain .tar files")
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError("bad checksum field in a tar header") from None
    # The checksum counts its own 8 bytes as spaces
    if stored != sum(header) - sum(header[148:156]) + 8 * 32:
        raise tarfile.ReadError("bad checksum in a tar header (corrupt shard?)")


def _size(header: bytes) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError("bad size field in a tar header") from None


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _long_name(kind: bytes, data: bytes) -> str | None:
    if kind == b"L":
        return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    for record in data.decode("utf-8", "surrogateescape").splitlines():
        # pax records: "<length> <key>=<value>"
        _, _, pair = record.partition(" ")
        key, _, value = pair.partition("=")
        if key == "path":
            return value
    return None

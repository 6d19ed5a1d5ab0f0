"""Read an offline wandb run (`run-<id>.wandb`) back, for tests.

wandb 0.31 has no public reader for its transaction log, so this follows the
layout it writes: a 7-byte file header (":W&B", two magic bytes, a version
byte), then LevelDB log blocks of 32 KiB counted from the start of the file.
Each fragment has a 7-byte header: CRC-32 of type byte + data (4 bytes, little
endian), data length (2 bytes, little endian) and type (1 full, 2 first,
3 middle, 4 last). A block tail shorter than a fragment header is padding.
Each whole record parses as `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

FILE_HEADER = 7
BLOCK = 32 * 1024
FRAGMENT_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def record_bytes(data: bytes) -> Iterator[bytes]:
    """The whole records of a `.wandb` file's bytes, fragments joined."""
    if data[:4] != b":W&B":
        raise ValueError(f"not a wandb transaction log (header {data[:FILE_HEADER]!r})")
    offset, pending = FILE_HEADER, b""
    while offset + FRAGMENT_HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < FRAGMENT_HEADER:
            offset += room  # padding at the end of a block
            continue
        checksum, length, kind = struct.unpack_from("<IHB", data, offset)
        body = data[offset + FRAGMENT_HEADER : offset + FRAGMENT_HEADER + length]
        offset += FRAGMENT_HEADER + length
        if kind == 0:
            break  # zeros past the last record: space written ahead, nothing in it yet
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"bad checksum in fragment ending at byte {offset}")
        pending = body if kind in (FULL, FIRST) else pending + body
        if kind in (FULL, LAST):
            yield pending
            pending = b""


def read_records(path: Path) -> list[Any]:
    """Every record of a run file, as `wandb_internal_pb2.Record` messages."""
    records = []
    for raw in record_bytes(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def item_key(item: Any) -> str:
    """A history item's key: `key`, or its `nested_key` parts joined with '/'."""
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What one offline run received: its id and names, config, and history rows in order."""

    run_id: str
    project: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def scalars(self) -> list[dict[str, Any]]:
        """Rows with only the numbers and strings, without wandb's `_` keys."""
        return [{k: v for k, v in row.items() if not k.startswith("_")
                 and isinstance(v, (int, float, str))} for row in self.rows]


def read_run(folder: Path) -> OfflineRun:
    """Parse the `run-*.wandb` file inside one `offline-run-*` folder."""
    (path,) = Path(folder).glob("run-*.wandb")
    run = OfflineRun(run_id=path.stem.removeprefix("run-"))
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.rows.append({item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            run.config.update(_config_items(record.config))
        elif kind == "run":
            info = record.run
            run.run_id = info.run_id or run.run_id
            run.project, run.name, run.group = info.project, info.display_name, info.run_group
            run.tags = list(info.tags)
            run.config.update(_config_items(info.config))
    return run


def _config_items(config: Any) -> dict[str, Any]:
    items = {}
    for item in config.update:
        key = item.key or "/".join(item.nested_key)
        items[key] = json.loads(item.value_json)
    return items

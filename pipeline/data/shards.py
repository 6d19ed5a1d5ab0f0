"""Shard sets: a folder of `<name>-%06d.tar` files described by a `manifest.json`.

The manifest is written last, so a folder without one is an unfinished shard set
and is refused. It records the samples in every shard, which the loader needs to
give every rank the same number of steps before reading a single byte.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand

from pipeline.config import ConfigError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pipeline-shards/1"


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int


@dataclass(frozen=True)
class ShardSet:
    """The shards a job reads, with the manifest that describes them."""

    root: Path
    manifest: dict[str, Any]
    shards: tuple[Shard, ...]

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"])

    @property
    def label_format(self) -> str:
        return self.manifest.get("label_format", "index")


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check a shard manifest; raise ConfigError naming the file."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"cannot read the shard manifest {str(path)!r} ({err}); "
            "rewrite the shard set with `pipeline shard`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(
            f"{path} is not a shard manifest of format {MANIFEST_FORMAT!r}; "
            "write the shards with `pipeline shard`"
        )
    missing = [k for k in ("class_names", "shards") if not manifest.get(k)]
    if missing:
        raise ConfigError(
            f"shard manifest {str(path)!r} lacks {missing}; rewrite the set with `pipeline shard`"
        )
    _check_shard_names(manifest, path)
    return manifest


def _check_shard_names(manifest: dict[str, Any], path: Path) -> None:
    # A listed name such as 'pipe:cmd' or '../x' would make the reader run a
    # command or leave the set's folder: shard names are plain file names.
    for entry in manifest["shards"]:
        name = str(entry.get("file", ""))
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar", name) or ".." in name:
            raise ConfigError(
                f"shard manifest {str(path)!r} lists {name!r}, which is not a plain .tar file "
                "name in the set's folder; rewrite the set with `pipeline shard`"
            )


def resolve_shards(spec: str, key: str = "data.train") -> ShardSet:
    """Turn a shard folder, a manifest path or a shard pattern into a ShardSet.

    A pattern (glob `*` or braces `{000000..000009}`) selects shards of the
    manifest that sits beside them. Raises ConfigError naming `key`.
    """
    if not spec:
        raise ConfigError(f"{key} is empty; give a shard folder written by `pipeline shard`")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_set(path, None, key, spec)
    if path.name == MANIFEST_NAME:
        return _load_set(path.parent, None, key, spec)
    if path.suffix == ".tar" or any(ch in path.name for ch in "*?[{"):
        return _load_set(path.parent, path.name, key, spec)
    problem = "is not a shard set" if path.exists() else "does not exist"
    raise ConfigError(
        f"{key}={spec!r} {problem}; give a shard folder, its {MANIFEST_NAME}, "
        "or a pattern such as 'shards/train-*.tar' (wildcards in the file name only)"
    )


def _load_set(root: Path, pattern: str | None, key: str, spec: str) -> ShardSet:
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ConfigError(_no_manifest_message(root, key, spec))
    manifest = read_manifest(manifest_path)
    entries = manifest["shards"]
    if pattern is not None:
        entries = [e for e in entries if _matches(e["file"], pattern)]
        if not entries:
            raise ConfigError(
                f"{key}={spec!r} matches no shard listed in {manifest_path}; "
                f"its shards are named like {manifest['shards'][0]['file']!r}"
            )
    shards = tuple(Shard(str(root / e["file"]), int(e["num_samples"])) for e in entries)
    _check_files_exist(shards, key, spec)
    return ShardSet(root=root, manifest=manifest, shards=shards)


def _no_manifest_message(root: Path, key: str, spec: str) -> str:
    if not root.is_dir():
        return f"{key}={spec!r}: the folder {str(root)!r} does not exist; check the path"
    parts = [p.name for p in sorted(root.iterdir()) if (p / MANIFEST_NAME).is_file()]
    if parts:
        # `pipeline shard --val-fraction` writes <out>/train and <out>/val.
        return (
            f"{key}={spec!r} holds the shard sets {parts}, not one set; "
            f"give one of them, e.g. {str(root / parts[0])!r}"
        )
    return (
        f"{key}={spec!r}: no {MANIFEST_NAME} in {str(root)!r}, so this is not a finished "
        "shard set; (re)write it with `pipeline shard`"
    )


def _matches(name: str, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in braceexpand.braceexpand(pattern))


def _check_files_exist(shards: tuple[Shard, ...], key: str, spec: str) -> None:
    missing = [s.url for s in shards if not Path(s.url).is_file()]
    if missing:
        raise ConfigError(
            f"{key}={spec!r}: {len(missing)} shard(s) listed in the manifest are missing, "
            f"first {missing[0]!r}; copy them back or rewrite the set with `pipeline shard`"
        )

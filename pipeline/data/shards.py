"""Shard sets: a folder of `<name>-%06d.tar` files described by a `manifest.json`.

The manifest is written last, so a folder without one is an unfinished shard set
and is refused. It records the samples in every shard, which the loader needs to
give every rank the same number of steps before reading a single byte.

Remote sets: an http(s) URL of a manifest.json (or of its folder) names shards
relative to it; s3:// and gs:// URLs go through fsspec when it is installed.
Manifest names must be plain `.tar` file names, so a manifest can never make
the reader run a command (`pipe:`) or leave the set's folder. `open_shard`
opens a local file or streams a remote shard, through an optional cache.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import os
import re
import tarfile
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import braceexpand

from pipeline.config import ConfigError
from pipeline.data.decode import wanted_member
from pipeline.data.tar import tar_samples_of

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pipeline-shards/1"
# What reading a shard can raise: I/O, truncated or corrupt tar, HTTP, and
# a ValueError for a member name repeated within one sample
SHARD_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, http.client.HTTPException)
HTTP_SCHEMES = ("http", "https")
FSSPEC_SCHEMES = ("s3", "gs", "gcs")
FETCH_TIMEOUT_S = 60.0


class ShardFetchError(OSError):
    """A remote shard cannot be fetched, or its bytes differ from the manifest's."""


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int
    sha256: str | None = None


@dataclass(frozen=True)
class ShardSet:
    """The shards a job reads, with the manifest that describes them."""

    root: Path | str  # a str URL for remote sets
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
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"cannot read the shard manifest {str(path)!r} ({err}); "
            "rewrite the shard set with `pipeline shard`"
        ) from None
    return parse_manifest(text, path)


def parse_manifest(text: str, path: Path | str) -> dict[str, Any]:
    """Check a manifest's text; `path` (file or URL) only names it in errors."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"cannot read the shard manifest {str(path)!r} (not JSON: {err}); "
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


def resolve_shards(spec: str, key: str = "data.train", must_exist: bool = True) -> ShardSet:
    """Turn a shard folder, a manifest path, a shard pattern or a URL into a ShardSet.

    A pattern (glob `*` or braces `{000000..000009}`) selects shards of the
    manifest that sits beside them. Local shard files must exist unless
    `must_exist` is false (`pipeline verify` reports them instead). Remote
    shards are not checked here: a missing one follows the bad-shard policy
    when read. Raises ConfigError naming `key`.
    """
    if not spec:
        raise ConfigError(f"{key} is empty; give a shard folder written by `pipeline shard`")
    if spec.startswith("pipe:"):
        raise ConfigError(
            f"{key}={spec!r}: shard sets are never read through shell commands; give "
            "an http(s):// URL of a manifest.json, or s3:// / gs:// with fsspec installed"
        )
    if url_scheme(spec) is not None:
        return _load_remote_set(spec, key)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_set(path, None, key, spec, must_exist)
    if path.name == MANIFEST_NAME:
        return _load_set(path.parent, None, key, spec, must_exist)
    if path.suffix == ".tar" or any(ch in path.name for ch in "*?[{"):
        return _load_set(path.parent, path.name, key, spec, must_exist)
    problem = "is not a shard set" if path.exists() else "does not exist"
    raise ConfigError(
        f"{key}={spec!r} {problem}; give a shard folder, its {MANIFEST_NAME}, "
        "or a pattern such as 'shards/train-*.tar' (wildcards in the file name only)"
    )


def _load_set(
    root: Path, pattern: str | None, key: str, spec: str, must_exist: bool = True
) -> ShardSet:
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
    shards = tuple(_shard(str(root / e["file"]), e) for e in entries)
    if must_exist:
        _check_files_exist(shards, key, spec)
    return ShardSet(root=root, manifest=manifest, shards=shards)


def _shard(url: str, entry: dict[str, Any]) -> Shard:
    return Shard(url, int(entry["num_samples"]), entry.get("sha256"))


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


# ---- reading one shard


def tar_samples(
    url: str, cache_dir: Path | None = None, timeout_s: float = FETCH_TIMEOUT_S,
    sha256: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The encoded samples of a shard, grouped by key as webdataset groups them.

    Only the members the loader decodes are read; the rest (`.pickle`, ...)
    are skipped unread. Raises one of SHARD_ERRORS when the shard is bad.
    """
    with open_shard(url, cache_dir, timeout_s, sha256) as stream:
        yield from tar_samples_of(stream, url, wanted_member)


def error_text(error: BaseException) -> str:
    """A short reason: webdataset appends the stream and URL to an error's args."""
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
    elif error.args and isinstance(error.args[0], str):
        text = error.args[0].split(" @ <")[0]
    else:
        text = str(error)
    return f"{type(error).__name__}: {text}"


# ---- remote shard sets


def url_scheme(spec: str) -> str | None:
    """The lower-case scheme of a `scheme://...` URL, or None for a local path."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    return match.group(1).lower() if match else None


def _load_remote_set(spec: str, key: str) -> ShardSet:
    scheme = url_scheme(spec)
    if scheme not in HTTP_SCHEMES + FSSPEC_SCHEMES:
        raise ConfigError(
            f"{key}={spec!r}: {scheme}:// is not supported; use http(s):// or, with "
            f"fsspec installed, one of {[s + '://' for s in FSSPEC_SCHEMES]}"
        )
    manifest_url = spec if spec.endswith(".json") else spec.rstrip("/") + "/" + MANIFEST_NAME
    try:
        with open_url(manifest_url, FETCH_TIMEOUT_S) as stream:
            text = stream.read().decode("utf-8")
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(
            f"{key}={spec!r}: cannot fetch the manifest {manifest_url!r} ({err}); "
            "check the URL and that the server is reachable"
        ) from None
    manifest = parse_manifest(text, manifest_url)
    # Names are plain file names (checked above), so every shard stays beside it
    base = manifest_url.rsplit("/", 1)[0] + "/"
    shards = tuple(_shard(base + e["file"], e) for e in manifest["shards"])
    return ShardSet(root=base, manifest=manifest, shards=shards)


def open_shard(
    url: str, cache_dir: Path | None = None, timeout_s: float = FETCH_TIMEOUT_S,
    sha256: str | None = None,
) -> BinaryIO:
    """A binary stream of one shard: a local file, a cached copy, or a download.

    A local path is opened as a plain file, never through webdataset's gopen,
    which would run a name such as 'pipe:cmd' as a shell command.
    """
    if url_scheme(url) is None:
        return open(url, "rb")
    if cache_dir is not None:
        return open(fetch_to_cache(url, Path(cache_dir), timeout_s, sha256), "rb")
    return open_url(url, timeout_s)


def fetch_to_cache(url: str, cache_dir: Path, timeout_s: float, sha256: str | None) -> Path:
    """The cached copy of a remote shard, downloaded first if absent.

    Written under a temporary name and renamed, so a reader never sees half a
    file; concurrent downloads of one shard each rename a whole copy.
    """
    digest_name = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache_dir / f"{digest_name}-{url.rsplit('/', 1)[-1]}"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    try:
        got = _download(url, partial, timeout_s)
        if sha256 and got != sha256:
            raise ShardFetchError(f"{url}: sha256 {got[:12]}... differs from the manifest's")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _download(url: str, path: Path, timeout_s: float) -> str:
    digest = hashlib.sha256()
    with open_url(url, timeout_s) as source, path.open("wb") as sink:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
            sink.write(block)
    return digest.hexdigest()


def open_url(url: str, timeout_s: float) -> BinaryIO:
    """Stream an http(s) URL (stdlib) or an s3/gs URL (fsspec)."""
    scheme = url_scheme(url)
    if scheme in HTTP_SCHEMES:
        opener = urllib.request.build_opener(_HttpOnlyRedirects)
        return opener.open(url, timeout=timeout_s)
    if scheme in FSSPEC_SCHEMES:
        return _open_fsspec(url, scheme)
    raise ShardFetchError(f"{url}: unsupported scheme {scheme!r}")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would also follow a redirect to ftp://; shards come over http(s) only
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if url_scheme(newurl) not in HTTP_SCHEMES:
            raise ShardFetchError(f"{req.full_url}: refused redirect to {newurl!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open_fsspec(url: str, scheme: str) -> BinaryIO:
    try:
        import fsspec
    except ImportError:
        raise ConfigError(
            f"{url!r} needs fsspec, which is not installed: pip install fsspec "
            f"{'s3fs' if scheme == 's3' else 'gcsfs'}"
        ) from None
    try:
        return fsspec.open(url, "rb").open()
    except ImportError as err:
        raise ConfigError(f"{url!r}: fsspec cannot open {scheme}:// ({err})") from None

"""Remote shard sets: an http.server on 127.0.0.1 (a port the OS picks, stopped
after each test) serves a shard set; fsspec is tested on its in-memory store."""

from __future__ import annotations

import functools
import json
import sys
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from loader_support import write_unequal_shards
from test_loader import all_keys, config, keys_of

from pipeline.config import ConfigError
from pipeline.data import shards as shards_module
from pipeline.data.decode import BadDataError
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.data.shards import MANIFEST_NAME, resolve_shards
from pipeline.data.verify import verify_shard_set

SIZES = [7, 13, 10]


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args: object) -> None:
        self.requests.append(self.path)  # instead of printing to stderr


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """(folder served, base URL, list of request paths); stopped at the end."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=root))
    serve = functools.partial(httpd.serve_forever, poll_interval=0.05)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}", requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture()
def served(server):
    root, base, requests = server
    local = write_unequal_shards(root / "set", SIZES)
    return local, f"{base}/set/{MANIFEST_NAME}", requests


def test_eval_and_train_read_the_same_samples_as_local(served):
    local, url, _ = served
    remote = resolve_shards(url, key="data.train")
    assert remote.num_samples == 30 and remote.shards[0].url.startswith("http://127.0.0.1:")
    assert resolve_shards(url.rsplit("/", 1)[0] + "/").shards == remote.shards  # its folder
    cfg = config(num_workers=2, batch_size=4)
    keys = Counter()
    for rank in (0, 1):
        keys.update(keys_of(build_eval_loader(cfg, remote, rank=rank, world_size=2)))
        train = build_train_loader(cfg, remote, rank=rank, world_size=2, seed=3)
        same = build_train_loader(cfg, local, rank=rank, world_size=2, seed=3)
        assert keys_of(train) == keys_of(same) and len(train) == 3
    assert keys == all_keys(local)
    assert verify_shard_set(remote, deep=True) == []


def test_cache_written_once_and_reused_without_the_server(served, tmp_path):
    local, url, requests = served
    remote = resolve_shards(url)
    cache = tmp_path / "cache"
    cfg = config(cache_dir=cache)
    first = keys_of(build_eval_loader(cfg, remote, rank=0, world_size=1))
    fetched = [path for path in requests if path.endswith(".tar")]
    assert sorted(fetched) == sorted(f"/set/train-{n:06d}.tar" for n in range(3))
    for shard in local.shards:
        Path(shard.url).unlink()  # the server has nothing left to give
    assert keys_of(build_eval_loader(cfg, remote, rank=0, world_size=1)) == first
    assert len(list(cache.glob("*.tar"))) == 3 and not list(cache.glob(".*"))


def test_a_shard_whose_bytes_changed_is_not_cached(served, tmp_path):
    local, url, _ = served
    remote = resolve_shards(url)
    path = Path(local.shards[1].url)
    data = path.read_bytes()
    path.write_bytes(data[:-1] + b"x")  # the same size, another checksum
    cfg = config(cache_dir=tmp_path / "cache", max_bad_fraction=0.9)
    loader = build_eval_loader(cfg, remote, rank=0, world_size=1)
    assert len(keys_of(loader)) == 30 - SIZES[1]
    assert loader.bad_counts()["bad_shards"] == 1
    assert len(list((tmp_path / "cache").glob("*"))) == 2


def test_unreachable_shard_follows_the_bad_shard_policy(served):
    local, url, _ = served
    Path(local.shards[2].url).unlink()  # the server answers 404
    remote = resolve_shards(url)
    loader = build_eval_loader(config(max_bad_fraction=0.5), remote, rank=0, world_size=1)
    assert len(keys_of(loader)) == 20
    assert loader.bad_counts()["bad_shards"] == 1 and loader.bad_counts()["bad"] == 10
    strict = build_eval_loader(config(on_bad_sample="strict"), remote, rank=0, world_size=1)
    with pytest.raises(BadDataError, match=r"train-000002\.tar.*HTTP Error 404"):
        list(strict)
    train = build_train_loader(config(max_bad_fraction=0.9), remote, rank=0, world_size=1,
                               seed=0)
    assert len(list(train)) == 30 // 8 and train.bad_counts()["bad_shards"] >= 1


def test_refused_specs_and_manifests(server):
    root, base, _ = server
    with pytest.raises(ConfigError, match="data.eval.val=.*cannot fetch the manifest"):
        resolve_shards(f"{base}/nothing/{MANIFEST_NAME}", key="data.eval.val")
    with pytest.raises(ConfigError, match="never read through shell commands"):
        resolve_shards("pipe:curl -s http://127.0.0.1/x.tar")
    with pytest.raises(ConfigError, match="ftp:// is not supported"):
        resolve_shards("ftp://127.0.0.1/set/manifest.json")
    (root / "evil").mkdir()
    manifest = {"format": "pipeline-shards/1", "class_names": ["a", "b"],
                "shards": [{"file": "pipe:touch x", "num_samples": 1}]}
    (root / "evil" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="not a plain .tar file name"):
        resolve_shards(f"{base}/evil/{MANIFEST_NAME}")


def test_s3_without_fsspec_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec now fails
    with pytest.raises(ConfigError, match="needs fsspec.*pip install fsspec s3fs"):
        resolve_shards("s3://bucket/set/manifest.json")


def test_fsspec_urls_are_read_through_fsspec(tmp_path, monkeypatch):
    fsspec = pytest.importorskip("fsspec")
    local = write_unequal_shards(tmp_path / "set", [5, 4])
    memory = fsspec.filesystem("memory")
    for path in (tmp_path / "set").iterdir():
        memory.pipe(f"/set-{id(tmp_path)}/{path.name}", path.read_bytes())
    # s3 and gs need credentials; fsspec's in-memory store takes the same path
    monkeypatch.setattr(shards_module, "FSSPEC_SCHEMES", ("memory",))
    remote = resolve_shards(f"memory://set-{id(tmp_path)}/")
    assert remote.num_samples == 9
    keys = keys_of(build_eval_loader(config(), remote, rank=0, world_size=1))
    assert Counter(keys) == all_keys(local)

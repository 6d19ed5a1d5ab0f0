"""resolve_shards: which shards a folder, a manifest or a pattern selects, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.data.shards import MANIFEST_FORMAT, MANIFEST_NAME, resolve_shards
from pipeline.data.sources import ShardSample
from pipeline.data.writer import write_shard_set

SIZES = [4, 4, 4, 2]  # 14 samples, at most 4 per shard


@pytest.fixture()
def shard_dir(tmp_path: Path) -> Path:
    samples = [ShardSample(bytes([i]) * 100, "png", i % 3, {"i": i}) for i in range(14)]
    write_shard_set(samples, tmp_path / "set", "part", ["a", "b", "c"], maxcount=4)
    return tmp_path / "set"


def urls(names: list[str], root: Path) -> list[str]:
    return [str(root / name) for name in names]


def test_folder_gives_every_shard(shard_dir):
    shards = resolve_shards(str(shard_dir))
    assert [s.url for s in shards.shards] == urls(
        [f"part-{i:06d}.tar" for i in range(4)], shard_dir
    )
    assert [s.num_samples for s in shards.shards] == SIZES
    assert shards.num_samples == 14
    assert shards.class_names == ["a", "b", "c"] and shards.num_classes == 3
    assert shards.label_format == "index"


def test_manifest_path_is_the_same_as_its_folder(shard_dir):
    assert resolve_shards(str(shard_dir / "manifest.json")) == resolve_shards(str(shard_dir))


@pytest.mark.parametrize(
    "pattern, selected",
    [
        ("part-*.tar", [0, 1, 2, 3]),
        ("part-00000[13].tar", [1, 3]),
        ("part-{000000..000001}.tar", [0, 1]),
        ("part-{000000,000003}.tar", [0, 3]),
        ("part-000002.tar", [2]),
    ],
)
def test_patterns_select_shards_of_the_manifest(shard_dir, pattern, selected):
    shards = resolve_shards(str(shard_dir / pattern))
    assert [s.url for s in shards.shards] == urls(
        [f"part-{i:06d}.tar" for i in selected], shard_dir
    )
    assert shards.num_samples == sum(SIZES[i] for i in selected)


def test_split_folders_resolve_one_at_a_time(faces_shards):
    assert resolve_shards(str(faces_shards / "train")).num_samples == 160
    assert resolve_shards(str(faces_shards / "val")).num_samples == 40
    with pytest.raises(ConfigError, match=r"holds the shard sets \['train', 'val'\]"):
        resolve_shards(str(faces_shards), key="data.train")


def test_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="data.eval.val='.*nowhere' does not exist"):
        resolve_shards(str(tmp_path / "nowhere"), key="data.eval.val")


def test_pattern_matching_nothing_names_the_shards(shard_dir):
    with pytest.raises(ConfigError, match="matches no shard.*'part-000000.tar'"):
        resolve_shards(str(shard_dir / "train-*.tar"))


def test_pattern_in_a_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="the folder .*gone' does not exist"):
        resolve_shards(str(tmp_path / "gone" / "part-*.tar"))


def test_folder_without_manifest_says_to_run_pipeline_shard(shard_dir):
    (shard_dir / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="data.train=.*no manifest.json.*`pipeline shard`"):
        resolve_shards(str(shard_dir))


def test_missing_shard_file(shard_dir):
    (shard_dir / "part-000002.tar").unlink()
    with pytest.raises(ConfigError, match="1 shard.* missing, first '.*part-000002.tar'"):
        resolve_shards(str(shard_dir))
    assert resolve_shards(str(shard_dir / "part-00000[01].tar")).num_samples == 8


@pytest.mark.parametrize(
    "text, message",
    [
        ("{broken", "cannot read the shard manifest"),
        ('{"format": "other/1"}', "not a shard manifest of format"),
        ('{"format": "pipeline-shards/1", "class_names": ["a"]}', r"lacks \['shards'\]"),
    ],
)
def test_bad_manifest(shard_dir, text, message):
    (shard_dir / "manifest.json").write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve_shards(str(shard_dir))


def test_empty_spec_and_other_files(tmp_path):
    with pytest.raises(ConfigError, match="data.train is empty"):
        resolve_shards("")
    (tmp_path / "config.yaml").write_text("run: {}")
    with pytest.raises(ConfigError, match="is not a shard set"):
        resolve_shards(str(tmp_path / "config.yaml"))


def test_manifest_records_what_the_loader_needs(shard_dir):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["class_counts"] == [5, 5, 4]  # labels i % 3 for i in 0..13
    assert manifest["num_samples"] == sum(s["num_samples"] for s in manifest["shards"])


@pytest.mark.parametrize("name", ["pipe:touch owned.tar", "../outside.tar", "sub/dir.tar"])
def test_manifest_shard_names_must_be_plain_files(tmp_path, name):
    folder = tmp_path / "set"
    folder.mkdir()
    manifest = {"format": MANIFEST_FORMAT, "class_names": ["a", "b"],
                "shards": [{"file": name, "num_samples": 1}]}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="not a plain .tar file name"):
        resolve_shards(str(folder))
    assert not (tmp_path / "owned.tar").exists()

"""`pipeline verify`: a clean set passes; each kind of damage is found and named."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
from loader_support import good_records, truncate, write_records
from test_bad_data import bad_records

from pipeline.data.shards import MANIFEST_NAME, resolve_shards
from pipeline.data.verify import add_verify_arguments, run_verify, verify_shard_set


def problems_of(root: Path, deep: bool = False) -> list[str]:
    return verify_shard_set(resolve_shards(str(root), must_exist=False), deep=deep)


def edit_manifest(root: Path, change) -> None:
    path = root / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture()
def clean(tmp_path) -> Path:
    write_records(tmp_path / "set", [good_records(6), good_records(5, 6)])
    return tmp_path / "set"


def test_clean_set_exit_code_0_damaged_1(clean, caplog):
    parser = argparse.ArgumentParser()
    add_verify_arguments(parser)

    def run(*args: str) -> int:
        return run_verify(parser.parse_args([str(clean), *args]))

    assert problems_of(clean, deep=True) == []
    with caplog.at_level(logging.INFO):
        assert run("--deep") == 0
    assert "11 samples in 2 shard(s) decoded and checked: no problems" in caplog.text
    truncate(clean / "raw-000001.tar", 3000)
    assert run() == 1
    assert "raw-000001.tar: unreadable after" in caplog.text


def test_truncated_and_missing_shards(clean, tmp_path):
    truncate(clean / "raw-000000.tar", 1800)  # inside the first image's data
    (clean / "raw-000001.tar").unlink()
    problems = problems_of(clean)
    # A broken tar is still sized and hashed, so the report says the file changed too
    assert problems[:4] == [
        "raw-000000.tar: unreadable after 0 samples: ReadError: unexpected end of data",
        "raw-000000.tar: 1800 bytes, the manifest lists 30720",
        "raw-000000.tar: SHA-256 differs from the manifest's (changed or damaged)",
        "raw-000001.tar: cannot be read: FileNotFoundError: No such file or directory",
    ]
    # Cut inside a member header (tarfile ended quietly there): a short header is an error
    write_records(tmp_path / "quiet", [good_records(6)])
    truncate(tmp_path / "quiet" / "raw-000000.tar", 5000)
    assert problems_of(tmp_path / "quiet")[0] == (
        "raw-000000.tar: unreadable after 0 samples: ReadError: unexpected end of data"
    )
    # Cut at a member boundary: the archive just ends early, the count tells
    write_records(tmp_path / "short", [good_records(6)])
    data = (tmp_path / "short" / "raw-000000.tar").read_bytes()
    cut = data.index(b"s-0002.")  # the header of the third sample's first member
    truncate(tmp_path / "short" / "raw-000000.tar", cut)
    assert problems_of(tmp_path / "short")[0] == (
        "raw-000000.tar: holds 2 samples, the manifest lists 6"
    )


def test_changed_bytes_fail_the_checksum_and_class_counts(clean):
    edit_manifest(clean, lambda m: m.update(class_counts=[11, 0]))
    assert problems_of(clean) == []  # as written: all faces
    path = clean / "raw-000000.tar"
    data = path.read_bytes()
    at = data.index(b"s-0000.cls") + 512  # the data block after that member's header
    path.write_bytes(data[:at] + (b"1" if data[at:at + 1] == b"0" else b"0") + data[at + 1:])
    found = problems_of(clean)
    assert any("raw-000000.tar: SHA-256 differs" in p for p in found)
    assert "manifest: class_counts [11, 0] but the shards hold [10, 1]" in found


def test_count_keys_labels_and_members(tmp_path):
    records = good_records(4)
    first = [records[0], records[1], dict(records[2], cls=b"5"), {"__key__": "no-label",
                                                                 "png": records[3]["png"]}]
    second = [dict(records[0]), {"__key__": "no-image", "cls": b"1"}]
    write_records(tmp_path / "set", [first, second])
    edit_manifest(tmp_path / "set", lambda m: m["shards"][1].update(num_samples=3))
    found = problems_of(tmp_path / "set")
    expected = [
        "raw-000000.tar: sample 's-0002': bad index label '5'",
        "raw-000000.tar: sample 'no-label': no label member",
        "raw-000001.tar: key 's-0000' repeats (also in raw-000000.tar)",
        "raw-000001.tar: sample 'no-image': no image member",
        "raw-000001.tar: holds 2 samples, the manifest lists 3",
        "manifest: num_samples 6 but its shards list 7",
    ]
    for start in expected:
        assert sum(p.startswith(start) for p in found) == 1, (start, found)
    assert len(found) == len(expected)


def test_deep_decodes_every_image(tmp_path):
    write_records(tmp_path / "set", [good_records(3) + bad_records(1)])
    assert problems_of(tmp_path / "set") == []
    found = problems_of(tmp_path / "set", deep=True)
    assert len(found) == 1 and found[0].startswith("raw-000000.tar: sample 'bad-0000': cannot")


def test_members_the_loader_never_reads_are_named(tmp_path, caplog):
    records = good_records(3)
    records[1]["pickle"] = b"\x80\x04K\x01."  # a pickle member: never read, never unpickled
    write_records(tmp_path / "set", [records])
    with caplog.at_level(logging.WARNING):
        assert problems_of(tmp_path / "set") == []
    assert "members the loader never reads (skipped unread, never unpickled): " \
        "{'pickle': 1}" in caplog.text

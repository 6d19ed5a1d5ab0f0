"""The shard writer and `pipeline shard`: every input kind, shard limits, split, safety.

Expected values are worked out here, from the files the tests write or from the
installed data, and the shards are read back with the standard `tarfile` module.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.config import ConfigError
from pipeline.data import sources
from pipeline.data.sources import ShardSample, detect_kind, stratified_split
from pipeline.data.writer import add_shard_arguments, parse_size, run_shard, write_shard_set

FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_shard_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def shard(*argv: str) -> int:
    return run_shard(parse(*argv))


def save_image(pixels: np.ndarray, path: Path) -> bytes:
    """Write `pixels` in the format its suffix names; return the file's bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=FORMATS[path.suffix.lower().lstrip(".")])
    return path.read_bytes()


def read_set(folder: Path) -> tuple[dict, dict[str, dict[str, bytes]]]:
    """The manifest and every sample, {key: {extension: bytes}}, checking the files
    against the manifest and every sample's members on the way."""
    manifest = json.loads((folder / "manifest.json").read_text())
    listed = {entry["file"] for entry in manifest["shards"]}
    assert {p.name for p in folder.iterdir()} == listed | {"manifest.json"}
    records: dict[str, dict[str, bytes]] = {}
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert path.stat().st_size == entry["bytes"]
        in_shard = read_tar(path)
        assert len(in_shard) == entry["num_samples"]
        assert not set(in_shard) & set(records), "a key appears in two shards"
        records.update(in_shard)
    assert len(records) == manifest["num_samples"]
    return manifest, records


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    records: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            assert "." not in ext and key not in ("", None)
            records.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for key, members in records.items():
        assert len(members) == 3 and {"cls", "json"} < set(members), (key, sorted(members))
    return records


def image_of(record: dict[str, bytes]) -> tuple[str, bytes]:
    (ext,) = set(record) - {"cls", "json"}
    return ext, record[ext]


def by_source(records: dict[str, dict[str, bytes]]) -> dict[str, dict[str, bytes]]:
    return {json.loads(r["json"])["source"]: r for r in records.values()}


def lfw_pixels() -> np.ndarray:
    spec = importlib.util.find_spec("skimage")
    images = np.load(Path(spec.origin).parent / "data" / "lfw_subset.npy")
    return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)


# ---- input kinds


def test_folder_stores_original_bytes_labels_and_names(tmp_path, photo_crops, caplog):
    root = tmp_path / "photos"
    layout = {
        "cat": ["a.jpg", "b.JPEG", "my photo.v2.jpg", "sub/c.png"],
        "dog": ["d.png", "e f.webp", "g.bmp"],
    }
    originals, crop = {}, iter(photo_crops)
    for name, files in layout.items():
        for file in files:
            originals[f"{name}/{file}"] = save_image(next(crop), root / name / file)
    (root / "cat" / "notes.txt").write_text("not an image")
    save_image(next(crop), root / "dog" / ".hidden.jpg")
    (root / "loose.jpg").write_bytes(originals["cat/a.jpg"])  # not in a class folder

    with caplog.at_level(logging.INFO):
        assert shard(root, "--out", tmp_path / "out") == 0
    manifest, records = read_set(tmp_path / "out")

    assert manifest["class_names"] == ["cat", "dog"]
    assert manifest["class_counts"] == [4, 3]
    assert manifest["image_format"] == "bmp,jpg,png,webp"
    assert manifest["source"] == {"kind": "folder", "path": str(root.resolve())}
    stored = by_source(records)
    assert set(stored) == set(originals)
    for source, record in stored.items():
        ext, data = image_of(record)
        assert data == originals[source]
        assert ext == {"jpeg": "jpg"}.get(Path(source).suffix.lower()[1:], Path(source).suffix[1:])
        assert int(record["cls"]) == (0 if source.startswith("cat/") else 1)
    assert "7 samples in 1 shard(s)" in caplog.text and "cat=4, dog=3" in caplog.text
    assert "notes.txt" not in json.dumps(manifest)


def test_cnndetection_with_categories(tmp_path, photo_crops):
    root = tmp_path / "progan"
    layout = {
        "airplane/0_real": 3,
        "airplane/1_fake": 2,
        "horse/0_real": 1,
        "horse/1_fake": 2,
    }
    crop = iter(photo_crops)
    for folder, count in layout.items():
        for number in range(count):
            save_image(next(crop), root / folder / f"{number:03d}.png")

    shard(root, "--out", tmp_path / "out")
    manifest, records = read_set(tmp_path / "out")

    assert manifest["source"]["kind"] == "cnndetection"
    assert manifest["class_names"] == ["real", "fake"]
    assert manifest["class_counts"] == [3 + 1, 2 + 2]
    for source, record in by_source(records).items():
        category, label_dir, _ = source.split("/")
        assert json.loads(record["json"])["category"] == category
        assert int(record["cls"]) == int(label_dir[0])


def test_cnndetection_without_categories(tmp_path, photo_crops):
    for number, folder in enumerate(["0_real", "0_real", "1_fake"]):
        save_image(photo_crops[number], tmp_path / "in" / folder / f"{number}.jpg")

    shard(tmp_path / "in", "--out", tmp_path / "out")
    manifest, records = read_set(tmp_path / "out")

    assert manifest["class_counts"] == [2, 1]
    assert {json.loads(r["json"])["category"] for r in records.values()} == {None}


def test_csv_list_with_names_relative_paths_and_extra_columns(tmp_path, photo_crops):
    images = tmp_path / "images"
    rows = [
        ("../images/x 1.jpg", "zebra", "0.5"),
        ("../images/x.2.png", "ant", "1"),
        (str(images / "abs.jpg"), "zebra", "2"),
    ]
    originals = {}
    for number, (path, _, _) in enumerate(rows):
        originals[path] = save_image(photo_crops[number], images / Path(path).name)
    lists = tmp_path / "lists"
    lists.mkdir()
    with (lists / "photos.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label", "weight"])
        writer.writerows(rows)

    shard(lists / "photos.csv", "--out", tmp_path / "out")
    manifest, records = read_set(tmp_path / "out")

    assert manifest["name"] == "photos"
    assert manifest["class_names"] == ["ant", "zebra"]
    assert manifest["class_counts"] == [1, 2]
    stored = by_source(records)
    for path, label, weight in rows:
        assert image_of(stored[path])[1] == originals[path]
        assert int(stored[path]["cls"]) == ["ant", "zebra"].index(label)
        assert json.loads(stored[path]["json"]) == {"source": path, "weight": weight}


def test_jsonl_list_with_indices(tmp_path, photo_crops):
    lines = [
        {"path": "a.png", "label": 2, "tags": ["x"]},
        {"path": "b.jpg", "label": 0},
        {"path": "c.jpg", "label": 2},
    ]
    for number, line in enumerate(lines):
        save_image(photo_crops[number], tmp_path / line["path"])
    text = "\n".join(json.dumps(line) for line in lines[:2]) + "\n\n" + json.dumps(lines[2])
    (tmp_path / "set.jsonl").write_text(text)

    shard(tmp_path / "set.jsonl", "--out", tmp_path / "out")
    manifest, records = read_set(tmp_path / "out")

    assert manifest["class_names"] == ["0", "1", "2"]
    assert manifest["class_counts"] == [1, 0, 2]
    assert json.loads(by_source(records)["a.png"]["json"])["tags"] == ["x"]


def test_embedded_faces_split_160_40_stratified(faces_shards):
    pixels = lfw_pixels()
    seen = []
    for part, total, per_class, shard_sizes in [
        ("train", 160, [80, 80], [50, 50, 50, 10]),
        ("val", 40, [20, 20], [40]),
    ]:
        manifest, records = read_set(faces_shards / part)
        assert manifest["num_samples"] == total
        assert manifest["class_names"] == ["non_face", "face"]
        assert manifest["class_counts"] == per_class
        assert [s["num_samples"] for s in manifest["shards"]] == shard_sizes
        assert manifest["split"] == part and manifest["image_format"] == "png"
        for record in records.values():
            index = json.loads(record["json"])["index"]
            image = np.asarray(Image.open(io.BytesIO(record["png"])))
            assert np.array_equal(image, pixels[index])
            assert int(record["cls"]) == (1 if index < 100 else 0)
            seen.append(index)
    assert sorted(seen) == list(range(200))


def test_embedded_faces_read_by_webdataset(faces_shards):
    manifest = json.loads((faces_shards / "val" / "manifest.json").read_text())
    urls = [str(faces_shards / "val" / s["file"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == 40
    assert all({"png", "cls", "json"} <= set(s) for s in samples)


def test_embedded_digits(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    shard("embedded:digits", "--out", tmp_path / "out", "--maxcount", "500")
    manifest, records = read_set(tmp_path / "out")

    assert manifest["class_names"] == [str(d) for d in range(10)]
    assert manifest["class_counts"] == np.bincount(digits.target).tolist()
    assert [s["num_samples"] for s in manifest["shards"]] == [500, 500, 500, 297]
    for record in list(records.values())[:50]:
        index = json.loads(record["json"])["index"]
        image = np.asarray(Image.open(io.BytesIO(record["png"])))
        assert np.array_equal(image, np.rint(digits.images[index] * 255 / 16))
        assert int(record["cls"]) == digits.target[index]


def test_embedded_jpg_format(tmp_path):
    shard("embedded:faces", "--out", tmp_path, "--image-format", "jpg", "--maxcount", "7")
    manifest, records = read_set(tmp_path)
    assert manifest["image_format"] == "jpg"
    assert all(image_of(r)[1][:2] == b"\xff\xd8" for r in records.values())


# ---- idx files (the MNIST / Fashion-MNIST layout)


def digit_pixels() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits as uint8 [N, 8, 8] and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.rint(digits.images * 255 / 16).astype(np.uint8), digits.target.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray, gz: bool = True, magic: int | None = None) -> Path:
    """An idx file: magic (0x0800 | ndim for uint8), big-endian dims, then the bytes."""
    magic = 0x0800 | array.ndim if magic is None else magic
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_idx_pair(folder: Path, part: str, start: int, count: int, gz: bool = True) -> None:
    pixels, labels = digit_pixels()
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{part}-images-idx3-ubyte{suffix}", pixels[start : start + count], gz)
    write_idx(folder / f"{part}-labels-idx1-ubyte{suffix}", labels[start : start + count], gz)


def test_idx_folder_train_and_test_pairs(tmp_path, caplog):
    root = tmp_path / "fashion-mnist"
    write_idx_pair(root, "train", 0, 120)
    write_idx_pair(root, "t10k", 120, 50, gz=False)  # plain files work as well
    pixels, labels = digit_pixels()

    assert detect_kind(root) == "idx"
    with caplog.at_level(logging.INFO):
        shard(root, "--out", tmp_path / "out", "--maxcount", "64")
    manifest, records = read_set(tmp_path / "out")

    assert manifest["class_names"] == sources.FASHION_MNIST_CLASSES
    assert manifest["class_counts"] == np.bincount(labels[:170], minlength=10).tolist()
    assert manifest["source"]["kind"] == "idx" and manifest["image_format"] == "png"
    assert [s["num_samples"] for s in manifest["shards"]] == [64, 64, 42]
    seen = set()
    for record in records.values():
        meta = json.loads(record["json"])
        start = 0 if meta["split"] == "train" else 120
        expected_file = "train-images-idx3-ubyte.gz" if start == 0 else "t10k-images-idx3-ubyte"
        assert meta["source"] == expected_file
        image = np.asarray(Image.open(io.BytesIO(record["png"])))
        assert np.array_equal(image, pixels[start + meta["index"]])
        assert int(record["cls"]) == labels[start + meta["index"]]
        seen.add((meta["split"], meta["index"]))
    assert len(seen) == 170 and {s for s, _ in seen} == {"train", "test"}
    assert "ONE source" in caplog.text  # says how to keep the official split


def test_idx_images_file_is_one_pair_with_digit_names(tmp_path):
    root = tmp_path / "digits-idx"
    write_idx_pair(root, "train", 0, 100)
    write_idx_pair(root, "t10k", 100, 30)
    images = root / "t10k-images-idx3-ubyte.gz"

    assert detect_kind(images) == "idx"
    shard(images, "--out", tmp_path / "test", "--image-format", "jpg")
    manifest, records = read_set(tmp_path / "test")

    assert manifest["num_samples"] == 30 and manifest["name"] == "digits-idx-test"
    assert manifest["class_names"] == [str(d) for d in range(10)]
    assert manifest["image_format"] == "jpg"
    assert all(json.loads(r["json"])["split"] == "test" for r in records.values())


def test_idx_folder_with_val_fraction_splits_like_other_kinds(tmp_path):
    root = tmp_path / "mnist"
    write_idx_pair(root, "train", 0, 200, gz=False)
    shard(root, "--kind", "idx", "--out", tmp_path / "out", "--val-fraction", "0.2")
    train, _ = read_set(tmp_path / "out" / "train")
    val, _ = read_set(tmp_path / "out" / "val")
    _, labels = digit_pixels()

    expected_val = [round(n * 0.2) for n in np.bincount(labels[:200], minlength=10)]
    assert val["class_counts"] == expected_val
    assert train["num_samples"] + val["num_samples"] == 200


def bad_idx_inputs(tmp: Path) -> dict[str, tuple[list, str]]:
    """name: (argv before --out, a regex the error message must match)."""
    pixels, labels = digit_pixels()
    write_idx(tmp / "count" / "x-images-idx3-ubyte.gz", pixels[:20])
    write_idx(tmp / "count" / "x-labels-idx1-ubyte.gz", labels[:19])
    write_idx(tmp / "magic" / "x-images-idx3-ubyte.gz", pixels[:5])
    write_idx(tmp / "magic" / "x-labels-idx1-ubyte.gz", pixels[:5])  # images where labels go
    write_idx(tmp / "short" / "x-images-idx3-ubyte", pixels[:5], gz=False)
    write_idx(tmp / "short" / "x-labels-idx1-ubyte", labels[:5], gz=False)
    write_idx(tmp / "cut" / "x-images-idx3-ubyte", pixels[:5], gz=False)
    write_idx(tmp / "cut" / "x-labels-idx1-ubyte", labels[:5], gz=False)
    whole = (tmp / "cut" / "x-images-idx3-ubyte").read_bytes()
    (tmp / "cut" / "x-images-idx3-ubyte").write_bytes(whole[:-10])
    write_idx(tmp / "alone" / "x-images-idx3-ubyte.gz", pixels[:5])
    write_idx(tmp / "gz" / "x-images-idx3-ubyte.gz", pixels[:5])
    (tmp / "gz" / "x-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0" * 20)[:-6])
    (tmp / "other.bin").write_bytes(b"\0" * 16)
    return {
        "count mismatch": ([tmp / "count"], "holds 20 images but .* holds 19 labels"),
        "bad magic": ([tmp / "magic"], "magic number 0x00000803, not 0x00000801"),
        "truncated": ([tmp / "cut"], r"header gives dimensions \(5, 8, 8\), 320 .* 310"),
        "no labels file": ([tmp / "alone"], "has no labels file beside it"),
        "broken gzip": ([tmp / "gz"], "cannot read idx file"),
        "too few names": (
            [tmp / "short" / "x-images-idx3-ubyte", "--class-names", "a,b"],
            "go up to 4, beyond the 2",
        ),
        "not an idx name": ([tmp / "other.bin", "--kind", "idx"], "is not named <part>-images"),
        "no idx files": ([tmp / "empty", "--kind", "idx"], "holds no <part>-images-idx3"),
    }


BAD_IDX_CASES = [
    "count mismatch",
    "bad magic",
    "truncated",
    "no labels file",
    "broken gzip",
    "too few names",
    "not an idx name",
    "no idx files",
]


@pytest.mark.parametrize("case", BAD_IDX_CASES)
def test_bad_idx_input_is_a_config_error(case, tmp_path):
    (tmp_path / "empty").mkdir()
    argv, message = bad_idx_inputs(tmp_path)[case]
    with pytest.raises(ConfigError, match=message):
        shard(*argv, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- shard limits, names and keys


def synthetic(count: int, image_bytes: int = 3000) -> list[ShardSample]:
    return [ShardSample(bytes([i]) * image_bytes, "png", i % 2, {"i": i}) for i in range(count)]


def test_maxcount_splits_shards(tmp_path):
    manifest = write_shard_set(synthetic(10), tmp_path / "out", "s", ["a", "b"], maxcount=3)
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 3, 1]
    read_set(tmp_path / "out")


def test_maxsize_splits_shards_and_is_respected(tmp_path):
    # One sample: image 512 + 3072, .cls 512 + 512, .json 512 + 512 = 5632 bytes.
    # A tar adds 1024 bytes of end blocks and is padded to 10240-byte records, so
    # 30720 bytes hold 5 samples (29184 -> 30720) but not 6 (34816).
    manifest = write_shard_set(synthetic(12), tmp_path / "out", "s", ["a", "b"], maxsize=30720)
    assert [s["num_samples"] for s in manifest["shards"]] == [5, 5, 2]
    assert [s["bytes"] for s in manifest["shards"]] == [30720, 30720, 20480]
    read_set(tmp_path / "out")


def test_image_types_the_loader_cannot_decode_are_refused(tmp_path):
    samples = [ShardSample(b"II*\x00", "tif", 0, {"source": "scan.tif"})]
    with pytest.raises(ConfigError, match="'tif' of 'scan.tif'"):
        write_shard_set(samples, tmp_path / "out", "s", ["a"])
    assert not (tmp_path / "out").exists()


def test_sample_larger_than_maxsize_gets_its_own_shard(tmp_path):
    samples = synthetic(3)
    samples.insert(1, ShardSample(b"x" * 50_000, "png", 0, {"i": "big"}))
    manifest = write_shard_set(samples, tmp_path / "out", "s", ["a", "b"], maxsize=30720)
    assert [s["num_samples"] for s in manifest["shards"]] == [1, 1, 2]


@pytest.mark.parametrize(
    "text, expected",
    [("12", 12), ("500MB", 500_000_000), ("1GB", 10**9), ("1.5k", 1500), ("64KiB", 65536)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "option", [["--maxsize", "ten"], ["--maxcount", "0"], ["--val-fraction", "1.5"]]
)
def test_bad_numbers_are_refused_by_the_parser(option, capsys):
    with pytest.raises(SystemExit):
        parse("embedded:faces", "--out", "x", *option)
    assert option[0] in capsys.readouterr().err


def test_names_with_dots_and_spaces_become_safe_keys(tmp_path):
    shard("embedded:faces", "--out", tmp_path, "--name", "my.set v1", "--maxcount", "150")
    manifest, records = read_set(tmp_path)
    assert [s["file"] for s in manifest["shards"]] == [
        "my_set_v1-000000.tar",
        "my_set_v1-000001.tar",
    ]
    assert sorted(records) == [f"my_set_v1-{i:08d}" for i in range(200)]


# ---- split and order


def test_split_is_deterministic_and_seeded(tmp_path, faces_shards):
    base = ["embedded:faces", "--val-fraction", "0.2", "--maxcount", "50"]
    shard(*base, "--out", tmp_path / "again")
    shard(*base, "--out", tmp_path / "seed1", "--seed", "1")

    def val_indices(root: Path) -> set[int]:
        _, records = read_set(root / "val")
        return {json.loads(r["json"])["index"] for r in records.values()}

    for part in ("train", "val"):
        first = json.loads((faces_shards / part / "manifest.json").read_text())["shards"]
        again = json.loads((tmp_path / "again" / part / "manifest.json").read_text())["shards"]
        assert [s["sha256"] for s in first] == [s["sha256"] for s in again]
    assert val_indices(faces_shards) != val_indices(tmp_path / "seed1")
    assert sum(i < 100 for i in val_indices(tmp_path / "seed1")) == 20


def test_stratified_split_rounds_per_class_and_keeps_one_in_train():
    labels = [0] * 10 + [1] * 3 + [2]
    train, val = stratified_split(labels, 0.25, seed=5)
    # class 0: round(2.5) = 3 in val; class 1: round(0.75) = 1; class 2: one sample stays
    assert sorted(labels[i] for i in val) == [0, 0, 0, 1]
    assert sorted(train + val) == list(range(len(labels)))


def test_unsplit_order_is_shuffled(tmp_path):
    shard("embedded:faces", "--out", tmp_path)
    _, records = read_set(tmp_path)
    first_50 = [int(records[f"faces-{i:08d}"]["cls"]) for i in range(50)]
    assert 10 < sum(first_50) < 40  # sorted input would give 50 faces in a row


# ---- failures and the output folder


def test_failure_mid_write_leaves_no_finished_set(tmp_path):
    def failing():
        yield from synthetic(5)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_shard_set(failing(), tmp_path / "out", "s", ["a", "b"], maxcount=2)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.partial").exists()


def test_broken_image_keeps_the_previous_set(tmp_path, photo_crops):
    root = tmp_path / "in"
    for number in range(4):
        save_image(photo_crops[number], root / "a" / f"{number}.jpg")
    shard(root, "--out", tmp_path / "out")
    before = (tmp_path / "out" / "manifest.json").read_text()

    (root / "a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ConfigError, match="broken.jpg.*not a readable image"):
        shard(root, "--out", tmp_path / "out", "--overwrite", "--val-fraction", "0.4")
    assert (tmp_path / "out" / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_non_empty_output_needs_overwrite(tmp_path):
    shard("embedded:faces", "--out", tmp_path / "out")
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        shard("embedded:digits", "--out", tmp_path / "out")

    shard("embedded:digits", "--out", tmp_path / "out", "--overwrite", "--val-fraction", "0.1")
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert json.loads((tmp_path / "out" / "val" / "manifest.json").read_text())["name"] == (
        "digits-val"
    )


def test_an_existing_empty_folder_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    inode = out.stat().st_ino
    shard("embedded:faces", "--out", out, "--maxcount", "150")
    shard("embedded:faces", "--out", out, "--overwrite", "--val-fraction", "0.5")
    assert out.stat().st_ino == inode
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_never_deletes_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds other files"):
        shard("embedded:faces", "--out", tmp_path, "--overwrite")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# ---- bad input


MIXED_JSONL = '{"path": "img/a.jpg", "label": 1}\n{"path": "img/a.jpg", "label": "cat"}\n'


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def bad_inputs(tmp: Path, crop: np.ndarray) -> dict[str, tuple[list, str]]:
    """name: (argv before --out, a regex the error message must match)."""
    save_image(crop, tmp / "img" / "a.jpg")
    save_image(crop, tmp / "two" / "cat" / "a.jpg")
    (tmp / "two" / "dog").mkdir()
    (tmp / "two" / "dog" / "readme.md").write_text("no images here")
    return {
        "missing path": ([tmp / "nope"], "'.*nope' does not exist"),
        "no class folders": ([tmp / "img"], "no class folders"),
        "empty class": ([tmp / "two"], "dog' holds no images"),
        "not a list": ([tmp / "two" / "dog" / "readme.md"], "not a list file"),
        "missing image": (
            [write_text(tmp / "m.csv", "path,label\nimg/a.jpg,x\nimg/b.jpg,y\n")],
            "1 image.* do not exist, first at line 3: '.*b.jpg'",
        ),
        "unknown name": (
            [write_text(tmp / "u.csv", "path,label\nimg/a.jpg,bird\n"), "--class-names", "cat,dog"],
            "'bird' is not one of --class-names",
        ),
        "no label column": ([write_text(tmp / "c.csv", "path,cls\nimg/a.jpg,1\n")], "'label'"),
        "mixed labels": ([write_text(tmp / "x.jsonl", MIXED_JSONL)], "x.jsonl:2: labels mix"),
        "bad json": ([write_text(tmp / "j.jsonl", "{not json}\n")], "j.jsonl:1 is not valid JSON"),
        "index too big": (
            [write_text(tmp / "i.csv", "path,label\nimg/a.jpg,2\n"), "--class-names", "a,b"],
            "label 2 is not an index",
        ),
        "extra class folder": ([tmp / "two", "--class-names", "cat"], r"\['dog'\] that are not"),
        "no label dirs": ([tmp / "two", "--kind", "cnndetection"], "no 0_real or 1_fake"),
        "unknown embedded": (["embedded:cats"], "choose one of embedded:faces"),
        "format for files": ([tmp / "two", "--image-format", "jpg"], "embedded sets and idx"),
        "kind for embedded": (["embedded:faces", "--kind", "folder"], "--kind folder cannot"),
        "classes for embedded": (["embedded:digits", "--class-names", "a,b"], "fixed"),
    }


BAD_CASES = [
    "missing path",
    "no class folders",
    "empty class",
    "not a list",
    "missing image",
    "unknown name",
    "no label column",
    "mixed labels",
    "bad json",
    "index too big",
    "extra class folder",
    "no label dirs",
    "unknown embedded",
    "format for files",
    "kind for embedded",
    "classes for embedded",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_a_config_error(case, tmp_path, photo_crops):
    argv, message = bad_inputs(tmp_path, photo_crops[0])[case]
    with pytest.raises(ConfigError, match=message):
        shard(*argv, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_faces_without_scikit_image_names_the_fix(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        sources.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "skimage" else real_find_spec(name, *args),
    )
    with pytest.raises(ConfigError, match="pip install scikit-image"):
        shard("embedded:faces", "--out", tmp_path / "out")


def test_detect_kind(tmp_path):
    (tmp_path / "gen" / "horse" / "1_fake").mkdir(parents=True)
    (tmp_path / "plain" / "cat").mkdir(parents=True)
    (tmp_path / "l.jsonl").write_text("")
    assert detect_kind(tmp_path / "gen") == "cnndetection"
    assert detect_kind(tmp_path) == "cnndetection"  # 1_fake three levels down
    assert detect_kind(tmp_path / "plain") == "folder"
    assert detect_kind(tmp_path / "l.jsonl") == "list"

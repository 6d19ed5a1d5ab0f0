"""The train and eval loaders on tiny real shards, ranks simulated in one process."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from loader_support import CLASS_NAMES, lfw_samples, write_unequal_shards
from PIL import Image

from pipeline.config import AugmentConfig, DataConfig
from pipeline.data.decode import SampleError, decode_sample, wanted_member
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    Shard,
    ShardSet,
    resolve_shards,
)
from pipeline.data.transforms import build_eval_transform, build_train_transform

UNEQUAL = [7, 50, 13, 30]


def config(**overrides) -> DataConfig:
    values = dict(image_size=32, batch_size=8, num_workers=0, shuffle_buffer=20)
    return DataConfig(**(values | overrides))


def all_keys(shard_set) -> Counter:
    """Sample keys straight from the tar member names, independent of the loader."""
    keys = Counter()
    for shard in shard_set.shards:
        with tarfile.open(shard.url) as tar:
            keys.update(m.name.split(".")[0] for m in tar if m.name.endswith(".cls"))
    return keys


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


@pytest.fixture(scope="module")
def unequal(tmp_path_factory):
    return write_unequal_shards(tmp_path_factory.mktemp("data") / "train", UNEQUAL)


@pytest.fixture(scope="module")
def equal(tmp_path_factory):
    return write_unequal_shards(tmp_path_factory.mktemp("data") / "train", [8, 8, 8, 8])


def test_batch_shapes_dtypes_labels(unequal):
    loader = build_train_loader(config(), unequal, rank=0, world_size=1, seed=0)
    batches = list(loader)
    for batch in batches:
        assert batch["image"].shape == (8, 3, 32, 32)
        assert batch["image"].dtype == torch.float32
        assert torch.isfinite(batch["image"]).all()
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (8,)
        assert len(batch["key"]) == 8 and all(isinstance(k, str) for k in batch["key"])
    labels = torch.cat([b["label"] for b in batches])
    assert set(labels.tolist()) == {0, 1}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size,batch_size", [(2, 8), (3, 5)])
def test_exact_full_batches_with_unequal_shards(unequal, num_workers, world_size, batch_size):
    cfg = config(num_workers=num_workers, batch_size=batch_size)
    for rank in range(world_size):
        loader = build_train_loader(cfg, unequal, rank=rank, world_size=world_size, seed=1)
        sizes = [len(batch["key"]) for batch in loader]
        assert loader.steps_per_epoch == 100 // (world_size * batch_size) == len(loader)
        assert sizes == [batch_size] * loader.steps_per_epoch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_read_disjoint_shards(unequal, equal, num_workers):
    cfg = config(num_workers=num_workers)
    for shard_set, exact in ((equal, True), (unequal, False)):
        ranks = [
            keys_of(build_train_loader(cfg, shard_set, rank=r, world_size=2, seed=3))
            for r in (0, 1)
        ]
        assert not set(ranks[0]) & set(ranks[1])
        if exact:  # 32 samples = 2 ranks x 2 steps x 8: nothing dropped or repeated
            assert Counter(ranks[0] + ranks[1]) == all_keys(shard_set)


def test_fewer_shards_than_workers_does_not_fail(tmp_path):
    shard_set = write_unequal_shards(tmp_path / "train", [9, 3])
    cfg = config(num_workers=2, batch_size=2)
    counts = [
        len(list(build_train_loader(cfg, shard_set, rank=r, world_size=2, seed=0))) for r in (0, 1)
    ]
    assert counts == [3, 3]


def test_remainder_rule_drops_surplus_and_tops_up_shortfall(tmp_path):
    # 32 samples, 2 ranks x batch 4 -> 4 steps = 16 samples per rank
    shard_set = write_unequal_shards(tmp_path / "train", [2, 30])
    cfg = config(batch_size=4)
    by_rank = {}
    for rank in (0, 1):
        loader = build_train_loader(cfg, shard_set, rank=rank, world_size=2, seed=0)
        epochs = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            epochs.append(Counter(keys_of(loader)))
        by_rank[len(epochs[0])] = epochs
    small, large = by_rank[2], by_rank[16]
    assert all(set(c.values()) == {8} for c in small)  # its 2 samples, 8 times each
    assert all(set(c.values()) == {1} for c in large)  # 16 of 30, none repeated
    assert set(large[0]) != set(large[1])  # a different surplus dropped each epoch


@pytest.mark.parametrize("sizes", [UNEQUAL, [10], [3, 2]])
def test_eval_every_sample_exactly_once(tmp_path, sizes):
    shard_set = write_unequal_shards(tmp_path / "eval", sizes)
    keys = Counter()
    for rank in (0, 1):
        loader = build_eval_loader(config(num_workers=2), shard_set, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == loader.num_batches
        assert sum(len(b["key"]) for b in batches) == loader.num_samples
        keys.update(k for b in batches for k in b["key"])
    assert keys == all_keys(shard_set)


def test_eval_batch_size_override_and_partial_batches(unequal):
    loader = build_eval_loader(config(), unequal, rank=0, world_size=1, batch_size=16)
    sizes = [len(batch["key"]) for batch in loader]
    assert sum(sizes) == 100 and max(sizes) == 16 and min(sizes) < 16


def test_shuffle_differs_per_epoch_and_repeats_for_seed(unequal):
    cfg = config(num_workers=2)

    def run(seed: int, epoch: int) -> tuple[list[str], torch.Tensor]:
        loader = build_train_loader(cfg, unequal, rank=0, world_size=2, seed=seed)
        loader.set_epoch(epoch)
        batches = list(loader)
        return keys_of(batches), torch.cat([b["image"] for b in batches])

    keys0, images0 = run(seed=0, epoch=0)
    keys0_again, images0_again = run(seed=0, epoch=0)
    assert keys0 == keys0_again and torch.equal(images0, images0_again)
    assert run(seed=0, epoch=1)[0] != keys0
    assert run(seed=1, epoch=0)[0] != keys0


def test_eval_transform_deterministic():
    image = Image.fromarray(torch.randint(0, 255, (40, 60, 3), dtype=torch.uint8).numpy())
    transform = build_eval_transform(config(eval_resize_ratio=1.14))
    first, second = transform(image), transform(image)
    assert first.shape == (3, 32, 32) and torch.equal(first, second)


def test_train_transform_augmentations_run_and_repeat():
    import random

    augment = AugmentConfig(blur_prob=1.0, blur_sigma=(0.5, 2.0), jpeg_prob=1.0)
    transform = build_train_transform(config(augment=augment))
    image = Image.fromarray(torch.randint(0, 255, (40, 60, 3), dtype=torch.uint8).numpy())
    first = transform(image, random.Random(4))
    assert first.shape == (3, 32, 32)
    assert torch.equal(first, transform(image, random.Random(4)))


def write_tar_with_pickles(root: Path, marker: Path) -> None:
    """One sample whose .pickle/.pyd members would create `marker` if unpickled."""
    payload = pickle.dumps(_Touch(marker))
    sample = lfw_samples(1)[0]
    root.mkdir()
    with wds.TarWriter(str(root / "evil-000000.tar"), encoder=False) as writer:
        record = {"__key__": "evil-0", "png": sample.image, "cls": b"1"}
        writer.write(record | {"pickle": payload, "pyd": payload, "npy": payload})
    manifest = {
        "format": MANIFEST_FORMAT,
        "class_names": CLASS_NAMES,
        "shards": [{"file": "evil-000000.tar", "num_samples": 1}],
    }
    (root / MANIFEST_NAME).write_text(str(manifest).replace("'", '"'))


class _Touch:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_members_never_unpickled(tmp_path):
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(_Touch(canary)))
    assert canary.exists(), "the payload must be live for this test to mean anything"

    marker = tmp_path / "unpickled"
    write_tar_with_pickles(tmp_path / "evil", marker)
    shard_set = resolve_shards(str(tmp_path / "evil"))
    cfg = config(batch_size=1)
    assert len(list(build_train_loader(cfg, shard_set, rank=0, world_size=1, seed=0))) == 1
    assert len(list(build_eval_loader(cfg, shard_set, rank=0, world_size=1))) == 1
    assert not marker.exists()
    assert not any(wanted_member(f"evil-0.{ext}") for ext in ("pickle", "pyd", "npy"))


def test_shard_path_is_never_run_as_a_command(tmp_path, unequal):
    # webdataset's gopen runs "pipe:" URLs through the shell; the loader must not
    marker = tmp_path / "ran"
    shard = Shard(f"pipe:touch {marker}", 1)
    shard_set = ShardSet(unequal.root, unequal.manifest, (shard,))
    with pytest.raises(FileNotFoundError):
        list(build_eval_loader(config(), shard_set, rank=0, world_size=1))
    assert not marker.exists()


def png(size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "sample,reason",
    [
        ({"cls": b"0"}, "no image member"),
        ({"png": png()}, "no label member"),
        ({"png": png()[:40], "cls": b"0"}, "cannot decode"),
        ({"jpg": b"not a jpeg", "cls": b"0"}, "cannot decode"),
        ({"png": png(), "cls": b"zero"}, "not an integer"),
        ({"png": png(), "cls": b"5"}, "outside 0..1"),
    ],
)
def test_bad_sample_error_names_key_and_shard(sample, reason):
    with pytest.raises(SampleError, match=reason) as error:
        decode_sample({"__key__": "k-7", "__url__": "s/x-000003.tar"} | sample, 2)
    assert "'k-7'" in str(error.value) and "x-000003.tar" in str(error.value)


def test_grayscale_decoded_as_rgb():
    decoded = decode_sample({"__key__": "k", "__url__": "u", "png": png(), "cls": b"1"})
    assert decoded.image.mode == "RGB" and decoded.label == 1 and decoded.meta == {}

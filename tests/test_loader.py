"""The train and eval loaders on tiny real shards, ranks simulated in one process."""

from __future__ import annotations

import io
import pickle
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from loader_support import CLASS_NAMES, lfw_samples, write_unequal_shards
from PIL import Image

from pipeline.config import AugmentConfig, DataConfig
from pipeline.data.decode import (
    BadDataError,
    DraftTarget,
    SampleError,
    build_draft_target,
    decode_sample,
    wanted_member,
)
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    Shard,
    ShardSet,
    resolve_shards,
)
from pipeline.data.transforms import (
    build_eval_transform,
    build_train_transform,
    random_crop_box,
)

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
        assert batch["image"].dtype == torch.uint8  # normalized on the device
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
    strict = config(on_bad_sample="strict")
    with pytest.raises(BadDataError, match="FileNotFoundError"):
        list(build_eval_loader(strict, shard_set, rank=0, world_size=1))
    with pytest.raises(BadDataError, match="no usable sample|max_bad_fraction"):
        list(build_train_loader(config(batch_size=1), shard_set, rank=0, world_size=1, seed=0))
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
        ({"png": png(), "cls": b"zero"}, "invalid literal for int"),
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


# ---- resampled mode


def test_resampled_gives_exact_steps_and_repeats_for_seed(unequal):
    cfg = config(resampled=True, batch_size=5)
    every = set(all_keys(unequal))
    runs = {}
    for rank in (0, 1):
        loader = build_train_loader(cfg, unequal, rank=rank, world_size=2, seed=0)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert [len(b["key"]) for b in batches] == [5] * 10 == [5] * len(loader)
            runs[rank, epoch] = keys_of(batches)
            assert set(runs[rank, epoch]) <= every
    assert runs[0, 0] != runs[0, 1] and runs[0, 0] != runs[1, 0]
    again = build_train_loader(cfg, unequal, rank=1, world_size=2, seed=0)
    assert keys_of(again) == runs[1, 0]
    workers = build_train_loader(config(resampled=True, batch_size=5, num_workers=2),
                                 unequal, rank=1, world_size=2, seed=0)
    assert [len(b["key"]) for b in workers] == [5] * 10


def test_resampled_draws_from_all_shards_with_replacement(equal):
    # 32 samples over 4 shards, one rank, 4 steps of 8: whole shards are drawn
    cfg = config(resampled=True, batch_size=8, shuffle_buffer=0)
    drawn = Counter(keys_of(build_train_loader(cfg, equal, rank=0, world_size=1, seed=5)))
    assert sum(drawn.values()) == 32
    assert max(drawn.values()) > 1 or len(drawn) == 32  # with replacement


# ---- draft decoding of large JPEGs


@pytest.fixture(scope="module")
def photo_jpegs() -> list[bytes]:
    """Six real photos: crops of scikit-learn's sample images, ~400 px, JPEG."""
    from sklearn.datasets import load_sample_images

    out = []
    for photo in load_sample_images().images:
        image = Image.fromarray(photo)
        for box in [(0, 0, 427, 427), (100, 20, 640, 400), (200, 0, 500, 427)]:
            crop = image.crop(box)
            width = 400
            crop = crop.resize((width, round(crop.height * width / crop.width)))
            buffer = io.BytesIO()
            crop.save(buffer, format="JPEG", quality=90)
            out.append(buffer.getvalue())
    return out


def test_draft_request_picks_the_largest_scale_that_still_covers():
    target = DraftTarget(min_side=100)
    assert target.request((400, 300)) == (200, 150)  # 1/4 would give 75 < 100
    assert target.request((900, 800)) == (112, 100)  # 1/8 still covers
    assert target.request((199, 400)) is None  # not twice the need: full decode
    assert DraftTarget(10, min_area=5000).request((400, 400)) == (100, 100)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 1.0), (0.9, 1.0)])
@pytest.mark.parametrize("size", [(640, 427), (400, 1000), (1500, 300)])
def test_drafted_train_crop_is_never_smaller_than_the_output(scale, size):
    cfg = config(image_size=64, augment=AugmentConfig(crop_scale=scale))
    request = build_draft_target(cfg, train=True).request(size)
    drafted = request or size
    rng = random.Random(0)
    for _ in range(500):
        left, top, right, bottom = random_crop_box(drafted, scale, rng)
        assert min(right - left, bottom - top) >= 64


def test_no_draft_when_augmentations_work_at_source_resolution():
    assert build_draft_target(config(draft_decode=False), train=False) is None
    assert build_draft_target(config(augment=AugmentConfig(blur_prob=0.5)), train=True) is None
    assert build_draft_target(config(augment=AugmentConfig(jpeg_prob=0.5)), train=True) is None
    plain = config(augment=AugmentConfig(random_resized_crop=False))
    assert build_draft_target(plain, train=True) == DraftTarget(32)
    assert build_draft_target(config(eval_resize_ratio=1.25), train=False) == DraftTarget(40)


@pytest.mark.parametrize("image_size,factor", [(96, 2), (48, 4)])
def test_draft_decoded_eval_matches_plain_decode(photo_jpegs, image_size, factor):
    cfg = config(image_size=image_size, eval_resize_ratio=1.14)
    target = build_draft_target(cfg, train=False)
    transform = build_eval_transform(cfg)
    for data in photo_jpegs:
        sample = {"__key__": "k", "__url__": "u", "jpg": data, "cls": b"0"}
        drafted = decode_sample(sample, 2, draft=target).image
        plain = decode_sample(sample, 2).image
        assert drafted.width == -(-plain.width // factor)  # libjpeg really scaled
        diff = transform(drafted).float() - transform(plain).float()
        # Grey levels of 255: libjpeg's DCT scaling is another low-pass filter than
        # Pillow's, so pixels differ a little (measured 1-5 levels on average);
        # brightness must not drift
        assert diff.abs().mean().item() < 6
        assert abs(diff.mean().item()) < 1.2


def test_normalize_on_the_device_matches_the_plain_formula():
    from pipeline.data.transforms import Normalize

    pixels = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (pixels.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1).double()) \
        / torch.tensor(std).view(1, 3, 1, 1).double()
    got = Normalize(mean, std)(pixels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)

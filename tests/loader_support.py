"""Test support for the data loader: tiny shard sets of real images, and the
worker that test_loader_dist.py starts on every rank with torchrun.

The images are scikit-image's bundled LFW subset (200 grayscale 25x25 crops,
first 100 faces = label 0, last 100 other = label 1), stored as PNG.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.shards import MANIFEST_FORMAT, MANIFEST_NAME, ShardSet, resolve_shards
from pipeline.data.writer import ShardSample, write_shard_set

CLASS_NAMES = ["face", "other"]


def lfw_images() -> np.ndarray:
    """The 200 LFW crops as uint8 [200, 25, 25], read without importing skimage."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    path = Path(spec.origin).parent / "data" / "lfw_subset.npy"
    return (np.load(path) * 255).round().astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def lfw_samples(count: int, start: int = 0) -> list[ShardSample]:
    images = lfw_images()
    samples = []
    for index in range(start, start + count):
        # 7 is prime to 200: the first 200 picks are distinct and mix both classes
        pick = index * 7 % len(images)
        label = 0 if pick < 100 else 1
        samples.append(ShardSample(png_bytes(images[pick]), "png", label, {"lfw": pick}))
    return samples


def write_unequal_shards(root: Path, sizes: Sequence[int]) -> ShardSet:
    """One shard set in `root` whose shards hold `sizes` samples, all keys distinct."""
    root.mkdir(parents=True, exist_ok=True)
    entries, start = [], 0
    for number, size in enumerate(sizes):
        part = root.parent / f"{root.name}.part{number}"
        manifest = write_shard_set(
            lfw_samples(size, start), part, f"p{number}", CLASS_NAMES, maxcount=size
        )
        entry = dict(manifest["shards"][0], file=f"train-{number:06d}.tar")
        shutil.move(part / manifest["shards"][0]["file"], root / entry["file"])
        shutil.rmtree(part)
        entries.append(entry)
        start += size
    _write_manifest(root, entries)
    return resolve_shards(str(root))


def _write_manifest(root: Path, entries: list[dict]) -> None:
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": "train",
        "num_samples": sum(e["num_samples"] for e in entries),
        "num_classes": len(CLASS_NAMES),
        "class_names": CLASS_NAMES,
        "label_format": "index",
        "shards": entries,
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


def run_rank(shard_dir: str, out_dir: str, batch_size: int, num_workers: int) -> None:
    """One rank: two epochs with a collective per step, like DDP's gradient sync."""
    import torch
    import torch.distributed as dist

    from pipeline.config import DataConfig
    from pipeline.data.loader import build_train_loader

    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = DataConfig(
        image_size=32, batch_size=batch_size, num_workers=num_workers, shuffle_buffer=20
    )
    loader = build_train_loader(cfg, resolve_shards(shard_dir), rank=rank, world_size=world, seed=7)
    report = {"rank": rank, "world_size": world, "steps_per_epoch": loader.steps_per_epoch}
    for epoch in range(2):
        loader.set_epoch(epoch)
        report[f"epoch{epoch}"] = _run_epoch(loader, torch, dist)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _run_epoch(loader, torch, dist) -> dict:
    count, keys = 0, []
    for batch in loader:
        # A rank with an extra step would block here until the timeout
        dist.all_reduce(torch.ones(1))
        count += 1
        keys += batch["key"]
    counts = torch.tensor([count, -count])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    return {"count": count, "max": int(counts[0]), "min": -int(counts[1]), "keys": keys}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser()
    parser.add_argument("shard_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=1)
    args = parser.parse_args()
    run_rank(args.shard_dir, args.out_dir, args.batch_size, args.num_workers)

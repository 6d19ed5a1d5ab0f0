"""Test support for the data loader: tiny shard sets of real images (some of
them broken on purpose), and the workers that test_loader_dist.py starts on
every rank with torchrun (`train`: equal steps; `eval`: exactly-once scoring).

The images are scikit-image's bundled LFW subset (200 grayscale 25x25 crops,
first 100 faces = label 0, last 100 other = label 1), stored as PNG.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import shutil
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
import webdataset as wds
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


def write_records(root: Path, shards: Sequence[Sequence[dict]]) -> ShardSet:
    """A shard set of raw records ({"__key__", "png", "cls", ...}), good or broken."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for number, records in enumerate(shards):
        path = root / f"raw-{number:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as writer:
            for record in records:
                writer.write(record)
        data = path.read_bytes()
        entries.append({"file": path.name, "num_samples": len(records), "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    _write_manifest(root, entries)
    return resolve_shards(str(root))


def good_records(count: int, start: int = 0, prefix: str = "s") -> list[dict]:
    """LFW samples as raw records with keys `<prefix>-<index>`."""
    return [
        {"__key__": f"{prefix}-{start + i:04d}", "png": s.image, "cls": str(s.label).encode()}
        for i, s in enumerate(lfw_samples(count, start))
    ]


def truncate(path: str | Path, keep_bytes: int) -> None:
    """Cut a file to its first keep_bytes bytes, like a partial copy."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:keep_bytes])


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


def score_sets(
    shard_dirs: Sequence[str], rank: int, world: int, num_workers: int, batch_size: int
) -> dict[str, dict]:
    """Score each set with a seeded untrained resnet18 at 32 px; gathered over ranks."""
    import torch

    from pipeline.config import DataConfig, ModelConfig
    from pipeline.data.loader import build_eval_loader
    from pipeline.evaluate import compute_metrics, gather_predictions, predict
    from pipeline.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", num_classes=2))
    cfg = DataConfig(image_size=32, batch_size=batch_size, num_workers=num_workers)
    results = {}
    for shard_dir in shard_dirs:
        shards = resolve_shards(shard_dir)
        loader = build_eval_loader(cfg, shards, rank=rank, world_size=world)
        local = predict(model, loader, "cross_entropy", torch.device("cpu"))
        pred = gather_predictions(local, shards.num_samples, shard_dir)
        results[shard_dir] = {
            "keys": pred.keys,
            "probs": pred.probs.tolist(),
            "labels": pred.labels.tolist(),
            "local": len(local.keys),
            "metrics": compute_metrics(pred, "cross_entropy", shards.class_names),
        }
    return results


def run_eval_rank(shard_dirs: Sequence[str], out_dir: str, batch_size: int, workers: int) -> None:
    """One rank of a distributed evaluation; each rank writes what it gathered."""
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = score_sets(shard_dirs, rank, world, workers, batch_size)
    Path(out_dir, f"eval-rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser()
    parser.add_argument("shard_dir", help="a shard folder; for --eval, comma-separated")
    parser.add_argument("out_dir")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--eval", action="store_true", help="score instead of train")
    args = parser.parse_args()
    if args.eval:
        dirs = args.shard_dir.split(",")
        run_eval_rank(dirs, args.out_dir, args.batch_size, args.num_workers)
    else:
        run_rank(args.shard_dir, args.out_dir, args.batch_size, args.num_workers)

"""Loader benchmarks on a JPEG corpus made from the photos bundled with scikit-image/-learn.

    .venv/bin/python benchmarks/loader.py [--images N] [--rounds R] [--workers W]

P1  train loader (1 worker) / a bare one-core loop: same decode + transform, bytes in memory
P2  train loader / torchvision ImageFolder + DataLoader: same transform, same workers
P4  loader with data.draft_decode on / off, sources at least twice the output size;
    the outputs are compared pixel by pixel
P5  peak memory of a train loader with a 5,000-sample shuffle buffer (PSS of the
    process and its workers, minus the same run without buffer) / the loader's estimate

Both sides of a ratio run in the same process on the same bytes, alternating their
order each round; the table shows medians over the rounds. Each ratio is given by
wall clock (what the targets mean) and by CPU time (this process plus its workers),
which other jobs on a shared machine disturb far less. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gc
import io
import logging
import math
import os
import platform
import random
import re
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the shard writer's progress bars

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data.decode import build_draft_target, decode_sample  # noqa: E402
from pipeline.data.loader import build_eval_loader, build_train_loader  # noqa: E402
from pipeline.data.shards import ShardSet, resolve_shards  # noqa: E402
from pipeline.data.sources import ShardSample  # noqa: E402
from pipeline.data.transforms import build_train_transform  # noqa: E402
from pipeline.data.writer import write_shard_set  # noqa: E402

# Colour photos that scikit-image ships (other skimage.data loaders download: not used)
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
    "immunohistochemistry", "stereo_motorcycle",
)  # fmt: skip
SIZE = 224
BATCH = 32
BUFFER = 5000
Corpus = list[tuple[bytes, int]]


# ---- the corpus


def load_photos() -> dict[str, np.ndarray]:
    """The bundled colour photos as uint8 HxWx3 arrays, by name."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {}
    for name in SKIMAGE_PHOTOS:
        image = getattr(data, name)()
        if name == "stereo_motorcycle":  # (left, right, disparity)
            photos["motorcycle_left"], photos["motorcycle_right"] = image[0], image[1]
        else:
            photos[name] = image
    bundled = load_sample_images()
    for filename, image in zip(bundled.filenames, bundled.images):
        photos[Path(filename).stem] = image
    return {name: np.ascontiguousarray(image[..., :3], dtype=np.uint8)
            for name, image in photos.items()}  # fmt: skip


def make_jpeg(photo: np.ndarray, rng: random.Random, side: tuple[int, int], short: bool) -> bytes:
    """A random crop (50-100% of each side), rescaled so its short or long side is
    in `side`, re-encoded at JPEG quality 75-95."""
    height, width = photo.shape[:2]
    crop_h, crop_w = int(height * rng.uniform(0.5, 1)), int(width * rng.uniform(0.5, 1))
    top, left = rng.randint(0, height - crop_h), rng.randint(0, width - crop_w)
    image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
    scale = rng.randint(*side) / (min(image.size) if short else max(image.size))
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(new_size, Image.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(75, 95))
    return buffer.getvalue()


def build_corpus(photos: dict[str, np.ndarray], count: int, seed: int, **size) -> Corpus:
    rng = random.Random(seed)
    arrays = list(photos.values())
    return [
        (make_jpeg(arrays[i % len(arrays)], rng, **size), i % len(arrays)) for i in range(count)
    ]


def write_shards(corpus: Corpus, folder: Path, names: list[str], repeat: int = 1) -> ShardSet:
    """The corpus (`repeat` times, new keys each time) as a shard set of >= 8 shards."""
    total = len(corpus) * repeat
    pick = (corpus[i % len(corpus)] for i in range(total))
    samples = (ShardSample(data, "jpg", label, {}) for data, label in pick)
    write_shard_set(samples, folder, "bench", names, maxcount=math.ceil(total / 8))
    return resolve_shards(str(folder))


def write_image_folder(corpus: Corpus, root: Path, names: list[str]) -> Path:
    for index, (data, label) in enumerate(corpus):
        path = root / names[label] / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


# ---- what is timed


@dataclass
class Pass:
    """One timed pass: images, wall seconds, CPU seconds of this process and of its
    workers (children are counted once they have exited, as they have by the end)."""

    images: int
    wall_s: float
    main_cpu_s: float
    workers_cpu_s: float

    @property
    def rate(self) -> float:
        return self.images / self.wall_s

    @property
    def cpu_ms(self) -> float:
        return 1000 * (self.main_cpu_s + self.workers_cpu_s) / self.images


def cpu_seconds() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def timed(run: Callable[[], int]) -> Pass:
    gc.collect()
    (main0, kids0), start = cpu_seconds(), time.perf_counter()
    images = run()
    # An exhausted DataLoader has joined its workers: their CPU time is counted now
    wall_s = time.perf_counter() - start
    main1, kids1 = cpu_seconds()
    return Pass(images, wall_s, main1 - main0, kids1 - kids0)


def bare_loop(corpus: Corpus, cfg: DataConfig, seed: int) -> Pass:
    """One process decoding (with the loader's decode_sample) and transforming."""
    transform, rng = build_train_transform(cfg), random.Random(seed)

    def run() -> int:
        for index, (data, _) in enumerate(corpus):
            sample = decode_sample({"__key__": str(index), "jpg": data, "cls": b"0"})
            transform(sample.image, rng)
        return len(corpus)

    return timed(run)


def count_images(batches: Iterable[dict]) -> int:
    return sum(len(batch["image"]) for batch in batches)


def train_loader_pass(cfg: DataConfig, shards: ShardSet, epoch: int) -> Pass:
    """One epoch, worker start-up included (it recurs every epoch)."""
    loader = build_train_loader(cfg, shards, rank=0, world_size=1, seed=0)
    loader.set_epoch(epoch)
    return timed(lambda: count_images(loader))


def eval_loader_pass(cfg: DataConfig, shards: ShardSet) -> Pass:
    loader = build_eval_loader(cfg, shards, rank=0, world_size=1)
    return timed(lambda: count_images(loader))


class _SeededTransform:
    """The project's train transform, in torchvision's one-argument form."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.transform, self.rng = build_train_transform(cfg), random.Random(seed)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image, self.rng)


def torchvision_transform(cfg: DataConfig) -> Callable:
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(cfg.image_size), T.RandomHorizontalFlip(),
        T.ToTensor(), T.Normalize(cfg.mean, cfg.std),
    ])  # fmt: skip


def image_folder_pass(root: Path, transform: Callable, workers: int) -> Pass:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root), transform=transform)
    loader = DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True
    )
    return timed(lambda: count_images({"image": images} for images, _ in loader))


def alternate(sides: dict[str, Callable[[int], Pass]], rounds: int) -> dict[str, Pass]:
    """Each side's median pass (by wall time per image; CPU fields are medians too);
    the order rotates every round to cancel drift."""
    passes: dict[str, list[Pass]] = {name: [] for name in sides}
    names = list(sides)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            passes[name].append(sides[name](round_index))
    return {name: median_pass(values) for name, values in passes.items()}


def median_pass(passes: list[Pass]) -> Pass:
    def per_image(field_name: str) -> float:
        return statistics.median(getattr(p, field_name) / p.images for p in passes)

    fields = ("wall_s", "main_cpu_s", "workers_cpu_s")
    return Pass(1, *(per_image(name) for name in fields))


# ---- the four measurements


class Row:
    """One line of the result table: a wall-clock ratio, and the same ratio in CPU time."""

    def __init__(
        self, name: str, wall: float, cpu: float | None, target: float | None, detail: str
    ):
        self.name, self.wall, self.cpu, self.target = name, wall, cpu, target
        self.detail = detail

    def verdict(self) -> str:
        if self.target is None:
            return "info"
        ratios = (self.wall, self.cpu) if self.cpu is not None else (self.wall,)
        return "/".join("met" if r >= self.target else "MISSED" for r in ratios)


def loader_cfg(workers: int, draft: bool = False, buffer: int = 1000) -> DataConfig:
    return DataConfig(
        image_size=SIZE, batch_size=BATCH, num_workers=workers, shuffle_buffer=buffer,
        draft_decode=draft,
    )  # fmt: skip


def rates_text(a: Pass, b: Pass) -> str:
    return f"{a.rate:.0f} vs {b.rate:.0f} img/s, {a.cpu_ms:.1f} vs {b.cpu_ms:.1f} CPU ms/img"


def measure_p1(corpus: Corpus, shards: ShardSet, rounds: int) -> list[Row]:
    cfg = loader_cfg(workers=1)
    got = alternate(
        {
            "loader": lambda r: train_loader_pass(cfg, shards, r),
            "bare": lambda r: bare_loop(corpus, cfg, r),
        },
        rounds,
    )
    loader, bare = got["loader"], got["bare"]
    # With one worker the worker is the bottleneck; the main process has the other core
    worker_ms, main_ms = 1000 * loader.workers_cpu_s, 1000 * loader.main_cpu_s
    detail = (f"{loader.rate:.0f} vs {bare.rate:.0f} img/s; CPU ms/img: worker {worker_ms:.1f}"
              f" + main {main_ms:.1f} vs bare {bare.cpu_ms:.1f}")  # fmt: skip
    return [Row("P1 train loader, 1 worker / bare loop", loader.rate / bare.rate,
                bare.cpu_ms / worker_ms, 0.95, detail)]  # fmt: skip


def measure_p2(shards: ShardSet, folder: Path, workers: int, rounds: int) -> list[Row]:
    cfg = loader_cfg(workers)
    got = alternate(
        {
            "loader": lambda r: train_loader_pass(cfg, shards, r),
            "same": lambda r: image_folder_pass(folder, _SeededTransform(cfg, r), workers),
            "tv": lambda r: image_folder_pass(folder, torchvision_transform(cfg), workers),
        },
        rounds,
    )
    loader, same, tv = got["loader"], got["same"], got["tv"]
    return [
        Row(f"P2 train loader / ImageFolder, {workers} workers", loader.rate / same.rate,
            same.cpu_ms / loader.cpu_ms, 1.10, rates_text(loader, same) + ", same transform"),
        Row("   the same / ImageFolder + torchvision transforms", loader.rate / tv.rate,
            tv.cpu_ms / loader.cpu_ms, None, rates_text(loader, tv)),
    ]  # fmt: skip


def drafted_share(corpus: Corpus, cfg: DataConfig, train: bool) -> float:
    """The share of the corpus the loader decodes at a reduced size."""
    target = build_draft_target(cfg, train)
    sizes = [Image.open(io.BytesIO(data)).size for data, _ in corpus]
    return sum(target.request(size) is not None for size in sizes) / len(sizes)


def measure_p4(corpus: Corpus, shards: ShardSet, rounds: int) -> list[Row]:
    on, off = loader_cfg(1, draft=True), loader_cfg(1, draft=False)
    share = {mode: drafted_share(corpus, on, mode == "train") for mode in ("eval", "train")}
    got = alternate(
        {
            "eval on": lambda r: eval_loader_pass(on, shards),
            "eval off": lambda r: eval_loader_pass(off, shards),
            "train on": lambda r: train_loader_pass(on, shards, r),
            "train off": lambda r: train_loader_pass(off, shards, r),
        },
        rounds,
    )
    mae, worst, psnr = compare_eval_outputs(on, off, shards)
    eval_on, eval_off, train_on, train_off = got.values()
    return [
        Row("P4 eval loader, draft on / off", eval_on.rate / eval_off.rate,
            eval_off.cpu_ms / eval_on.cpu_ms, 1.5,
            f"{rates_text(eval_on, eval_off)}; {share['eval']:.0%} drafted; output differs "
            f"by {mae:.2f} levels mean, {worst:.0f} max, PSNR {psnr:.1f} dB"),
        Row("   train loader, draft on / off", train_on.rate / train_off.rate,
            train_off.cpu_ms / train_on.cpu_ms, None,
            f"{rates_text(train_on, train_off)}; {share['train']:.0%} drafted "
            f"(crop_scale {on.augment.crop_scale})"),
    ]  # fmt: skip


def compare_eval_outputs(on: DataConfig, off: DataConfig, shards: ShardSet) -> tuple:
    """Mean and max absolute difference in 0-255 levels, and the PSNR, draft vs full."""
    outputs = []
    for cfg in (on, off):
        loader = build_eval_loader(cfg, shards, rank=0, world_size=1)
        outputs.append({k: x for b in loader for k, x in zip(b["key"], b["image"])})
    # The loader's images are uint8 levels (normalisation happens on the device)
    diff = torch.stack([outputs[0][k].float() - outputs[1][k].float() for k in outputs[1]])
    mse = float((diff**2).mean())
    psnr = 10 * math.log10(255**2 / mse) if mse > 0 else math.inf
    return float(diff.abs().mean()), float(diff.abs().max()), psnr


# ---- P5: memory


def pss_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def tree_memory() -> tuple[int, int]:
    """(PSS, RSS) summed over this process and its children, bytes."""
    me = psutil.Process()
    pss = rss = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            pss, rss = pss + pss_bytes(proc.pid), rss + proc.memory_info().rss
        except (psutil.Error, OSError):
            continue  # a worker that just exited
    return pss, rss


class PeakMemory:
    """The highest tree_memory() seen while the block runs, sampled every 20 ms."""

    def __init__(self):
        self.pss = self.rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            pss, rss = tree_memory()
            self.pss, self.rss = max(self.pss, pss), max(self.rss, rss)


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def peak_with_buffer(shards: ShardSet, workers: int, buffer: int) -> tuple[PeakMemory, str]:
    """Peak memory over the first 10 batches of an epoch, and the loader's log."""
    logger, capture = logging.getLogger("pipeline.data.loader"), _Messages()
    logger.addHandler(capture)
    level, logger.level = logger.level, logging.INFO
    try:
        loader = build_train_loader(loader_cfg(workers, buffer=buffer), shards, rank=0,
                                    world_size=1, seed=0)  # fmt: skip
        with PeakMemory() as peak:
            for step, _ in enumerate(loader):
                if step == 9:
                    break
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)
    return peak, "\n".join(capture.messages)


def measure_p5(shards: ShardSet, workers: int) -> list[Row]:
    base, _ = peak_with_buffer(shards, workers, buffer=0)
    peak, log_text = peak_with_buffer(shards, workers, buffer=BUFFER)
    found = re.search(r"shuffle buffers hold about ([\d.]+) MiB", log_text)
    if found is None:
        raise RuntimeError(f"the loader logged no buffer estimate:\n{log_text}")
    estimate_mib = float(found.group(1))
    measured_mib = (peak.pss - base.pss) / 2**20
    detail = (
        f"+{measured_mib:.0f} MiB measured vs {estimate_mib:.0f} MiB logged; peak PSS "
        f"{peak.pss / 2**20:.0f} MiB (RSS sum {peak.rss / 2**20:.0f}), no buffer "
        f"{base.pss / 2**20:.0f} MiB"
    )
    name = f"P5 buffer {BUFFER} x {workers} workers: measured / estimate"
    return [Row(name, measured_mib / estimate_mib, None, None, detail)]


# ---- the run


def machine_text() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    cores = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cores} cores ({model}), Python {platform.python_version()}, torch "
        f"{torch.__version__}, torchvision {torchvision.__version__}, Pillow "
        f"{Image.__version__}; load average {load}"
    )


def run_all(args: argparse.Namespace, work: Path) -> list[Row]:
    photos = load_photos()
    names = list(photos)
    corpus = build_corpus(photos, args.images, args.seed, side=(300, 500), short=False)
    large = build_corpus(photos, max(64, args.images // 10), args.seed + 1, side=(460, 900),
                         short=True)  # fmt: skip
    mean_kib = sum(len(d) for d, _ in corpus) / len(corpus) / 1024
    step(f"corpus: {len(corpus)} JPEGs, 300-500 px, mean {mean_kib:.0f} KiB; "
         f"{len(large)} for P4 with a short side of 460-900 px")  # fmt: skip
    shards = write_shards(corpus, work / "shards", names)
    folder = write_image_folder(corpus, work / "folder", names)
    rows = measure_p1(corpus, shards, args.rounds)
    step("P1 done")
    rows += measure_p2(shards, folder, args.workers, args.rounds)
    step("P2 done")
    rows += measure_p4(large, write_shards(large, work / "large", names), args.rounds)
    step("P4 done")
    repeat = math.ceil(BUFFER * args.workers * 1.2 / len(corpus))
    rows += measure_p5(write_shards(corpus, work / "repeated", names, repeat), args.workers)
    step("P5 done")
    return rows


_START = time.perf_counter()


def step(text: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f} s] {text}", file=sys.stderr, flush=True)


def print_table(rows: list[Row]) -> None:
    """Ratios by wall clock and by CPU time; the verdict is wall/CPU against the target."""
    width = max(len(row.name) for row in rows)
    print(f"{'measure':<{width}}   wall    cpu   target  verdict")
    for row in rows:
        cpu = f"{row.cpu:6.2f}" if row.cpu is not None else "     -"
        target = f">= {row.target:.2f}" if row.target is not None else "-"
        print(f"{row.name:<{width}}  {row.wall:5.2f} {cpu}  {target:>7}  {row.verdict()}")
        print(f"    {row.detail}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1500, help="JPEGs in the corpus")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per ratio")
    parser.add_argument("--workers", type=int, default=2, help="loader workers for P2 and P5")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # the bare loop is one core; workers use one thread each
    print(f"machine: {machine_text()}")
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        rows = run_all(args, Path(tmp))
    print_table(rows)
    print(f"after: load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

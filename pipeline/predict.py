"""`pipeline predict`: score image files, image folders or shard sets with a run's
checkpoint and write one CSV row per image.

Columns: `key` (path relative to the input, or the sample key in a shard set),
`source` (the input as given), `prob_<class>` per output, `predicted`, `label`
(shard sets only). Probabilities come from the head as in evaluation: sigmoid
for BCE heads, softmax for cross_entropy. A 1-logit head gives one column, the
positive class. Binary heads predict with `eval.threshold`.

Images get the deterministic eval transform. An image file that cannot be
decoded is logged and skipped; a bad sample inside a shard set stops the run,
as in training (the loader's strict policy).

Shapes: B batch, K outputs of the head.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.checkpoint import latest_checkpoint, load_model_weights
from pipeline.config import Config, ConfigError, load_config
from pipeline.data.decode import DECODE_ERRORS, IMAGE_EXTENSIONS, PIL_FORMATS
from pipeline.data.loader import build_eval_loader
from pipeline.data.shards import MANIFEST_NAME, ShardSet, read_manifest, resolve_shards
from pipeline.data.transforms import (
    EvalTransform,
    Normalize,
    build_eval_transform,
    build_normalize,
)
from pipeline.losses import BINARY_LOSSES, positive_probability, probabilities
from pipeline.model import build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageInput:
    """Image files of one input: (key, path) pairs, key relative to the input."""

    source: str
    files: tuple[tuple[str, Path], ...]

    @property
    def num_images(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class ShardInput:
    source: str
    shard_set: ShardSet

    @property
    def num_images(self) -> int:
        return self.shard_set.num_samples


Input = ImageInput | ShardInput


@dataclass
class Predictor:
    """A run's model on its device, with what is needed to name its outputs."""

    model: nn.Module
    device: torch.device
    config: Config
    class_names: list[str]  # two names for a 1-logit head
    batch_size: int
    num_workers: int
    normalize: Normalize  # uint8 batch -> the model's float input, on its device

    @property
    def columns(self) -> list[str]:
        names = self.class_names[1:] if self.config.model.num_classes == 1 else self.class_names
        return [f"prob_{name}" for name in names]


@dataclass
class Batch:
    keys: list[str]
    images_BCHW: torch.Tensor | None  # None when every file of the batch was skipped
    labels: list[str]
    seen: int  # inputs consumed, skipped ones included


@dataclass
class Summary:
    rows: int = 0
    skipped: int = 0


def predict_to_csv(
    run_dir: Path,
    inputs: list[str],
    out: Path,
    checkpoint: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> Summary:
    """Score every image of `inputs` with the run's checkpoint; write the CSV `out`.

    Raises ConfigError for a missing run, checkpoint or input, or an input without images.
    """
    run_dir, out = Path(run_dir), Path(out)
    # The cheap checks first: run folder, checkpoint, inputs, --out; then the model
    config = load_run_config(run_dir)
    ckpt = find_checkpoint(run_dir, checkpoint)
    resolved = [resolve_input(spec) for spec in inputs]
    partial = _partial_path(out)
    predictor = build_predictor(config, ckpt, batch_size, num_workers)
    try:
        summary = _write_csv(predictor, resolved, partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)  # left only when writing failed
    log.info(
        "wrote %d predictions to %s; %d undecodable image file(s) skipped",
        summary.rows,
        out,
        summary.skipped,
    )
    return summary


def _partial_path(out: Path) -> Path:
    """Where the CSV is written before it is renamed to `out`, complete."""
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give a file name such as preds.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(out.name + ".partial")


def _write_csv(predictor: Predictor, inputs: list[Input], path: Path) -> Summary:
    summary = Summary()
    total = sum(item.num_images for item in inputs)
    bar = tqdm(total=total, desc="predict", unit="img", file=sys.stderr)
    # Log lines go through tqdm.write, so warnings do not break the bar
    with path.open("w", newline="") as stream, bar, logging_redirect_tqdm():
        writer = csv.writer(stream)
        writer.writerow(["key", "source", *predictor.columns, "predicted", "label"])
        for item in inputs:
            for batch in _batches(predictor, item, summary):
                rows = score_rows(predictor, item.source, batch) if batch.keys else []
                writer.writerows(rows)
                summary.rows += len(rows)
                bar.update(batch.seen)
    return summary


# --- inputs -------------------------------------------------------------------


def resolve_input(spec: str) -> Input:
    """An image file, a folder of images (recursive) or a shard set; raise ConfigError."""
    path = Path(spec).expanduser()
    if _is_shard_spec(path):
        return ShardInput(spec, resolve_shards(spec, key="input"))
    if path.is_file():
        if _is_image(path):
            return ImageInput(spec, ((path.name, path),))
        raise ConfigError(
            f"input {spec!r} is not an image file ({', '.join(IMAGE_EXTENSIONS)}); "
            "give images, folders of images or a shard set"
        )
    if path.is_dir():
        return ImageInput(spec, _folder_files(path, spec))
    raise ConfigError(
        f"input {spec!r} does not exist; give an image file, a folder of images, "
        f"a shard folder, its {MANIFEST_NAME} or a pattern such as 'shards/val-*.tar'"
    )


def _is_shard_spec(path: Path) -> bool:
    return (
        (path.is_dir() and (path / MANIFEST_NAME).is_file())
        or path.name == MANIFEST_NAME
        or path.suffix == ".tar"
        or any(ch in path.name for ch in "*?[{")
    )


def _is_image(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def _folder_files(folder: Path, spec: str) -> tuple[tuple[str, Path], ...]:
    files = _walk_images(folder)
    if files:
        return tuple((p.relative_to(folder).as_posix(), p) for p in files)
    if any(folder.glob("*.tar")) or any(folder.glob(f"*/{MANIFEST_NAME}")):
        resolve_shards(spec, key="input")  # raises, naming the shard sets it holds
    raise ConfigError(
        f"input {spec!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), "
        "searched recursively; give a folder of images or a shard set"
    )


def _walk_images(folder: Path) -> list[Path]:
    found = []
    for parent, _, names in os.walk(folder, onerror=_log_unreadable):
        found += [Path(parent, name) for name in names if _is_image(Path(name))]
    return sorted(found)


def _log_unreadable(error: OSError) -> None:
    log.warning("cannot list %s (%s); its images are left out", error.filename, error.strerror)


# --- model --------------------------------------------------------------------


def build_predictor(
    config: Config, ckpt: Path, batch_size: int | None = None, num_workers: int | None = None
) -> Predictor:
    """The model of `config` with the checkpoint's weights, on the GPU when there is one."""
    model = build_model(config.model.model_copy(update={"weights": None}))
    _load_weights(model, ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    log.info("checkpoint %s on %s", ckpt, device)
    return Predictor(
        model=model,
        device=device,
        config=config,
        class_names=read_class_names(config),
        batch_size=batch_size or config.eval.batch_size or config.data.batch_size,
        num_workers=config.data.num_workers if num_workers is None else num_workers,
        normalize=build_normalize(config.data),
    )


def load_run_config(run_dir: Path) -> Config:
    """The resolved config that training saved in the run folder."""
    if not (run_dir / "config.yaml").is_file():
        problem = "has no config.yaml" if run_dir.is_dir() else "does not exist"
        raise ConfigError(
            f"--run-dir {str(run_dir)!r} {problem}; give a run folder written by `pipeline train` "
            "(it holds config.yaml and checkpoints/)"
        )
    return load_config(run_dir / "config.yaml")


def find_checkpoint(run_dir: Path, checkpoint: str | None) -> Path:
    """The given checkpoint folder (a path, or a name under RUN/checkpoints), or the latest."""
    if checkpoint is None:
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise ConfigError(
                f"--run-dir {str(run_dir)!r} has no checkpoint (no checkpoints/latest); "
                "train first or pass --checkpoint CKPT_DIR"
            )
        return latest
    for candidate in (Path(checkpoint), run_dir / "checkpoints" / checkpoint):
        if candidate.is_dir():
            return candidate
    raise ConfigError(
        f"--checkpoint {checkpoint!r} is not a folder, nor one in {run_dir / 'checkpoints'}; "
        "give a checkpoint folder such as RUN/checkpoints/step-00000300"
    )


def _load_weights(model: nn.Module, ckpt: Path) -> None:
    try:
        load_model_weights(model, ckpt)
    except FileNotFoundError as err:
        raise ConfigError(f"--checkpoint: {err}; give a folder written by training") from None
    except RuntimeError as err:  # load_state_dict: missing, unexpected or mis-shaped tensors
        first = str(err).splitlines()[1:2] or [str(err)]
        raise ConfigError(
            f"checkpoint {str(ckpt)!r} does not fit the run's model.arch / model.num_classes "
            f"({first[0].strip()}); pass the checkpoint of this run"
        ) from None


def read_class_names(config: Config) -> list[str]:
    """Class names from the training manifest (data.train); class_0.. when unavailable."""
    k = config.model.num_classes
    wanted = 2 if k == 1 else k
    fallback = [f"class_{i}" for i in range(wanted)]
    try:
        names = _train_class_names(config.data.train)
    except ConfigError as err:
        log.warning("class names unavailable (%s); columns use class_0..", err)
        return fallback
    if len(names) != wanted:
        log.warning(
            "the training manifest names %d classes %s, but model.num_classes=%d needs %d; "
            "columns use class_0..",
            len(names),
            names,
            k,
            wanted,
        )
        return fallback
    return names


def _train_class_names(spec: str | None) -> list[str]:
    # Only the manifest is read: the training shards need not be where we predict.
    if not spec:
        raise ConfigError("data.train is not set in the run's config")
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / MANIFEST_NAME
    elif path.name != MANIFEST_NAME:
        path = path.parent / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(f"data.train={spec!r}: no {MANIFEST_NAME} found at {str(path)!r}")
    return [str(name) for name in read_manifest(path)["class_names"]]


# --- scoring ------------------------------------------------------------------


@torch.inference_mode()
def score(predictor: Predictor, images_BCHW: torch.Tensor) -> torch.Tensor:
    """Probabilities `[B, K]` on the CPU."""
    pixels = images_BCHW.to(predictor.device, non_blocking=True)
    logits_BK = predictor.model(predictor.normalize(pixels))
    return probabilities(logits_BK, predictor.config.loss.name).cpu()


def predicted_classes(
    probs_BK: torch.Tensor, class_names: list[str], loss_name: str, threshold: float
) -> list[str]:
    """Binary heads: the positive class at `threshold`; multi-label (sigmoid, K > 1):
    every class at `threshold`, joined by '|'; multiclass: the most probable class."""
    k = probs_BK.shape[1]
    if loss_name in BINARY_LOSSES and k > 1:
        return ["|".join(_names_at(row >= threshold, class_names)) for row in probs_BK]
    if k <= 2:
        index_B = (positive_probability(probs_BK) >= threshold).long()
    else:
        index_B = probs_BK.argmax(dim=1)
    return [class_names[i] for i in index_B.tolist()]


def score_rows(predictor: Predictor, source: str, batch: Batch) -> list[list[str]]:
    probs_BK = score(predictor, batch.images_BCHW)
    cfg = predictor.config
    predicted = predicted_classes(
        probs_BK, predictor.class_names, cfg.loss.name, cfg.eval.threshold
    )
    return [
        [key, source, *(f"{p:.9g}" for p in row), name, label]
        for key, row, name, label in zip(batch.keys, probs_BK.tolist(), predicted, batch.labels)
    ]


def _names_at(mask: torch.Tensor, class_names: list[str]) -> list[str]:
    return [name for name, on in zip(class_names, mask.tolist()) if on]


def _label_text(label: torch.Tensor, class_names: list[str]) -> str:
    """A class index or 0/1 value -> its name; a one- or multi-hot vector -> names '|'."""
    if label.dim() == 0:
        return class_names[int(round(float(label)))]
    return "|".join(_names_at(label >= 0.5, class_names))


# --- batches ------------------------------------------------------------------


def _batches(predictor: Predictor, item: Input, summary: Summary) -> Iterator[Batch]:
    if isinstance(item, ShardInput):
        return _shard_batches(predictor, item)
    return _file_batches(predictor, item, summary)


def _shard_batches(predictor: Predictor, item: ShardInput) -> Iterator[Batch]:
    names = item.shard_set.class_names
    if names != predictor.class_names:
        log.warning(
            "input %r has classes %s, the run %s; its label column uses the former",
            item.source,
            names,
            predictor.class_names,
        )
    data_cfg = predictor.config.data.model_copy(update={"num_workers": predictor.num_workers})
    loader = build_eval_loader(
        data_cfg, item.shard_set, rank=0, world_size=1, batch_size=predictor.batch_size
    )
    for batch in loader:
        labels = [_label_text(label, names) for label in batch["label"]]
        yield Batch(list(batch["key"]), batch["image"], labels, len(labels))


class _ImageFiles(Dataset):
    """(key, path, image tensor or None, decode error) per file; errors are not raised."""

    def __init__(self, files: tuple[tuple[str, Path], ...], transform: EvalTransform):
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, str, torch.Tensor | None, str]:
        key, path = self.files[index]
        try:
            image = read_image(path)
        except DECODE_ERRORS as err:
            return key, str(path), None, f"{type(err).__name__}: {err}"
        return key, str(path), self.transform(image), ""


def read_image(path: Path) -> Image.Image:
    """Decode an image file as the shard decoder does: Pillow limited to its formats, RGB."""
    with Image.open(path, formats=PIL_FORMATS) as image:
        return image.convert("RGB")  # forces the full decode: truncated files fail here


def _as_list(items: list) -> list:
    return items


def _file_batches(predictor: Predictor, item: ImageInput, summary: Summary) -> Iterator[Batch]:
    dataset = _ImageFiles(item.files, build_eval_transform(predictor.config.data))
    loader = DataLoader(
        dataset,
        batch_size=predictor.batch_size,
        collate_fn=_as_list,
        num_workers=predictor.num_workers,
        pin_memory=predictor.device.type == "cuda",
    )
    for items in loader:
        for _, path, _, error in (i for i in items if i[2] is None):
            log.warning("skipped %s: cannot decode it (%s)", path, error)
            summary.skipped += 1
        good = [(key, image) for key, _, image, _ in items if image is not None]
        keys = [key for key, _ in good]
        images_BCHW = torch.stack([image for _, image in good]) if good else None
        yield Batch(keys, images_BCHW, [""] * len(keys), len(items))


# --- command line -------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`pipeline predict`: write predictions for images, folders or shard sets."""
    predict_to_csv(
        Path(args.run_dir),
        args.inputs,
        Path(args.out),
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pipeline predict")
    # dest run_dir: `pipeline` keeps the subcommand's handler in args.run
    parser.add_argument(
        "--run-dir", dest="run_dir", required=True, help="run folder (holds config.yaml)"
    )
    parser.add_argument(
        "--checkpoint",
        metavar="CKPT_DIR",
        help="checkpoint folder, or its name in RUN_DIR/checkpoints (default: the latest)",
    )
    parser.add_argument("--out", required=True, metavar="CSV", help="CSV file to write")
    parser.add_argument(
        "--batch-size",
        type=_count(1),
        metavar="N",
        help="default: eval.batch_size or data.batch_size",
    )
    parser.add_argument(
        "--num-workers", type=_count(0), metavar="N", help="decoding processes (data.num_workers)"
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image file, folder of images (recursive), or shard set (folder, manifest, pattern)",
    )
    return parser


def _count(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse

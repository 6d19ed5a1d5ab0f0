"""Inputs the shard writer reads: image folders, CNNDetection trees, lists, idx files, demo sets.

Every kind is opened into a `Source`: the class names, one label per sample and a
function that loads sample `i` as a `ShardSample`. Labels are known before any
image is read, so a stratified train/val split costs nothing, and images are read
only while shards are written.

Kinds (`--kind`, detected from the path when `auto`):
  folder        root/<class_name>/**/<image>; class names sorted
  cnndetection  root/[<category>/...]0_real/<image> and .../1_fake/<image>
  list          a .csv (header with path,label) or .jsonl ({"path": ..., "label": ...})
  idx           MNIST-style <part>-images-idx3-ubyte[.gz] + <part>-labels-idx1-ubyte[.gz]
                pairs: a folder (every pair, train then t10k, as one source) or one
                images file (that pair only); pixels are encoded as PNG (or --image-format)
  embedded      embedded:faces (scikit-image's LFW crops), embedded:digits (scikit-learn)
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

SOURCE_KINDS = ("folder", "cnndetection", "list", "idx")
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_SETS = ("faces", "digits")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
LIST_SUFFIXES = (".csv", ".jsonl")
CNNDETECTION_CLASSES = ["real", "fake"]
_LABEL_DIR = re.compile(r"^([01])_")
IDX_IMAGES = re.compile(r"^(?P<part>.+)-images-idx3-ubyte(?:\.gz)?$")
IDX_IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dimensions: count, rows, columns
IDX_LABELS_MAGIC = 0x00000801  # uint8 data, 1 dimension: count
IDX_PART_NAMES = {"train": "train", "t10k": "test"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


@dataclass
class ShardSample:
    """One encoded image with its class index and free-form metadata."""

    image: bytes
    image_ext: str
    label: int | list[int]  # a class index, or a 0/1 vector (one-hot or multi-hot)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    """An opened input: labels up front, images loaded one at a time by index."""

    kind: str
    location: str
    default_name: str
    class_names: list[str]
    labels: list[int]
    load: Callable[[int], ShardSample]

    def __len__(self) -> int:
        return len(self.labels)

    def samples(self, indices: Sequence[int]) -> Iterator[ShardSample]:
        return (self.load(i) for i in indices)


@dataclass(frozen=True)
class _FileItem:
    path: Path
    label: int | list[int]  # a class index, or a 0/1 vector (one-hot or multi-hot)
    meta: dict[str, Any]


def open_source(
    spec: str,
    kind: str = "auto",
    image_format: str | None = None,
    class_names: list[str] | None = None,
) -> Source:
    """Open `spec` (a path or `embedded:NAME`) as a Source; raise ConfigError if unusable.

    `image_format` (png or jpg) only applies to embedded arrays and idx files;
    `class_names` fixes the names and their order for folder, list and idx inputs.
    """
    if spec.startswith(EMBEDDED_PREFIX):
        _refuse_options("an embedded set", spec, kind=kind, class_names=class_names)
        return open_embedded(spec.removeprefix(EMBEDDED_PREFIX), image_format or "png")
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(
            f"input {spec!r} does not exist; give an image folder, a .csv/.jsonl list, "
            f"or one of {', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_SETS)}"
        )
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "idx":
        return open_idx(path, class_names, image_format or "png")
    if image_format is not None:
        raise ConfigError(
            f"--image-format {image_format} applies to embedded sets and idx files only; "
            f"the images of {spec!r} are stored as their original bytes, so leave it out"
        )
    if kind == "folder":
        return _folder_source(path, class_names)
    if kind == "cnndetection":
        _refuse_options("--kind cnndetection", spec, class_names=class_names)
        return _cnndetection_source(path)
    if kind == "list":
        return _list_source(path, class_names)
    raise ConfigError(f"--kind {kind!r} is unknown; choose auto or one of {SOURCE_KINDS}")


def _refuse_options(what: str, spec: str, kind: str = "auto", class_names=None) -> None:
    if kind != "auto":
        raise ConfigError(f"--kind {kind} cannot be combined with {what} ({spec!r}); drop it")
    if class_names:
        raise ConfigError(
            f"--class-names cannot be combined with {what} ({spec!r}): its class names "
            "are fixed; drop the option"
        )


def detect_kind(path: Path) -> str:
    """`list` for a .csv/.jsonl file, `idx` for an idx images file or a folder holding
    some, `cnndetection` if 0_real/1_fake folders sit within three levels, else `folder`."""
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            return "list"
        if IDX_IMAGES.match(path.name):
            return "idx"
        raise ConfigError(
            f"input file {str(path)!r} is not a list file; give a {'/'.join(LIST_SUFFIXES)} "
            "file, an idx images file, or the folder that holds the images"
        )
    if _idx_images_files(path):
        return "idx"
    return "cnndetection" if _has_label_dirs(path, depth=3) else "folder"


def _has_label_dirs(folder: Path, depth: int) -> bool:
    subdirs = [d for d in _visible(folder) if d.is_dir()]
    if any(d.name in ("0_real", "1_fake") for d in subdirs):
        return True
    return depth > 1 and any(_has_label_dirs(d, depth - 1) for d in subdirs)


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _list_images(folder: Path) -> list[Path]:
    """Image files anywhere under `folder`, hidden ones skipped, sorted by relative path."""
    found, skipped = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath, name))
            else:
                skipped += 1
    if skipped:
        log.warning("skipped %d file(s) under %s that are not %s", skipped, folder, IMAGE_SUFFIXES)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


# ---- folder: root/<class_name>/<images>


def _folder_source(root: Path, class_names: list[str] | None) -> Source:
    if not root.is_dir():
        raise ConfigError(f"--kind folder needs a folder, got the file {str(root)!r}")
    class_dirs = {d.name: d for d in _visible(root) if d.is_dir()}
    if not class_dirs:
        raise ConfigError(
            f"folder {str(root)!r} has no class folders; the layout is "
            "root/<class_name>/<image>, one folder per class"
        )
    names = class_names or sorted(class_dirs)
    _check_class_folders(root, class_dirs, names)
    items = []
    for label, name in enumerate(names):
        files = _list_images(class_dirs[name]) if name in class_dirs else []
        if not files and name in class_dirs:
            raise ConfigError(
                f"class folder {str(class_dirs[name])!r} holds no images "
                f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder"
            )
        items += [_FileItem(f, label, {"source": _relative(f, root)}) for f in files]
    return _file_source("folder", root, root.resolve().name, names, items)


def _check_class_folders(root: Path, class_dirs: dict[str, Path], names: list[str]) -> None:
    extra = sorted(set(class_dirs) - set(names))
    if extra:
        raise ConfigError(
            f"folder {str(root)!r} has class folder(s) {extra} that are not in "
            f"--class-names {names}; add them to the list or move them away"
        )
    for name in names:
        if name not in class_dirs:
            log.warning("class %r has no folder in %s: it will have 0 samples", name, root)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# ---- cnndetection: root/[<category>/]0_real/<images>, root/[<category>/]1_fake/<images>


def _cnndetection_source(root: Path) -> Source:
    label_dirs = _find_label_dirs(root)
    if not label_dirs:
        raise ConfigError(
            f"no 0_real or 1_fake folders under {str(root)!r}; the CNNDetection layout is "
            "root/<category>/0_real/<image> and root/<category>/1_fake/<image>"
        )
    items = []
    for folder, label in label_dirs:
        files = _list_images(folder)
        if not files:
            log.warning("%s holds no images; skipped", folder)
        category = _relative(folder.parent, root) if folder.parent != root else None
        for f in files:
            meta = {"source": _relative(f, root), "category": category}
            items.append(_FileItem(f, label, meta))
    return _file_source("cnndetection", root, root.resolve().name, CNNDETECTION_CLASSES, items)


def _find_label_dirs(root: Path) -> list[tuple[Path, int]]:
    """Folders named 0_* (real) or 1_* (fake), at any depth; their insides are images."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in list(dirnames):
            match = _LABEL_DIR.match(name)
            if match:
                found.append((Path(dirpath, name), int(match.group(1))))
                dirnames.remove(name)
    return sorted(found, key=lambda item: _relative(item[0], root))


# ---- list: a CSV or JSONL file of path,label[,extra fields]


def _list_source(path: Path, class_names: list[str] | None) -> Source:
    if not path.is_file():
        raise ConfigError(f"--kind list needs a .csv or .jsonl file, got {str(path)!r}")
    rows = _read_csv(path) if path.suffix.lower() == ".csv" else _read_jsonl(path)
    if not rows:
        raise ConfigError(f"list file {str(path)!r} has no rows; add lines of path,label")
    labels, names = _resolve_labels(path, [(n, row["label"]) for n, row in rows], class_names)
    items = []
    for (line, row), label in zip(rows, labels):
        meta = {k: v for k, v in row.items() if k not in ("path", "label")}
        if "source" in meta:
            raise ConfigError(
                f"{path}:{line}: the field 'source' is reserved for the image path; rename it"
            )
        meta["source"] = str(row["path"])
        items.append(_FileItem(path.parent / str(row["path"]), label, meta))
    _check_listed_files(path, rows, items)
    return _file_source("list", path, path.stem, names, items)


def _read_csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        header = reader.fieldnames or []
        if "path" not in header or "label" not in header:
            raise ConfigError(
                f"CSV list {str(path)!r} has header {header}; it needs the columns "
                "'path' and 'label' (more columns become metadata)"
            )
        return [(reader.line_num, row) for row in reader]


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{line} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or "path" not in row or "label" not in row:
            raise ConfigError(
                f'{path}:{line} must be an object with "path" and "label", got {text[:80]!r}'
            )
        rows.append((line, row))
    return rows


def _resolve_labels(
    path: Path, values: list[tuple[int, Any]], class_names: list[str] | None
) -> tuple[list[int], list[str]]:
    """Labels are class indices when all are integers, else class names."""
    is_index = [_is_index(v) for _, v in values]
    if all(is_index):
        indices = [int(v) for _, v in values]
        names = class_names or [str(i) for i in range(max(indices) + 1)]
        for (line, _), index in zip(values, indices):
            if index >= len(names):
                raise ConfigError(
                    f"{path}:{line}: label {index} is not an index of the classes {names}; "
                    "fix the label or --class-names"
                )
        return indices, names
    if any(is_index):
        # Name the first line that differs from the first one: that is where to look.
        line = values[is_index.index(not is_index[0])][0]
        raise ConfigError(
            f"{path}:{line}: labels mix class indices and class names; use one or the other"
        )
    return _labels_by_name(path, values, class_names)


def _is_index(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())


def _labels_by_name(
    path: Path, values: list[tuple[int, Any]], class_names: list[str] | None
) -> tuple[list[int], list[str]]:
    for line, value in values:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"{path}:{line}: label {value!r} is neither a class index nor a class name"
            )
    names = class_names or sorted({v.strip() for _, v in values})
    index = {name: i for i, name in enumerate(names)}
    for line, value in values:
        if value.strip() not in index:
            raise ConfigError(
                f"{path}:{line}: label {value!r} is not one of --class-names {names}; "
                "fix the label or add the class"
            )
    return [index[v.strip()] for _, v in values], names


def _check_listed_files(path: Path, rows: list, items: list[_FileItem]) -> None:
    missing = [(line, item) for (line, _), item in zip(rows, items) if not item.path.is_file()]
    if missing:
        line, item = missing[0]
        raise ConfigError(
            f"{len(missing)} image(s) listed in {str(path)!r} do not exist, first at line "
            f"{line}: {str(item.path)!r}; relative paths are taken from the list file's folder"
        )
    for line, item in zip((n for n, _ in rows), items):
        if item.path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ConfigError(
                f"{path}:{line}: {str(item.path)!r} is not one of {IMAGE_SUFFIXES}; "
                "convert it or remove the line"
            )


# ---- image files, read as their original bytes


def _file_source(
    kind: str, root: Path, name: str, class_names: list[str], items: list[_FileItem]
) -> Source:
    if not items:
        raise ConfigError(f"no images found in {str(root)!r} (--kind {kind})")
    return Source(
        kind=kind,
        location=str(root.resolve()),
        default_name=name,
        class_names=list(class_names),
        labels=[item.label for item in items],
        load=lambda i: _load_file(items[i]),
    )


def _load_file(item: _FileItem) -> ShardSample:
    try:
        data = item.path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read image {str(item.path)!r}: {err}") from None
    _check_image(item.path, data)
    ext = item.path.suffix.lower().lstrip(".")
    return ShardSample(data, "jpg" if ext == "jpeg" else ext, item.label, dict(item.meta))


def _check_image(path: Path, data: bytes) -> None:
    # Only the header is parsed here; decoding every pixel twice would double the cost.
    # The formats are those the loader decodes, so a file it would refuse fails now.
    try:
        Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError(
            f"{str(path)!r} is not a readable image ({err}); delete or replace it"
        ) from None


# ---- idx: MNIST-style <part>-images-idx3-ubyte[.gz] + <part>-labels-idx1-ubyte[.gz]


@dataclass(frozen=True)
class _IdxPart:
    name: str  # train, test (from t10k), or the file name's prefix
    images_file: Path
    pixels_NHW: np.ndarray
    labels_N: np.ndarray


def open_idx(path: Path, class_names: list[str] | None, image_format: str = "png") -> Source:
    """Open one idx images file (with its labels file), or every pair in a folder.

    A folder's pairs become one source, train first; each sample's metadata names
    its file, index and split. Raises ConfigError for a missing labels file, a bad
    header, a truncated file, or unequal image and label counts.
    """
    if image_format not in ("png", "jpg"):
        raise ConfigError(f"--image-format {image_format!r} is not png or jpg")
    parts = [_read_idx_pair(images_file) for images_file in _idx_inputs(path)]
    folder = path.parent if path.is_file() else path
    labels_N = np.concatenate([part.labels_N for part in parts])
    names = _idx_class_names(folder, labels_N, class_names)
    where = [(part, i) for part in parts for i in range(len(part.labels_N))]
    if len(parts) > 1:
        _log_idx_parts(path, parts)

    def load(i: int) -> ShardSample:
        part, index = where[i]
        meta = {"source": part.images_file.name, "index": index, "split": part.name}
        image = encode_image(part.pixels_NHW[index], image_format)
        return ShardSample(image, image_format, int(part.labels_N[index]), meta)

    name = folder.resolve().name + ("" if path.is_dir() else f"-{parts[0].name}")
    return Source("idx", str(path.resolve()), name, names, labels_N.tolist(), load)


def _idx_inputs(path: Path) -> list[Path]:
    if path.is_file():
        if not IDX_IMAGES.match(path.name):
            raise ConfigError(
                f"{str(path)!r} is not named <part>-images-idx3-ubyte[.gz]; give the images "
                "file of a pair (its labels file is found beside it) or their folder"
            )
        return [path]
    files = _idx_images_files(path)
    if not files:
        raise ConfigError(
            f"folder {str(path)!r} holds no <part>-images-idx3-ubyte[.gz] file; --kind idx "
            "needs images files with <part>-labels-idx1-ubyte[.gz] beside them"
        )
    parts = [IDX_IMAGES.match(f.name)["part"] for f in files]
    twice = sorted({p for p in parts if parts.count(p) > 1})
    if twice:
        raise ConfigError(
            f"folder {str(path)!r} holds the idx images of {twice} twice (gzip'd and not); "
            "keep one of each"
        )
    return files


def _idx_images_files(folder: Path) -> list[Path]:
    """idx images files directly in `folder`: train first, then t10k, then the rest."""
    files = [p for p in _visible(folder) if p.is_file() and IDX_IMAGES.match(p.name)]
    order = list(IDX_PART_NAMES)

    def rank(file: Path) -> tuple[int, str]:
        part = IDX_IMAGES.match(file.name)["part"]
        return (order.index(part) if part in order else len(order), file.name)

    return sorted(files, key=rank)


def _read_idx_pair(images_file: Path) -> _IdxPart:
    prefix = IDX_IMAGES.match(images_file.name)["part"]
    labels_file = _idx_labels_file(images_file, prefix)
    pixels_NHW = read_idx(images_file, IDX_IMAGES_MAGIC)
    labels_N = read_idx(labels_file, IDX_LABELS_MAGIC)
    if len(pixels_NHW) != len(labels_N):
        raise ConfigError(
            f"{str(images_file)!r} holds {len(pixels_NHW)} images but {str(labels_file)!r} "
            f"holds {len(labels_N)} labels; the two files of a pair must have equal counts"
        )
    if 0 in pixels_NHW.shape:
        raise ConfigError(
            f"{str(images_file)!r} holds no pixels (shape {pixels_NHW.shape}); "
            "remove it or give another file"
        )
    return _IdxPart(IDX_PART_NAMES.get(prefix, prefix), images_file, pixels_NHW, labels_N)


def _idx_labels_file(images_file: Path, prefix: str) -> Path:
    stem = f"{prefix}-labels-idx1-ubyte"
    suffixes = (".gz", "") if images_file.suffix == ".gz" else ("", ".gz")
    for suffix in suffixes:
        candidate = images_file.with_name(stem + suffix)
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"idx images file {str(images_file)!r} has no labels file beside it; "
        f"expected {stem}.gz or {stem} in the same folder"
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array of an idx file (gzip'd or not) whose header must hold `magic`.

    Raises ConfigError for another magic number, a truncated file or trailing bytes.
    """
    data = _read_idx_bytes(path)
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        shown = "none (under 4 bytes)" if found is None else f"0x{found:08x}"
        raise ConfigError(
            f"{str(path)!r} has magic number {shown}, not 0x{magic:08x} (uint8, "
            f"{magic & 0xFF} dimension(s)); is it the right file of the pair?"
        )
    ndim = magic & 0xFF
    header_bytes = 4 + 4 * ndim
    dims_raw = data[4:header_bytes]
    dims = tuple(int(d) for d in np.frombuffer(dims_raw[: len(dims_raw) // 4 * 4], ">u4"))
    body_bytes = len(data) - header_bytes
    if len(dims) != ndim or body_bytes != math.prod(dims):
        raise ConfigError(
            f"{str(path)!r} is damaged: its header gives dimensions {dims}, "
            f"{math.prod(dims) if len(dims) == ndim else '?'} bytes of data, but "
            f"{max(body_bytes, 0)} follow; get the file again"
        )
    return np.frombuffer(data, np.uint8, offset=header_bytes).reshape(dims)


def _read_idx_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        # Told by content, not by name: a plain file named .gz still reads
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError, zlib.error) as err:
        raise ConfigError(f"cannot read idx file {str(path)!r}: {err}") from None


def _idx_class_names(
    folder: Path, labels_N: np.ndarray, class_names: list[str] | None
) -> list[str]:
    """--class-names, else Fashion-MNIST's names for a folder named *fashion*, else 0..9."""
    top = int(labels_N.max())
    if class_names:
        names = list(class_names)
    elif "fashion" in folder.resolve().name.lower():
        names = list(FASHION_MNIST_CLASSES)
    else:
        names = [str(i) for i in range(max(10, top + 1))]
    if top >= len(names):
        raise ConfigError(
            f"idx labels in {str(folder)!r} go up to {top}, beyond the {len(names)} "
            f"classes {names}; fix --class-names"
        )
    return names


def _log_idx_parts(path: Path, parts: list[_IdxPart]) -> None:
    sizes = ", ".join(f"{part.name} {len(part.labels_N)}" for part in parts)
    log.warning(
        "%s holds idx pairs (%s): they become ONE source, the split kept only in each "
        "sample's metadata; to keep the official split, shard each images file on its "
        "own, e.g. `pipeline shard %s --out OUT/%s`",
        path,
        sizes,
        parts[0].images_file,
        parts[0].name,
    )


# ---- embedded demo sets, read from the installed packages


def open_embedded(name: str, image_format: str = "png") -> Source:
    if image_format not in ("png", "jpg"):
        raise ConfigError(f"--image-format {image_format!r} is not png or jpg")
    if name == "faces":
        images_NHW = np.load(_skimage_data_file("lfw_subset.npy"))
        if images_NHW.shape != (200, 25, 25):
            raise ConfigError(f"lfw_subset.npy has shape {images_NHW.shape}, not (200, 25, 25)")
        # The first 100 crops are faces (label 1, the positive class), the rest are not.
        labels = [1 if i < 100 else 0 for i in range(len(images_NHW))]
        pixels = np.clip(np.rint(images_NHW * 255), 0, 255).astype(np.uint8)
        return _array_source(name, pixels, labels, ["non_face", "face"], image_format)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
        names = [str(i) for i in range(10)]
        return _array_source(name, pixels, digits.target.tolist(), names, image_format)
    raise ConfigError(
        f"unknown embedded set {EMBEDDED_PREFIX}{name}; choose one of "
        f"{', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_SETS)}"
    )


def _skimage_data_file(name: str) -> Path:
    # find_spec locates the installed package without importing it (skimage is slow to import).
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"{EMBEDDED_PREFIX}faces needs scikit-image, which is not installed; run "
            "`pip install scikit-image` (or install this project with the demo extra)"
        )
    path = Path(spec.origin).parent / "data" / name
    if not path.is_file():
        raise ConfigError(
            f"scikit-image at {Path(spec.origin).parent} lacks data/{name}; reinstall it "
            "with `pip install --force-reinstall scikit-image`"
        )
    return path


def _array_source(
    name: str, pixels_NHW: np.ndarray, labels: list[int], class_names: list[str], fmt: str
) -> Source:
    def load(i: int) -> ShardSample:
        meta = {"source": f"{EMBEDDED_PREFIX}{name}", "index": i}
        return ShardSample(encode_image(pixels_NHW[i], fmt), fmt, labels[i], meta)

    spec = EMBEDDED_PREFIX + name
    return Source("embedded", spec, name, class_names, [int(v) for v in labels], load)


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """Encode a uint8 HxW (grey) or HxWx3 (RGB) array as png or jpg."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# ---- order and split


def shuffled(count: int, seed: int) -> list[int]:
    """A seeded order of 0..count-1. Shards are written shuffled so that no shard,
    and so no rank reading whole shards, holds a single class."""
    return np.random.default_rng(seed).permutation(count).tolist()


def stratified_split(
    labels: Sequence[int], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split sample indices into (train, val), both shuffled.

    Each class puts round(n * val_fraction) samples in val, but always keeps one
    in train. Deterministic for a given seed. Raises ConfigError if a part is empty.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive)")
    rng = np.random.default_rng(seed)
    train, val = [], []
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    for label in sorted(by_class):
        members = rng.permutation(by_class[label]).tolist()
        n_val = min(math.floor(len(members) * val_fraction + 0.5), len(members) - 1)
        val += members[:n_val]
        train += members[n_val:]
    if not val:
        raise ConfigError(
            f"--val-fraction {val_fraction} leaves the validation set empty for "
            f"{len(labels)} samples; use a larger fraction"
        )
    return rng.permutation(train).tolist(), rng.permutation(val).tolist()

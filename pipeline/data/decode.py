"""Turn an encoded sample from a tar shard into an RGB image, a label and metadata.

Only three kinds of member are ever decoded: the image (jpg, jpeg, png, webp,
bmp, opened by Pillow restricted to those formats), `cls` (the label as text,
parsed by labels.py) and `json` (metadata). Everything else is never read from
the tar at all (`wanted_member`), so a `.pickle`, `.pyd` or `.npy` member in a
shard is never unpickled or loaded, whoever wrote the shard. webdataset's
autodecoder is not used for the same reason.

Bad samples (no image, no label, undecodable, label out of range) raise
SampleError naming the key and the shard. What happens next is a policy
(`BadDataPolicy`, from `data.on_bad_sample`): `strict` stops with BadDataError;
`skip` counts the sample in a Tally, logs it (rate-limited) and goes on. The
same policy takes shards that cannot be read to the end.

Draft decoding: a JPEG much larger than the transform needs is decoded at 1/2,
1/4 or 1/8 scale by libjpeg itself (`Image.draft`), which is several times
faster; the scale is chosen so the crop still has at least the output's pixels.
"""

from __future__ import annotations

import io
import json
import logging
import math
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.labels import Label, parse_label
from pipeline.data.transforms import CROP_RATIO

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
WANTED_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + ("cls", "json"))
# What Pillow raises on broken or hostile files (SyntaxError: some bad PNGs)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError)

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """A sample of a shard cannot be used; the message names its key and shard."""

    def __init__(self, key: str, url: str, reason: str):
        super().__init__(f"sample {key!r} in shard {url!r}: {reason}")
        self.key = key
        self.url = url


class BadDataError(RuntimeError):
    """Bad data stops the run: strict mode, too many bad samples, or none usable.

    One message argument only, so that a DataLoader worker can re-raise it in
    the main process as the same type.
    """


@dataclass
class DecodedSample:
    key: str
    url: str
    image: Image.Image
    label: Label
    meta: dict[str, Any] = field(default_factory=dict)


ErrorPolicy = Callable[[SampleError], None]


def strict(error: SampleError) -> None:
    """The error policy that stops at the first bad sample."""
    raise error


# ---- counting and the bad-data policy


COUNT_NAMES = ("good", "bad", "bad_shards", "small")


@dataclass
class Tally:
    """What one reader has read; `take` hands on what changed since its last call.

    good: samples decoded; bad: samples skipped, including those lost in a
    shard that failed; bad_shards: shards that failed; small: images whose
    short side is below data.image_size (resized up by the crop, not padded).
    """

    good: int = 0
    bad: int = 0
    bad_shards: int = 0
    small: int = 0
    last_bad: str = ""
    _taken: dict[str, int] = field(default_factory=dict, repr=False)

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNT_NAMES}

    def take(self) -> dict[str, Any]:
        """The counts since the last take, plus the latest bad read ("" if none)."""
        now = self.counts()
        delta = {name: now[name] - self._taken.get(name, 0) for name in COUNT_NAMES}
        self._taken = now
        return delta | {"last_bad": self.last_bad}

    def pending(self) -> bool:
        now = self.counts()
        return any(now[name] != self._taken.get(name, 0) for name in COUNT_NAMES)


class RateLimitedLog:
    """Warnings that cannot flood a log: the first `first`, then one per `interval_s`.

    A message after a quiet spell says how many were held back.
    """

    def __init__(self, logger: logging.Logger, first: int = 5, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.first, self.interval_s, self.clock = logger, first, interval_s, clock
        self.seen = self.held = 0
        self.last = -math.inf

    def warning(self, message: str, *args: object) -> None:
        self.seen += 1
        now = self.clock()
        if self.seen > self.first and now - self.last < self.interval_s:
            self.held += 1
            return
        if self.held:
            message += f" ({self.held} similar warnings held back)"
        self.logger.warning(message, *args)
        self.last, self.held = now, 0


class BadDataPolicy:
    """`data.on_bad_sample`: strict stops at the first bad sample or shard;
    skip counts it in `tally`, logs it (rate-limited) and goes on."""

    def __init__(self, mode: str, tally: Tally, warn: RateLimitedLog | None = None):
        self.mode, self.tally = mode, tally
        self.warn = warn or RateLimitedLog(log)

    def __call__(self, error: SampleError) -> None:
        if self.mode == "strict":
            raise BadDataError(f"{error} (data.on_bad_sample=strict)") from error
        self.tally.bad += 1
        self.tally.last_bad = f"sample {error.key!r} in shard {error.url!r}"
        self.warn.warning("skipped bad %s", error)

    def shard_failed(self, url: str, reason: str, missing: int) -> None:
        """A shard could not be read to its end; `missing` samples were lost."""
        if self.mode == "strict":
            raise BadDataError(f"shard {url!r}: {reason} (data.on_bad_sample=strict)")
        self.tally.bad_shards += 1
        self.tally.bad += missing
        self.tally.last_bad = f"shard {url!r} ({reason})"
        self.warn.warning("shard %r: %s; skipped its %d unread sample(s)", url, reason, missing)


def check_bad_fraction(bad: int, reads: int, limit: float, last_bad: str, where: str) -> None:
    """Raise BadDataError when bad reads exceed `limit` of `reads`."""
    if bad == 0 or bad <= limit * reads:
        return
    raise BadDataError(
        f"{where}: {bad} bad of {reads} samples read ({bad / reads:.2%}) is more than "
        f"data.max_bad_fraction={limit}; last: {last_bad}. Find the bad data with "
        "`pipeline verify SHARDS --deep` and rewrite it, or raise data.max_bad_fraction"
    )


class BadCounts:
    """The workers' counts, summed in the main process and held to the limit."""

    def __init__(self, data_cfg: DataConfig, where: str):
        self.mode, self.limit = data_cfg.on_bad_sample, data_cfg.max_bad_fraction
        self.where = where
        self.total = dict.fromkeys(COUNT_NAMES, 0)
        self.epoch = dict.fromkeys(COUNT_NAMES, 0)
        self.last_bad = ""
        self.needed, self.read_once = 0, False

    def start_epoch(self, needed: int, read_once: bool) -> None:
        """`needed`: good samples the epoch takes; `read_once`: no top-up (eval)."""
        self.epoch = dict.fromkeys(COUNT_NAMES, 0)
        self.needed, self.read_once = needed, read_once

    def add(self, delta: dict[str, Any]) -> None:
        """Add one batch's delta; stop once the epoch's bad share must pass the limit."""
        for name in COUNT_NAMES:
            self.total[name] += delta[name]
            self.epoch[name] += delta[name]
        self.last_bad = delta["last_bad"] or self.last_bad
        bad = self.epoch["bad"]
        # Training reads on until `needed` good ones came: bad + needed reads
        reads = self.needed if self.read_once else bad + self.needed
        if self.mode == "skip":
            check_bad_fraction(bad, reads, self.limit, self.last_bad, self.where)

    def log_epoch(self, image_size: int) -> None:
        counts = self.epoch
        if counts["bad"]:
            log.warning(
                "%s: skipped %d bad sample(s), counting those lost in %d shard(s) "
                "that failed; last: %s",
                self.where, counts["bad"], counts["bad_shards"], self.last_bad,
            )
        if counts["small"]:
            log.info(
                "%s: %d image(s) smaller than %d px were resized up by the crop, never padded",
                self.where, counts["small"], image_size,
            )


# ---- draft decoding


@dataclass(frozen=True)
class DraftTarget:
    """The smallest decoded image the transform needs: short side and area, pixels."""

    min_side: int
    min_area: int = 0

    def request(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """The size to ask `Image.draft` for, or None to decode in full.

        Pillow picks the largest scale s with size // s >= request and returns
        at least the request, so asking for size // s gives exactly scale s.
        """
        width, height = size
        for scale in (8, 4, 2):
            w, h = width // scale, height // scale
            if min(w, h) >= self.min_side and w * h >= self.min_area:
                return w, h
        return None


def build_draft_target(data_cfg: DataConfig, train: bool) -> DraftTarget | None:
    """What the train or eval transform needs from a drafted JPEG; None: no drafting."""
    size = data_cfg.image_size
    if not data_cfg.draft_decode:
        return None
    if not train:
        # Eval resizes the short side to resize_to, then crops: it needs that side
        return DraftTarget(round(size * data_cfg.eval_resize_ratio))
    aug = data_cfg.augment
    if aug.blur_prob > 0 or aug.jpeg_prob > 0:
        return None  # blur sigma and JPEG artefacts are meant at the source resolution
    if not aug.random_resized_crop:
        return DraftTarget(size)
    if aug.crop_scale[0] <= 0:
        return None
    # The smallest crop side is sqrt(area * min scale * min ratio); it must stay
    # >= size (+1 for rounding), so the crop is only ever scaled down
    min_area = math.ceil((size + 1) ** 2 / (aug.crop_scale[0] * CROP_RATIO[0]))
    return DraftTarget(size, min_area)


# ---- decoding


def wanted_member(fname: str) -> bool:
    """True for the tar members the loader reads; the rest are never read."""
    name = fname.rsplit("/", 1)[-1]
    _, dot, ext = name.partition(".")
    return bool(dot) and ext.lower() in WANTED_EXTENSIONS


def decode_samples(
    samples: Iterable[dict[str, Any]],
    num_classes: int | None = None,
    label_format: str = "index",
    on_error: ErrorPolicy = strict,
    draft: DraftTarget | None = None,
) -> Iterator[DecodedSample]:
    """Decode a stream of encoded samples; bad ones go to the on_error policy."""
    for sample in samples:
        try:
            yield decode_sample(sample, num_classes, label_format, draft)
        except SampleError as error:
            on_error(error)


def decode_sample(
    sample: dict[str, Any],
    num_classes: int | None = None,
    label_format: str = "index",
    draft: DraftTarget | None = None,
) -> DecodedSample:
    """Decode one webdataset sample dict (`__key__`, `__url__`, member bytes)."""
    key = str(sample.get("__key__", "?"))
    url = str(sample.get("__url__", "?"))
    image = _decode_image(sample, key, url, draft)
    label = _decode_label(sample, key, url, num_classes, label_format)
    meta = _decode_meta(sample, key, url)
    return DecodedSample(key, url, image, label, meta)


def _decode_image(
    sample: dict[str, Any], key: str, url: str, draft: DraftTarget | None
) -> Image.Image:
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise SampleError(key, url, f"no image member (one of {IMAGE_EXTENSIONS}); has {members}")
    try:
        with Image.open(io.BytesIO(sample[ext]), formats=PIL_FORMATS) as image:
            if draft is not None and image.format == "JPEG":
                request = draft.request(image.size)
                if request is not None:
                    image.draft("RGB", request)
            # convert() forces the full decode, so truncated files fail here
            return image.convert("RGB")
    except DECODE_ERRORS as error:
        raise SampleError(key, url, f"cannot decode its {ext} image: {error}") from error


def _decode_label(
    sample: dict[str, Any], key: str, url: str, num_classes: int | None, label_format: str
) -> Label:
    if "cls" not in sample:
        raise SampleError(key, url, "no label member (.cls)")
    text = sample["cls"].decode("utf-8", errors="replace").strip()
    try:
        return parse_label(text, label_format, num_classes)
    except ValueError as error:
        raise SampleError(key, url, f"bad {label_format} label {text!r}: {error}") from None


def _decode_meta(sample: dict[str, Any], key: str, url: str) -> dict[str, Any]:
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
    except ValueError as error:
        raise SampleError(key, url, f"metadata (.json) is not JSON: {error}") from None
    return meta if isinstance(meta, dict) else {"value": meta}

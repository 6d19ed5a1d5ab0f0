"""Turn an encoded sample from a tar shard into an RGB image, a label and metadata.

Only three kinds of member are ever decoded: the image (jpg, jpeg, png, webp,
bmp, opened by Pillow restricted to those formats), `cls` (the class index as
text) and `json` (metadata). Everything else is never read from the tar at all
(`wanted_member`), so a `.pickle`, `.pyd` or `.npy` member in a shard is never
unpickled or loaded, whoever wrote the shard. webdataset's autodecoder is not
used for the same reason.

Bad samples (no image, no label, undecodable) raise SampleError naming the key
and the shard. What happens to that error is a policy: `decode_samples` hands
it to `on_error`, which either re-raises (`strict`, the only policy today) or
returns to skip the sample.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
WANTED_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + ("cls", "json"))
# What Pillow raises on broken or hostile files (SyntaxError: some bad PNGs)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError)


class SampleError(ValueError):
    """A sample of a shard cannot be used; the message names its key and shard."""

    def __init__(self, key: str, url: str, reason: str):
        super().__init__(f"sample {key!r} in shard {url!r}: {reason}")
        self.key = key
        self.url = url


@dataclass
class DecodedSample:
    key: str
    url: str
    image: Image.Image
    label: int
    meta: dict[str, Any] = field(default_factory=dict)


ErrorPolicy = Callable[[SampleError], None]


def strict(error: SampleError) -> None:
    """The error policy that stops at the first bad sample."""
    raise error


def wanted_member(fname: str) -> bool:
    """True for the tar members the loader reads; the rest are never read."""
    name = fname.rsplit("/", 1)[-1]
    _, dot, ext = name.partition(".")
    return bool(dot) and ext.lower() in WANTED_EXTENSIONS


def decode_samples(
    samples: Iterable[dict[str, Any]],
    num_classes: int | None = None,
    on_error: ErrorPolicy = strict,
) -> Iterator[DecodedSample]:
    """Decode a stream of encoded samples; bad ones go to the on_error policy."""
    for sample in samples:
        try:
            yield decode_sample(sample, num_classes)
        except SampleError as error:
            on_error(error)


def decode_sample(sample: dict[str, Any], num_classes: int | None = None) -> DecodedSample:
    """Decode one webdataset sample dict (`__key__`, `__url__`, member bytes)."""
    key = str(sample.get("__key__", "?"))
    url = str(sample.get("__url__", "?"))
    image = _decode_image(sample, key, url)
    label = _decode_label(sample, key, url, num_classes)
    meta = _decode_meta(sample, key, url)
    return DecodedSample(key, url, image, label, meta)


def _decode_image(sample: dict[str, Any], key: str, url: str) -> Image.Image:
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise SampleError(key, url, f"no image member (one of {IMAGE_EXTENSIONS}); has {members}")
    try:
        with Image.open(io.BytesIO(sample[ext]), formats=PIL_FORMATS) as image:
            # convert() forces the full decode, so truncated files fail here
            return image.convert("RGB")
    except DECODE_ERRORS as error:
        raise SampleError(key, url, f"cannot decode its {ext} image: {error}") from error


def _decode_label(sample: dict[str, Any], key: str, url: str, num_classes: int | None) -> int:
    if "cls" not in sample:
        raise SampleError(key, url, "no label member (.cls)")
    text = sample["cls"].decode("utf-8", errors="replace").strip()
    try:
        label = int(text)
    except ValueError:
        raise SampleError(key, url, f"label {text!r} is not an integer") from None
    if num_classes is not None and not 0 <= label < num_classes:
        raise SampleError(key, url, f"label {label} is outside 0..{num_classes - 1}")
    return label


def _decode_meta(sample: dict[str, Any], key: str, url: str) -> dict[str, Any]:
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
    except ValueError as error:
        raise SampleError(key, url, f"metadata (.json) is not JSON: {error}") from None
    return meta if isinstance(meta, dict) else {"value": meta}

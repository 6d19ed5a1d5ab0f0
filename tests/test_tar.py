"""The loader's tar reader against webdataset's (tarfile-based) reading of the same
archives: plain, GNU long names, pax headers, odd members; and broken archives."""

from __future__ import annotations

import io
import tarfile

import pytest
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.data.decode import wanted_member
from pipeline.data.tar import tar_samples_of


def make_tar(members: list[tuple[str, bytes]], fmt: int, extra: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        if extra:
            folder = tarfile.TarInfo("images")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if extra:
                link = tarfile.TarInfo(name + ".link")
                link.type, link.linkname = tarfile.SYMTYPE, name
                tar.addfile(link)
    return buffer.getvalue()


MEMBERS = [
    ("a/000.jpg", b"\xff\xd8jpeg-0" * 100), ("a/000.cls", b"1"), ("a/000.pickle", b"evil"),
    ("a/001.PNG", b"png-1" * 300), ("a/001.cls", b"0"), ("a/001.json", b'{"k": 1}'),
    ("b/" + "x" * 150 + "/002.webp", b"webp"), ("b/" + "x" * 150 + "/002.cls", b"1"),
    ("c/é-ü/003.jpg", b""), ("c/é-ü/003.cls", b"0"),
    ("d/004.tar.gz", b"not wanted"), ("noext", b"skip me"),
]


def webdataset_samples(data: bytes) -> list[dict]:
    source = [{"url": "u", "stream": io.BytesIO(data)}]
    return list(group_by_keys(tar_file_expander(source, select_files=wanted_member)))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("extra", [False, True])
def test_samples_match_webdataset_reading(fmt, extra):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [
        (name, data) for name, data in MEMBERS if len(name) < 100 and name.isascii()]
    data = make_tar(members, fmt, extra)
    mine = list(tar_samples_of(io.BytesIO(data), "u", wanted_member))
    assert mine == webdataset_samples(data)
    assert [s["__key__"] for s in mine][:2] == ["a/000", "a/001"]
    assert "pickle" not in mine[0] and mine[1]["png"] == b"png-1" * 300


class Trickle(io.RawIOBase):
    """A stream that returns at most 100 bytes a read, like a socket."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = 100 if size < 0 else min(size, 100)
        chunk = self.data[self.at:self.at + size]
        self.at += len(chunk)
        return chunk


def test_short_reads_are_completed():
    data = make_tar(MEMBERS, tarfile.PAX_FORMAT)
    assert list(tar_samples_of(Trickle(data), "u", wanted_member)) == webdataset_samples(data)


def test_broken_archives_raise_tar_errors():
    data = make_tar(MEMBERS[:6], tarfile.GNU_FORMAT)
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(tar_samples_of(io.BytesIO(data[:700]), "u", wanted_member))  # inside a member
    flipped = bytearray(data)
    flipped[3] ^= 0x01  # a name byte of the first header
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        list(tar_samples_of(io.BytesIO(bytes(flipped)), "u", wanted_member))
    with pytest.raises(tarfile.ReadError, match="compressed tar"):
        list(tar_samples_of(io.BytesIO(b"\x1f\x8b" + bytes(510)), "u", wanted_member))
    assert list(tar_samples_of(io.BytesIO(b""), "u", wanted_member)) == []


def test_a_repeated_member_within_a_sample_is_an_error():
    data = make_tar([("k.cls", b"0"), ("k.cls", b"1")], tarfile.GNU_FORMAT)
    with pytest.raises(ValueError, match="duplicate file name"):
        list(tar_samples_of(io.BytesIO(data), "u", wanted_member))

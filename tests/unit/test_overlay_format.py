"""Overlay file format: write, read back, and refuse every kind of damaged input."""

import hashlib
import io
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cloudlet.chunks import CHUNK_SIZE, Kind, Target
from cloudlet.errors import CorruptOverlay, TruncatedOverlay, UnsupportedFormat
from cloudlet.overlay import format as fmt
from cloudlet.overlay.reader import OverlayReader
from cloudlet.overlay.writer import OverlayWriter

BASE_ID = "5eed" * 16
DISK_SIZE = 40 * CHUNK_SIZE + 1000  # partial last chunk (chunk 40, 1000 bytes)
MEMORY_SIZE = 64 * CHUNK_SIZE
DISK_DIGEST = "d1" * 32
MEMORY_DIGEST = "a0" * 32


def _chunk(seed: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (CHUNK_SIZE // 32)


def write_sample(path: Path, frame_size: int = 2 * CHUNK_SIZE, **kw: object) -> dict:
    """An overlay with every kind on both targets; returns what a reader must give back."""
    new: dict[tuple[Target, int], bytes] = {}
    with OverlayWriter(path, BASE_ID, frame_size=frame_size, **kw) as w:
        w.set_image(Target.DISK, DISK_SIZE, DISK_DIGEST)
        w.set_image(Target.MEMORY, MEMORY_SIZE, MEMORY_DIGEST)
        for i, chunk in enumerate((3, 7, 8, 20)):
            new[(Target.MEMORY, chunk)] = _chunk(i)
            assert w.add_new(Target.MEMORY, chunk, _chunk(i)) == i
        new[(Target.DISK, 5)] = _chunk(99)
        assert w.add_new(Target.DISK, 5, memoryview(_chunk(99))) == 4
        new[(Target.DISK, 40)] = b"t" * 1000
        assert w.add_new(Target.DISK, 40, b"t" * 1000) == 5  # partial last chunk
        w.add_ref(Target.DISK, 0, Kind.ZERO)
        w.add_ref(Target.DISK, 1, Kind.BASE_DISK, 9)
        w.add_ref(Target.DISK, 2, Kind.BASE_MEMORY, 63)
        w.add_ref(Target.DISK, 6, Kind.SELF, 0)
        w.add_ref(Target.MEMORY, 0, Kind.ZERO)
        w.add_ref(Target.MEMORY, 1, Kind.BASE_MEMORY, 1000)
        w.add_ref(Target.MEMORY, 2, Kind.BASE_DISK, 0)
        w.add_ref(Target.MEMORY, 63, Kind.SELF, 4)
        w.add_blob("memory-layout", b"QEVM device state" * 100)
        w.add_blob("vm-config", b'{"memory_mb": 256}')
        w.set_meta({"stats": {"capture": 1.5}, "note": "test"})
        info = w.close()
    return {"new": new, "info": info}


@pytest.fixture
def sample(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "vm.overlay"
    return path, write_sample(path)


def _assert_sample(r: OverlayReader, expect: dict) -> None:
    assert r.base_id == BASE_ID
    assert r.images == {
        Target.DISK: (DISK_SIZE, DISK_DIGEST),
        Target.MEMORY: (MEMORY_SIZE, MEMORY_DIGEST),
    }
    assert r.slot_count == 6
    assert [f.slot_count for f in r.frames] == [2, 2, 2]
    assert r.blob("vm-config") == b'{"memory_mb": 256}'
    assert r.blob("memory-layout") == b"QEVM device state" * 100
    assert r.meta == {"stats": {"capture": 1.5}, "note": "test"}
    assert r.created["tool"] == "cloudlet"
    m = r.chunk_map
    assert m.dtype == fmt.MAP_DTYPE
    rows = {(int(t), int(c)): (Kind(k), int(ref)) for t, k, c, ref in m.tolist()}
    assert rows[(Target.DISK, 0)] == (Kind.ZERO, 0)
    assert rows[(Target.DISK, 1)] == (Kind.BASE_DISK, 9)
    assert rows[(Target.DISK, 2)] == (Kind.BASE_MEMORY, 63)
    assert rows[(Target.DISK, 6)] == (Kind.SELF, 0)
    assert rows[(Target.MEMORY, 63)] == (Kind.SELF, 4)
    assert rows[(Target.DISK, 40)] == (Kind.NEW, 5)
    assert len(rows) == 14
    payload = b"".join(raw for _, raw in r.iter_frames())
    for (target, chunk), data in expect["new"].items():
        slot = rows[(target, chunk)][1]
        got = payload[slot * CHUNK_SIZE : (slot + 1) * CHUNK_SIZE]
        assert got == data.ljust(CHUNK_SIZE, b"\0")  # partial chunk: zero padded slot


def test_round_trip_from_path(sample: tuple[Path, dict]) -> None:
    path, expect = sample
    with OverlayReader.open(path) as r:
        _assert_sample(r, expect)
        assert r.version == (1, 0)
        assert r.total_length == path.stat().st_size
        s = r.summary()
        assert s["chunks"] == {"ZERO": 2, "BASE_MEMORY": 2, "BASE_DISK": 2, "SELF": 2, "NEW": 6}
        assert s["codec"] == "zstd"
    info = expect["info"]
    assert info.size == path.stat().st_size
    assert info.counts_by_kind()[Kind.NEW] == 6
    assert info.chunks[Target.DISK][Kind.SELF] == 1
    assert info.bytes_in == 6 * CHUNK_SIZE
    assert sorted(os.listdir(path.parent)) == ["vm.overlay"]  # no temporary files left


def test_round_trip_from_pipe(sample: tuple[Path, dict]) -> None:
    """A stream (pipe, HTTP body) is read in one pass."""
    path, expect = sample
    with subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        _assert_sample(OverlayReader.open(proc.stdout), expect)
        proc.wait(timeout=30)


def test_round_trip_from_memory_and_without_threads(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    expect = write_sample(a, workers=0)
    write_sample(b, workers=4)
    _assert_sample(OverlayReader.open(io.BytesIO(a.read_bytes())), expect)
    ra, rb = OverlayReader.open(a), OverlayReader.open(b)
    assert [f.sha256 for f in ra.frames] == [f.sha256 for f in rb.frames]


def test_frame_fetched_by_byte_range(sample: tuple[Path, dict]) -> None:
    """Early start: fetch the prefix, then any single frame by range."""
    path, _ = sample
    full = path.read_bytes()
    r = OverlayReader.open(path)
    prefix = OverlayReader.open(io.BytesIO(full[: r.frames_offset] + bytes(len(full))))
    assert prefix.chunk_map.tolist() == r.chunk_map.tolist()
    fr = r.frames[2]
    raw = prefix.decode_frame(2, full[fr.offset : fr.offset + fr.length])
    assert raw == r.read_frame(2)
    assert raw[CHUNK_SIZE:] == b"t" * 1000 + bytes(CHUNK_SIZE - 1000)


def test_xz_and_incompressible_frames(tmp_path: Path) -> None:
    path = tmp_path / "x.overlay"
    noise = [os.urandom(CHUNK_SIZE) for _ in range(4)]
    with OverlayWriter(path, BASE_ID, codec="xz", frame_size=2 * CHUNK_SIZE) as w:
        w.set_image(Target.DISK, 8 * CHUNK_SIZE, DISK_DIGEST)
        w.set_image(Target.MEMORY, 0, MEMORY_DIGEST)
        w.add_new(Target.DISK, 0, noise[0])
        w.add_new(Target.DISK, 1, noise[1])
        w.add_new(Target.DISK, 2, bytes(CHUNK_SIZE))
        w.add_blob("vm-config", b"{}")
    r = OverlayReader.open(path)
    assert [f.codec for f in r.frames] == ["none", "xz"]
    assert r.read_frame(0) == noise[0] + noise[1]
    assert r.read_frame(1) == bytes(CHUNK_SIZE)


def test_empty_overlay(tmp_path: Path) -> None:
    path = tmp_path / "e.overlay"
    with OverlayWriter(path, BASE_ID) as w:
        w.set_image(Target.DISK, 0, DISK_DIGEST)
        w.set_image(Target.MEMORY, 0, MEMORY_DIGEST)
    r = OverlayReader.open(path)
    assert r.frames == [] and len(r.chunk_map) == 0 and r.blob_names == []


# -- damaged input ---------------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(data)


def test_flipped_bit_in_frame_names_the_frame(sample: tuple[Path, dict]) -> None:
    path, _ = sample
    fr = OverlayReader.open(path).frames[1]
    _flip(path, fr.offset + fr.length // 2)
    r = OverlayReader.open(path)  # the manifest is intact
    r.read_frame(0)
    with pytest.raises(CorruptOverlay, match="frame 1"):
        r.read_frame(1)


@pytest.mark.parametrize("where", ["header", "manifest", "chunk map"])
def test_tampered_metadata_is_corrupt(sample: tuple[Path, dict], where: str) -> None:
    path, _ = sample
    r = OverlayReader.open(path)
    offset = {
        "header": 20,
        "manifest": fmt.HEADER_SIZE + 30,
        "chunk map": r.data_offset + 3,
    }[where]
    _flip(path, offset)
    with pytest.raises(CorruptOverlay):
        OverlayReader.open(path)


def test_forged_manifest_with_matching_header_digest_is_checked(tmp_path: Path) -> None:
    """Even a re-digested manifest cannot point outside the file or break the slot order."""
    path = tmp_path / "f.overlay"
    write_sample(path)
    r = OverlayReader.open(path)
    data = path.read_bytes()
    manifest = fmt.decode_manifest(data[fmt.HEADER_SIZE : r.data_offset])
    manifest["frames"][1][5] = 7  # first_slot out of sequence
    raw = fmt.encode_manifest(manifest)
    rest = data[r.data_offset :]
    path.write_bytes(fmt.pack_header(raw, len(rest)) + raw + rest)
    with pytest.raises(CorruptOverlay, match="frame 1"):
        OverlayReader.open(path)


def test_tampered_blob(sample: tuple[Path, dict]) -> None:
    path, _ = sample
    r = OverlayReader.open(path)
    info = r._blob_info["vm-config"]
    _flip(path, info.offset)
    r = OverlayReader.open(path)
    assert r.blob("memory-layout")
    with pytest.raises(CorruptOverlay, match="vm-config"):
        r.blob("vm-config")
    with pytest.raises(KeyError, match="memory-layout"):
        r.blob("kernel")


@pytest.mark.parametrize("keep", [50, fmt.HEADER_SIZE + 10, -1])
def test_truncated_file(sample: tuple[Path, dict], keep: int) -> None:
    path, _ = sample
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(TruncatedOverlay):
        OverlayReader.open(path)


def test_truncated_stream_fails_at_the_missing_frame(sample: tuple[Path, dict]) -> None:
    path, _ = sample
    data = path.read_bytes()
    r = OverlayReader.open(io.BufferedReader(_Pipe(data[:-10])))
    frames = r.iter_frames()
    next(frames)
    next(frames)
    with pytest.raises(TruncatedOverlay, match="frame 2"):
        next(frames)


class _Pipe(io.RawIOBase):
    """A non-seekable byte stream, like a socket or an HTTP body."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        n = min(len(b), len(self._data), 1000)
        b[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def test_unknown_major_version(sample: tuple[Path, dict]) -> None:
    path, _ = sample
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, 2)
    data[80:96] = hashlib.sha256(bytes(data[:80])).digest()[:16]
    path.write_bytes(data)
    with pytest.raises(UnsupportedFormat, match="version 2.0"):
        OverlayReader.open(path)


def test_newer_minor_version_is_read(sample: tuple[Path, dict]) -> None:
    path, expect = sample
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 10, 7)
    data[80:96] = hashlib.sha256(bytes(data[:80])).digest()[:16]
    path.write_bytes(data)
    r = OverlayReader.open(path)
    assert r.version == (1, 7)
    _assert_sample(r, expect)


@pytest.mark.parametrize(
    "content", [b"", b"hello", b"QFI\xfb" + bytes(200), b"#!/bin/sh\necho not an overlay\n" * 9]
)
def test_not_an_overlay(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "other"
    path.write_bytes(content)
    with pytest.raises(UnsupportedFormat, match="not a cloudlet overlay"):
        OverlayReader.open(path)


def test_unknown_frame_codec_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "c.overlay"
    write_sample(path)
    r = OverlayReader.open(path)
    data = path.read_bytes()
    manifest = fmt.decode_manifest(data[fmt.HEADER_SIZE : r.data_offset])
    manifest["frames"][0][3] = "brotli"
    raw = fmt.encode_manifest(manifest)
    rest = data[r.data_offset :]
    path.write_bytes(fmt.pack_header(raw, len(rest)) + raw + rest)
    with pytest.raises(UnsupportedFormat, match="brotli"):
        OverlayReader.open(path)


# -- writer misuse leaves nothing behind -----------------------------------------------------


def _writer(path: Path) -> OverlayWriter:
    w = OverlayWriter(path, BASE_ID, frame_size=CHUNK_SIZE)
    w.set_image(Target.DISK, DISK_SIZE, DISK_DIGEST)
    w.set_image(Target.MEMORY, MEMORY_SIZE, MEMORY_DIGEST)
    return w


def test_exception_inside_writer_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "o.overlay"
    with pytest.raises(RuntimeError), _writer(path) as w:
        for i in range(10):
            w.add_new(Target.MEMORY, i, _chunk(i))
        raise RuntimeError("capture failed")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "misuse",
    [
        lambda w: (w.add_ref(Target.DISK, 3, Kind.ZERO), w.add_ref(Target.DISK, 3, Kind.ZERO)),
        lambda w: w.add_ref(Target.MEMORY, 64, Kind.ZERO),  # past the image end
        lambda w: w.add_new(Target.DISK, 3, b"short"),  # short but not the last chunk
        lambda w: w.add_new(Target.DISK, 40, b"x" * 999),  # last chunk of the wrong length
    ],
)
def test_invalid_chunk_map_fails_close(tmp_path: Path, misuse) -> None:  # noqa: ANN001
    path = tmp_path / "o.overlay"
    w = _writer(path)
    misuse(w)
    with pytest.raises(ValueError):
        w.close()
    assert os.listdir(tmp_path) == []


def test_invalid_calls_are_refused_at_once(tmp_path: Path) -> None:
    w = _writer(tmp_path / "o.overlay")
    with pytest.raises(ValueError, match="earlier payload slot"):
        w.add_ref(Target.DISK, 1, Kind.SELF, 0)
    with pytest.raises(ValueError, match="add_new"):
        w.add_ref(Target.DISK, 1, Kind.NEW, 0)
    with pytest.raises(ValueError):
        w.add_new(Target.DISK, 1, bytes(CHUNK_SIZE + 1))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_missing_image_fails_close(tmp_path: Path) -> None:
    w = OverlayWriter(tmp_path / "o.overlay", BASE_ID)
    w.set_image(Target.DISK, 100, DISK_DIGEST)
    with pytest.raises(ValueError, match="memory"):
        w.close()
    assert os.listdir(tmp_path) == []


def test_unknown_codec_for_writer(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormat, match="zstd"):
        OverlayWriter(tmp_path / "o.overlay", BASE_ID, codec="nope")
    assert os.listdir(tmp_path) == []


def test_chunk_map_is_compact(tmp_path: Path) -> None:
    """100k modified chunks cost a few hundred KiB of map, not megabytes of JSON."""
    path = tmp_path / "big.overlay"
    with OverlayWriter(path, BASE_ID) as w:
        w.set_image(Target.DISK, 1 << 30, DISK_DIGEST)
        w.set_image(Target.MEMORY, 0, MEMORY_DIGEST)
        for c in range(0, 200_000, 2):
            w.add_ref(Target.DISK, c, Kind.BASE_DISK, c + 1)
    r = OverlayReader.open(path)
    assert len(r.chunk_map) == 100_000
    assert r.data_offset < 4096
    assert r.total_length < 600_000
    assert np.array_equal(r.chunk_map["ref"], r.chunk_map["chunk"] + 1)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_overlay_file_mode_follows_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Overlays are meant to be served: a web server reading them got 403 from 0600 files."""
    old = os.umask(umask)
    try:
        write_sample(tmp_path / "app.overlay")
    finally:
        os.umask(old)
    assert (tmp_path / "app.overlay").stat().st_mode & 0o777 == mode

"""Codec plugins: round trips, bounded decompression, lookup by name."""

import os
import threading

import pytest
import zstandard

from cloudlet.codecs import Codec, available_codecs, get_codec
from cloudlet.errors import CorruptOverlay, UnsupportedFormat

SAMPLE = (b"cloudlet overlay frame " * 2000) + os.urandom(20000) + bytes(30000)


def test_installed_codecs_are_listed() -> None:
    assert {"zstd", "xz"} <= set(available_codecs())


@pytest.mark.parametrize(
    ("name", "level"),
    [("zstd", None), ("zstd", 1), ("zstd", 19), ("xz", None), ("xz", 0), ("none", None)],
)
@pytest.mark.parametrize("data", [SAMPLE, b"", b"x"])
def test_round_trip(name: str, level: int | None, data: bytes) -> None:
    codec = get_codec(name, level)
    assert isinstance(codec, Codec) and codec.name == name
    assert codec.decompress(codec.compress(data), len(data)) == data


def test_defaults_are_the_measured_ones() -> None:
    assert get_codec("zstd").level == 3
    assert get_codec("xz").level == 6


def test_compression_shrinks_redundant_data() -> None:
    for name in ("zstd", "xz"):
        assert len(get_codec(name).compress(SAMPLE)) < len(SAMPLE) // 2


@pytest.mark.parametrize("name", ["zstd", "xz", "none"])
def test_decompression_bomb_is_refused(name: str) -> None:
    codec = get_codec(name)
    bomb = codec.compress(bytes(10 << 20))
    with pytest.raises(CorruptOverlay, match="bytes"):
        codec.decompress(bomb, 4096)


def test_zstd_frame_without_content_size_is_still_bounded() -> None:
    codec = get_codec("zstd")
    blob = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    assert codec.decompress(blob, 1 << 20) == bytes(1 << 20)
    with pytest.raises(CorruptOverlay):
        codec.decompress(blob, (1 << 20) - 1)


@pytest.mark.parametrize("name", ["zstd", "xz"])
def test_garbage_is_corrupt_not_a_crash(name: str) -> None:
    codec = get_codec(name)
    with pytest.raises(CorruptOverlay):
        codec.decompress(b"\x00garbage" * 50, 4096)
    good = codec.compress(SAMPLE)
    with pytest.raises(CorruptOverlay):
        codec.decompress(good[: len(good) // 2], len(SAMPLE))


def test_unknown_codec_names_the_installed_ones() -> None:
    with pytest.raises(UnsupportedFormat, match="lz4.*xz, zstd"):
        get_codec("lz4")


@pytest.mark.parametrize(("name", "level"), [("zstd", 23), ("xz", 10), ("xz", -1)])
def test_level_out_of_range(name: str, level: int) -> None:
    with pytest.raises(ValueError, match="level"):
        get_codec(name, level)


def test_one_codec_shared_by_threads() -> None:
    """The writer compresses frames in a thread pool with one codec instance."""
    codec = get_codec("zstd")
    blocks = [os.urandom(1000) * (i + 1) for i in range(8)]
    results: dict[int, bytes] = {}

    def work(i: int) -> None:
        for _ in range(20):
            results[i] = codec.decompress(codec.compress(blocks[i]), len(blocks[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(results[i] == blocks[i] for i in range(8))

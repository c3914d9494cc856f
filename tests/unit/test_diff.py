from pathlib import Path

import numpy as np
import pytest

from cloudlet.chunks import CHUNK_SIZE
from cloudlet.diff import ChangedBatch, changed_chunks, data_ranges_of
from cloudlet.errors import ImageError

C = CHUNK_SIZE


def random_bytes(n: int, seed: int) -> bytearray:
    return bytearray(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())


def collect(batches: list[ChangedBatch]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for b in batches:
        assert list(b.chunks) == sorted(b.chunks)
        for i, chunk in enumerate(b.chunks.tolist()):
            out[chunk] = bytes(b.chunk_data(i))
    return out


def expected(base: bytes, new: bytes) -> dict[int, bytes]:
    """Naive reference: chunk by chunk, the base extended with zeros."""
    padded = bytes(base) + bytes(max(0, len(new) - len(base)))
    return {
        i // C: bytes(new[i : i + C])
        for i in range(0, len(new), C)
        if new[i : i + C] != padded[i : i + len(new[i : i + C])]
    }


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(random_bytes(700 * C, 1))  # three 1 MiB windows, the last one short
    return path


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "new.img"
    path.write_bytes(data)
    return path


def test_finds_exactly_the_changed_chunks(tmp_path: Path, base: Path) -> None:
    new = bytearray(base.read_bytes())
    for chunk in (0, 255, 256, 511, 699):  # window edges included
        new[chunk * C + 100] ^= 0xFF
    new[400 * C : 402 * C] = bytes(2 * C)  # zeroed chunks are changes too
    new[600 * C + C - 1] ^= 1  # last byte of a chunk
    batches = list(changed_chunks(base, write(tmp_path, new), len(new)))
    got = collect(batches)
    assert sorted(got) == [0, 255, 256, 400, 401, 511, 600, 699]
    assert got == expected(base.read_bytes(), new)


def test_equal_images_yield_nothing(tmp_path: Path, base: Path) -> None:
    assert list(changed_chunks(base, write(tmp_path, base.read_bytes()), 700 * C)) == []


def test_new_image_larger_compares_against_zeros(tmp_path: Path, base: Path) -> None:
    new = base.read_bytes() + bytes(300 * C)
    new = bytearray(new)
    new[800 * C + 7] = 9  # data beyond the base end
    got = collect(list(changed_chunks(base, write(tmp_path, new), len(new))))
    assert sorted(got) == [800]


def test_new_image_smaller_only_its_size_counts(tmp_path: Path, base: Path) -> None:
    new = bytearray(base.read_bytes()[: 100 * C])
    new[50 * C] ^= 1
    got = collect(list(changed_chunks(base, write(tmp_path, new), len(new))))
    assert sorted(got) == [50]


def test_partial_last_chunk_keeps_its_real_length(tmp_path: Path, base: Path) -> None:
    size = 650 * C + 123
    new = bytearray(base.read_bytes()[:size])
    new[-1] ^= 1
    got = collect(list(changed_chunks(base, write(tmp_path, new), size)))
    assert list(got) == [650]
    assert len(got[650]) == 123 and got[650] == bytes(new[650 * C :])
    # equal prefix of a longer base chunk: not a change
    assert list(changed_chunks(base, write(tmp_path, new[:-1]), size - 1)) == []


def test_new_size_bounds_what_is_compared(tmp_path: Path, base: Path) -> None:
    new = bytearray(base.read_bytes())
    new[600 * C] ^= 1  # beyond new_size: ignored
    assert list(changed_chunks(base, write(tmp_path, new), 500 * C)) == []


def test_ranges_limit_what_is_read(tmp_path: Path, base: Path) -> None:
    new = bytearray(base.read_bytes())
    for chunk in (10, 20, 300, 650):
        new[chunk * C + 5] ^= 0xFF
    ranges = [(300 * C + 5, 1), (10 * C, 11 * C)]  # unsorted, unaligned, overlapping none
    got = collect(list(changed_chunks(base, write(tmp_path, new), len(new), ranges)))
    assert sorted(got) == [10, 20, 300]  # 650 lies outside the ranges: known equal


def test_ranges_past_the_end_are_clipped(tmp_path: Path, base: Path) -> None:
    new = bytearray(base.read_bytes())
    new[-1] ^= 1
    got = collect(list(changed_chunks(base, write(tmp_path, new), len(new), [(699 * C, 10 * C)])))
    assert sorted(got) == [699]


def test_truncated_new_image_is_an_error(tmp_path: Path, base: Path) -> None:
    new = write(tmp_path, base.read_bytes()[: 10 * C])
    with pytest.raises(ImageError, match="ends before"):
        list(changed_chunks(base, new, 700 * C))


def test_sparse_images_compare_the_same_without_reading_holes(tmp_path):
    """Skipping ranges where both images are holes finds exactly what a full scan finds."""

    size = 64 << 20
    base, new = tmp_path / "base.img", tmp_path / "new.img"
    rng = np.random.default_rng(5)
    for path, spots in ((base, (1, 9, 30)), (new, (9, 30, 47))):
        with open(path, "wb") as f:
            f.truncate(size)
            for mib in spots:
                f.seek(mib << 20)
                f.write(rng.bytes(3 * CHUNK_SIZE) if mib != 30 else b"same" * 1024)
    ranges = data_ranges_of((base, new), size)
    assert sum(length for _, length in ranges) < 8 << 20  # the 56+ MiB of shared holes are skipped
    full = [c for b in changed_chunks(base, new, size) for c in b.chunks.tolist()]
    skipping = [c for b in changed_chunks(base, new, size, ranges) for c in b.chunks.tolist()]
    assert skipping == full
    # base-only data (now zero), data in both that differs, new-only data; equal data is not
    assert {c * CHUNK_SIZE >> 20 for c in full} == {1, 9, 47}

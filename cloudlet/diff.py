"""Find the chunks of a new image that differ from the base image, window by window.

A window (up to hashing.READ_SIZE bytes, chunk aligned) of the new image is compared with the same
bytes of the base: equal windows cost one memcmp, differing ones are compared per chunk with numpy.
Beyond the end of the base the new image is compared against zeros (the base is conceptually
extended with zeros). Only the first `new_size` bytes of the new image count; if `new_size` is not a
multiple of CHUNK_SIZE, the last chunk is partial and is returned with its real (short) length.
"""

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloudlet.chunks import CHUNK_SIZE, chunk_count
from cloudlet.errors import ImageError
from cloudlet.fsutil import data_ranges
from cloudlet.hashing import READ_SIZE

LOG = logging.getLogger(__name__)

_WORDS = CHUNK_SIZE // 8


@dataclass(frozen=True, slots=True, eq=False)  # eq on arrays would be ambiguous
class ChangedBatch:
    """Changed chunks: ascending chunk numbers and their bytes, concatenated.

    Chunk `chunks[i]` is `data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]`; every chunk is CHUNK_SIZE
    bytes except a partial last chunk of the image, which only ever comes last in its batch.
    """

    chunks: np.ndarray  # int64
    data: bytes

    def __len__(self) -> int:
        return len(self.chunks)

    def chunk_data(self, i: int) -> memoryview:
        return memoryview(self.data)[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]


def compare_window(
    first_chunk: int, new: bytes | bytearray, base: bytes | bytearray
) -> ChangedBatch | None:
    """The chunks of `new` (image bytes from chunk `first_chunk` on) that differ from `base`.

    `base` holds the base's bytes at the same offset and may be shorter than `new`: the missing
    tail counts as zeros. `len(new)` is the real length (a partial last chunk stays partial).
    """
    n = len(new)
    if len(base) == n and new == base:  # memcmp: the common case costs no numpy at all
        return None
    nchunks = chunk_count(n)
    padded = nchunks * CHUNK_SIZE
    a = _padded(new, padded)
    b = _padded(base[:n], padded)
    mask = (a.view(np.uint64) != b.view(np.uint64)).reshape(nchunks, _WORDS).any(axis=1)
    idx = np.flatnonzero(mask)
    if not len(idx):
        return None
    data = a.reshape(nchunks, CHUNK_SIZE)[idx].tobytes()
    if n < padded and mask[-1]:
        data = data[: len(data) - (padded - n)]
    return ChangedBatch(idx.astype(np.int64) + first_chunk, data)


def _padded(data: bytes | bytearray, size: int) -> np.ndarray:
    arr = np.frombuffer(data, dtype=np.uint8)
    if len(arr) == size:
        return arr
    out = np.zeros(size, dtype=np.uint8)
    out[: len(arr)] = arr
    return out


def pread_exact(fd: int, length: int, offset: int, path: Path) -> bytes:
    """Read exactly `length` bytes at `offset` (regular files return short reads only at EOF)."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise ImageError(
            f"{path}: ends before byte {offset + length} (read {len(data)} of {length} bytes at "
            f"offset {offset}); the image is truncated or smaller than its declared size"
        )
    return data


def normalize_ranges(ranges: Iterable[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """(offset, length) byte ranges -> sorted, merged, chunk-aligned (start, end) within `size`."""
    spans = []
    for offset, length in ranges:
        if length <= 0:
            continue
        start = offset // CHUNK_SIZE * CHUNK_SIZE
        end = min(chunk_count(offset + length) * CHUNK_SIZE, size)
        if start < end:
            spans.append((start, end))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def data_ranges_of(paths: Iterable[Path], size: int) -> list[tuple[int, int]]:
    """(offset, length) ranges of the first `size` bytes where any of `paths` may hold data.

    Outside them every file is a hole (or ends), so all read as zeros and are equal: passed as
    `ranges` to changed_chunks, two sparse images are compared without reading their holes.
    """
    ranges = []
    for path in paths:
        with open(path, "rb") as f:
            end = min(size, os.fstat(f.fileno()).st_size) // CHUNK_SIZE * CHUNK_SIZE
            ranges += [
                (s, e - s) for s, e in data_ranges(f.fileno(), 0, end, CHUNK_SIZE, READ_SIZE)
            ]
            if end < size:  # a partial last chunk, or past this file's end: compare it
                ranges.append((end, size - end))
    return ranges


def iter_spans(spans: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Split (start, end) spans into chunk-aligned windows of at most READ_SIZE bytes."""
    for start, end in spans:
        for offset in range(start, end, READ_SIZE):
            yield offset, min(READ_SIZE, end - offset)


def changed_chunks(
    base: Path,
    new: Path,
    new_size: int,
    ranges: Iterable[tuple[int, int]] | None = None,
) -> Iterator[ChangedBatch]:
    """Yield the chunks of the first `new_size` bytes of `new` that differ from `base`.

    `ranges` are (offset, length) byte ranges of the new image that may differ; everything outside
    them is known equal and is not read. Memory: a few windows of READ_SIZE.
    """
    spans = normalize_ranges([(0, new_size)] if ranges is None else ranges, new_size)
    changed = 0
    with open(base, "rb") as fb, open(new, "rb") as fn:
        for offset, length in iter_spans(spans):
            data = pread_exact(fn.fileno(), length, offset, new)
            base_data = os.pread(fb.fileno(), length, offset)  # short past the base end
            batch = compare_window(offset // CHUNK_SIZE, data, base_data)
            if batch is not None:
                changed += len(batch)
                yield batch
    LOG.debug("%s vs %s: %d changed chunks", new, base, changed)

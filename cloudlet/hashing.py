"""Chunk digests and the image digest built from them.

The digest of an image is sha256 over the concatenated sha256 digests of its 4 KiB chunks (the
last chunk hashed as it is, unpadded). Synthesis can then verify a whole multi-GiB image by hashing
only the chunks it wrote: the digests of untouched chunks come from the base's index.

Digest arrays of big images (32 bytes per chunk: 64 MiB for 8 GiB) are never materialised here:
they are read and hashed window by window, and pages of a memory-mapped array are handed back to
the page cache once hashed, so the process's RSS stays bounded whatever the image size.
"""

import hashlib
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from cloudlet.chunks import CHUNK_SIZE, chunk_count
from cloudlet.fsutil import next_data

DIGEST_SIZE = 32
READ_SIZE = 1 << 20  # 256 chunks per read: large sequential reads, bounded memory
DIGEST_WINDOW = 1 << 16  # chunk digests hashed at a time (2 MiB of digests, 256 MiB of image)
ZERO_CHUNK_DIGEST = hashlib.sha256(bytes(CHUNK_SIZE)).digest()
_ZERO_ROW = np.frombuffer(ZERO_CHUNK_DIGEST, dtype=np.uint8)


def chunk_digest(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def iter_windows(path: Path, size: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield (first chunk number, bytes) windows of READ_SIZE covering an image file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size if size is None else size
        offset = 0
        while offset < size:
            data = f.read(min(READ_SIZE, size - offset))
            if not data:
                raise OSError(f"{path}: ends at byte {offset}, expected {size}")
            yield offset // CHUNK_SIZE, data
            offset += len(data)


def window_digests(data: bytes) -> np.ndarray:
    """Digests of the chunks of one window, as an (n, 32) uint8 array."""
    n = chunk_count(len(data))
    out = np.empty((n, DIGEST_SIZE), dtype=np.uint8)
    view = memoryview(data)
    zero = zero_chunk_mask(data)
    out[zero] = _ZERO_ROW
    for i in np.flatnonzero(~zero).tolist():
        out[i] = np.frombuffer(
            hashlib.sha256(view[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]).digest(), np.uint8
        )
    return out


def zero_chunk_mask(data: bytes) -> np.ndarray:
    """Boolean per full 4 KiB chunk of `data`: True where the chunk is all zero bytes.

    A trailing partial chunk is reported as non-zero (it is hashed as it is).
    """
    full = len(data) // CHUNK_SIZE
    mask = np.zeros(chunk_count(len(data)), dtype=bool)
    if full:
        words = np.frombuffer(data, dtype=np.uint64, count=full * CHUNK_SIZE // 8)
        mask[:full] = ~words.reshape(full, CHUNK_SIZE // 8).any(axis=1)
    return mask


def iter_chunk_digests(
    path: Path, size: int | None = None, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first chunk number, (k, 32) digests) windows covering an image file, in order.

    Windows that lie in a hole of a sparse file are not read (SEEK_DATA): their chunks are zero.
    """
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size if size is None else size
        offset = 0
        while offset < size:
            length = min(READ_SIZE, size - offset)
            if next_data(fd, offset, size) >= offset + length and length % CHUNK_SIZE == 0:
                digests = np.broadcast_to(_ZERO_ROW, (length // CHUNK_SIZE, DIGEST_SIZE))
            else:
                data = os.pread(fd, length, offset)
                if len(data) != length:
                    raise OSError(f"{path}: ends at byte {offset + len(data)}, expected {size}")
                digests = window_digests(data)
            yield offset // CHUNK_SIZE, digests
            offset += length
            if progress:
                progress(offset)


def image_chunk_digests(
    path: Path, size: int | None = None, progress: Callable[[int], None] | None = None
) -> np.ndarray:
    """All chunk digests of an image file in one array (32 bytes per chunk: small images only).

    Big images go through iter_chunk_digests (index.ChunkIndex.build streams it to a file).
    """
    size = os.path.getsize(path) if size is None else size
    out = np.empty((chunk_count(size), DIGEST_SIZE), dtype=np.uint8)
    for first, d in iter_chunk_digests(path, size, progress):
        out[first : first + len(d)] = d
    return out


def tree_digest(digests: np.ndarray) -> str:
    """The image digest (hex) from its (n, 32) chunk digest array (read window by window)."""
    h = hashlib.sha256()
    for rows in iter_rows(digests, 0, len(digests)):
        h.update(rows.tobytes())
    return h.hexdigest()


def tree_digest_with_overrides(
    base_digests: np.ndarray, size_chunks: int, chunks: np.ndarray, digests: np.ndarray
) -> str:
    """tree_digest of a result image described as a base plus the chunks that changed.

    Equal to tree_digest of the (size_chunks, 32) array made of `base_digests`, cut or extended
    with ZERO_CHUNK_DIGEST, then `digests[i]` written at chunk `chunks[i]` (in order: a repeated
    chunk keeps its last digest), but memory is one window plus the overrides, never the image.
    """
    chunks = np.asarray(chunks, dtype=np.int64)
    digests = np.asarray(digests, dtype=np.uint8).reshape(len(chunks), DIGEST_SIZE)
    if len(chunks) and (chunks.min() < 0 or chunks.max() >= size_chunks):
        raise ValueError(f"override chunks must lie in [0, {size_chunks})")
    if len(chunks) > 1 and not (np.diff(chunks) > 0).all():
        order = np.argsort(chunks, kind="stable")
        chunks, digests = chunks[order], digests[order]
        last = np.append(chunks[1:] != chunks[:-1], True)  # the last of each repeated chunk
        chunks, digests = chunks[last], digests[last]
    base_n = min(len(base_digests), size_chunks)
    window = np.empty((DIGEST_WINDOW, DIGEST_SIZE), dtype=np.uint8)
    h = hashlib.sha256()
    for start in range(0, size_chunks, DIGEST_WINDOW):
        stop = min(start + DIGEST_WINDOW, size_chunks)
        rows = window[: stop - start]
        if start < base_n:
            inside = min(stop, base_n)
            rows[: inside - start] = _read_rows(base_digests, start, inside)
            rows[inside - start :] = _ZERO_ROW
        else:
            rows[:] = _ZERO_ROW
        a, b = np.searchsorted(chunks, (start, stop))
        rows[chunks[a:b] - start] = digests[a:b]
        h.update(rows.data)
    return h.hexdigest()


def iter_rows(digests: np.ndarray, start: int, stop: int) -> Iterator[np.ndarray]:
    """Copies of rows [start, stop) of a digest array, DIGEST_WINDOW at a time."""
    for i in range(start, stop, DIGEST_WINDOW):
        yield _read_rows(digests, i, min(i + DIGEST_WINDOW, stop))


def take_rows(digests: np.ndarray, index: np.ndarray) -> np.ndarray:
    """digests[index] as a new (k, 32) array, gathered in chunk order (mapped pages released)."""
    index = np.asarray(index, dtype=np.int64)
    out = np.empty((len(index), DIGEST_SIZE), dtype=np.uint8)
    order = np.argsort(index, kind="stable")
    for s in range(0, len(order), DIGEST_WINDOW):
        pick = order[s : s + DIGEST_WINDOW]
        lo, hi = int(index[pick[0]]), int(index[pick[-1]]) + 1
        out[pick] = digests[index[pick]]
        _release(digests[lo:hi])
    return out


def _read_rows(digests: np.ndarray, start: int, stop: int) -> np.ndarray:
    """A copy of rows [start, stop); a memory-mapped array's pages are released after the copy.

    Pages of a mapped file count in the process's RSS while mapped; a tree digest over a 64 MiB
    digest file would otherwise leave all of it resident (it stays in the page cache either way).
    """
    part = digests[start:stop]
    rows = np.array(part, dtype=np.uint8, copy=True)
    _release(part)
    return rows


def _release(part: np.ndarray) -> None:
    mapping, owner = part, None
    while mapping is not None and not isinstance(mapping, mmap.mmap):
        if isinstance(mapping, np.memmap):
            owner = mapping
        mapping = getattr(mapping, "base", None)
    if (
        mapping is None
        or owner is None
        or owner.mode == "c"  # private copy-on-write pages: dropping them would lose writes
        or not part.flags.c_contiguous
        or part.nbytes == 0
        or not hasattr(mapping, "madvise")
    ):
        return
    whole = np.frombuffer(mapping, dtype=np.uint8)
    begin = part.ctypes.data - whole.ctypes.data
    del whole
    first = begin - begin % mmap.PAGESIZE
    end = min(len(mapping), begin + part.nbytes)
    mapping.madvise(mmap.MADV_DONTNEED, first, end - first)


def file_sha256(path: Path) -> str:
    """Plain sha256 of a whole file (kernels, packages), streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_SIZE):
            h.update(block)
    return h.hexdigest()

"""Chunk digests and the image digest built from them.

The digest of an image is sha256 over the concatenated sha256 digests of its 4 KiB chunks (the
last chunk hashed as it is, unpadded). Synthesis can then verify a whole multi-GiB image by hashing
only the chunks it wrote: the digests of untouched chunks come from the base's index.
"""

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from cloudlet.chunks import CHUNK_SIZE, chunk_count

DIGEST_SIZE = 32
READ_SIZE = 1 << 20  # 256 chunks per read: large sequential reads, bounded memory
ZERO_CHUNK_DIGEST = hashlib.sha256(bytes(CHUNK_SIZE)).digest()


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
    for i in range(n):
        if zero[i]:
            out[i] = np.frombuffer(ZERO_CHUNK_DIGEST, dtype=np.uint8)
        else:
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


def image_chunk_digests(
    path: Path, size: int | None = None, progress: Callable[[int], None] | None = None
) -> np.ndarray:
    """All chunk digests of an image file, streamed (memory: 32 bytes per chunk)."""
    size = os.path.getsize(path) if size is None else size
    out = np.empty((chunk_count(size), DIGEST_SIZE), dtype=np.uint8)
    for first, data in iter_windows(path, size):
        d = window_digests(data)
        out[first : first + len(d)] = d
        if progress:
            progress(first * CHUNK_SIZE + len(data))
    return out


def tree_digest(digests: np.ndarray) -> str:
    """The image digest (hex) from its (n, 32) chunk digest array."""
    h = hashlib.sha256()
    step = 1 << 16
    for i in range(0, len(digests), step):
        h.update(np.ascontiguousarray(digests[i : i + step]).tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """Plain sha256 of a whole file (kernels, packages), streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_SIZE):
            h.update(block)
    return h.hexdigest()

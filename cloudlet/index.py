"""Chunk index of a base image: its chunk digests plus a digest -> chunk number lookup.

Both arrays live in `.npy` files next to the base and are loaded memory-mapped, so looking chunks
up in a base of many GiB costs page cache, not RAM: 32 bytes per chunk for the digests and 16 bytes
per distinct non-zero chunk for the lookup (sorted 8-byte key prefixes and their chunk numbers).
"""

import logging
import os
import tempfile
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np

from cloudlet.chunks import CHUNK_SIZE, chunk_count
from cloudlet.errors import BaseVMError
from cloudlet.hashing import (
    DIGEST_SIZE,
    ZERO_CHUNK_DIGEST,
    iter_windows,
    tree_digest,
    window_digests,
)

LOG = logging.getLogger(__name__)

_BLOCK = 1 << 20  # rows processed at a time when deriving keys from the digest array
_ZERO = np.frombuffer(ZERO_CHUNK_DIGEST, dtype=np.uint8)


def _keys(digests: np.ndarray) -> np.ndarray:
    """First 8 bytes of each digest as a uint64 whose numeric order is the bytes' order."""
    prefix = np.ascontiguousarray(digests[:, :8])
    return prefix.view(">u8").ravel().astype(np.uint64)


def _paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.digests.npy", directory / f"{name}.lookup.npy"


def _publish(tmp: str, dest: Path) -> None:
    """fsync a finished temp file and rename it into place (readers see old or new, never half)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


class ChunkIndex:
    """The chunk digests of one base image and where each distinct non-zero content first occurs."""

    def __init__(self, digests: np.ndarray, lookup: np.ndarray) -> None:
        self.digests = digests
        self._keys = lookup[0]
        self._chunks = lookup[1]

    @property
    def size_chunks(self) -> int:
        return len(self.digests)

    @cached_property
    def image_digest(self) -> str:
        return tree_digest(self.digests)

    @classmethod
    def build(
        cls,
        image: Path,
        directory: Path,
        name: str,
        progress: Callable[[int], None] | None = None,
    ) -> "ChunkIndex":
        """Hash `image` chunk by chunk and write `{name}.digests.npy` + `{name}.lookup.npy`."""
        directory.mkdir(parents=True, exist_ok=True)
        digests_path, lookup_path = _paths(directory, name)
        size = os.path.getsize(image)
        n = chunk_count(size)
        fd, tmp_digests = tempfile.mkstemp(dir=directory, prefix=f".{name}.digests.", suffix=".tmp")
        os.close(fd)
        fd, tmp_lookup = tempfile.mkstemp(dir=directory, prefix=f".{name}.lookup.", suffix=".tmp")
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(
                tmp_digests, mode="w+", dtype=np.uint8, shape=(n, DIGEST_SIZE)
            )
            for first, data in iter_windows(image, size):
                d = window_digests(data)
                out[first : first + len(d)] = d
                if progress:
                    progress(first * CHUNK_SIZE + len(data))
            out.flush()
            lookup = _build_lookup(out)
            del out
            with open(tmp_lookup, "wb") as f:
                np.save(f, lookup)
            # Remove the old lookup first: a crash between the renames leaves a missing file
            # (load fails clearly, rebuild) rather than a lookup that belongs to other digests.
            lookup_path.unlink(missing_ok=True)
            _publish(tmp_digests, digests_path)
            _publish(tmp_lookup, lookup_path)
        except BaseException:
            for tmp in (tmp_digests, tmp_lookup):
                Path(tmp).unlink(missing_ok=True)
            raise
        LOG.info("indexed %s: %d chunks, %d distinct non-zero", image, n, lookup.shape[1])
        return cls.load(directory, name)

    @classmethod
    def load(cls, directory: Path, name: str) -> "ChunkIndex":
        """Open a built index memory-mapped."""
        digests_path, lookup_path = _paths(directory, name)
        try:
            digests = np.load(digests_path, mmap_mode="r", allow_pickle=False)
            lookup = np.load(lookup_path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError as e:
            raise BaseVMError(
                f"chunk index {name!r} missing in {directory} ({e.filename}): "
                "rebuild the base index"
            ) from e
        except (OSError, ValueError) as e:
            raise BaseVMError(
                f"chunk index {name!r} in {directory} is corrupt ({e}): rebuild the base index"
            ) from e
        if digests.dtype != np.uint8 or digests.ndim != 2 or digests.shape[1] != DIGEST_SIZE:
            raise BaseVMError(
                f"{digests_path}: expected (n, {DIGEST_SIZE}) uint8 digests, found "
                f"{digests.shape} {digests.dtype}: rebuild the base index"
            )
        if (
            lookup.dtype != np.uint64
            or lookup.ndim != 2
            or lookup.shape[0] != 2
            or lookup.shape[1] > digests.shape[0]
        ):
            raise BaseVMError(
                f"{lookup_path}: expected a (2, m<={digests.shape[0]}) uint64 lookup, found "
                f"{lookup.shape} {lookup.dtype}: rebuild the base index"
            )
        return cls(digests, lookup)

    def find_many(self, digests: np.ndarray) -> np.ndarray:
        """Chunk number of each (k, 32) digest in this image, -1 where absent.

        Zero chunks are not indexed (dedup handles them first), so the zero digest is never found.
        """
        result = np.full(len(digests), -1, dtype=np.int64)
        if len(digests) == 0 or len(self._keys) == 0:
            return result
        query = _keys(digests)
        left = np.searchsorted(self._keys, query, side="left")
        count = np.searchsorted(self._keys, query, side="right") - left
        # Distinct digests may share an 8-byte key: try each candidate of the run in turn.
        for j in range(int(count.max())):
            sel = np.flatnonzero((count > j) & (result < 0))
            if not len(sel):
                break
            cand = self._chunks[left[sel] + j].astype(np.int64)
            match = (self.digests[cand] == digests[sel]).all(axis=1)
            result[sel[match]] = cand[match]
        return result


def _build_lookup(digests: np.ndarray) -> np.ndarray:
    """(2, m) uint64: sorted keys and chunk numbers, first occurrence of each non-zero digest."""
    n = len(digests)
    keys = np.empty(n, dtype=np.uint64)
    nonzero = np.empty(n, dtype=bool)
    for i in range(0, n, _BLOCK):
        block = np.asarray(digests[i : i + _BLOCK])
        keys[i : i + len(block)] = _keys(block)
        nonzero[i : i + len(block)] = (block != _ZERO).any(axis=1)
    chunks = np.flatnonzero(nonzero)
    order = chunks[np.argsort(keys[chunks], kind="stable")]  # ties stay in chunk order
    del chunks
    sorted_keys = keys[order]
    del keys
    keep = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        # Entries whose key repeats: equal content (usual) or a key collision (rare). Sort those
        # by full digest, then by chunk, and drop all but the first chunk of each equal digest.
        same = sorted_keys[1:] == sorted_keys[:-1]
        in_run = np.zeros(len(order), dtype=bool)
        in_run[1:] |= same
        in_run[:-1] |= same
        pos = np.flatnonzero(in_run)
        if len(pos):
            full = np.ascontiguousarray(digests[order[pos]]).view(">u8").astype(np.uint64)
            sort = np.lexsort((order[pos], full[:, 3], full[:, 2], full[:, 1], full[:, 0]))
            full = full[sort]
            dup = (full[1:] == full[:-1]).all(axis=1)
            keep[pos[sort[1:][dup]]] = False
    return np.stack([sorted_keys[keep], order[keep].astype(np.uint64)])

"""Chunk index of a base image: its chunk digests plus a digest -> chunk number lookup.

Both arrays live in `.npy` files next to the base and are loaded memory-mapped, so looking chunks
up in a base of many GiB costs page cache, not RAM: 32 bytes per chunk for the digests and 16 bytes
per distinct non-zero chunk for the lookup (sorted 8-byte key prefixes and their chunk numbers).
Building streams the digests to their file; only the lookup is sorted in RAM, and it holds
non-zero chunks only (about 16 bytes kept + 24 bytes while sorting per chunk: 10 MiB per GiB of
non-zero data), so indexing a big sparse base costs little.
"""

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np

from cloudlet.chunks import chunk_count
from cloudlet.errors import BaseVMError
from cloudlet.hashing import (
    DIGEST_SIZE,
    ZERO_CHUNK_DIGEST,
    iter_chunk_digests,
    iter_rows,
    take_rows,
    tree_digest,
)

LOG = logging.getLogger(__name__)

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
            tree = hashlib.sha256()
            keys: list[np.ndarray] = []
            chunks: list[np.ndarray] = []
            with open(tmp_digests, "wb") as f:
                header = {"descr": "|u1", "fortran_order": False, "shape": (n, DIGEST_SIZE)}
                np.lib.format.write_array_header_1_0(f, header)
                for first, d in iter_chunk_digests(image, size, progress):
                    raw = np.ascontiguousarray(d).tobytes()
                    f.write(raw)
                    tree.update(raw)
                    nonzero = np.flatnonzero((d != _ZERO).any(axis=1))
                    if len(nonzero):
                        keys.append(_keys(d[nonzero]))
                        chunks.append(nonzero.astype(np.uint64) + np.uint64(first))
            digests = np.load(tmp_digests, mmap_mode="r", allow_pickle=False)
            if digests.shape != (n, DIGEST_SIZE):
                raise BaseVMError(f"{image} changed size while it was indexed: index it again")
            lookup = _build_lookup(digests, _concat(keys), _concat(chunks))
            del digests, keys, chunks
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
        index = cls.load(directory, name)
        index.__dict__["image_digest"] = tree.hexdigest()  # hashed as written: no second pass
        return index

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


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def _build_lookup(
    digests: np.ndarray, keys: np.ndarray | None = None, chunks: np.ndarray | None = None
) -> np.ndarray:
    """(2, m) uint64: sorted keys and chunk numbers, first occurrence of each non-zero digest.

    `keys` and `chunks` (ascending) are those of the non-zero chunks when the caller already has
    them; otherwise they are derived from `digests` block by block.
    """
    if keys is None or chunks is None:
        key_parts, chunk_parts, start = [], [], 0
        for block in iter_rows(digests, 0, len(digests)):
            nonzero = np.flatnonzero((block != _ZERO).any(axis=1))
            key_parts.append(_keys(block[nonzero]))
            chunk_parts.append(nonzero.astype(np.uint64) + np.uint64(start))
            start += len(block)
        keys, chunks = _concat(key_parts), _concat(chunk_parts)
    sort = np.argsort(keys, kind="stable")  # ties stay in chunk order
    order = chunks[sort].astype(np.int64)
    sorted_keys = keys[sort]
    del sort, keys, chunks
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
            full = take_rows(digests, order[pos]).view(">u8").astype(np.uint64)
            sort = np.lexsort((order[pos], full[:, 3], full[:, 2], full[:, 1], full[:, 0]))
            full = full[sort]
            dup = (full[1:] == full[:-1]).all(axis=1)
            keep[pos[sort[1:][dup]]] = False
    return np.stack([sorted_keys[keep], order[keep].astype(np.uint64)])

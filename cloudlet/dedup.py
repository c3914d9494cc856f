"""Classify changed chunks by where their content can come from, cheapest source first.

Order: ZERO (nothing to ship), BASE_MEMORY, BASE_DISK (a chunk number in the base), SELF (same
bytes as an earlier NEW chunk of this overlay), NEW (payload). Base matches are found by digest and
then confirmed by comparing bytes, so a digest collision can never corrupt a synthesized VM.

Refs returned with each kind:
- ZERO: 0
- BASE_MEMORY / BASE_DISK: the chunk number in the base memory / disk image
- SELF: the (Target, chunk) pair of the first chunk classified NEW with the same content
- NEW: -1 (the overlay writer assigns the payload slot)
"""

import logging
import os
from pathlib import Path

import numpy as np

from cloudlet.chunks import CHUNK_SIZE, Kind, Target
from cloudlet.diff import ChangedBatch
from cloudlet.hashing import window_digests, zero_chunk_mask
from cloudlet.index import ChunkIndex

LOG = logging.getLogger(__name__)

Ref = int | tuple[Target, int]


class Deduplicator:
    """Dedup state of one overlay capture: the base indexes and every NEW chunk seen so far."""

    def __init__(
        self,
        base_memory: ChunkIndex,
        base_disk: ChunkIndex,
        base_memory_image: Path,
        base_disk_image: Path,
    ) -> None:
        self._bases = (
            (Kind.BASE_MEMORY, base_memory, base_memory_image),
            (Kind.BASE_DISK, base_disk, base_disk_image),
        )
        self._fds: dict[Kind, int] = {}
        self._seen: dict[bytes, tuple[Target, int]] = {}  # full digest -> first NEW chunk
        self._chunks = dict.fromkeys(Kind, 0)
        self._bytes = dict.fromkeys(Kind, 0)
        self.collisions = 0  # digest matched a base chunk but the bytes did not

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "Deduplicator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    @property
    def stats(self) -> dict[str, int]:
        """Chunks per kind so far, keyed by lower-case kind name ("zero", "base_memory", ...)."""
        return {kind.name.lower(): n for kind, n in self._chunks.items()}

    @property
    def bytes_stats(self) -> dict[str, int]:
        """Bytes per kind so far (a partial last chunk counts its real length)."""
        return {kind.name.lower(): n for kind, n in self._bytes.items()}

    def classify(self, target: Target, batch: ChangedBatch) -> list[tuple[Kind, Ref]]:
        """(kind, ref) of each chunk of `batch`, in batch order (see the module doc for refs)."""
        n = len(batch.chunks)
        data = batch.data
        if n == 0:
            return []
        kinds = np.full(n, Kind.NEW, dtype=np.int8)
        refs = np.full(n, -1, dtype=np.int64)
        sizes = np.full(n, CHUNK_SIZE, dtype=np.int64)
        sizes[-1] = len(data) - (n - 1) * CHUNK_SIZE
        zero = zero_chunk_mask(data)
        if sizes[-1] < CHUNK_SIZE:  # zero_chunk_mask calls a partial chunk non-zero: check it
            zero[-1] = not any(memoryview(data)[(n - 1) * CHUNK_SIZE :])
        kinds[zero] = Kind.ZERO
        refs[zero] = 0
        digests = window_digests(data)
        view = memoryview(data)
        for kind, index, image in self._bases:
            todo = np.flatnonzero(kinds == Kind.NEW)
            if not len(todo):
                break
            found = index.find_many(digests[todo])
            for i, ref in zip(todo[found >= 0].tolist(), found[found >= 0].tolist(), strict=True):
                chunk = view[i * CHUNK_SIZE : i * CHUNK_SIZE + int(sizes[i])]
                if os.pread(self._fd(kind, image), CHUNK_SIZE, ref * CHUNK_SIZE) == chunk:
                    kinds[i] = kind
                    refs[i] = ref
                else:
                    self.collisions += 1
                    LOG.warning("chunk digest matches %s chunk %d but bytes differ", kind.name, ref)
        out: list[tuple[Kind, Ref]] = []
        chunk_numbers = batch.chunks.tolist()
        for i, (k, r) in enumerate(zip(kinds.tolist(), refs.tolist(), strict=True)):
            kind = Kind(k)
            ref: Ref = r
            if kind is Kind.NEW:
                key = digests[i].tobytes()
                first = self._seen.get(key)
                if first is None:
                    self._seen[key] = (target, chunk_numbers[i])
                else:
                    kind, ref = Kind.SELF, first
            self._chunks[kind] += 1
            self._bytes[kind] += int(sizes[i])
            out.append((kind, ref))
        return out

    def _fd(self, kind: Kind, image: Path) -> int:
        fd = self._fds.get(kind)
        if fd is None:
            fd = self._fds[kind] = os.open(image, os.O_RDONLY)
        return fd

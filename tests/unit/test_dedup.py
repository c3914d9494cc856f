from pathlib import Path

import numpy as np
import pytest

from cloudlet.chunks import CHUNK_SIZE, Kind, Target
from cloudlet.dedup import Deduplicator
from cloudlet.diff import ChangedBatch
from cloudlet.index import ChunkIndex

C = CHUNK_SIZE


def random_chunks(n: int, seed: int) -> list[bytes]:
    data = np.random.default_rng(seed).integers(0, 256, n * C, dtype=np.uint8).tobytes()
    return [data[i * C : (i + 1) * C] for i in range(n)]


class Bases:
    """A base memory image and a base disk image sharing one chunk, both with zero chunks."""

    def __init__(self, tmp: Path) -> None:
        self.mem = random_chunks(8, 1)
        self.disk = random_chunks(8, 2)
        self.mem[2] = bytes(C)
        self.disk[5] = bytes(C)
        self.shared = self.mem[6]
        self.disk[3] = self.shared  # in both bases: must dedup to BASE_MEMORY
        self.disk[7] = self.disk[1]  # repeated in the base disk: first occurrence wins
        self.mem_path, self.disk_path = tmp / "memory.img", tmp / "disk.raw"
        self.mem_path.write_bytes(b"".join(self.mem) + b"tail")  # partial last chunk
        self.disk_path.write_bytes(b"".join(self.disk))
        self.dedup = Deduplicator(
            ChunkIndex.build(self.mem_path, tmp, "memory"),
            ChunkIndex.build(self.disk_path, tmp, "disk"),
            self.mem_path,
            self.disk_path,
        )


@pytest.fixture
def bases(tmp_path: Path) -> Bases:
    return Bases(tmp_path)


def batch(chunks: list[int], contents: list[bytes]) -> ChangedBatch:
    return ChangedBatch(np.array(chunks, dtype=np.int64), b"".join(contents))


def test_every_kind_in_dedup_order(bases: Bases) -> None:
    fresh = random_chunks(2, 3)
    contents = [
        bytes(C),  # ZERO even though both bases hold zero chunks
        bases.shared,  # in base memory and base disk: BASE_MEMORY
        bases.mem[4],
        bases.disk[1],  # BASE_DISK, first occurrence (1, not 7)
        fresh[0],  # NEW
        fresh[1],  # NEW
        fresh[0],  # SELF of the first NEW with these bytes
        bases.disk[4],
    ]
    got = bases.dedup.classify(Target.DISK, batch(list(range(100, 108)), contents))
    assert got == [
        (Kind.ZERO, 0),
        (Kind.BASE_MEMORY, 6),
        (Kind.BASE_MEMORY, 4),
        (Kind.BASE_DISK, 1),
        (Kind.NEW, -1),
        (Kind.NEW, -1),
        (Kind.SELF, (Target.DISK, 104)),
        (Kind.BASE_DISK, 4),
    ]
    assert all(type(k) is Kind for k, _ in got)
    stats = bases.dedup.stats
    assert stats == {"zero": 1, "base_memory": 2, "base_disk": 2, "self": 1, "new": 2}
    assert bases.dedup.bytes_stats["new"] == 2 * C


def test_self_spans_targets_and_batches(bases: Bases) -> None:
    fresh = random_chunks(1, 4)[0]
    first = bases.dedup.classify(Target.MEMORY, batch([7], [fresh]))
    again = bases.dedup.classify(Target.DISK, batch([0, 9], [fresh, fresh]))
    assert first == [(Kind.NEW, -1)]
    assert again == [(Kind.SELF, (Target.MEMORY, 7)), (Kind.SELF, (Target.MEMORY, 7))]


def test_partial_last_chunk(bases: Bases) -> None:
    """A short last chunk: zero if all zero, a base match only with the same short content."""
    assert bases.dedup.classify(Target.MEMORY, batch([3, 8], [bases.mem[0], bytes(100)])) == [
        (Kind.BASE_MEMORY, 0),
        (Kind.ZERO, 0),
    ]
    assert bases.dedup.classify(Target.MEMORY, batch([8], [b"tail"])) == [(Kind.BASE_MEMORY, 8)]
    assert bases.dedup.classify(Target.MEMORY, batch([8], [bases.mem[1][:10]])) == [(Kind.NEW, -1)]
    assert bases.dedup.bytes_stats["zero"] == 100


def test_base_match_is_confirmed_by_bytes(bases: Bases) -> None:
    """A base chunk whose bytes no longer match its indexed digest is shipped, not referenced."""
    with open(bases.disk_path, "r+b") as f:
        f.seek(4 * C)
        f.write(b"\xff" * 16)
    got = bases.dedup.classify(Target.DISK, batch([0], [bases.disk[4]]))
    assert got == [(Kind.NEW, -1)]
    assert bases.dedup.collisions == 1


def test_empty_batch(bases: Bases) -> None:
    assert bases.dedup.classify(Target.DISK, batch([], [])) == []

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloudlet.chunks import CHUNK_SIZE
from cloudlet.errors import BaseVMError
from cloudlet.hashing import ZERO_CHUNK_DIGEST, tree_digest
from cloudlet.index import ChunkIndex, _build_lookup

C = CHUNK_SIZE


def chunks_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + C] for i in range(0, len(data), C)]


def digest_array(chunks: list[bytes]) -> np.ndarray:
    return np.array([list(hashlib.sha256(c).digest()) for c in chunks], dtype=np.uint8)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """600 chunks (crosses a 1 MiB window), repeated content, zero chunks, partial last chunk."""
    rng = np.random.default_rng(1)
    data = bytearray(rng.integers(0, 256, 600 * C + 100, dtype=np.uint8).tobytes())
    data[10 * C : 20 * C] = bytes(10 * C)  # zero chunks
    data[300 * C : 301 * C] = data[5 * C : 6 * C]  # duplicate of chunk 5
    data[599 * C : 600 * C] = data[5 * C : 6 * C]  # and again, after a window boundary
    path = tmp_path / "image.raw"
    path.write_bytes(data)
    return path


def test_build_writes_digests_in_chunk_order(image: Path, tmp_path: Path) -> None:
    seen: list[int] = []
    index = ChunkIndex.build(image, tmp_path / "idx", "disk", progress=seen.append)
    expected = digest_array(chunks_of(image))
    assert index.size_chunks == 601
    assert np.array_equal(index.digests, expected)
    assert index.image_digest == tree_digest(expected)
    assert seen[-1] == image.stat().st_size
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert files == ["disk.digests.npy", "disk.lookup.npy"]  # no temp files left behind


def test_load_is_memory_mapped_and_equal(image: Path, tmp_path: Path) -> None:
    built = ChunkIndex.build(image, tmp_path, "memory")
    loaded = ChunkIndex.load(tmp_path, "memory")
    assert isinstance(loaded.digests, np.memmap)
    assert np.array_equal(loaded.digests, built.digests)
    assert loaded.image_digest == built.image_digest


def test_find_many_returns_first_occurrence_and_minus_one(image: Path, tmp_path: Path) -> None:
    index = ChunkIndex.build(image, tmp_path, "disk")
    chunks = chunks_of(image)
    query = digest_array([chunks[0], chunks[5], chunks[300], chunks[599], chunks[600]])
    unknown = digest_array([b"not in the image", bytes(C)])
    found = index.find_many(np.concatenate([query, unknown]))
    assert found.dtype == np.int64
    # duplicates map to the first chunk with that content; the zero chunk is never indexed
    assert found.tolist() == [0, 5, 5, 5, 600, -1, -1]


def test_find_many_every_chunk(image: Path, tmp_path: Path) -> None:
    index = ChunkIndex.build(image, tmp_path, "disk")
    found = index.find_many(np.asarray(index.digests))
    zero = (np.asarray(index.digests) == np.frombuffer(ZERO_CHUNK_DIGEST, np.uint8)).all(axis=1)
    assert (found[zero] == -1).all()
    hit = found[~zero]
    assert (hit >= 0).all()
    assert np.array_equal(np.asarray(index.digests)[hit], np.asarray(index.digests)[~zero])


def test_digests_sharing_a_key_are_told_apart() -> None:
    """Several distinct digests with the same 8-byte prefix: only the full digest decides."""
    rng = np.random.default_rng(2)
    digests = rng.integers(0, 256, (50, 32), dtype=np.uint8)
    digests[[3, 17, 40], :8] = digests[9, :8]  # four digests share one key
    digests[25] = digests[17]  # equal content: first occurrence (17) wins
    index = ChunkIndex(digests, _build_lookup(digests))
    assert index.find_many(digests).tolist() == [i if i != 25 else 17 for i in range(50)]
    impostor = digests[9].copy()
    impostor[31] ^= 1
    assert index.find_many(impostor[None]).tolist() == [-1]
    assert _build_lookup(digests).shape == (2, 49)


def test_empty_image(tmp_path: Path) -> None:
    empty = tmp_path / "empty.raw"
    empty.touch()
    index = ChunkIndex.build(empty, tmp_path, "disk")
    assert index.size_chunks == 0
    assert index.find_many(digest_array([b"x"])).tolist() == [-1]


def test_load_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BaseVMError, match="missing"):
        ChunkIndex.load(tmp_path, "disk")


def test_load_corrupt_is_a_clear_error(image: Path, tmp_path: Path) -> None:
    ChunkIndex.build(image, tmp_path, "disk")
    (tmp_path / "disk.lookup.npy").write_bytes(b"garbage" * 10)
    with pytest.raises(BaseVMError, match="corrupt"):
        ChunkIndex.load(tmp_path, "disk")


def test_load_wrong_shape_is_a_clear_error(image: Path, tmp_path: Path) -> None:
    ChunkIndex.build(image, tmp_path, "disk")
    np.save(tmp_path / "disk.digests.npy", np.zeros((4, 16), dtype=np.uint8))
    with pytest.raises(BaseVMError, match="expected"):
        ChunkIndex.load(tmp_path, "disk")


def test_rebuild_replaces_the_index(image: Path, tmp_path: Path) -> None:
    ChunkIndex.build(image, tmp_path, "disk")
    other = tmp_path / "other.raw"
    other.write_bytes(b"\x01" * 3 * C)
    index = ChunkIndex.build(other, tmp_path, "disk")
    assert ChunkIndex.load(tmp_path, "disk").size_chunks == 3
    assert index.find_many(digest_array([b"\x01" * C])).tolist() == [0]


_BUILD_CHILD = """
import sys
def status(key):  # kB; VmHWM is this process's own peak (ru_maxrss inherits the parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
from pathlib import Path
from cloudlet.index import ChunkIndex
start = status("VmRSS:")
index = ChunkIndex.build(Path(sys.argv[1]), Path(sys.argv[2]), "disk")
digest = index.image_digest
peak = status("VmHWM:")
print((peak - start) // 1024, digest)
"""


def test_indexing_a_big_sparse_image_needs_bounded_memory(tmp_path: Path) -> None:
    """An 8 GiB image (64 MiB of digests) is indexed without its digest array in RAM."""
    image = tmp_path / "big.raw"
    data = np.random.default_rng(5).integers(0, 256, 64 * C, dtype=np.uint8).tobytes()
    with open(image, "wb") as f:
        f.truncate(8 << 30)
        for offset in (0, 3 << 30, (8 << 30) - len(data)):
            f.seek(offset)
            f.write(data)
    result = subprocess.run(
        [sys.executable, "-c", _BUILD_CHILD, str(image), str(tmp_path / "idx")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    grew_mib, digest = result.stdout.split()
    assert int(grew_mib) < 24, f"peak RSS grew by {grew_mib} MiB"
    index = ChunkIndex.load(tmp_path / "idx", "disk")
    assert index.size_chunks == 2 << 20
    assert digest == tree_digest(np.asarray(index.digests))
    found = index.find_many(digest_array([data[i * C : (i + 1) * C] for i in range(64)]))
    assert found.tolist() == list(range(64))  # the first copy of each, not the later ones
    assert index.find_many(digest_array([bytes(C)])).tolist() == [-1]

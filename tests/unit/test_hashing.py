"""Image digests computed by streaming equal the definition over a materialised digest array."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloudlet import hashing
from cloudlet.chunks import CHUNK_SIZE
from cloudlet.hashing import (
    ZERO_CHUNK_DIGEST,
    image_chunk_digests,
    take_rows,
    tree_digest,
    tree_digest_with_overrides,
)

C = CHUNK_SIZE
_ZERO = np.frombuffer(ZERO_CHUNK_DIGEST, np.uint8)


def materialised(base: np.ndarray, n: int, chunks: np.ndarray, digests: np.ndarray) -> str:
    """The definition: base cut/extended with zero digests, overrides written in order."""
    out = np.empty((n, 32), np.uint8)
    m = min(n, len(base))
    out[:m] = base[:m]
    out[m:] = _ZERO
    for c, d in zip(chunks.tolist(), digests, strict=True):
        out[c] = d
    return hashlib.sha256(out.tobytes()).hexdigest()


@pytest.mark.parametrize("window", [7, 1 << 16])
@pytest.mark.parametrize(
    ("base_n", "n", "k"),
    [(100, 100, 10), (100, 250, 30), (250, 100, 30), (100, 100, 0), (0, 40, 5), (40, 0, 0)],
)
def test_overrides_equal_the_materialised_array(
    monkeypatch: pytest.MonkeyPatch, window: int, base_n: int, n: int, k: int
) -> None:
    monkeypatch.setattr(hashing, "DIGEST_WINDOW", window)  # many windows, or one
    rng = np.random.default_rng(base_n * 1000 + n + k)
    base = rng.integers(0, 256, (base_n, 32), dtype=np.uint8)
    chunks = rng.integers(0, max(n, 1), k) if n else np.empty(0, np.int64)  # unsorted, repeats
    digests = rng.integers(0, 256, (k, 32), dtype=np.uint8)
    got = tree_digest_with_overrides(base, n, chunks, digests)
    assert got == materialised(base, n, chunks, digests)
    if k == 0:
        assert got == tree_digest(
            np.concatenate([base[:n], np.tile(_ZERO, (n - min(n, base_n), 1))])
        )


def test_overrides_over_a_mapped_index_across_windows(tmp_path: Path) -> None:
    """A memory-mapped base (as ChunkIndex.load gives) of several 64k windows, left unchanged."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (150_000, 32), dtype=np.uint8)
    np.save(tmp_path / "d.npy", base)
    mapped = np.load(tmp_path / "d.npy", mmap_mode="r")
    chunks = np.sort(rng.choice(200_000, 500, replace=False))
    digests = rng.integers(0, 256, (500, 32), dtype=np.uint8)
    for n in (200_000, 150_000, 70_000):
        sel = chunks < n
        assert tree_digest_with_overrides(mapped, n, chunks[sel], digests[sel]) == materialised(
            base, n, chunks[sel], digests[sel]
        )
    assert tree_digest(mapped) == hashlib.sha256(base.tobytes()).hexdigest()
    idx = rng.integers(0, len(base), 1000)
    assert np.array_equal(take_rows(mapped, idx), base[idx])
    assert np.array_equal(mapped, base)


def test_override_outside_the_image_is_refused() -> None:
    with pytest.raises(ValueError, match="override"):
        tree_digest_with_overrides(np.zeros((4, 32), np.uint8), 4, np.array([4]), np.zeros((1, 32)))


def test_sparse_image_digests_skip_holes_and_keep_data(tmp_path: Path) -> None:
    """Holes (not read) hash as zero chunks; data and a partial zero tail hash as they are."""
    path = tmp_path / "sparse.raw"
    size = (5 << 20) + 100  # the last window ends in a partial chunk of zeros
    data = np.random.default_rng(3).integers(0, 256, 3 * C, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek((2 << 20) + 5)  # unaligned data in the middle of a window
        f.write(data)
    raw = path.read_bytes()
    want = [hashlib.sha256(raw[i : i + C]).digest() for i in range(0, size, C)]
    seen: list[int] = []
    got = image_chunk_digests(path, progress=seen.append)
    assert got.tobytes() == b"".join(want)
    assert seen[-1] == size


_TREE_CHILD = """
import sys
def status(key):  # kB; VmHWM is this process's own peak (ru_maxrss inherits the parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
import numpy as np
from cloudlet.hashing import tree_digest, tree_digest_with_overrides
digests = np.load(sys.argv[1], mmap_mode="r")
start = status("VmRSS:")
whole = tree_digest(digests)
grown = tree_digest_with_overrides(digests, len(digests) + 1000, np.array([5, 10**6]),
                                   np.ones((2, 32), np.uint8))
peak = status("VmHWM:")
print((peak - start) // 1024, whole, grown)
"""


def test_tree_digest_of_a_big_mapped_index_needs_bounded_memory(tmp_path: Path) -> None:
    """An 8 GiB image's 64 MiB digest file is hashed without 64 MiB becoming resident."""
    n = (8 << 30) // C
    path = tmp_path / "digests.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 32))
    out[::1000] = 7  # touch a few pages; the rest is a hole that reads as zeros
    del out
    result = subprocess.run(
        [sys.executable, "-c", _TREE_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    grew_mib, whole, grown = result.stdout.split()
    assert int(grew_mib) < 24, f"peak RSS grew by {grew_mib} MiB"  # the array is 64 MiB
    base = np.load(path)
    assert whole == tree_digest(base)
    chunks = np.array([5, 10**6])
    assert grown == materialised(base, n + 1000, chunks, np.ones((2, 32), np.uint8))

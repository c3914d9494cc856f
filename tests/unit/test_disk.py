import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cloudlet import disk as disk_mod
from cloudlet.chunks import CHUNK_SIZE
from cloudlet.diff import ChangedBatch, changed_chunks
from cloudlet.disk import allocated_ranges, changed_disk_chunks, disk_format, virtual_size
from cloudlet.errors import ImageError

pytestmark = pytest.mark.skipif(
    not (shutil.which("qemu-img") and shutil.which("qemu-io")), reason="needs qemu-img, qemu-io"
)

C = CHUNK_SIZE
K, M = 1 << 10, 1 << 20


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def qemu_io(image: Path, *commands: str) -> None:
    args = [a for c in commands for a in ("-c", c)]
    run("qemu-io", "-f", "qcow2", *args, str(image))


def cow(base: Path, top: Path, *opts: str) -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", *opts, "-b", str(base), "-F", "raw", str(top))
    return top


def collect(batches) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for b in batches:
        assert isinstance(b, ChangedBatch)
        for i, chunk in enumerate(b.chunks.tolist()):
            assert chunk not in out
            out[chunk] = bytes(b.chunk_data(i))
    return out


def oracle(base: Path, top: Path, tmp: Path) -> dict[int, bytes]:
    """The changes found the slow way: convert the whole qcow2 to raw and scan it."""
    flat = tmp / "flat.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(top), str(flat))
    return collect(changed_chunks(base, flat, flat.stat().st_size))


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """8 MiB raw base: random in the first 4 MiB, zeros (a hole) after."""
    path = tmp_path / "base.raw"
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        f.write(rng.integers(0, 256, 4 * M, dtype=np.uint8).tobytes())
        f.truncate(8 * M)
    return path


def chunks(offset: int, length: int) -> list[int]:
    return list(range(offset // C, (offset + length) // C))


def test_format_and_size(base: Path, tmp_path: Path) -> None:
    top = cow(base, tmp_path / "top.qcow2", "-o", "size=16M")
    assert disk_format(base) == "raw"
    assert disk_format(top) == "qcow2"
    assert virtual_size(base) == 8 * M
    assert virtual_size(top) == 16 * M


def test_allocated_ranges_keep_only_the_top_layer(base: Path, tmp_path: Path) -> None:
    top = cow(base, tmp_path / "top.qcow2")
    qemu_io(top, "write -P 0xab 1M 64k", "write -z 2M 64k")
    extents = allocated_ranges(top)
    assert [(e.start, e.length, e.data, e.zero) for e in extents] == [
        (1 * M, 64 * K, True, False),
        (2 * M, 64 * K, False, True),
    ]
    assert all(e.depth == 0 for e in extents)
    assert extents[0].offset is not None and extents[0].offset > 0  # host offset in the qcow2


def test_qcow2_changes_data_and_discards(base: Path, tmp_path: Path) -> None:
    top = cow(base, tmp_path / "top.qcow2")
    qemu_io(
        top,
        "write -P 0xab 1M 64k",  # data over random base: 16 chunks
        "write -z 2M 64k",  # zeroes over random base: 16 ZERO chunks
        "discard 3M 64k",  # discard over random base: 16 ZERO chunks
        "write -P 0xcd 6M 4k",  # 1 chunk into a 64k cluster over zeros: only that chunk
        "write -P 0 7M 64k",  # zeros written as data over zeros: no change
        "write -z 5M 64k",  # zeroes over zeros: no change
        f"write -P 0xab {M + 128 * K} 64k",  # a second cluster right after a COW'd one
    )
    got = collect(changed_disk_chunks(base, top))
    want = chunks(1 * M, 64 * K) + chunks(1 * M + 128 * K, 64 * K)
    want += chunks(2 * M, 64 * K) + chunks(3 * M, 64 * K) + [6 * M // C]
    assert sorted(got) == sorted(want)
    assert got[1 * M // C] == b"\xab" * C
    assert got[2 * M // C] == bytes(C) and got[3 * M // C] == bytes(C)
    assert got[6 * M // C] == b"\xcd" * C
    assert got == oracle(base, top, tmp_path)


def test_qcow2_reads_only_the_top_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 GiB base with a tiny top layer: only the allocated clusters are read."""
    base = tmp_path / "big.raw"
    with open(base, "wb") as f:
        f.truncate(1 << 30)
        f.seek(500 * M)
        f.write(b"\x11" * M)
    top = cow(base, tmp_path / "top.qcow2")
    qemu_io(
        top, "write -P 0x22 500M 64k", "write -P 0x33 900M 4k", f"write -z {500 * M + 512 * K} 64k"
    )
    read = 0
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        nonlocal read
        data = real_pread(fd, n, offset)
        read += len(data)
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    got = collect(changed_disk_chunks(base, top))
    monkeypatch.undo()
    want = chunks(500 * M, 64 * K) + chunks(500 * M + 512 * K, 64 * K) + [900 * M // C]
    assert sorted(got) == want
    assert read <= 4 * 3 * 64 * K  # base + qcow2 bytes of three clusters, not 1 GiB


def test_qcow2_larger_than_base(base: Path, tmp_path: Path) -> None:
    top = cow(base, tmp_path / "top.qcow2", "-o", "size=16M")
    qemu_io(top, "write -P 0x5a 9M 4k", "write -z 12M 64k")
    got = collect(changed_disk_chunks(base, top))
    assert sorted(got) == [9 * M // C]
    assert got == oracle(base, top, tmp_path)


def test_qcow2_smaller_than_base(base: Path, tmp_path: Path) -> None:
    top = cow(base, tmp_path / "top.qcow2", "-o", "size=2M")
    qemu_io(top, "write -P 0x5a 1M 4k")
    got = collect(changed_disk_chunks(base, top))
    assert sorted(got) == [1 * M // C]


def test_small_clusters_not_chunk_aligned(base: Path, tmp_path: Path) -> None:
    """512-byte clusters: a chunk is part top layer, part base."""
    top = cow(base, tmp_path / "top.qcow2", "-o", "cluster_size=512")
    qemu_io(
        top,
        f"write -P 0x77 {M + 512} 512",
        f"write -z {2 * M + 1024} 1536",
        f"write -P 0x01 {6 * M + 3584} 1k",
    )
    got = collect(changed_disk_chunks(base, top))
    assert sorted(got) == [1 * M // C, 2 * M // C, 6 * M // C, 6 * M // C + 1]
    assert got == oracle(base, top, tmp_path)


def test_compressed_clusters(base: Path, tmp_path: Path) -> None:
    top = cow(base, tmp_path / "top.qcow2")
    qemu_io(top, "write -c -P 0x77 4M 64k", "write -c -P 0x78 1M 64k")
    assert any(e.offset is None for e in allocated_ranges(top))
    got = collect(changed_disk_chunks(base, top))
    assert sorted(got) == chunks(1 * M, 64 * K) + chunks(4 * M, 64 * K)
    assert got[4 * M // C] == b"\x77" * C
    assert got == oracle(base, top, tmp_path)


def test_raw_disk_falls_back_to_a_full_scan(base: Path, tmp_path: Path) -> None:
    new = tmp_path / "new.raw"
    shutil.copyfile(base, new)
    with open(new, "r+b") as f:
        f.seek(7 * M)
        f.write(b"\x01")
    assert sorted(collect(changed_disk_chunks(base, new))) == [7 * M // C]


def test_wrong_backing_file_is_refused(base: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.raw"
    shutil.copyfile(base, other)
    top = cow(other, tmp_path / "top.qcow2")
    with pytest.raises(ImageError, match="not by the base disk"):
        list(changed_disk_chunks(base, top))


def test_qcow2_without_backing_is_refused(base: Path, tmp_path: Path) -> None:
    top = tmp_path / "alone.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(top), "8M")
    with pytest.raises(ImageError, match="no backing file"):
        list(changed_disk_chunks(base, top))


def test_relative_backing_path(base: Path, tmp_path: Path) -> None:
    sub = tmp_path / "run"
    sub.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base.raw", "-F", "raw",
        str(sub / "top.qcow2"))  # fmt: skip
    qemu_io(sub / "top.qcow2", "write -P 1 0 4k")
    assert sorted(collect(changed_disk_chunks(base, sub / "top.qcow2"))) == [0]


def test_missing_disk_is_a_clear_error(base: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        disk_mod.virtual_size(tmp_path / "nope.qcow2")

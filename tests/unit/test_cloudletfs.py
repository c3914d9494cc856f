"""cloudletfs on real FUSE mounts: chunk states, waiting for pending chunks, copy-on-write,
views under mmap, stats/trace files, bounded unmount, stale mounts of dead owners.

The overlay pipeline is played by the test itself (write_chunks / zero_chunks from a thread):
the tests are about the filesystem, not about where the chunks come from. Reads that go
through a page fault (mmap) run in a child process: a fault taken while holding the GIL would
wait for our own FUSE threads, which need the GIL.
"""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cloudlet.chunks import CHUNK_SIZE
from cloudlet.errors import FetchTimeout
from cloudlet.fsutil import fuse_mounts_under
from cloudlet.home import _start_time, remove_orphans
from cloudletfs import ChunkState, CloudletFS, ImageSpec, View

B, Z, P, W = ChunkState.BASE, ChunkState.ZERO, ChunkState.PENDING, ChunkState.WRITTEN
WAIT = 60.0  # generous bound for anything that must happen (loaded CI machine)


@pytest.fixture(autouse=True)
def no_mount_left(tmp_path):
    """Every test must leave neither a mount nor a serving thread behind."""
    yield
    left = fuse_mounts_under(tmp_path)
    for mountpoint, _ in left:
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True, timeout=30)
    assert not left, f"mounts left behind: {left}"
    assert not [t for t in threading.enumerate() if t.name.startswith("cloudletfs")]


class Demands:
    """on_demand callback that records frames and lets the test wait for them."""

    def __init__(self) -> None:
        self.frames: list[int] = []
        self._cond = threading.Condition()

    def __call__(self, frame: int) -> None:
        with self._cond:
            self.frames.append(frame)
            self._cond.notify_all()

    def wait_for(self, frame: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: frame in self.frames, WAIT), self.frames


class Reader(threading.Thread):
    """A read (or write) on the mount from another thread, so the test can act meanwhile."""

    def __init__(self, path: Path, offset: int, size: int = CHUNK_SIZE,
                 data: bytes | None = None) -> None:
        super().__init__(name="test-reader", daemon=True)
        self.path, self.offset, self.size, self.data = path, offset, size, data
        self.result: bytes | int | None = None
        self.error: OSError | None = None
        self.start()

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDONLY if self.data is None else os.O_WRONLY)
        try:
            if self.data is None:
                self.result = os.pread(fd, self.size, self.offset)
            else:
                self.result = os.pwrite(fd, self.data, self.offset)
        except OSError as e:
            self.error = e
        finally:
            os.close(fd)

    def finish(self) -> "Reader":
        self.join(WAIT)
        assert not self.is_alive(), "the read did not return"
        return self


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, CHUNK_SIZE), dtype=np.uint8)


def make_fs(tmp_path: Path, states: list[int], frames: dict[int, int] | None = None, *,
            size: int | None = None, views: list[View] = (), **kw) -> tuple[CloudletFS, bytes]:
    """A mounted fs with one image "disk.raw" over a random base; returns (fs, base bytes)."""
    n = len(states)
    size = n * CHUNK_SIZE if size is None else size
    base = np.random.default_rng(1).bytes(size)
    (tmp_path / "base").write_bytes(base)
    frame = np.full(n, -1, dtype=np.int32)
    for chunk, f in (frames or {}).items():
        frame[chunk] = f
    (tmp_path / "mnt").mkdir()
    kw.setdefault("on_demand", Demands())
    fs = CloudletFS(tmp_path / "mnt", [ImageSpec("disk.raw", size, tmp_path / "base",
                                                 tmp_path / "layer",
                                                 np.array(states, dtype=np.uint8), frame)],
                    views, **kw)
    fs.mount()
    return fs, base


def chunk(data: bytes, c: int) -> bytes:
    return data[c * CHUNK_SIZE : (c + 1) * CHUNK_SIZE]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_base_zero_present_and_written_chunks_read_back(tmp_path):
    size = 6 * CHUNK_SIZE - 100  # a partial last chunk
    fs, base = make_fs(tmp_path, [B, Z, P, P, B, P], {2: 0, 3: 0, 5: 1}, size=size)
    try:
        supplied = rows(3, 2)
        fs.write_chunks("disk.raw", np.array([2, 3, 5]), supplied)
        fs.zero_chunks("disk.raw", np.array([]))
        img = fs.path("disk.raw")
        assert img.stat().st_size == size
        data = img.read_bytes()
        expected = (chunk(base, 0) + bytes(CHUNK_SIZE) + supplied[:2].tobytes()
                    + chunk(base, 4) + supplied[2].tobytes()[: CHUNK_SIZE - 100])
        assert data == expected
        with open(img, "rb") as f:  # unaligned read across states
            f.seek(CHUNK_SIZE - 10)
            assert f.read(CHUNK_SIZE + 20) == expected[CHUNK_SIZE - 10 : 2 * CHUNK_SIZE + 10]
        assert sorted(os.listdir(fs.mountpoint)) == ["disk.raw", "stats.json", "trace.jsonl"]
        assert fs.stats()["chunks"]["disk.raw"] == {
            "base": 2, "zero": 1, "pending": 0, "present": 3, "written": 0}
    finally:
        fs.unmount()


def test_pending_read_demands_its_frame_and_returns_the_supplied_data(tmp_path):
    demands = Demands()
    fs, base = make_fs(tmp_path, [B, B, P, P, B, B, B, B], {2: 7, 3: 7}, on_demand=demands)
    try:
        reader = Reader(fs.path("disk.raw"), 2 * CHUNK_SIZE + 100, 200)
        demands.wait_for(7)
        assert reader.is_alive()  # still waiting for its chunk
        supplied = rows(2, 3)
        fs.write_chunks("disk.raw", np.array([2, 3]), supplied)
        reader.finish()
        assert reader.error is None
        assert reader.result == supplied[0].tobytes()[100:300]
        assert demands.frames == [7]  # once per wait, not once per wake-up
        stats = fs.stats()
        assert stats["demand_misses"] >= 1 and stats["frames_demanded"] >= 1
        assert stats["wait_seconds_max"] > 0 and not stats["failed"]
    finally:
        fs.unmount()


def test_without_readahead_a_read_waits_only_for_its_own_chunks(tmp_path):
    demands = Demands()
    fs, base = make_fs(tmp_path, [B, P, B, B], {1: 5}, on_demand=demands, max_readahead=0)
    try:  # with the kernel's default readahead this read would also wait for chunk 1
        assert Reader(fs.path("disk.raw"), 0).finish().result == chunk(base, 0)
        assert demands.frames == []
    finally:
        fs.unmount()


def test_missed_deadline_fails_the_read_and_the_filesystem(tmp_path):
    fs, base = make_fs(tmp_path, [B, P, B, B, B, B, B, B, P], {1: 0, 8: 1}, fetch_deadline=1.0)
    try:
        start = time.monotonic()
        reader = Reader(fs.path("disk.raw"), CHUNK_SIZE).finish()
        assert reader.error is not None and reader.error.errno == errno.EIO
        assert time.monotonic() - start < WAIT
        stats = fs.stats()
        assert stats["failed"] and "did not arrive within 1 s" in stats["error"]
        # once failed, every pending read fails at once; present chunks still read
        later = Reader(fs.path("disk.raw"), 8 * CHUNK_SIZE).finish()
        assert later.error is not None and later.error.errno == errno.EIO
        assert Reader(fs.path("disk.raw"), 0, 10).finish().result == base[:10]
    finally:
        fs.unmount()


def test_fail_wakes_a_waiting_reader_with_eio(tmp_path):
    demands = Demands()
    fs, _ = make_fs(tmp_path, [P, P], {0: 3, 1: 3}, on_demand=demands, fetch_deadline=600)
    try:
        reader = Reader(fs.path("disk.raw"), 0)
        demands.wait_for(3)
        fs.fail(FetchTimeout("the overlay source went away"))
        reader.finish()
        assert reader.error is not None and reader.error.errno == errno.EIO
        assert fs.stats()["error"] == "the overlay source went away"
    finally:
        fs.unmount()


def test_guest_writes_are_copy_on_write(tmp_path):
    demands = Demands()
    fs, base = make_fs(tmp_path, [B, B, Z, P, B, B, B, B], {3: 9}, on_demand=demands)
    base_digest = sha256(tmp_path / "base")
    img = fs.path("disk.raw")
    try:
        fd = os.open(img, os.O_RDWR)
        try:
            os.pwrite(fd, b"A" * 10, 100)  # partial, over BASE
            os.pwrite(fd, b"B" * CHUNK_SIZE, CHUNK_SIZE)  # whole chunk over BASE
            os.pwrite(fd, b"C" * 20, 2 * CHUNK_SIZE + 50)  # partial, over ZERO
            with pytest.raises(OSError) as exc:
                os.ftruncate(fd, 4 * CHUNK_SIZE)
            assert exc.value.errno in (errno.EPERM, errno.EINVAL)
        finally:
            os.close(fd)
        # a partial write into a pending chunk waits for it, then merges
        writer = Reader(img, 3 * CHUNK_SIZE + 10, data=b"D" * 100)
        demands.wait_for(9)
        assert writer.is_alive()
        supplied = rows(1, 4)
        fs.write_chunks("disk.raw", np.array([3]), supplied)
        assert writer.finish().error is None and writer.result == 100

        expected = bytearray(base)
        expected[100:110] = b"A" * 10
        expected[CHUNK_SIZE : 2 * CHUNK_SIZE] = b"B" * CHUNK_SIZE
        expected[2 * CHUNK_SIZE : 3 * CHUNK_SIZE] = bytes(CHUNK_SIZE)
        expected[2 * CHUNK_SIZE + 50 : 2 * CHUNK_SIZE + 70] = b"C" * 20
        expected[3 * CHUNK_SIZE : 4 * CHUNK_SIZE] = supplied[0].tobytes()
        expected[3 * CHUNK_SIZE + 10 : 3 * CHUNK_SIZE + 110] = b"D" * 100
        assert img.read_bytes() == bytes(expected)
        assert sha256(tmp_path / "base") == base_digest
        assert fs.stats()["chunks"]["disk.raw"]["written"] == 4
        assert [r["op"] for r in fs.trace() if r["chunk"] == 3] == ["write"]
    finally:
        fs.unmount()


def test_overlay_chunks_never_overwrite_the_guests(tmp_path):
    demands = Demands()
    fs, _ = make_fs(tmp_path, [P, P, P, P], {0: 0, 1: 0, 2: 0, 3: 0}, on_demand=demands,
                    fetch_deadline=600)
    img = fs.path("disk.raw")
    try:
        # whole-chunk writes into pending chunks need no wait
        fd = os.open(img, os.O_WRONLY)
        try:
            os.pwrite(fd, b"G" * 2 * CHUNK_SIZE, 0)
        finally:
            os.close(fd)
        assert demands.frames == []
        fs.write_chunks("disk.raw", np.array([0, 1, 2]), rows(3, 5))
        fs.zero_chunks("disk.raw", np.array([1, 3]))
        data = img.read_bytes()
        assert data[: 2 * CHUNK_SIZE] == b"G" * 2 * CHUNK_SIZE
        assert data[2 * CHUNK_SIZE : 3 * CHUNK_SIZE] == rows(3, 5)[2].tobytes()
        assert data[3 * CHUNK_SIZE :] == bytes(CHUNK_SIZE)
    finally:
        fs.unmount()


_MMAP_READER = """
import hashlib, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
size = os.fstat(fd).st_size
m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
digest = hashlib.sha256(m).hexdigest()
m[0:4] = b"XXXX"  # private: never reaches the file
print(digest, size)
"""


def test_mmap_private_of_a_view_shows_the_image_window(tmp_path):
    view = View("memory.ram", "disk.raw", 2 * CHUNK_SIZE, 5 * CHUNK_SIZE)
    fs, base = make_fs(tmp_path, [B, B, B, Z, P, B, P, B], {4: 0, 6: 1}, views=[view])
    try:
        supplied = rows(2, 6)
        fs.write_chunks("disk.raw", np.array([4, 6]), supplied)
        expected = (chunk(base, 2) + bytes(CHUNK_SIZE) + supplied[0].tobytes()
                    + chunk(base, 5) + supplied[1].tobytes())
        out = subprocess.run([sys.executable, "-c", _MMAP_READER, str(fs.path("memory.ram"))],
                             capture_output=True, text=True, timeout=WAIT, check=True)
        assert out.stdout.split() == [hashlib.sha256(expected).hexdigest(), str(len(expected))]
        assert fs.path("memory.ram").read_bytes() == expected
        with pytest.raises(OSError) as exc:  # views are read-only windows
            fd = os.open(fs.path("memory.ram"), os.O_WRONLY)
            try:
                os.pwrite(fd, b"x", 0)
            finally:
                os.close(fd)
        assert exc.value.errno == errno.EROFS
    finally:
        fs.unmount()


def test_stats_and_trace_files_parse(tmp_path):
    fs, _ = make_fs(tmp_path, [B, P, Z, B], {1: 4})
    try:
        fs.write_chunks("disk.raw", np.array([1]), rows(1, 7))
        fs.path("disk.raw").read_bytes()
        stats = json.loads(fs.path("stats.json").read_text())
        assert stats["reads"] >= 1 and stats["read_bytes"] >= 4 * CHUNK_SIZE
        assert stats["chunks"]["disk.raw"]["present"] == 1
        assert {"demand_misses", "frames_demanded", "wait_seconds_total", "wait_seconds_max",
                "failed"} <= stats.keys()
        lines = fs.path("trace.jsonl").read_text().splitlines()
        trace = [json.loads(line) for line in lines]
        assert trace == fs.trace()
        assert sorted(r["chunk"] for r in trace) == [0, 1, 2, 3]  # first access only
        first = {r["chunk"]: r for r in trace}
        assert first[1]["state"] == "present" and first[2]["state"] == "zero"
        assert all(r["image"] == "disk.raw" and r["op"] == "read" and r["t"] >= 0
                   for r in trace)
        assert set(trace[0]) == {"t", "image", "chunk", "op", "state", "frame", "wait"}
    finally:
        fs.unmount()


def test_unmount_while_a_read_waits_does_not_hang(tmp_path):
    demands = Demands()
    fs, _ = make_fs(tmp_path, [P, B], {0: 2}, on_demand=demands, fetch_deadline=600)
    reader = Reader(fs.path("disk.raw"), 0)
    demands.wait_for(2)
    fs.unmount(timeout=30)
    reader.finish()
    assert reader.error is not None and reader.error.errno in (errno.EIO, errno.ENOTCONN)
    assert not fuse_mounts_under(tmp_path)


_MOUNT_HERE = """
import os, numpy as np
from pathlib import Path
from cloudletfs import CloudletFS, ImageSpec
run = Path("run")
run.mkdir()
(run / "mnt").mkdir()
with CloudletFS(run / "mnt", [ImageSpec("disk.raw", 8192, None, run / "layer",
                np.full(2, 2, np.uint8), np.zeros(2, np.int32))], on_demand=print) as fs:
    print(os.getcwd(), flush=True)
"""


def test_mount_keeps_the_working_directory_and_prints_no_libfuse_noise(tmp_path):
    """Relative paths a user gave (--trace-out t.jsonl, the overlay) must still name the same
    files once the mount is up; and a mount prints nothing on the user's terminal."""
    done = subprocess.run([sys.executable, "-c", _MOUNT_HERE], cwd=tmp_path, capture_output=True,
                          text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path)
    assert done.stderr == ""


_OWNER = """
import sys, time, numpy as np
from pathlib import Path
from cloudletfs import CloudletFS, ImageSpec
run = Path(sys.stdin.readline().strip())  # named after this process, so made by the test
(run / "mnt").mkdir()
fs = CloudletFS(run / "mnt", [ImageSpec("disk.raw", 8192, None, run / "layer",
                np.full(2, 2, np.uint8), np.zeros(2, np.int32))], on_demand=print)
fs.mount()
print("mounted", flush=True)
time.sleep(600)
"""


def test_stale_mount_of_a_dead_owner_is_detached_when_its_run_dir_is_swept(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:  # the run dir carries the owner's pid and start time, as CloudletHome names them
        run = runs / f"synthesis-pid{owner.pid}.{_start_time(owner.pid)}.x"
        run.mkdir()
        owner.stdin.write(f"{run}\n")
        owner.stdin.flush()
        assert owner.stdout.readline().strip() == "mounted"
        assert [mp for mp, _ in fuse_mounts_under(run)] == [run / "mnt"]
        owner.send_signal(signal.SIGKILL)  # no chance to unmount
        owner.wait(WAIT)
    finally:
        owner.kill()
        owner.stdin.close()
        owner.stdout.close()
    assert fuse_mounts_under(run)  # stale: still mounted, nobody serves it
    assert remove_orphans(runs) == [run]
    assert not fuse_mounts_under(tmp_path)
    assert not run.exists()

"""Which FUSE binding should cloudletfs use? mfusepy (ctypes over libfuse3, operations on
libfuse's threads, as cloudletfs runs it) against pyfuse3 (Cython over libfuse3's low-level API,
operations as trio tasks), on the same minimal read-only filesystem.

The filesystem has one file, disk.raw, answered with os.pread of a real (not sparse) backing
file on local disk. Each binding is mounted in a child process of its own (pyfuse3 keeps its
session in module globals: one mount per process). pyfuse3 reads go through
trio.to_thread.run_sync, as a read that may block (cloudletfs waits for pending chunks) must not
stall the other requests; `pyfuse3-inline` preads on the trio loop itself, to show what the
thread hop costs. The reads are fuse_latency.py's: a separate reader process, random aligned
preads, page cache dropped before each (POSIX_FADV_DONTNEED), readahead off (FADV_RANDOM);
"cold" drops the backing file's cache too, "backing cached" reads it whole first. Median and
90th percentile in microseconds, their ratio to the same reads of the local file, and the
microseconds the binding adds to the median.

pyfuse3 is not a dependency of the project; install it into the venv only to run this:

    apt-get install libfuse3-dev pkg-config && .venv/bin/pip install pyfuse3
    .venv/bin/python benchmarks/fuse_binding.py [--mib 256] [--reads 300] [--binding B]...
"""

import argparse
import contextlib
import errno
import importlib.util
import os
import select
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fuse_latency import SIZES, measure

from cloudlet.fsutil import detach_mounts_under
from cloudletfs.mount import FuseMount, mfusepy

BINDINGS = ("mfusepy", "pyfuse3", "pyfuse3-inline")
FILE = "disk.raw"
READY_TIMEOUT = 30.0


def serve_mfusepy(backing: str, mountpoint: str) -> None:
    """Child: mount with mfusepy through cloudletfs's FuseMount (libfuse loop in a thread,
    operations on libfuse's worker threads) until stdin closes."""
    fd = os.open(backing, os.O_RDONLY)
    size = os.fstat(fd).st_size
    now = time.time_ns()

    class Ops(mfusepy.Operations):
        use_ns = True

        def init_with_config(self, conn: object, config: object) -> None:
            mount.mark_ready()

        def getattr(self, path: str, fh: object = None) -> dict:
            times = {"st_atime": now, "st_mtime": now, "st_ctime": now}
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o700, "st_nlink": 2, **times}
            if path != "/" + FILE:
                raise mfusepy.FuseOSError(errno.ENOENT)
            return {"st_mode": stat.S_IFREG | 0o400, "st_nlink": 1, "st_size": size,
                    "st_blocks": -(-size // 512), "st_blksize": 4096, **times}

        def readdir(self, path: str, fh: object) -> list[str]:
            return [".", "..", FILE]

        def open(self, path: str, fi: object) -> int:
            self.getattr(path)
            return 0

        def read(self, path: str, size: int, offset: int, fh: object) -> bytes:
            return os.pread(fd, size, offset)

    mount = FuseMount(Path(mountpoint), Ops(), fsname="bench_mfusepy")
    mount.start(READY_TIMEOUT)
    try:
        print("ready", flush=True)
        sys.stdin.read()
    finally:
        mount.stop(READY_TIMEOUT)


def serve_pyfuse3(backing: str, mountpoint: str, threaded: bool) -> None:
    """Child: mount with pyfuse3 (one trio loop) until stdin closes; reads in trio's worker
    threads if `threaded`, else on the loop."""
    import pyfuse3
    import trio

    fd = os.open(backing, os.O_RDONLY)
    size = os.fstat(fd).st_size
    now = time.time_ns()
    file_inode = pyfuse3.ROOT_INODE + 1

    class Ops(pyfuse3.Operations):
        def init(self) -> None:
            print("ready", flush=True)  # FUSE_INIT reached the loop: requests flow

        async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = inode
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = now
            attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
            if inode == pyfuse3.ROOT_INODE:
                attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o700, 2
            elif inode == file_inode:
                attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFREG | 0o400, 1, size
                attr.st_blocks, attr.st_blksize = -(-size // 512), 4096
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attr

        async def lookup(self, parent: int, name: bytes, ctx: object) -> pyfuse3.EntryAttributes:
            if parent != pyfuse3.ROOT_INODE or name != FILE.encode():
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.getattr(file_inode)

        async def opendir(self, inode: int, ctx: object) -> int:
            return inode

        async def readdir(self, fh: int, start_id: int, token: object) -> None:
            if start_id == 0:
                pyfuse3.readdir_reply(token, FILE.encode(), await self.getattr(file_inode), 1)

        async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=inode)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            if threaded:
                return await trio.to_thread.run_sync(os.pread, fd, size, off)
            return os.pread(fd, size, off)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            await trio.to_thread.run_sync(sys.stdin.read)
            pyfuse3.terminate()

    name = "bench_pyfuse3"
    pyfuse3.init(Ops(), mountpoint, {"default_permissions", f"fsname={name}", f"subtype={name}"})
    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)


@contextlib.contextmanager
def served(binding: str, backing: Path, mountpoint: Path) -> Iterator[Path]:
    """Mount `backing` with `binding` in a child process; unmounted on exit, also on errors.
    Closing the child's stdin asks it to unmount; if it does not, the mount is detached and
    the child killed."""
    mountpoint.mkdir()
    child = subprocess.Popen([sys.executable, __file__, "--serve", binding, str(backing),
                              str(mountpoint)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], READY_TIMEOUT)
        if not ready or child.stdout.readline().strip() != "ready":
            raise SystemExit(f"{binding} did not mount {mountpoint} within {READY_TIMEOUT:g} s")
        yield mountpoint / FILE
    finally:
        child.stdin.close()
        try:
            child.wait(READY_TIMEOUT)
        except subprocess.TimeoutExpired:
            detach_mounts_under(mountpoint)
            child.kill()
            child.wait()
        child.stdout.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="file size")
    ap.add_argument("--reads", type=int, default=300, help="reads per measurement")
    ap.add_argument("--binding", action="append", choices=BINDINGS,
                    help="binding to measure (repeatable; default: all)")
    args = ap.parse_args()
    bindings = args.binding or list(BINDINGS)
    if any(b.startswith("pyfuse3") for b in bindings) and not importlib.util.find_spec("pyfuse3"):
        raise SystemExit("pyfuse3 is not installed: apt-get install libfuse3-dev pkg-config && "
                         ".venv/bin/pip install pyfuse3 (or pass --binding mfusepy)")
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:  # disk-backed, not tmpfs
        work = Path(tmp)
        backing = work / "backing.img"
        with open(backing, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
        try:
            with contextlib.ExitStack() as stack:
                targets = {"local file": backing} | {
                    b: stack.enter_context(served(b, backing, work / b)) for b in bindings}
                for label, nbytes in SIZES.items():
                    for cond in ("cold", "backing cached"):
                        cold = cond == "cold"
                        warm = [] if cold else [backing]
                        for where, path in targets.items():
                            drop = [path, backing] if cold else [path]
                            if path == backing:
                                drop = drop[1:]
                            r = measure(path, nbytes, args.reads, drop, warm)
                            rows.append((label, cond, where, r))
        finally:
            detach_mounts_under(work)  # never remove a directory with a mount below it
    print(f"{'read':6} {'page cache':15} {'where':15} {'median µs':>10} {'p90 µs':>9} "
          f"{'× local (median / p90)':>23} {'+ µs median':>12}")
    local = {(label, cond): r for label, cond, where, r in rows if where == "local file"}
    for label, cond, where, r in rows:
        base = local[label, cond]
        ratio = f"{r['median_us'] / base['median_us']:.1f} / {r['p90_us'] / base['p90_us']:.1f}"
        added = r["median_us"] - base["median_us"]
        print(f"{label:6} {cond:15} {where:15} {r['median_us']:>10} {r['p90_us']:>9} {ratio:>23}"
              f" {added:>12.0f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        binding, backing, mountpoint = sys.argv[2:5]
        if binding == "mfusepy":
            serve_mfusepy(backing, mountpoint)
        else:
            serve_pyfuse3(backing, mountpoint, threaded=binding == "pyfuse3")
    else:
        main()

"""What does serving images through cloudletfs cost per read? 4 KiB and 1 MiB reads through the
mount against the same reads of a local file.

A separate reader process (like QEMU) does random, aligned preads; before each one it drops the
page cache of the file it reads (posix_fadvise DONTNEED) and, for "cold", of the file behind it
too, so every read reaches the filesystem. Readahead is off (FADV_RANDOM) in both cases, so a
4 KiB read is one 4 KiB request. Median and 90th percentile in microseconds.

    .venv/bin/python benchmarks/fuse_latency.py [--mib 256] [--reads 300]
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cloudlet.chunks import CHUNK_SIZE, chunk_count
from cloudletfs import ChunkState, CloudletFS, ImageSpec

SIZES = {"4 KiB": 4096, "1 MiB": 1 << 20}


def reader(path: str, size: int, reads: int, drop: list[str], warm: list[str]) -> None:
    """Child process: time `reads` random preads of `size` bytes of `path`; before each, the
    page cache of the `drop` files is dropped. `warm` files are read whole first."""
    for name in warm:
        with open(name, "rb") as f:
            while f.read(1 << 24):
                pass
    fd = os.open(path, os.O_RDONLY)
    drop_fds = [os.open(name, os.O_RDONLY) for name in drop]
    length = os.fstat(fd).st_size
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    rng = random.Random(size)
    times = []
    for _ in range(reads):
        offset = rng.randrange(0, length - size, CHUNK_SIZE)
        for d in drop_fds:
            os.posix_fadvise(d, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        if len(os.pread(fd, size, offset)) != size:
            raise SystemExit(f"short read at {offset}")
        times.append((time.perf_counter() - start) * 1e6)
    times.sort()
    print(json.dumps({"median_us": round(statistics.median(times), 1),
                      "p90_us": round(times[int(len(times) * 0.9)], 1)}))


def measure(path: Path, size: int, reads: int, drop: list[Path], warm: list[Path]) -> dict:
    """Run the reader in its own process, as QEMU would be."""
    cmd = [sys.executable, __file__, "--reader", json.dumps(
        [str(path), size, reads, [str(d) for d in drop], [str(w) for w in warm]])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="image size")
    ap.add_argument("--reads", type=int, default=300, help="reads per measurement")
    args = ap.parse_args()
    size = args.mib << 20
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:  # disk-backed, not tmpfs
        work = Path(tmp)
        base = work / "base.img"
        with open(base, "wb") as f:
            rng = np.random.default_rng(0)
            for _ in range(args.mib):
                f.write(rng.bytes(1 << 20))
        n = chunk_count(size)
        mnt = work / "mnt"
        mnt.mkdir()
        fs = CloudletFS(mnt, [ImageSpec("disk.raw", size, base, work / "layer",
                                        np.full(n, ChunkState.BASE, np.uint8),
                                        np.full(n, -1, np.int32))],
                        on_demand=lambda frame: None, trace=False)
        fs.mount()
        image = fs.path("disk.raw")
        try:
            rows = []
            for label, nbytes in SIZES.items():
                cases = [
                    ("local file, cold", base, [base], []),
                    ("cloudletfs, backing cold", image, [image, base], []),
                    ("local file, page cache", base, [], [base]),
                    ("cloudletfs, backing in page cache", image, [image], [base]),
                ]
                for where, path, drop, warm in cases:
                    rows.append((label, where, measure(path, nbytes, args.reads, drop, warm)))
        finally:
            fs.unmount()
    print(f"{'read':6} {'where':36} {'median µs':>10} {'p90 µs':>10}")
    for label, where, r in rows:
        print(f"{label:6} {where:36} {r['median_us']:>10} {r['p90_us']:>10}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reader"]:
        reader(*json.loads(sys.argv[2]))
    else:
        main()

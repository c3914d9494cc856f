"""Do per-chunk binary deltas pay? Measured on the chunks a real customisation changed.

For every changed chunk that dedup could not remove (NEW), compare what ships:
raw chunks (what cloudlet does), XOR against the base chunk at the same place, and bsdiff4
against that base chunk; each stream cut into ~1 MiB frames and zstd-3 compressed, like
overlay frames. Needs `pip install bsdiff4` (not a cloudlet dependency: this is the measurement
that decides whether it should be).

    .venv/bin/python benchmarks/delta_encoders.py [--workload app|demo]
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import bsdiff4
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overlay_vs_naive import WORKLOADS, capture, guest_base, guest_of  # noqa: E402

from cloudlet.chunks import CHUNK_SIZE, Kind, Target  # noqa: E402
from cloudlet.codecs import get_codec  # noqa: E402
from cloudlet.dedup import Deduplicator  # noqa: E402
from cloudlet.diff import changed_chunks  # noqa: E402
from cloudlet.disk import changed_disk_chunks  # noqa: E402
from cloudlet.index import ChunkIndex  # noqa: E402
from cloudlet.memory.stream import parse_stream  # noqa: E402

FRAME = 1 << 20


def framed_size(records: list[bytes]) -> int:
    codec, size, frame = get_codec("zstd"), 0, bytearray()
    for r in records:
        frame += r
        if len(frame) >= FRAME:
            size += len(codec.compress(bytes(frame)))
            frame.clear()
    return size + (len(codec.compress(bytes(frame))) if frame else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=WORKLOADS, default="app")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cloudlet-delta-"))
    try:
        _, base = guest_base(work, guest=guest_of(args.workload))
        stream, disk = capture(base, args.workload, work)
        memory = work / "memory.img"
        with open(stream, "rb") as src:
            layout = parse_stream(src, memory)
        dedup = Deduplicator(
            ChunkIndex.load(base.path, "memory"),
            ChunkIndex.load(base.path, "disk"),
            base.memory_path,
            base.disk_path,
        )
        raw, xor, bsd = [], [], []
        t_xor = t_bsd = 0.0
        for target, batches, base_image in (
            (
                Target.MEMORY,
                changed_chunks(base.memory_path, memory, layout.size),
                base.memory_path,
            ),
            (Target.DISK, changed_disk_chunks(base.disk_path, disk), base.disk_path),
        ):
            with open(base_image, "rb") as b:
                for batch in batches:
                    for i, (kind, _) in enumerate(dedup.classify(target, batch)):
                        if kind is not Kind.NEW:
                            continue
                        new = bytes(batch.chunk_data(i))
                        b.seek(int(batch.chunks[i]) * CHUNK_SIZE)
                        old = b.read(len(new)).ljust(len(new), b"\0")
                        raw.append(new)
                        start = time.perf_counter()
                        xor.append(
                            (np.frombuffer(new, np.uint8) ^ np.frombuffer(old, np.uint8)).tobytes()
                        )
                        t_xor += time.perf_counter() - start
                        start = time.perf_counter()
                        bsd.append(bsdiff4.diff(old, new))
                        t_bsd += time.perf_counter() - start
        sizes = {"raw": framed_size(raw), "xor": framed_size(xor), "bsdiff4": framed_size(bsd)}
        print(f"{len(raw)} new chunks ({len(raw) * CHUNK_SIZE / 2**20:.1f} MiB), zstd-3 frames:")
        for name, seconds in (("raw", 0.0), ("xor", t_xor), ("bsdiff4", t_bsd)):
            print(
                f"  {name:<8} {sizes[name] / 1e6:7.2f} MB"
                f"  ({sizes[name] / sizes['raw']:.2f} of raw)"
                f"  encode {seconds:6.2f} s"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

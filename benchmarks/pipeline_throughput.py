"""Local apply throughput: the staged pipeline (Pipeline + FileSink) against the old
single-prefetch apply_overlay, on the same ~200 MiB overlay of random and repeated data.

The old implementation is loaded from git (`--baseline-rev`, the last commit before the
pipeline). Throughput is MB/s of raw frame data (decompressed slots) per whole apply call
(copying the base, frames, verification, rename). Runs alternate; best and median are reported.

    .venv/bin/python benchmarks/pipeline_throughput.py [--mib 200] [--runs 3] [--json out.json]
"""

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloudlet.chunks import CHUNK_SIZE, Target  # noqa: E402
from cloudlet.hashing import image_chunk_digests, tree_digest, window_digests  # noqa: E402
from cloudlet.overlay.apply import apply_overlay  # noqa: E402
from cloudlet.overlay.reader import OverlayReader  # noqa: E402
from cloudlet.overlay.writer import OverlayWriter  # noqa: E402

BASE_ID = "be" * 32
BASELINE_REV = "5ff22ef"  # apply.py before the pipeline


def build(root: Path, mib: int) -> None:
    """Base images of 1 MiB each; a result disk of `mib` MiB, every chunk NEW: half random
    (incompressible), half a repeated text-like pattern (compresses ~10x)."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    (root / "disk.raw").write_bytes(base)
    (root / "memory.img").write_bytes(base[::-1])
    pattern = (b"GET /index.html HTTP/1.1 200 OK cache hit " * 100)[:CHUNK_SIZE]
    size = mib << 20
    window = 1 << 20
    digests = []
    with OverlayWriter(root / "big.overlay", BASE_ID) as w:
        for start in range(0, size, window):
            if (start // window) % 2:
                block = rng.integers(0, 256, window, dtype=np.uint8).tobytes()
            else:
                block = b"".join(
                    pattern[:-8] + (start + i).to_bytes(8, "little")
                    for i in range(0, window, CHUNK_SIZE)
                )
            for i in range(0, window, CHUNK_SIZE):
                w.add_new(Target.DISK, (start + i) // CHUNK_SIZE, block[i : i + CHUNK_SIZE])
            digests.append(window_digests(block))
        w.set_image(Target.DISK, size, tree_digest(np.concatenate(digests)))
        w.set_image(Target.MEMORY, len(base), tree_digest(image_chunk_digests(root / "memory.img")))
        w.close()


def load_baseline(rev: str):  # noqa: ANN201 - a module object
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:cloudlet/overlay/apply.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spec = importlib.util.spec_from_loader("baseline_apply", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{rev}:cloudlet/overlay/apply.py", "exec"), module.__dict__)  # noqa: S102
    return module.apply_overlay


def run(apply, root: Path) -> float:  # noqa: ANN001
    out = root / "out"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    with OverlayReader.open(root / "big.overlay") as reader:
        apply(
            reader,
            root / "disk.raw",
            image_chunk_digests(root / "disk.raw"),
            root / "memory.img",
            image_chunk_digests(root / "memory.img"),
            out / "disk.raw",
            out / "memory.img",
            BASE_ID,
        )
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        build(root, args.mib)
        reader = OverlayReader.open(root / "big.overlay")
        raw = reader.slot_count * CHUNK_SIZE
        print(
            f"overlay: {len(reader.frames)} frames, {raw / 1e6:.0f} MB raw, "
            f"{(root / 'big.overlay').stat().st_size / 1e6:.0f} MB on disk "
            f"(built in {time.perf_counter() - t:.1f} s)"
        )
        reader.close()
        impls = {"old apply_overlay": load_baseline(args.baseline_rev), "pipeline": apply_overlay}
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(args.runs):
            for name, apply in impls.items():
                times[name].append(run(apply, root))
        result: dict = {}
        for name, ts in times.items():
            best, median = min(ts), statistics.median(ts)
            result[name] = {"seconds": ts, "mb_per_s": raw / best / 1e6}
            print(
                f"{name:>18}: best {best:.2f} s = {raw / best / 1e6:6.1f} MB/s, "
                f"median {median:.2f} s = {raw / median / 1e6:6.1f} MB/s"
            )
        for key, pick in (("ratio_best", min), ("ratio_median", statistics.median)):
            result[key] = pick(times["old apply_overlay"]) / pick(times["pipeline"])
        print(
            f"pipeline / old throughput: best {result['ratio_best']:.2f}x, "
            f"median {result['ratio_median']:.2f}x"
        )
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

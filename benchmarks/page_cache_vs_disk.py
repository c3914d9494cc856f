"""How much guest memory duplicates disk data that is not 4 KiB-aligned on the disk?

A file written in the guest sits both on its disk and in its page cache. The overlay's dedup
compares 4 KiB chunks at 4 KiB-aligned offsets, so on a filesystem with 1 KiB blocks (the test
guest's small ext4) a page-cache page usually matches no aligned disk chunk and is shipped twice.
This measures, for one customised VM (a file of random bytes written to its disk), how many
non-zero memory pages equal 4 KiB of its disk at 4 KiB, 1 KiB and 512-byte steps: what dedup
at each step could save. Real QEMU guest (TCG), real files. `--guest distro` measures the
distribution guest instead (tools/distroguest: ext4 with 4 KiB blocks, the file written over ssh).

    .venv/bin/python benchmarks/page_cache_vs_disk.py [--guest testguest|distro] [--mib 32]
                                                      [--json FILE]
"""

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloudlet.basevm.create import BaseSpec, Readiness, create_base  # noqa: E402
from cloudlet.chunks import CHUNK_SIZE  # noqa: E402
from cloudlet.disk import convert_to_raw  # noqa: E402
from cloudlet.home import CloudletHome  # noqa: E402
from cloudlet.hypervisor.qemu import Forward, free_port  # noqa: E402
from cloudlet.memory.stream import parse_stream  # noqa: E402
from cloudlet.overlay.create import Customisation, capture_customised  # noqa: E402
from cloudlet.stats import Stats  # noqa: E402
from cloudlet.vm import HostOptions  # noqa: E402
from tests.distroguest import DistroGuest, build  # noqa: E402

GUEST = Path.home() / ".cache" / "cloudlet" / "testguest"


def page_digests(data: np.ndarray) -> set[bytes]:
    """Digests of the non-zero 4 KiB pages of `data` (length a multiple of 4 KiB)."""
    pages = data.reshape(-1, CHUNK_SIZE)
    return {hashlib.sha256(p.tobytes()).digest()[:16] for p in pages if p.any()}


def window_digests(disk: np.ndarray, step: int) -> set[bytes]:
    """Digests of every non-zero 4 KiB window of the disk starting at a multiple of `step`."""
    view = memoryview(disk)
    zero = bytes(CHUNK_SIZE)
    out = set()
    for off in range(0, len(view) - CHUNK_SIZE + 1, step):
        window = view[off : off + CHUNK_SIZE]
        if window != zero:
            out.add(hashlib.sha256(window).digest()[:16])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=32, help="size of the file written in the guest")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--guest", choices=["testguest", "distro"], default="testguest")
    args = ap.parse_args()
    write = f"dd if=/dev/urandom of={{}}/big bs=1M count={args.mib} 2>/dev/null; sync"
    with tempfile.TemporaryDirectory(prefix="pagecache-") as tmp:
        home = CloudletHome(Path(tmp) / "home")
        if args.guest == "distro":
            guest = DistroGuest.load(build())
            base = guest.create_base(home)
            ssh_port = free_port()
            host = HostOptions([Forward("tcp", ssh_port, guest.info["ready_port"])])
            custom = Customisation(
                wait_for_user=lambda vm: guest.ssh(ssh_port, write.format("/root"))
            )
        else:
            g = json.loads((GUEST / "guest.json").read_text())
            base = create_base(
                home,
                BaseSpec(disk=GUEST / g["disk"], name="testguest", memory_mib=g["memory_mib"],
                         kernel=GUEST / g["kernel"], initrd=GUEST / g["initrd"],
                         append=g["append"]),
                Readiness(marker=g["ready_marker"], timeout=600),
                Stats(),
            )
            host = HostOptions()
            custom = Customisation(script=write.format("/data"), timeout=600)
        run = home.new_run_dir("measure")
        snapshot, cow = capture_customised(base, run, custom, host, Stats())
        memory, disk = run / "memory.img", run / "disk.raw"
        with open(snapshot, "rb") as src:
            parse_stream(src, memory)
        convert_to_raw(cow, "qcow2", disk)
        mem = np.fromfile(memory, dtype=np.uint8)
        mem = mem[: len(mem) // CHUNK_SIZE * CHUNK_SIZE]
        dsk = np.memmap(disk, dtype=np.uint8, mode="r")
        pages = page_digests(mem)
        result: dict[str, object] = {
            "guest": args.guest, "file_mib": args.mib, "nonzero_memory_pages": len(pages)
        }
        for step in (4096, 1024, 512):
            started = time.monotonic()
            windows = window_digests(dsk, step)
            matched = len(pages & windows)
            result[f"pages_on_disk_at_{step}_steps"] = matched
            result[f"index_seconds_at_{step}_steps"] = round(time.monotonic() - started, 2)
            print(f"step {step:>4} B: {matched} of {len(pages)} non-zero memory pages equal "
                  f"disk data ({matched * CHUNK_SIZE / 2**20:.1f} MiB), {len(windows)} windows "
                  f"indexed in {result[f'index_seconds_at_{step}_steps']} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

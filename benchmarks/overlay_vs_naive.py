"""Overlay size, creation time and synthesis time against the naive alternative, in one run.

Naive = what you would do without cloudlet: ship the customised VM's qcow2 backing-file diff
plus its full memory snapshot (QEMU migration stream), both compressed with zstd -19, then
decompress them and restore. Both sides start from the SAME captured VM (one customisation, one
memory save), so the ratios compare methods, not runs. Real QEMU guests (TCG), real files.

    .venv/bin/python benchmarks/overlay_vs_naive.py [--workload app|demo] [--codec zstd|xz]
                                                     [--no-init-on-free] [--json FILE]

Peak RSS of our create and synthesize is measured in child processes (QEMU excluded).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloudlet.basevm.create import BaseSpec, Readiness, create_base  # noqa: E402
from cloudlet.basevm.store import BaseStore, BaseVM  # noqa: E402
from cloudlet.fsutil import clone_sparse  # noqa: E402
from cloudlet.home import CloudletHome  # noqa: E402
from cloudlet.hypervisor.config import VMConfig  # noqa: E402
from cloudlet.hypervisor.qemu import Forward, LaunchSpec, QemuVM, free_port, http_get  # noqa: E402
from cloudlet.overlay.create import (  # noqa: E402
    Customisation,
    OverlaySpec,
    build_overlay,
    capture_customised,
)
from cloudlet.stats import Stats  # noqa: E402
from cloudlet.synthesis import QemuRunner, SynthesisSpec, synthesize  # noqa: E402
from cloudlet.vm import HostOptions  # noqa: E402

WORKLOADS = {
    # what tools/demo.sh does: a page on disk, a RAM-only web server, 1 MiB of random data
    "demo": (REPO / "tools" / "demo" / "customize.sh").read_text(),
    # an "installed application": binaries (duplicated on disk and in RAM), a compressible log,
    # incompressible state, and a warmed RAM cache of files that are also on disk
    "app": """
mkdir -p /data/app /ram/cache
for i in 1 2 3 4; do cp /bin/busybox /data/app/tool$i; done
dd if=/dev/urandom of=/data/app/state bs=1M count=8 2>/dev/null
i=0; while [ $i -lt 2000 ]; do echo "request $i served by app"; i=$((i+1)); done >/data/app/log
cat /data/app/tool1 /data/app/log > /ram/cache/warm
echo "app ready" > /data/www/index.html
sync
""",
}
GUEST = Path(os.environ.get("CLOUDLET_GUEST_DIR", Path.home() / ".cache/cloudlet/testguest"))


def timed(fn, *args, **kw):
    start = time.monotonic()
    result = fn(*args, **kw)
    return result, time.monotonic() - start


def zstd19(src: Path) -> tuple[Path, float]:
    out = src.with_name(src.name + ".zst")
    _, seconds = timed(
        subprocess.run, ["zstd", "-19", "-q", "-f", "-T1", str(src), "-o", str(out)], check=True
    )
    return out, seconds


def unzstd(src: Path, dest: Path) -> float:
    _, seconds = timed(
        subprocess.run, ["zstd", "-d", "-q", "-f", str(src), "-o", str(dest)], check=True
    )
    return seconds


def wait_http(port: int, expect: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            body = http_get(port, timeout=1)
            if expect in body:
                return body
        except Exception:  # noqa: BLE001 - any failure means "not yet"; bounded by the deadline
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def child(args: list[str]) -> dict:
    """Run one of our phases in a child process; it reports its own peak RSS."""
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False, timeout=1800
    )
    if done.returncode != 0:
        raise SystemExit(f"phase {args[0]} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def phase_build(home: str, base_id: str, stream: str, disk: str, out: str, codec: str) -> None:
    h = CloudletHome(Path(home))
    base = BaseStore(h).get(base_id)
    stats = Stats()
    work = Path(tempfile.mkdtemp(dir=h.tmp))
    start = time.monotonic()
    info = build_overlay(
        base, Path(stream), Path(disk), OverlaySpec(Path(out), codec=codec), stats, work_dir=work
    )
    seconds = time.monotonic() - start
    shutil.rmtree(work)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "stats": stats.as_dict(),
                "chunks": info.counts_by_kind() if hasattr(info, "counts_by_kind") else {},
            },
            default=str,
        )
    )


def phase_synth(home: str, overlay: str, expect: str) -> None:
    port = free_port()
    stats = Stats()
    start = time.monotonic()
    spec = SynthesisSpec(
        source=Path(overlay), runner=QemuRunner(HostOptions([Forward("tcp", port, 80)]))
    )
    with synthesize(CloudletHome(Path(home)), spec, stats):
        resumed = time.monotonic() - start
        wait_http(port, expect)
        first = time.monotonic() - start
    print(
        json.dumps(
            {
                "resumed": resumed,
                "first_response": first,
                "stats": stats.as_dict(),
                "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        )
    )


def capture(base: BaseVM, workload: str, work: Path) -> tuple[Path, Path]:
    """Resume the base, customise, save memory; return (memory stream, qcow2 diff disk)."""
    run = work / "capture"
    run.mkdir()
    return capture_customised(
        base, run, Customisation(script=workload, timeout=600), HostOptions(), Stats()
    )


def naive_synth(
    base, config: VMConfig, disk_zst: Path, stream_zst: Path, work: Path, expect: str
) -> dict:
    out = work / "naive"
    out.mkdir()
    start = time.monotonic()
    disk, stream = out / "disk.qcow2", out / "memory.stream"
    unzstd(disk_zst, disk)
    unzstd(stream_zst, stream)
    decompressed = time.monotonic() - start
    port = free_port()
    spec = LaunchSpec(
        config=config,
        disk=disk,
        disk_format="qcow2",
        run_dir=out,
        kernel=base.kernel_path,
        initrd=base.initrd_path,
        forwards=[Forward("tcp", port, 80)],
        incoming=stream,
    )
    with QemuVM.launch(spec) as vm:
        vm.wait_incoming(300)
        vm.cont()
        resumed = time.monotonic() - start
        wait_http(port, expect)
        first = time.monotonic() - start
        vm.quit(timeout=30)
    shutil.rmtree(out)
    return {"decompress": decompressed, "resumed": resumed, "first_response": first}


def guest_base(
    work: Path,
    memory_mib: int | None = None,
    disk_mib: int | None = None,
    init_on_free: bool = True,
    balloon: bool = True,
) -> tuple[CloudletHome, BaseVM]:
    """A cloudlet home under `work` holding a base VM made from the test guest."""
    subprocess.run(
        ["bash", str(REPO / "tools/testguest/build.sh"), str(GUEST)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    g = json.loads((GUEST / "guest.json").read_text())
    append = g["append"]
    if not init_on_free:
        append = " ".join(w for w in append.split() if w != "init_on_free=1")
    home = CloudletHome(work / "home")
    base_disk = GUEST / g["disk"]
    if disk_mib:
        base_disk = work / "base-disk.raw"
        clone_sparse(GUEST / g["disk"], base_disk)
        subprocess.run(
            ["qemu-img", "resize", "-q", "-f", "raw", str(base_disk), f"{disk_mib}M"], check=True
        )
    base = create_base(
        home,
        BaseSpec(
            disk=base_disk,
            name="bench",
            memory_mib=memory_mib or g["memory_mib"],
            kernel=GUEST / g["kernel"],
            initrd=GUEST / g["initrd"],
            append=append,
            balloon=balloon,
        ),
        Readiness(marker=g["ready_marker"]),
        Stats(),
    )
    return home, base


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_build":
        return phase_build(*sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_synth":
        return phase_synth(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="app")
    ap.add_argument("--codec", default="zstd")
    ap.add_argument(
        "--no-init-on-free",
        action="store_true",
        help="boot the base without init_on_free=1 (freed pages keep their data)",
    )
    ap.add_argument(
        "--no-balloon",
        action="store_true",
        help="no virtio-balloon, so no free-page hinting during the (then stopped) save",
    )
    ap.add_argument("--memory-mib", type=int, help="guest RAM (default: the test guest's)")
    ap.add_argument("--disk-mib", type=int, help="grow the base disk to this size first")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    expect = "app ready" if args.workload == "app" else "hello from the cloudlet overlay"
    work = Path(tempfile.mkdtemp(prefix="cloudlet-bench-"))
    try:
        home, base = guest_base(
            work,
            args.memory_mib,
            args.disk_mib,
            init_on_free=not args.no_init_on_free,
            balloon=not args.no_balloon,
        )
        stream, disk = capture(base, WORKLOADS[args.workload], work)

        # naive: qcow2 diff + full memory snapshot, zstd -19
        disk_zst, t_disk = zstd19(disk)
        stream_zst, t_stream = zstd19(stream)
        naive_size = disk_zst.stat().st_size + stream_zst.stat().st_size
        naive_create = t_disk + t_stream
        naive = naive_synth(
            base, VMConfig.from_dict(base.config), disk_zst, stream_zst, work, expect
        )

        # ours, from the same captured VM
        overlay = work / "app.overlay"
        ours_create = child(
            ["_build", str(home.path), base.id, str(stream), str(disk), str(overlay), args.codec]
        )
        ours = child(["_synth", str(home.path), str(overlay), expect])
        ours_size = overlay.stat().st_size

        report = {
            "workload": args.workload,
            "codec": args.codec,
            "init_on_free": not args.no_init_on_free,
            "balloon": not args.no_balloon,
            "memory_mib": base.config["memory_mib"],
            "disk_size": base.disk_size,
            "naive": {
                "size": naive_size,
                "disk_zst": disk_zst.stat().st_size,
                "memory_zst": stream_zst.stat().st_size,
                "create_s": naive_create,
                "raw_qcow2": disk.stat().st_size,
                "raw_stream": stream.stat().st_size,
                **naive,
            },
            "ours": {
                "size": ours_size,
                "create_s": ours_create["seconds"],
                "create_maxrss_kib": ours_create["maxrss_kib"],
                "create_stats": ours_create["stats"],
                "resumed": ours["resumed"],
                "first_response": ours["first_response"],
                "synth_maxrss_kib": ours["maxrss_kib"],
                "synth_stats": ours["stats"],
            },
            "ratios": {
                "size ours/naive": ours_size / naive_size,
                "create ours/naive": ours_create["seconds"] / naive_create,
                "resume ours/naive": ours["resumed"] / naive["resumed"],
                "first response ours/naive": ours["first_response"] / naive["first_response"],
            },
        }
        print(json.dumps(report, indent=2))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""First response over an emulated link: naive download-then-restore against our synthesis.

Time from the client's request until the guest's HTTP answer, with the overlay (or the naive
artefacts) served by nginx across an emulated link (benchmarks/netlink.py: two network
namespaces, veth + tbf for the rate, a timestamped relay for the RTT; no netem on this kernel).
Methods, all from the SAME captured VM per workload:

  naive      download the qcow2 diff + zstd -19 memory snapshot whole (as overlay_vs_naive.py
             defines naive), then decompress and restore
  pipelined  ours, fetch/decompress/apply pipelined, the VM resumes once all is applied
  early      ours with early start: the VM resumes at once, missing chunks are fetched on demand
  ordered    early start from an access-ordered overlay (`cloudlet overlay reorder --trace`,
             the trace recorded by one unmeasured early-start synthesis)

    .venv/bin/python benchmarks/early_start.py [--workload app --workload demo] [--repeats 3]
        [--link wifi:38:20 --link lan:1000:1] [--quick] [--json out.json]

Needs root (namespaces), nginx, QEMU. Every run is a child process inside the client namespace;
everything (namespaces, processes, files) is removed at the end, on errors and on Ctrl-C too.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import overlay_vs_naive as ovn
from netlink import EmulatedLink, LinkSpec, stop

from cloudlet.basevm.store import BaseStore
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.config import VMConfig
from cloudlet.hypervisor.qemu import Forward, free_port
from cloudlet.sources import AllowList
from cloudlet.stats import Stats
from cloudlet.synthesis import (
    MountedImages,
    PlainImages,
    QemuRunner,
    Synthesis,
    SynthesisSpec,
    prepare_synthesis,
)
from cloudlet.vm import HostOptions

METHODS = ("naive", "pipelined", "early", "ordered")
EXPECT = {"app": "app ready", "demo": "hello from the cloudlet overlay"}
RUN_TIMEOUT = 900


# -- child phases (run inside the client namespace; print one JSON line) ----------------------


def download(urls: list[str], dest: Path) -> list[Path]:
    """GET each URL in turn over one keep-alive connection, streamed to files."""
    first = urllib.parse.urlsplit(urls[0])
    conn = http.client.HTTPConnection(first.hostname, first.port, timeout=60)
    out = []
    for url in urls:
        path = dest / Path(urllib.parse.urlsplit(url).path).name
        conn.request("GET", urllib.parse.urlsplit(url).path)
        resp = conn.getresponse()
        if resp.status != 200:
            raise SystemExit(f"GET {url}: HTTP {resp.status}")
        with open(path, "wb") as f:
            while block := resp.read(1 << 20):
                f.write(block)
        out.append(path)
    conn.close()
    return out


def phase_naive(home: str, base_id: str, url_disk: str, url_mem: str, expect: str) -> None:
    base = BaseStore(CloudletHome(Path(home))).get(base_id)
    work = Path(tempfile.mkdtemp(prefix="naive-", dir=CloudletHome(Path(home)).tmp))
    try:
        t0 = time.monotonic()
        disk_zst, mem_zst = download([url_disk, url_mem], work)
        t_dl = time.monotonic()
        r = ovn.naive_synth(base, VMConfig.from_dict(base.config), disk_zst, mem_zst, work, expect)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "t0": t0,
                "t_first": t_dl + r["first_response"],
                "t_end": t_dl + r["first_response"],
                "first_response": t_dl - t0 + r["first_response"],
                "stages": {
                    "download": t_dl - t0,
                    "decompress": r["decompress"],
                    "restore": r["resumed"] - r["decompress"],
                    "answer": r["first_response"] - r["resumed"],
                },
            }
        )
    )


def phase_ours(home: str, url: str, expect: str, early: str, trace_out: str) -> None:
    port = free_port()
    stats = Stats()
    t0 = time.monotonic()
    spec = SynthesisSpec(
        source=url,
        sink=MountedImages(Path(trace_out) if trace_out != "-" else None)
        if early == "1"
        else PlainImages(),
        runner=QemuRunner(HostOptions([Forward("tcp", port, 80)])),
        allow=AllowList.parse([url]),
    )
    syn = prepare_synthesis(CloudletHome(Path(home)), spec, stats)
    with syn:
        t_prep = time.monotonic()
        syn.start()
        t_run = time.monotonic()
        completed: list[float] = []
        watcher = threading.Thread(target=_note_complete, args=(syn, completed))
        watcher.start()
        ovn.wait_http(port, expect)
        t_first = time.monotonic()
        at_first = syn.status()
        watcher.join()
        syn.wait_complete(0)  # raises the synthesis's failure, if any
        t_end = completed[0]
        status = syn.status()
    print(
        json.dumps(
            {
                "t0": t0,
                "t_first": t_first,
                "t_end": t_end,
                "first_response": t_first - t0,
                "stages": {
                    "prepare": t_prep - t0,
                    "start": t_run - t_prep,
                    "answer": t_first - t_run,
                    "complete": t_end - t0,
                },
                "progress_at_first": at_first.get("progress", {}),
                "status": status,
                "stats": stats.as_dict(),
            },
            default=str,
        )
    )


def _note_complete(syn: Synthesis, completed: list[float]) -> None:
    """When the whole overlay is in (timed here, not after the first response)."""
    try:
        syn.wait_complete(RUN_TIMEOUT)
    finally:
        completed.append(time.monotonic())


# -- the harness -------------------------------------------------------------------------------


def run_child(link: EmulatedLink, args: list[str]) -> dict:
    proc = subprocess.Popen(
        link.in_client([sys.executable, __file__, *args]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"run {args[0]} failed:\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])


class Workload:
    """One customised VM, captured once: its naive artefacts and overlays, served by nginx."""

    def __init__(self, name: str, home: CloudletHome, base, work: Path, serve: Path) -> None:
        self.name, self.home, self.base = name, home, base
        wdir = work / name
        wdir.mkdir()
        stream, disk = ovn.capture(base, ovn.WORKLOADS[name], wdir)
        self.dir = serve / name
        self.dir.mkdir()
        for src, dest in ((disk, "disk.qcow2"), (stream, "memory.stream")):
            zst, _ = ovn.zstd19(src)
            zst.rename(self.dir / f"{dest}.zst")
        ovn.child(
            [
                "_build",
                str(home.path),
                base.id,
                str(stream),
                str(disk),
                str(self.dir / "plain.overlay"),
                "zstd",
            ]
        )
        stream.unlink()
        self.naive_size = sum(
            (self.dir / f).stat().st_size for f in ("disk.qcow2.zst", "memory.stream.zst")
        )

    def size(self, overlay: str) -> int:
        return (self.dir / overlay).stat().st_size

    def make_ordered(self, link: EmulatedLink) -> None:
        """Record an access trace with one unmeasured early-start run, then reorder the overlay."""
        if (self.dir / "ordered.overlay").exists():
            return
        trace = self.dir.parent.parent / f"{self.name}.trace.jsonl"
        url = link.url(f"{self.name}/plain.overlay")
        run_child(link, ["_ours", str(self.home.path), url, EXPECT[self.name], "1", str(trace)])
        subprocess.run(
            [
                str(Path(sys.executable).with_name("cloudlet")),
                "overlay",
                "reorder",
                str(self.dir / "plain.overlay"),
                "--trace",
                str(trace),
                "-o",
                str(self.dir / "ordered.overlay"),
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "CLOUDLET_HOME": str(self.home.path)},
        )

    def run(self, link: EmulatedLink, method: str) -> dict:
        home, expect = str(self.home.path), EXPECT[self.name]
        if method == "naive":
            args = [
                "_naive",
                home,
                self.base.id,
                link.url(f"{self.name}/disk.qcow2.zst"),
                link.url(f"{self.name}/memory.stream.zst"),
                expect,
            ]
            size = self.naive_size
        else:
            overlay = "ordered.overlay" if method == "ordered" else "plain.overlay"
            early = "0" if method == "pipelined" else "1"
            args = ["_ours", home, link.url(f"{self.name}/{overlay}"), expect, early, "-"]
            size = self.size(overlay)
        r = run_child(link, args)
        r["bytes_at_first"] = link.delivered(r["t0"], r["t_first"])
        r["bytes_total"] = link.delivered(r["t0"], r["t_end"] + 1.0)
        r["size"] = size
        r["share_at_first"] = r["bytes_at_first"] / size
        return r


def summarise(runs: dict[str, list[dict]]) -> dict:
    out = {}
    naive = statistics.median(r["first_response"] for r in runs["naive"])
    for method, rs in runs.items():
        first = statistics.median(r["first_response"] for r in rs)
        stages = {k: statistics.median(r["stages"][k] for r in rs) for k in rs[0]["stages"]}
        out[method] = {
            "first_response_s": first,
            "ratio_to_naive": first / naive,
            "share_at_first": statistics.median(r["share_at_first"] for r in rs),
            "size": rs[0]["size"],
            "stages_s": stages,
            "all_first_response_s": [r["first_response"] for r in rs],
        }
    return out


def stage_text(method: str, s: dict) -> str:
    if method == "naive":
        return (
            f"download {s['download']:.2f} + unzstd {s['decompress']:.2f} + restore "
            f"{s['restore']:.2f} + answer {s['answer']:.2f}"
        )
    return (
        f"prepare {s['prepare']:.2f} + start {s['start']:.2f} + answer {s['answer']:.2f}; "
        f"complete {s['complete']:.2f}"
    )


def table(report: dict) -> str:
    lines = []
    for link in report["links"]:
        m = link["measured"]
        lines.append(
            f"\nlink {link['name']}: asked {link['rate_mbit']:g} Mbit/s, "
            f"{link['rtt_ms']:g} ms RTT; measured {m['rate_mbit']:.1f} Mbit/s, "
            f"{m['rtt_ms']:.1f} ms RTT"
        )
        lines.append(f"  ({link['emulation']})")
        lines.append(
            "| workload | method | MB sent | first response s (median) | ratio to naive "
            "| share of bytes at first response | stages s (median) |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for wname, methods in link["results"].items():
            for method, r in methods.items():
                lines.append(
                    f"| {wname} | {method} | {r['size'] / 1e6:.1f} | {r['first_response_s']:.2f} "
                    f"| {r['ratio_to_naive']:.2f} | {100 * r['share_at_first']:.0f} % "
                    f"| {stage_text(method, r['stages_s'])} |"
                )
    return "\n".join(lines)


def parse_link(text: str) -> LinkSpec:
    name, rate, rtt = text.split(":")
    return LinkSpec(name, float(rate), float(rtt))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_naive":
        return phase_naive(*sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_ours":
        return phase_ours(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", action="append", choices=sorted(ovn.WORKLOADS))
    ap.add_argument(
        "--link",
        action="append",
        type=parse_link,
        help="NAME:MBIT:RTT_MS (default: wifi:38:20 and lan:1000:1)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", action="append", choices=METHODS)
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: app workload, wifi link, one repeat"
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--no-init-on-free",
        action="store_true",
        help="boot the base without init_on_free=1 (with the balloon's free-page hints, a guest "
        "with it zeroes every hinted page when it resumes: early start then reads most of RAM)",
    )
    args = ap.parse_args()
    workloads = args.workload or (["app"] if args.quick else ["app", "demo"])
    links = args.link or [LinkSpec("wifi", 38, 20)] + (
        [] if args.quick else [LinkSpec("lan", 1000, 1)]
    )
    repeats = 1 if args.quick else args.repeats
    methods = args.method or list(METHODS)
    if "naive" not in methods:
        methods.insert(0, "naive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="cloudlet-early-"))
    started = time.monotonic()
    try:
        home, base = ovn.guest_base(work, init_on_free=not args.no_init_on_free)
        serve = work / "serve"
        serve.mkdir()
        loads = [Workload(w, home, base, work, serve) for w in workloads]
        report = {
            "repeats": repeats,
            "methods": methods,
            "init_on_free": not args.no_init_on_free,
            "links": [],
        }
        for spec in links:
            with EmulatedLink(spec, serve) as link:
                entry = {
                    "name": spec.name,
                    "rate_mbit": spec.rate_mbit,
                    "rtt_ms": spec.rtt_ms,
                    "emulation": link.describe(),
                    "measured": link.measure(),
                    "results": {},
                    "runs": {},
                }
                for load in loads:
                    if "ordered" in methods:
                        load.make_ordered(link)
                    runs: dict[str, list[dict]] = {m: [] for m in methods}
                    for rep in range(repeats):
                        for method in methods:
                            r = load.run(link, method)
                            print(
                                f"{spec.name} {load.name} {method} #{rep + 1}: first response "
                                f"{r['first_response']:.2f} s, {100 * r['share_at_first']:.0f} % "
                                "of bytes",
                                file=sys.stderr,
                                flush=True,
                            )
                            runs[method].append(r)
                    entry["results"][load.name] = summarise(runs)
                    entry["runs"][load.name] = runs
                report["links"].append(entry)
        report["wall_s"] = time.monotonic() - started
        print(table(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

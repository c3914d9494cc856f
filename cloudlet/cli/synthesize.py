"""`cloudlet synthesize`: rebuild a VM from base + overlay here and resume it running."""

import argparse
import signal
import time
import urllib.request
from pathlib import Path

from cloudlet.cli.common import add_vm_host_options, host_options, print_stats
from cloudlet.errors import GuestTimeout
from cloudlet.home import CloudletHome
from cloudlet.stats import StageLine, Stats
from cloudlet.synthesis import SynthesisSpec, synthesize


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("synthesize", help="synthesize a VM from an overlay and resume it")
    p.add_argument("overlay", type=Path)
    p.add_argument(
        "--check-and-exit",
        action="store_true",
        help="stop the VM once it is resumed (and --check-url answered) instead of "
        "keeping it running until Ctrl-C",
    )
    p.add_argument(
        "--check-url",
        metavar="URL",
        action="append",
        default=[],
        help="wait until this URL (a forwarded guest service) answers and print the "
        "body (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print statistics as JSON")
    add_vm_host_options(p)
    p.set_defaults(run=_run)


def _run(home: CloudletHome, args: argparse.Namespace) -> int:
    stats = Stats(listener=StageLine())
    spec = SynthesisSpec(
        overlay=args.overlay,
        host=host_options(args),
        timeout=args.timeout,
    )
    start = time.monotonic()
    with synthesize(home, spec, stats) as synth:
        for i, url in enumerate(args.check_url):
            with stats.stage("first response" if i == 0 else f"response {url}"):
                body = _wait_for_url(url, args.timeout)
            if i == 0:
                stats.counters["first response after"] = f"{time.monotonic() - start:.2f} s"
            if not args.json:
                print(f"{url} answered: {body.strip()[:200]}")
        if not args.json:
            print(f"VM synthesized from base {synth.base.id[:16]} and running")
        print_stats("statistics:", stats, as_json=args.json)
        if not args.check_and_exit:
            print("VM running; press Ctrl-C to stop it", flush=True)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print("stopping the VM", flush=True)
    return 0


def _wait_for_url(url: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.read().decode(errors="replace")
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise GuestTimeout(f"{url} did not answer within {timeout:.0f} s (last error: {last})")

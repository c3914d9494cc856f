"""`cloudlet synthesize`: rebuild a VM from base + overlay and resume it running.

Here by default (early start: the guest resumes while the overlay still streams in), or on a
`cloudlet serve` host with --server.
"""

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from cloudlet.cli.common import (
    add_vm_host_options,
    check_url_reachable,
    host_options,
    print_stats,
    wait_for_url,
)
from cloudlet.cli.remote import add_remote_options, run_remote
from cloudlet.home import CloudletHome
from cloudlet.sources import AllowList
from cloudlet.stats import StageLine, Stats
from cloudlet.synthesis import MountedImages, PlainImages, QemuRunner, SynthesisSpec, synthesize


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("synthesize", help="synthesize a VM from an overlay and resume it")
    p.add_argument(
        "overlay", help="overlay file, or an http(s):// URL (fetched by byte range as needed)"
    )
    p.add_argument(
        "--no-early-start",
        dest="early_start",
        action="store_false",
        help="apply the whole overlay before resuming the guest (no FUSE); by default the "
        "guest resumes at once and missing chunks are fetched when it touches them",
    )
    p.add_argument(
        "--fetch-deadline",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="the synthesis fails if the overlay source sends nothing for this long, or (early "
        "start) a guest read of a missing chunk waits longer (default 60)",
    )
    p.add_argument(
        "--trace-out",
        type=Path,
        metavar="FILE",
        help="early start: write the guest's chunk access trace (JSON lines) here when the VM "
        "stops, for `cloudlet overlay reorder --trace`",
    )
    p.add_argument(
        "--check-and-exit",
        action="store_true",
        help="check, then stop the VM: succeeds only if the guest resumed, every --check-url "
        "answered and the whole overlay arrived and verified (instead of running until Ctrl-C)",
    )
    p.add_argument(
        "--check-url",
        metavar="URL",
        action="append",
        default=[],
        help="wait until this URL (a forwarded guest service) answers and print the "
        "body (repeatable)",
    )
    p.add_argument(
        "--wait-complete",
        action="store_true",
        help="early start: also wait until the whole overlay has arrived and been verified "
        "before the checks end (always so with --check-and-exit)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout: statistics (numbers), the synthesis and base ids, "
        "and each --check-url's answer under \"responses\"",
    )
    add_vm_host_options(p)
    add_remote_options(p)
    p.set_defaults(run=_run)


def _run(home: CloudletHome, args: argparse.Namespace) -> int:
    if args.server:
        return run_remote(home, args)
    host = host_options(args)
    for url in args.check_url:
        check_url_reachable(url, host)
    stats = Stats(listener=StageLine())
    spec = SynthesisSpec(
        source=args.overlay,
        sink=MountedImages(trace_out=args.trace_out) if args.early_start else PlainImages(),
        runner=QemuRunner(host),
        timeout=args.timeout,
        fetch_deadline=args.fetch_deadline,
        allow=AllowList.any(),  # the user's own command line names the URL
    )
    start = time.monotonic()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    answers: dict[str, str] = {}
    # with --json, stdout holds one JSON document: everything for humans goes to stderr
    say = sys.stderr if args.json else sys.stdout
    with synthesize(home, spec, stats) as synth:
        for i, url in enumerate(args.check_url):
            with stats.stage("first response" if i == 0 else f"response {url}"):
                answers[url] = wait_for_url(url, args.timeout, failed=lambda: synth.error)
            if i == 0:
                stats.counters["first response after s"] = round(time.monotonic() - start, 3)
            if not args.json:
                print(f"{url} answered: {answers[url].strip()[:200]}")
        if args.wait_complete or args.check_and_exit or not args.early_start:
            with stats.stage("rest of the overlay"):
                synth.wait_complete(args.timeout)
        if args.json:
            print(json.dumps({**stats.as_dict(), "id": synth.id, "base_id": synth.base.id,
                              "responses": answers}), flush=True)
        else:
            mode = "early start" if args.early_start else "complete overlay"
            print(f"VM synthesized from base {synth.base.id[:16]} ({mode}) and running")
            print_stats("statistics:", stats)
        if not args.check_and_exit:
            print("VM running; press Ctrl-C to stop it", file=say, flush=True)
            try:
                while synth.error is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                print("stopping the VM", file=say, flush=True)
            if synth.error is not None:
                raise synth.error
    return 0

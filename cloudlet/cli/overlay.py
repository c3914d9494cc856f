"""`cloudlet overlay ...`: capture an overlay from a customised base, or summarise one."""

import argparse
import json
from pathlib import Path

from cloudlet.basevm.store import BaseStore
from cloudlet.chunks import Kind, Target
from cloudlet.cli.common import add_vm_host_options, host_options, print_stats, wait_for_enter
from cloudlet.codecs import available_codecs
from cloudlet.home import CloudletHome
from cloudlet.overlay.create import Customisation, OverlaySpec, create_overlay
from cloudlet.overlay.reader import OverlayReader
from cloudlet.stats import StageLine, Stats, human_bytes


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("overlay", help="create or inspect VM overlays")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = sub.add_parser(
        "create", help="resume a base from its memory snapshot, customise it, capture the overlay"
    )
    c.add_argument("base", help="base id, unique id prefix, or name")
    c.add_argument("-o", "--output", type=Path, required=True, help="overlay file to write")
    how = c.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--script", type=Path, help="shell script run in the guest over its serial console"
    )
    how.add_argument(
        "--wait",
        action="store_true",
        help="customise by hand, then press Enter: through --forward ports (ssh, a web UI), "
        "or over --vnc if the base was created with --display std",
    )
    c.add_argument("--codec", default="zstd", choices=available_codecs())
    c.add_argument("--level", type=int, help="codec level (default: the codec's own)")
    c.add_argument("--json", action="store_true", help="print statistics as JSON")
    add_vm_host_options(c)
    c.set_defaults(run=_create)
    s = sub.add_parser("show", help="summarise an overlay's manifest")
    s.add_argument("file", type=Path)
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=_show)


def _create(home: CloudletHome, args: argparse.Namespace) -> int:
    base = BaseStore(home).get(args.base)
    custom = Customisation(
        script=args.script.read_text() if args.script else None,
        wait_for_user=(lambda vm: wait_for_enter("Customise the guest, then press Enter: "))
        if args.wait
        else None,
        timeout=args.timeout,
    )
    spec = OverlaySpec(
        output=args.output,
        codec=args.codec,
        level=args.level,
        host=host_options(args),
    )
    stats = Stats(listener=StageLine())
    create_overlay(home, base, spec, custom, stats)
    if not args.json:
        print(
            f"overlay {args.output} for base {base.id} ({human_bytes(args.output.stat().st_size)})"
        )
    print_stats("statistics:", stats, as_json=args.json)
    return 0


def _show(home: CloudletHome, args: argparse.Namespace) -> int:
    reader = OverlayReader.open(args.file)
    summary = reader.summary()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"overlay      {args.file} ({human_bytes(args.file.stat().st_size)})")
    print(f"format       {summary['version']}")
    print(f"base VM      {reader.base_id}")
    for target in Target:
        size, digest = reader.images[target]
        print(f"{target.name.lower():<12} {human_bytes(size)} result, digest {digest[:16]}...")
    counts = summary["chunks"]
    print("chunks       " + ", ".join(f"{k.name.lower()} {counts.get(k.name, 0)}" for k in Kind))
    print(f"frames       {len(reader.frames)} ({summary['codec']})")
    return 0

"""`cloudlet overlay ...`: capture an overlay from a customised base, reorder or summarise one."""

import argparse
import contextlib
import json
from pathlib import Path

from cloudlet.basevm.store import BaseStore
from cloudlet.chunks import Kind, Target
from cloudlet.cli.common import (
    add_vm_host_options,
    host_options,
    print_stats,
    read_user_file,
    wait_for_enter,
)
from cloudlet.codecs import available_codecs
from cloudlet.home import CloudletHome
from cloudlet.overlay.create import Customisation, OverlaySpec, create_overlay
from cloudlet.overlay.order import load_trace, reorder_overlay
from cloudlet.overlay.reader import OverlayReader
from cloudlet.sources import AllowList, open_source
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
    c.add_argument(
        "--access-order",
        type=Path,
        metavar="TRACE",
        help="order frames by first access in this trace (`cloudlet synthesize --trace-out` of "
        "an earlier overlay of the same app), so a first response needs only a prefix",
    )
    c.add_argument("--json", action="store_true", help="print statistics as JSON")
    add_vm_host_options(c)
    c.set_defaults(run=_create)
    r = sub.add_parser(
        "reorder",
        help="rewrite an overlay with its frames in the access order of a synthesis trace",
    )
    r.add_argument("input", type=Path, help="overlay to reorder")
    r.add_argument(
        "--trace", type=Path, required=True, help="JSONL from `cloudlet synthesize --trace-out`"
    )
    r.add_argument("-o", "--output", type=Path, required=True, help="overlay file to write")
    r.set_defaults(run=_reorder)
    s = sub.add_parser("show", help="summarise an overlay's manifest")
    s.add_argument("file", help="overlay file, or an http(s):// URL")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=_show)


def _create(home: CloudletHome, args: argparse.Namespace) -> int:
    script = read_user_file(args.script, "customisation script") if args.script else None
    base = BaseStore(home).get(args.base)
    custom = Customisation(
        script=script,
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
        access_order=load_trace(args.access_order) if args.access_order else None,
    )
    stats = Stats(listener=StageLine())
    create_overlay(home, base, spec, custom, stats)
    if not args.json:
        print(
            f"overlay {args.output} for base {base.id} ({human_bytes(args.output.stat().st_size)})"
        )
    print_stats("statistics:", stats, as_json=args.json)
    return 0


def _reorder(home: CloudletHome, args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    stats = Stats(listener=StageLine())
    with OverlayReader.open(args.input) as reader, stats.stage("reorder", reader.total_length):
        info = reorder_overlay(reader, trace, args.output)
    order = info.access_order
    assert order is not None  # reorder_overlay always marks the accessed prefix
    print(
        f"overlay {args.output} ({human_bytes(info.size)}): {order['accessed_slots']} of "
        f"{info.slots} slots accessed, in the first {order['prefix_frames']} of {info.frames} "
        f"frames ({human_bytes(order['prefix_bytes'])})"
    )
    print_stats("statistics:", stats)
    return 0


def _show(home: CloudletHome, args: argparse.Namespace) -> int:
    # the user's own command line names the URL; only the manifest's prefix is read
    with open_source(args.file, allow=AllowList.any()) as source:
        size = source.size()
        with contextlib.closing(source.stream(0)) as stream:
            reader = OverlayReader.open(stream, name=source.url)
    summary = reader.summary()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"overlay      {source.url} ({human_bytes(size or reader.total_length)})")
    print(f"format       {summary['version']}")
    print(f"base VM      {reader.base_id}")
    for target in Target:
        size, digest = reader.images[target]
        print(f"{target.name.lower():<12} {human_bytes(size)} result, digest {digest[:16]}...")
    counts = summary["chunks"]
    print("chunks       " + ", ".join(f"{k.name.lower()} {counts.get(k.name, 0)}" for k in Kind))
    print(f"frames       {len(reader.frames)} ({summary['codec']})")
    order = reader.meta.get("access_order")
    if isinstance(order, dict):  # written by `overlay reorder` / `overlay create --access-order`
        frames = min(int(order.get("prefix_frames", 0)), len(reader.frames))
        last = reader.frames[frames - 1] if frames else None
        end = last.offset + last.length if last else reader.frames_offset
        print(
            f"access order {order.get('accessed_slots')} accessed slots in the first {frames} "
            f"frames ({human_bytes(order.get('prefix_bytes', 0))}): a first response needs the "
            f"first {human_bytes(end)} of the file"
        )
        print(f"trace        sha256 {str(order.get('trace_sha256'))[:16]}...")
    return 0

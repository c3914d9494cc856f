"""`cloudlet base ...`: create, list, show, delete, export, import, verify base VMs."""

import argparse
import json
from pathlib import Path

from cloudlet.basevm.create import BaseSpec, Readiness, create_base
from cloudlet.basevm.package import export_base, import_base
from cloudlet.basevm.store import BaseStore, BaseVM
from cloudlet.cli.common import add_vm_host_options, host_options, print_stats, wait_for_enter
from cloudlet.home import CloudletHome
from cloudlet.stats import Progress, StageLine, Stats, human_bytes


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("base", help="manage base VMs")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    c = sub.add_parser("create", help="boot a disk, snapshot the ready guest, register it")
    c.add_argument("disk", type=Path, help="raw or qcow2 disk image")
    c.add_argument("--name", help="a name for humans (default: the disk file name)")
    c.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (default 256)")
    c.add_argument("--vcpus", type=int, default=1)
    c.add_argument("--cpu", default="qemu64", help="CPU model; a portable one lets bases move")
    c.add_argument("--machine", default="pc", help="machine type (an alias is pinned at creation)")
    c.add_argument("--nic", default="e1000", help="NIC model")
    c.add_argument(
        "--no-balloon",
        dest="balloon",
        action="store_false",
        help="no virtio-balloon (free page hinting) device",
    )
    c.add_argument(
        "--display",
        choices=["none", "std"],
        default="none",
        help="std: give the guest a VGA card, to see it over --vnc (part of the base's "
        "hardware: every resume of this base has it); none: serial console only",
    )
    c.add_argument("--kernel", type=Path, help="boot this kernel directly")
    c.add_argument("--initrd", type=Path)
    c.add_argument("--append", help="kernel command line")
    ready = c.add_mutually_exclusive_group(required=True)
    ready.add_argument("--ready-marker", help="snapshot once the guest prints this on its console")
    ready.add_argument(
        "--ready-port", type=int, help="snapshot once this forwarded host port accepts connections"
    )
    ready.add_argument(
        "--wait",
        action="store_true",
        help="snapshot when you press Enter (see the guest with --display std --vnc ADDR)",
    )
    add_vm_host_options(c)
    c.set_defaults(run=_create)

    ls = sub.add_parser("list", help="list registered base VMs")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=_list)
    for name, fn, helptext in (
        ("show", _show, "show one base VM"),
        ("delete", _delete, "delete a base VM and its files"),
        ("verify", _verify, "re-check every file of a base VM against its digests"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("base", help="base id, unique id prefix, or name")
        s.set_defaults(run=fn)
    e = sub.add_parser("export", help="write a base VM package (.cbase)")
    e.add_argument("base")
    e.add_argument("file", type=Path)
    e.set_defaults(run=_export)
    i = sub.add_parser("import", help="import a base VM package, verifying every digest")
    i.add_argument("file", type=Path)
    i.set_defaults(run=_import)


def _create(home: CloudletHome, args: argparse.Namespace) -> int:
    spec = BaseSpec(
        disk=args.disk,
        name=args.name or args.disk.stem,
        memory_mib=args.memory,
        vcpus=args.vcpus,
        cpu=args.cpu,
        machine=args.machine,
        nic_model=args.nic,
        balloon=args.balloon,
        display=args.display,
        kernel=args.kernel,
        initrd=args.initrd,
        append=args.append,
        host=host_options(args),
    )
    ready = Readiness(
        marker=args.ready_marker,
        port=args.ready_port,
        timeout=args.timeout,
        wait_for_user=(lambda: wait_for_enter("Guest booting; press Enter to snapshot it: "))
        if args.wait
        else None,
    )
    stats = Stats(listener=StageLine())
    base = create_base(home, spec, ready, stats)
    print(f"base VM {base.id} ({base.name}) created")
    print_stats("statistics:", stats)
    return 0


def _describe(b: BaseVM) -> dict:
    return {**b.summary(), "path": str(b.path)}


def _list(home: CloudletHome, args: argparse.Namespace) -> int:
    bases = BaseStore(home).list()
    if args.json:
        print(json.dumps([_describe(b) for b in bases], indent=2))
        return 0
    print(f"{'ID':<16} {'NAME':<20} {'DISK':>10} {'MEMORY':>10} CREATED")
    for b in bases:
        print(
            f"{b.id[:16]:<16} {b.name[:20]:<20} {human_bytes(b.disk_size):>10} "
            f"{human_bytes(b.memory_size):>10} {b.created:%Y-%m-%d %H:%M}"
        )
    return 0


def _show(home: CloudletHome, args: argparse.Namespace) -> int:
    print(json.dumps(_describe(BaseStore(home).get(args.base)), indent=2))
    return 0


def _delete(home: CloudletHome, args: argparse.Namespace) -> int:
    store = BaseStore(home)
    base = store.get(args.base)
    store.delete(base.id)
    print(f"base VM {base.id} deleted")
    return 0


def _verify(home: CloudletHome, args: argparse.Namespace) -> int:
    store = BaseStore(home)
    base = store.get(args.base)
    store.verify(base.id)
    print(f"base VM {base.id}: every file matches its digest")
    return 0


def _export(home: CloudletHome, args: argparse.Namespace) -> int:
    base = BaseStore(home).get(args.base)
    progress = Progress("export", None)
    export_base(home, base.id, args.file, progress=progress)
    progress.done()
    print(f"exported {base.id} to {args.file} ({human_bytes(args.file.stat().st_size)})")
    return 0


def _import(home: CloudletHome, args: argparse.Namespace) -> int:
    progress = Progress("import", args.file.stat().st_size if args.file.exists() else None)
    result = import_base(home, args.file, progress=progress)
    progress.done()
    base = result.base
    if result.already_present:
        print(f"base VM {base.id} ({base.name}) is already present")
    else:
        print(f"imported base VM {base.id} ({base.name})")
    return 0

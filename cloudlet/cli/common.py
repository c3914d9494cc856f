"""Argument helpers shared by the verbs."""

import argparse
import json
import sys

from cloudlet.hypervisor.qemu import Forward
from cloudlet.stats import Stats
from cloudlet.vm import HostOptions


def add_vm_host_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--forward",
        "-f",
        action="append",
        default=[],
        type=Forward.parse,
        metavar="tcp:HOST:GUEST",
        help="forward a host port on 127.0.0.1 to a guest port (repeatable)",
    )
    p.add_argument(
        "--vnc", metavar="ADDR:DISPLAY", help="also show the guest on VNC, e.g. 127.0.0.1:1"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds any single step may take before it is abandoned (default 600)",
    )


def host_options(args: argparse.Namespace) -> HostOptions:
    return HostOptions(forwards=args.forward, extra_args=args.qemu_args, vnc=args.vnc)


def print_stats(title: str, stats: Stats, as_json: bool = False) -> None:
    if as_json:
        json.dump(stats.as_dict(), sys.stdout, indent=2)
        print()
    else:
        print(title)
        print(stats.render())


def wait_for_enter(prompt: str) -> None:
    if not sys.stdin.isatty():
        raise SystemExit("cloudlet: --wait needs an interactive terminal")
    input(prompt)

"""Argument helpers shared by the verbs."""

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cloudlet.errors import CloudletError, GuestTimeout
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
        print(json.dumps(stats.as_dict()))
    else:
        print(title)
        print(stats.render())


def check_url_reachable(url: str, host: HostOptions) -> None:
    """A --check-url on this machine must reach the guest through one of the run's forwards."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CloudletError(f"--check-url {url}: expected an http(s):// URL")
    if parts.hostname in ("127.0.0.1", "localhost", "::1"):
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host.check_forwarded(port, f"--check-url {url}")


def read_user_file(path: Path, what: str) -> str:
    """A text file the user named, or a CloudletError that names it and why it cannot be read."""
    try:
        return path.read_text()
    except OSError as e:
        raise CloudletError(f"cannot read {what} {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise CloudletError(f"{what} {path} is not text ({e.reason} at byte {e.start})") from e


def wait_for_enter(prompt: str) -> None:
    if not sys.stdin.isatty():
        raise SystemExit("cloudlet: --wait needs an interactive terminal")
    input(prompt)


def wait_for_url(
    url: str, timeout: float, failed: Callable[[], BaseException | None] | None = None
) -> str:
    """The body of `url` once it answers; GuestTimeout after `timeout` seconds.

    `failed` is asked between tries: an error it returns (the synthesis failed) is raised at
    once instead of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if failed is not None and (error := failed()) is not None:
            raise error
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.read().decode(errors="replace")
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise GuestTimeout(f"{url} did not answer within {timeout:.0f} s (last error: {last})")

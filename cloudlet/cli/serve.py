"""`cloudlet serve`: the synthesis server (HTTP JSON API, optionally Elijah's 8021 protocol)."""

import argparse
import logging
import signal
import time
from pathlib import Path

from cloudlet.home import CloudletHome
from cloudlet.server.api import ApiServer
from cloudlet.server.auth import load_or_create_token, token_path
from cloudlet.server.manager import SynthesisManager
from cloudlet.server.protocol8021 import Server8021
from cloudlet.sources import AllowList

LOG = logging.getLogger(__name__)


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "serve",
        help="run the synthesis server: clients upload or name overlays, VMs run here",
        description="Serve the HTTP JSON API (docs/server.md) and, with --listen-8021, Elijah's "
        "protocol (docs/protocol-8021.md). Clients authenticate with the token in --token-file. "
        "Stops every synthesis cleanly on SIGTERM or Ctrl-C.",
    )
    p.add_argument(
        "--listen",
        type=address,
        default=("127.0.0.1", 8022),
        metavar="HOST:PORT",
        help="address of the HTTP API (default 127.0.0.1:8022)",
    )
    p.add_argument(
        "--listen-8021",
        type=address,
        default=None,
        metavar="HOST:PORT",
        help="also speak the 8021 protocol here, e.g. 127.0.0.1:8021 (default: off)",
    )
    p.add_argument(
        "--max-running",
        type=int,
        default=2,
        metavar="N",
        help="syntheses at once; more are refused (HTTP 429, 8021 FAILED) (default 2)",
    )
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="URL-PREFIX",
        help="fetch overlays from URLs under this prefix, e.g. https://host/overlays/ "
        "(repeatable; none: uploads and --overlay-dir files only)",
    )
    p.add_argument(
        "--overlay-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="clients may name overlay files in this directory",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="the clients' bearer token, generated if missing "
        "(default $CLOUDLET_HOME/server.token)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds any single step of a synthesis may take (default 600)",
    )
    p.set_defaults(run=_run)


def address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def _run(home: CloudletHome, args: argparse.Namespace) -> int:
    token_file = args.token_file or token_path(home)
    token = load_or_create_token(token_file)
    manager = SynthesisManager(
        home,
        allow=AllowList.parse(args.allow) if args.allow else None,
        overlay_dir=args.overlay_dir,
        max_running=args.max_running,
        timeout=args.timeout,
    )
    servers: list[ApiServer | Server8021] = []
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        api = ApiServer(manager, token, args.listen)
        servers.append(api)
        api.start()
        print(f"HTTP API on {api.url}/v1/ (token in {token_file})", flush=True)
        if args.listen_8021:
            p8021 = Server8021(manager, token, args.listen_8021)
            servers.append(p8021)
            p8021.start()
            host, port = p8021.address
            print(f"8021 protocol on {host}:{port}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping every synthesis", flush=True)
    finally:
        manager.shutdown(timeout=args.timeout)
        for server in servers:
            server.stop()
    return 0

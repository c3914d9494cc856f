"""`cloudlet` command line: parses arguments and hands off to one module per verb."""

import argparse
import logging
import os
import sys
from pathlib import Path

from cloudlet import __version__
from cloudlet.cli import base, overlay, serve, synthesize
from cloudlet.errors import CloudletError
from cloudlet.home import CloudletHome


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloudlet",
        description="VM synthesis: base VMs, overlays, and synthesis on this machine.",
        epilog="Arguments after a lone `--` are passed to QEMU as they are (host-side options "
        "only, such as extra -netdev port forwards: the guest hardware comes from the base).",
    )
    parser.add_argument("--version", action="version", version=f"cloudlet {__version__}")
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="state directory (default: $CLOUDLET_HOME or ~/.cloudlet)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    base.register(verbs)
    overlay.register(verbs)
    synthesize.register(verbs)
    serve.register(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    args.qemu_args = extra
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    home = CloudletHome(
        args.home
        or (Path(os.environ["CLOUDLET_HOME"]) if os.environ.get("CLOUDLET_HOME") else None)
    )
    try:
        return args.run(home, args) or 0
    except CloudletError as exc:
        print(f"cloudlet: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named that no message above anticipated
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"cloudlet: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cloudlet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

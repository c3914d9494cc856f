"""openstack cloudlet synthesize | synthesis list|show"""

from __future__ import annotations

from typing import Any

from cliff import columns
from openstack import exceptions as sdk_exceptions
from osc_lib import exceptions
from osc_lib.command import command

from cloudletclient.osc.v1 import common

COLUMNS = (
    "id",
    "name",
    "overlay_id",
    "task_id",
    "state",
    "stage",
    "progress",
    "error",
    "server",
    "statistics",
    "created_at",
    "updated_at",
)
LIST_COLUMNS = ("id", "name", "overlay_id", "state", "stage", "progress")


class StatisticsColumn(columns.FormattableColumn):
    """The host's per-stage statistics: one line per stage, in the order they started, with when
    it started and ended (seconds since the spawn began; stages may overlap) and its bytes."""

    def human_readable(self) -> str:
        stats = self._value
        if not stats:
            return ""
        head = f"{stats['state']} since {stats['started_at']}"
        lines = [head + (f": {stats['error']}" if stats.get("error") else "")]
        width = max([len(s["name"]) for s in stats["stages"]] + [0])
        for s in stats["stages"]:
            end = "..." if s["end"] is None else f"{s['end']:.2f}"
            line = f"{s['name']:<{width}}  {s['start']:7.2f} - {end:>7} s  {s['seconds']:7.2f} s"
            if s["bytes"]:
                line += f"  {s['bytes']} B"
            lines.append(line + ("  FAILED" if s["failed"] else ""))
        lines += [f"{name}: {value}" for name, value in stats["counters"].items()]
        return "\n".join(lines)

    def machine_readable(self) -> Any:
        return self._value


def _show(synthesis: Any) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    names, values = common.show(synthesis, COLUMNS)
    return names, tuple(
        StatisticsColumn(v) if n == "statistics" else v for n, v in zip(names, values, strict=True)
    )


class Synthesize(command.ShowOne):
    """Synthesize a server from an overlay (a Nova server booted from the overlay image)."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument("overlay", metavar="<overlay>", help="overlay (name or id)")
        parser.add_argument("--name", metavar="<name>", required=True, help="server name")
        parser.add_argument(
            "--flavor", metavar="<flavor>", required=True, help="flavor (name or id)"
        )
        networks = parser.add_mutually_exclusive_group()
        networks.add_argument("--network", metavar="<network>", help="network (name or id)")
        networks.add_argument(
            "--no-network",
            action="store_true",
            help="a server without a network (default: Nova's automatic allocation)",
        )
        common.add_wait(parser)
        return parser

    def take_action(self, args: Any) -> Any:
        client = self.app.client_manager.cloudlet
        conn = self.app.client_manager.sdk_connection
        try:
            flavor = conn.compute.find_flavor(args.flavor, ignore_missing=False).id
            network = (
                conn.network.find_network(args.network, ignore_missing=False).id
                if args.network
                else None
            )
        except sdk_exceptions.ResourceNotFound as e:
            raise exceptions.CommandError(str(e)) from None
        overlay = client.find_overlay(args.overlay)
        synthesis = client.synthesize(
            overlay.id, args.name, flavor, network, "none" if args.no_network else None
        )
        if args.wait:
            common.wait(client, synthesis.task_id, args.wait_timeout)
            synthesis = client.get_synthesis(synthesis.id)
        return _show(synthesis)


class ListSynthesis(command.Lister):
    """List the project's syntheses."""

    def take_action(self, args: Any) -> Any:
        return common.rows(self.app.client_manager.cloudlet.syntheses(), LIST_COLUMNS)


class ShowSynthesis(command.ShowOne):
    """Show a synthesis, its server's state and the stages its compute host recorded."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument("synthesis", metavar="<synthesis>", help="synthesis (server id)")
        return parser

    def take_action(self, args: Any) -> Any:
        return _show(self.app.client_manager.cloudlet.get_synthesis(args.synthesis))

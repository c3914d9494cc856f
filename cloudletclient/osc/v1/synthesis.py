"""openstack cloudlet synthesize | synthesis list|show"""

from __future__ import annotations

from typing import Any

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
    "created_at",
    "updated_at",
)
LIST_COLUMNS = ("id", "name", "overlay_id", "state", "stage", "progress")


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
        return common.show(synthesis, COLUMNS)


class ListSynthesis(command.Lister):
    """List the project's syntheses."""

    def take_action(self, args: Any) -> Any:
        return common.rows(self.app.client_manager.cloudlet.syntheses(), LIST_COLUMNS)


class ShowSynthesis(command.ShowOne):
    """Show a synthesis and its server's state."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument("synthesis", metavar="<synthesis>", help="synthesis (server id)")
        return parser

    def take_action(self, args: Any) -> Any:
        return common.show(self.app.client_manager.cloudlet.get_synthesis(args.synthesis), COLUMNS)

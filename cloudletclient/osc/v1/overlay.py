"""openstack cloudlet overlay create|list|show|download|delete"""

from __future__ import annotations

from typing import Any

from osc_lib.command import command

from cloudletclient.osc.v1 import common

COLUMNS = (
    "id",
    "name",
    "base_id",
    "base_disk_image_id",
    "status",
    "visibility",
    "project_id",
    "size",
    "checksum",
    "chunks",
    "created_at",
    "updated_at",
)
LIST_COLUMNS = ("id", "name", "base_id", "status", "visibility", "size")


class ListOverlay(command.Lister):
    """List the overlays the project can see."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument("--base-id", metavar="<base-id>", help="only overlays of this base")
        return parser

    def take_action(self, args: Any) -> Any:
        query = {"base_id": args.base_id} if args.base_id else {}
        return common.rows(self.app.client_manager.cloudlet.overlays(**query), LIST_COLUMNS)


class ShowOverlay(command.ShowOne):
    """Show an overlay."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument("overlay", metavar="<overlay>", help="overlay (name or id)")
        return parser

    def take_action(self, args: Any) -> Any:
        client = self.app.client_manager.cloudlet
        overlay = client.find_overlay(args.overlay)
        if overlay.chunks is None:  # found by name in the list, which leaves chunks out
            overlay = client.get_overlay(overlay.id)
        return common.show(overlay, COLUMNS)


class DeleteOverlay(command.Command):
    """Delete overlays."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument(
            "overlays", metavar="<overlay>", nargs="+", help="overlay(s) (name or id)"
        )
        return parser

    def take_action(self, args: Any) -> None:
        client = self.app.client_manager.cloudlet
        for ref in args.overlays:
            client.delete_overlay(client.find_overlay(ref))


class DownloadOverlay(command.Command):
    """Download an overlay file."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument("overlay", metavar="<overlay>", help="overlay (name or id)")
        parser.add_argument(
            "--file", metavar="<file>", required=True, help="where to write it ('-': stdout)"
        )
        return parser

    def take_action(self, args: Any) -> None:
        client = self.app.client_manager.cloudlet
        overlay = client.find_overlay(args.overlay)
        common.download(
            args.file, lambda out, progress: client.download_overlay(overlay, out, progress)
        )


class CreateOverlay(command.ShowOne):
    """Capture an overlay of a running server (on its compute host)."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument("server", metavar="<server>", help="server (name or id)")
        parser.add_argument("--name", metavar="<name>", required=True, help="overlay image name")
        parser.add_argument(
            "--after",
            choices=("resume", "delete"),
            default="resume",
            help="what happens to the server once captured (default resume)",
        )
        parser.add_argument("--codec", choices=("zstd", "xz"), help="compression")
        parser.add_argument("--public", action="store_true", help="a public overlay (admins)")
        common.add_wait(parser)
        return parser

    def take_action(self, args: Any) -> Any:
        client = self.app.client_manager.cloudlet
        task = client.create_overlay(
            common.find_server(self.app, args.server),
            args.name,
            args.after,
            args.codec,
            args.public,
        )
        if args.wait:
            task = common.wait(client, task, args.wait_timeout)
        return common.show(task, common.TASK_COLUMNS)

"""openstack cloudlet base import|export|list|show|delete|create"""

from __future__ import annotations

import os
from typing import Any

from osc_lib.cli import format_columns
from osc_lib.command import command

from cloudletclient.osc.v1 import common

COLUMNS = (
    "id",
    "name",
    "base_id",
    "memory_image_id",
    "status",
    "visibility",
    "project_id",
    "size",
    "disk_size",
    "memory_size",
    "min_ram",
    "configuration",
    "cached_on",
    "created_at",
    "updated_at",
)
LIST_COLUMNS = (
    "id",
    "name",
    "base_id",
    "status",
    "visibility",
    "disk_size",
    "memory_size",
    "cached_on",
    "created_at",
)
# a table shows these as key='value' pairs and comma-separated names; -f json keeps them whole
FORMATTERS = {"configuration": format_columns.DictColumn, "cached_on": format_columns.ListColumn}


class ListBase(command.Lister):
    """List the base VMs the project can see."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument("--base-id", metavar="<base-id>", help="only this engine base id")
        return parser

    def take_action(self, args: Any) -> Any:
        query = {"base_id": args.base_id} if args.base_id else {}
        bases = self.app.client_manager.cloudlet.bases(**query)
        return common.rows(bases, LIST_COLUMNS, FORMATTERS)


class ShowBase(command.ShowOne):
    """Show a base VM."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument("base", metavar="<base>", help="base (name or id)")
        return parser

    def take_action(self, args: Any) -> Any:
        base = self.app.client_manager.cloudlet.find_base(args.base)
        return common.show(base, COLUMNS, FORMATTERS)


class DeleteBase(command.Command):
    """Delete base VMs (their disk and memory images)."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument("bases", metavar="<base>", nargs="+", help="base(s) (name or id)")
        return parser

    def take_action(self, args: Any) -> None:
        client = self.app.client_manager.cloudlet
        for ref in args.bases:
            client.delete_base(client.find_base(ref))


class ExportBase(command.Command):
    """Download a base VM as a package (.cbase) another cloudlet can import."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument("base", metavar="<base>", help="base (name or id)")
        parser.add_argument(
            "--file", metavar="<file>", required=True, help="where to write it ('-': stdout)"
        )
        return parser

    def take_action(self, args: Any) -> None:
        client = self.app.client_manager.cloudlet
        base = client.find_base(args.base)
        common.download(args.file, lambda out, progress: client.export_base(base, out, progress))


class ImportBase(command.ShowOne):
    """Import a base-VM package (.cbase): upload a file, or have the service fetch a URL."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("package", metavar="<package>", nargs="?", help="a .cbase file")
        source.add_argument("--url", metavar="<url>", help="fetched by the service (allow-list)")
        parser.add_argument("--name", metavar="<name>", help="image name (default: the package's)")
        parser.add_argument("--public", action="store_true", help="a public base (admins)")
        common.add_wait(parser)
        return parser

    def take_action(self, args: Any) -> Any:
        client = self.app.client_manager.cloudlet
        if args.url:
            task = client.import_base(url=args.url, name=args.name, public=args.public)
        else:
            line = common.ProgressLine()
            with open(args.package, "rb") as f:
                task = client.import_base(
                    f,
                    os.fstat(f.fileno()).st_size,
                    name=args.name,
                    public=args.public,
                    progress=line.bytes,
                )
            line.end()
        if args.wait:
            task = common.wait(client, task, args.wait_timeout)
        return common.show(task, common.TASK_COLUMNS)


class CreateBase(command.ShowOne):
    """Create a base VM from a running server (its memory and disk, on its compute host)."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument("server", metavar="<server>", help="server (name or id)")
        parser.add_argument("--name", metavar="<name>", required=True, help="image name")
        parser.add_argument("--public", action="store_true", help="a public base (admins)")
        common.add_wait(parser)
        return parser

    def take_action(self, args: Any) -> Any:
        client = self.app.client_manager.cloudlet
        task = client.create_base(common.find_server(self.app, args.server), args.name, args.public)
        if args.wait:
            task = common.wait(client, task, args.wait_timeout)
        return common.show(task, common.TASK_COLUMNS)

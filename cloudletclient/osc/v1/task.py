"""openstack cloudlet task list|show"""

from __future__ import annotations

from typing import Any

from osc_lib.command import command

from cloudletclient.osc.v1 import common

LIST_COLUMNS = ("id", "kind", "name", "state", "stage", "progress")


class ListTask(command.Lister):
    """List the project's tasks."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument(
            "--kind", choices=("import-base", "create-base", "capture-overlay", "synthesize")
        )
        parser.add_argument("--state", choices=("running", "succeeded", "failed"))
        return parser

    def take_action(self, args: Any) -> Any:
        query = {k: v for k, v in (("kind", args.kind), ("state", args.state)) if v}
        return common.rows(self.app.client_manager.cloudlet.tasks(**query), LIST_COLUMNS)


class ShowTask(command.ShowOne):
    """Show a task."""

    def get_parser(self, prog_name: str) -> Any:
        parser = super().get_parser(prog_name)
        parser.add_argument("task", metavar="<task>", help="task id")
        return parser

    def take_action(self, args: Any) -> Any:
        return common.show(
            self.app.client_manager.cloudlet.get_task(args.task), common.TASK_COLUMNS
        )

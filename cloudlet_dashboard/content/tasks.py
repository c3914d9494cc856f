"""A long operation in the table of what it makes: the task's stage and progress in the row
until the result exists (then the row turns into it), or the service's message if it failed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.utils.translation import gettext_lazy as _

from cloudlet_dashboard.api import cloudlet

TASK_ROW_PREFIX = "task-"
# failed tasks stay in their table for a day, so that the service's message can be read
FAILED_SHOWN_FOR = timedelta(days=1)


# the status column of a table whose rows are Glance images (Glance's image status) or tasks
# still making one ("running", "succeeded" or "error")
ROW_STATUS_CHOICES = (
    ("active", True),
    ("succeeded", True),
    ("error", False),
    ("killed", False),
    ("deleted", False),
    ("deactivated", False),
)


def is_result(datum: Any) -> bool:
    """A row of the table's own resource (a base, an overlay), not a task still making it."""
    return not getattr(datum, "is_task", False)


class TaskRow:
    """A table row for a task (import-base, create-base, capture-overlay)."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.id = TASK_ROW_PREFIX + task.id
        self.name = task.name
        self.base_id = task.base_id
        self.created_at = task.created_at
        self.status = "error" if task.state == "failed" else task.state
        self.error = task.error
        self.visibility = "-"  # the result's, once there is one
        self.is_task = True

    @property
    def activity(self) -> str:
        """What the task does now, e.g. "verify (42%)", or why it failed."""
        if self.task.state == "failed":
            return _("Failed: %s") % (self.task.error or _("no reason given"))
        percent = round((self.task.progress or 0) * 100)
        return f"{self.task.stage or self.task.kind} ({percent}%)"


def is_task_row(row_id: str) -> bool:
    return row_id.startswith(TASK_ROW_PREFIX)


def task_id_of(row_id: str) -> str:
    return row_id[len(TASK_ROW_PREFIX) :]


def pending_rows(request: Any, kinds: tuple[str, ...]) -> list[TaskRow]:
    """Rows of the running tasks of these kinds, and of those that failed lately."""
    since = datetime.now(UTC) - FAILED_SHOWN_FOR
    rows = []
    for kind in kinds:
        for task in cloudlet.task_list(request, kind=kind):
            if task.state == "running" or (
                task.state == "failed" and _parse_time(task.created_at) >= since
            ):
                rows.append(TaskRow(task))
    return rows


def _parse_time(value: str | None) -> datetime:
    if not value:
        return datetime.min.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

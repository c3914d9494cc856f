"""What the commands share: output columns, the progress line, waiting for a task."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from openstack import exceptions as sdk_exceptions
from osc_lib import exceptions

TASK_COLUMNS = (
    "id",
    "kind",
    "name",
    "state",
    "stage",
    "progress",
    "host",
    "server_id",
    "base_id",
    "images",
    "error",
    "created_at",
    "updated_at",
)


def show(
    resource: Any, columns: tuple[str, ...], formatters: dict[str, Any] | None = None
) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    return columns, _values(resource, columns, formatters or {})


def rows(
    resources: Any, columns: tuple[str, ...], formatters: dict[str, Any] | None = None
) -> tuple[tuple[str, ...], list[tuple]]:
    return columns, [_values(r, columns, formatters or {}) for r in resources]


def _values(resource: Any, columns: tuple[str, ...], formatters: dict[str, Any]) -> tuple:
    """The columns' values; those with a formatter (an osc-lib FormattableColumn) wrapped in it,
    unless absent (None stays None)."""
    values = []
    for column in columns:
        value = getattr(resource, column)
        formatter = formatters.get(column)
        values.append(formatter(value) if formatter is not None and value is not None else value)
    return tuple(values)


class ProgressLine:
    """One live line on stderr: percent and stage (a terminal redraws it in place)."""

    def __init__(self) -> None:
        self._last: tuple[Any, ...] | None = None
        self._tty = sys.stderr.isatty()

    def task(self, task: Any) -> None:
        seen = (round(task.progress or 0.0, 3), task.stage)
        if seen != self._last:
            self._last = seen
            self._write(f"[{(task.progress or 0.0) * 100:5.1f} %] {task.stage}")

    def bytes(self, done: int, total: int) -> None:
        percent = done * 100 / total if total else 100.0
        seen = (round(percent), "bytes")
        if seen != self._last:
            self._last = seen
            self._write(f"[{percent:5.1f} %] sent {done >> 20} of {total >> 20} MiB")

    def _write(self, text: str) -> None:
        sys.stderr.write(("\r\033[K" if self._tty else "") + text + ("" if self._tty else "\n"))
        sys.stderr.flush()

    def end(self) -> None:
        if self._tty and self._last is not None:
            sys.stderr.write("\n")
            sys.stderr.flush()


def wait(client: Any, task: Any, timeout: float) -> Any:
    """Follow the task with a progress line; CommandError (exit 1) with the service's reason
    if it fails."""
    line = ProgressLine()
    try:
        return client.wait_for_task(task, timeout=timeout, interval=1.0, callback=line.task)
    except (sdk_exceptions.ResourceFailure, sdk_exceptions.ResourceTimeout) as e:
        raise exceptions.CommandError(str(e)) from None
    finally:
        line.end()


def add_wait(parser: Any) -> None:
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait for the task to end, with a progress line on stderr",
    )
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=3600,
        metavar="<seconds>",
        help="give up waiting after this long (the task keeps running)",
    )


def find_server(app: Any, name_or_id: str) -> str:
    compute = app.client_manager.sdk_connection.compute
    try:
        return compute.find_server(name_or_id, ignore_missing=False).id
    except sdk_exceptions.ResourceNotFound:
        raise exceptions.CommandError(f"no server with id or name {name_or_id!r}") from None


def download(path: str, fetch: Callable[[Any, Any], Any]) -> None:
    """Run fetch(output, progress) into `path` ('-': stdout) through `path`.part, renamed when
    complete: never a partial file under the name asked for."""
    if path == "-":
        fetch(sys.stdout.buffer, None)
        return
    line = ProgressLine()
    tmp = f"{path}.part"
    try:
        with open(tmp, "wb") as out:
            fetch(out, line.bytes)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        line.end()

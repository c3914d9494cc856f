"""What the panels share: reporting the service's refusals with its own message.

horizon.exceptions.handle() shows the text of a Horizon exception (CloudletError is one) in
place of the message it is given, so the panels say "<what>: <the service's message>"
themselves."""

from __future__ import annotations

from typing import Any, NoReturn

from horizon import exceptions, messages

from cloudlet_dashboard.api import cloudlet


def report(request: Any, what: str, error: cloudlet.CloudletError) -> None:
    messages.error(request, f"{what}: {error}")


def fail_to(request: Any, what: str, error: cloudlet.CloudletError, redirect: str) -> NoReturn:
    """Report and send the browser to `redirect` (a page that cannot be shown)."""
    report(request, what, error)
    raise exceptions.Http302(redirect) from error


def refused(request: Any, what: str, error: cloudlet.CloudletError) -> NoReturn:
    """Report and end a table action as handled (Horizon then adds no generic "Unable to
    ..." message of its own)."""
    report(request, what, error)
    raise exceptions.HandledException((type(error), error, error.__traceback__)) from error


def file_name(name: str | None, fallback: str) -> str:
    """A download's file name made of safe characters only."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in (name or ""))
    return safe.strip(".") or fallback

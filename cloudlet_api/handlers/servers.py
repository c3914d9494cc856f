"""Starting work on a compute host for one of the caller's servers (capture, base creation)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import oslo_messaging as messaging
from nova import exception as nova_exception

from cloudlet_api import errors, rpc
from cloudlet_api.clients import HOST_ATTR
from cloudlet_api.context import Request
from cloudlet_api.tasks import FAILED, Task


def start_on_host(
    req: Request, server_id: str, kind: str, name: str, send: Callable[[Any, str, str], Any]
) -> Task:
    """Check the caller owns the running server (a Nova GET with the caller's token: another
    project's server is a 404 there), find its compute host, record a task and send the request
    (`send(nova_context, host, task_id)`)."""
    server = req.nova().get_server(server_id)
    if server.get("status") != "ACTIVE":
        raise errors.Conflict(
            f"server {server_id} is {server.get('status')}, not ACTIVE: only a running server "
            "can be captured or made into a base"
        )
    host = req.service.clients.service_nova().get_server(server_id).get(HOST_ATTR)
    if not host:
        raise errors.Conflict(f"server {server_id} has no compute host yet")
    ctx = req.context
    task = req.service.tasks.new(
        ctx.project_id, ctx.user_id, kind, name=name, host=host, server_id=server_id
    )
    try:
        send(rpc.nova_context(ctx), host, task.id)
    except nova_exception.NovaException as e:  # refused before it started (state, base, ...)
        _fail(req, task, e.format_message())
        # a server in the wrong state is a conflict, as Nova's API answers it
        status = 409 if isinstance(e, nova_exception.InstanceInvalidState) else e.code
        error = {400: errors.BadRequest, 404: errors.NotFound}.get(status, errors.Conflict)
        raise error(f"compute host {host} refused: {e.format_message()}") from None
    except messaging.RemoteError as e:
        _fail(req, task, e.value)
        raise errors.BadGateway(f"compute host {host} failed: {e.value}") from None
    except messaging.MessagingException as e:
        _fail(req, task, str(e))
        raise errors.BadGateway(f"compute host {host} did not answer: {e}") from None
    return task


def _fail(req: Request, task: Task, reason: str) -> None:
    task.state, task.error = FAILED, reason
    req.service.tasks.save(task)

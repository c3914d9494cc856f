"""GET /tasks, GET /tasks/{task_id}; and how a running task's record is brought up to date from
whoever runs it (this service, a compute host, Nova)."""

from __future__ import annotations

import os
from typing import Any

import oslo_messaging as messaging
from oslo_log import log as logging

from cloudlet_api import errors, rpc
from cloudlet_api.context import Request, json_response
from cloudlet_api.policies import tasks as policies
from cloudlet_api.schemas import tasks as schemas
from cloudlet_api.tasks import (
    CAPTURE_OVERLAY,
    CREATE_BASE,
    FAILED,
    IMPORT_BASE,
    SUCCEEDED,
    SYNTHESIZE,
    Task,
)

LOG = logging.getLogger(__name__)


def list_tasks(req: Request) -> Any:
    req.authorize(policies.LIST)
    query = req.query(schemas.LIST_QUERY)
    found = req.service.tasks.list(req.context.project_id, query.get("kind"), query.get("state"))
    return json_response({"tasks": [refresh(req, t).view() for t in found]})


def show_task(req: Request) -> Any:
    req.authorize(policies.SHOW)
    return json_response({"task": refresh(req, get_task(req, req.params_in_path["id"])).view()})


def get_task(req: Request, task_id: str) -> Task:
    task = req.service.tasks.get(task_id, req.context.project_id)
    if task is None:
        raise errors.NotFound(f"task {task_id} not found")
    return task


def refresh(req: Request, task: Task) -> Task:
    """Ask whoever runs a running task how far it is, and record the answer."""
    if task.done:
        return task
    before = (task.state, task.stage, task.progress)
    if task.kind == IMPORT_BASE:
        _refresh_import(task)
    elif task.kind in (CREATE_BASE, CAPTURE_OVERLAY):
        _refresh_host_task(req, task)
    elif task.kind == SYNTHESIZE:
        refresh_synthesis(req, task)
    if (task.state, task.stage, task.progress) != before:
        req.service.tasks.save(task)
    return task


def _refresh_import(task: Task) -> None:
    if task.pid is None:
        return
    try:
        os.kill(task.pid, 0)
    except ProcessLookupError:
        task.state = FAILED
        task.error = "interrupted: the cloudlet-api process running the import ended"


def _refresh_host_task(req: Request, task: Task) -> None:
    client = rpc.client(req.service.conf)
    try:
        remote = client.get_task(rpc.nova_context(req.context), task.host, task.id)
    except messaging.MessagingException as e:
        LOG.warning("could not read task %s from host %s: %s", task.id, task.host, e)
        return
    if remote is None:
        task.state = FAILED
        task.error = f"compute host {task.host} has no record of the task (was it reinstalled?)"
        return
    task.state, task.stage, task.progress = remote.state, remote.stage, remote.progress
    task.base_id = remote.base_id
    task.images = dict(remote.images)
    task.stats = dict(remote.stats)
    task.error = remote.error


def refresh_synthesis(req: Request, task: Task) -> dict[str, Any] | None:
    """Update a synthesis task from its server (as the caller sees it); returns the server."""
    try:
        server = req.nova().get_server(str(task.server_id))
    except errors.NotFound:
        task.state = FAILED
        task.error = f"server {task.server_id} was deleted before it became active"
        return None
    status = server.get("status")
    if status == "ACTIVE":
        task.state, task.stage, task.progress = SUCCEEDED, "active", 1.0
    elif status == "ERROR":
        task.state = FAILED
        task.error = (server.get("fault") or {}).get("message") or "the server went to ERROR"
    else:
        task.stage = server.get("OS-EXT-STS:task_state") or str(status).lower()
        task.progress = max(task.progress, float(server.get("progress") or 0) / 100)
    return server

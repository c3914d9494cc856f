"""Syntheses: a Nova server created from an overlay image (the compute driver does the rest);
each is the record of that request, tracked through the server's state, with the per-stage
statistics its compute host recorded (cloudlet_nova.records, read by RPC get_synthesis)."""

from __future__ import annotations

from typing import Any

import oslo_messaging as messaging
from oslo_log import log as logging

from cloudlet_api import errors, rpc
from cloudlet_api.clients import HOST_ATTR
from cloudlet_api.context import Request, json_response
from cloudlet_api.handlers.tasks import refresh, refresh_synthesis
from cloudlet_api.policies import syntheses as policies
from cloudlet_api.schemas import syntheses as schemas
from cloudlet_api.tasks import SYNTHESIZE, Task
from cloudlet_nova import glance as cloudlet_glance

LOG = logging.getLogger(__name__)
_STAGE_FIELDS = ("start", "end", "seconds", "bytes", "failed")


def view(
    task: Task, server: dict[str, Any] | None = None, statistics: dict[str, Any] | None = None
) -> dict[str, Any]:
    out = {
        "id": task.server_id,
        "name": task.name,
        "overlay_id": task.images.get("overlay"),
        "task_id": task.id,
        "state": task.state,
        "stage": task.stage,
        "progress": task.progress,
        "error": task.error,
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "statistics": statistics,
    }
    if server is not None:
        out["server"] = {
            "status": server.get("status"),
            "task_state": server.get("OS-EXT-STS:task_state"),
            "addresses": server.get("addresses", {}),
        }
    return out


def statistics_view(record: dict[str, Any]) -> dict[str, Any]:
    """The host's record as the API shows it: stages in the order they started."""
    stats = record.get("stats") or {}
    stages = [
        {"name": name, **{k: stage.get(k) for k in _STAGE_FIELDS}}
        for name, stage in (stats.get("stages") or {}).items()
    ]
    stages.sort(key=lambda s: (s["start"] is None, s["start"] or 0.0))
    return {
        "state": record.get("state"),
        "error": record.get("error"),
        "started_at": record.get("started_at"),
        "stages": stages,
        "counters": dict(stats.get("counters") or {}),
    }


def statistics(req: Request, server_id: str) -> dict[str, Any] | None:
    """The statistics of a server the caller's own GET just found: its compute host (read with
    the service's identity, as for capture) asked with the caller's context, which the host
    scopes to the caller's project. None when there is no record (yet), or no host to ask."""
    try:
        host = req.service.clients.service_nova().get_server(server_id).get(HOST_ATTR)
    except errors.NotFound:
        return None  # deleted since
    if not host:
        return None  # not scheduled yet
    try:
        record = rpc.client(req.service.conf).get_synthesis(
            rpc.nova_context(req.context), host, server_id
        )
    except messaging.MessagingException as e:
        LOG.warning("could not read synthesis %s from host %s: %s", server_id, host, e)
        return None
    return statistics_view(record) if record is not None else None


def _callers_server(req: Request, task: Task) -> dict[str, Any] | None:
    try:
        return req.nova().get_server(str(task.server_id))
    except errors.NotFound:
        return None


def create_synthesis(req: Request) -> Any:
    req.authorize(policies.CREATE)
    body = req.json_body(schemas.CREATE)
    overlay_id = body["overlay_id"]
    req.glance().cloudlet_image(overlay_id, cloudlet_glance.Kind.OVERLAY, "overlay")
    server = req.nova().create_server(
        {
            "name": body["name"],
            "imageRef": overlay_id,
            "flavorRef": body["flavor_id"],
            "networks": (
                [{"uuid": body["network_id"]}]
                if "network_id" in body
                else body.get("network", "auto")
            ),
        }
    )
    ctx = req.context
    task = req.service.tasks.new(
        ctx.project_id,
        ctx.user_id,
        SYNTHESIZE,
        name=body["name"],
        server_id=server["id"],
        images={"overlay": overlay_id},
        stage="building",
    )
    return json_response(
        {"synthesis": view(task), "task": task.view()},
        status=202,
        headers={"Location": f"{req.application_url}/syntheses/{server['id']}"},
    )


def list_syntheses(req: Request) -> Any:
    req.authorize(policies.LIST)
    req.query(schemas.LIST_QUERY)
    rows = []
    for task in req.service.tasks.list(req.context.project_id, kind=SYNTHESIZE):
        task = refresh(req, task)
        found = _callers_server(req, task) is not None
        rows.append(view(task, statistics=statistics(req, str(task.server_id)) if found else None))
    return json_response({"syntheses": rows})


def show_synthesis(req: Request) -> Any:
    req.authorize(policies.SHOW)
    server_id = req.params_in_path["id"]
    found = [
        t
        for t in req.service.tasks.list(req.context.project_id, kind=SYNTHESIZE)
        if t.server_id == server_id
    ]
    if not found:
        raise errors.NotFound(f"synthesis {server_id} not found")
    task = found[-1]
    server: dict[str, Any] | None = None
    if task.done:
        server = _callers_server(req, task)  # None: deleted since, the record stays
    else:
        server = refresh_synthesis(req, task)
        req.service.tasks.save(task)
    stats = statistics(req, server_id) if server is not None else None
    return json_response({"synthesis": view(task, server, stats)})

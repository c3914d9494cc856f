"""Syntheses: a Nova server created from an overlay image (the compute driver does the rest);
each is the record of that request, tracked through the server's state."""

from __future__ import annotations

from typing import Any

from cloudlet_api import errors
from cloudlet_api.context import Request, json_response
from cloudlet_api.handlers.tasks import refresh, refresh_synthesis
from cloudlet_api.policies import syntheses as policies
from cloudlet_api.schemas import syntheses as schemas
from cloudlet_api.tasks import SYNTHESIZE, Task
from cloudlet_nova import glance as cloudlet_glance


def view(task: Task, server: dict[str, Any] | None = None) -> dict[str, Any]:
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
    }
    if server is not None:
        out["server"] = {
            "status": server.get("status"),
            "task_state": server.get("OS-EXT-STS:task_state"),
            "addresses": server.get("addresses", {}),
        }
    return out


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
    found = req.service.tasks.list(req.context.project_id, kind=SYNTHESIZE)
    return json_response({"syntheses": [view(refresh(req, t)) for t in found]})


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
        try:
            server = req.nova().get_server(server_id)
        except errors.NotFound:
            pass  # deleted since: the record stays
    else:
        server = refresh_synthesis(req, task)
        req.service.tasks.save(task)
    return json_response({"synthesis": view(task, server)})

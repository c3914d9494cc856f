"""Base VMs: Glance base-disk images (each linked to its memory image)."""

from __future__ import annotations

from typing import Any

import webob

from cloudlet_api import errors, exports, rpc
from cloudlet_api.context import JSON, Request, json_response, no_content
from cloudlet_api.handlers.servers import start_on_host
from cloudlet_api.policies import bases as policies
from cloudlet_api.schemas import bases as schemas
from cloudlet_api.tasks import CREATE_BASE
from cloudlet_nova import glance as cloudlet_glance
from cloudlet_nova.objects import CloudletCreateBaseRequest

KIND = cloudlet_glance.Kind.BASE_DISK
PACKAGE = "application/octet-stream"


def view(image: dict[str, Any], info: cloudlet_glance.CloudletImage) -> dict[str, Any]:
    return {
        "id": image["id"],
        "name": image.get("name"),
        "base_id": info.base_id,
        "memory_image_id": info.memory_image,
        "status": image.get("status"),
        "visibility": image.get("visibility"),
        "project_id": image.get("owner"),
        "size": image.get("size"),
        "min_ram": image.get("min_ram"),
        "created_at": image.get("created_at"),
        "updated_at": image.get("updated_at"),
    }


def task_response(req: Request, task: Any) -> Any:
    return json_response(
        {"task": task.view()},
        status=202,
        headers={"Location": f"{req.application_url}/tasks/{task.id}"},
    )


def list_bases(req: Request) -> Any:
    req.authorize(policies.LIST)
    query = req.query(schemas.LIST_QUERY)
    found = req.glance().cloudlet_images(KIND, query.get("base_id"))
    return json_response({"bases": [view(image, info) for image, info in found]})


def show_base(req: Request) -> Any:
    req.authorize(policies.SHOW)
    image, info = req.glance().cloudlet_image(req.params_in_path["id"], KIND, "base")
    return json_response({"base": view(image, info)})


def delete_base(req: Request) -> Any:
    """Deletes the disk image, then its memory image; refused while an overlay the caller can
    see still needs the base."""
    req.authorize(policies.DELETE)
    glance = req.glance()
    image_id = req.params_in_path["id"]
    image, info = glance.cloudlet_image(image_id, KIND, "base")
    users = glance.list_images(
        **{
            cloudlet_glance.TYPE: cloudlet_glance.Kind.OVERLAY.value,
            cloudlet_glance.BASE_DISK_IMAGE: image_id,
        }
    )
    if users:
        raise errors.Conflict(
            f"base {image_id} is used by {len(users)} overlay(s) "
            f"({', '.join(u['id'] for u in users[:5])}): delete them first"
        )
    glance.delete_image(image_id, f"deleting base {image_id}")
    try:
        glance.delete_image(str(info.memory_image), f"deleting memory image {info.memory_image}")
    except errors.NotFound:
        pass  # already gone: nothing of the base is left
    return no_content()


def export_base(req: Request) -> Any:
    """The base as a package (.cbase), streamed."""
    req.authorize(policies.EXPORT)
    glance = req.glance()
    image, info = glance.cloudlet_image(req.params_in_path["id"], KIND, "base")
    size, chunks = exports.export(req.service.imports, glance, image, info)
    resp = webob.Response(status=200, content_type=PACKAGE, charset=None, app_iter=chunks)
    resp.content_length = size
    resp.content_disposition = f'attachment; filename="{info.base_id[:12]}.cbase"'
    return resp


def create_base(req: Request) -> Any:
    req.authorize(policies.CREATE)
    body = req.json_body(schemas.CREATE)

    def send(ctxt: Any, host: str, task_id: str) -> Any:
        request = CloudletCreateBaseRequest(
            task_id=task_id,
            instance_uuid=body["server_id"],
            name=body["name"],
            public=body.get("public", False),
        )
        return rpc.client(req.service.conf).create_base(ctxt, host, request)

    return task_response(
        req, start_on_host(req, body["server_id"], CREATE_BASE, body["name"], send)
    )


def import_base(req: Request) -> Any:
    """An upload (the package as the body) or a URL import (a JSON body naming the URL)."""
    req.authorize(policies.IMPORT)
    importer = req.service.imports
    if req.content_type == PACKAGE:
        query = req.query(schemas.IMPORT_UPLOAD_QUERY)
        task = importer.upload(
            req.context,
            req.glance(),
            req.body_file_raw,
            req.content_length,
            query.get("name"),
            query.get("public") == "true",
        )
    elif req.content_type == JSON:
        req.query(schemas.IMPORT_URL_QUERY)
        body = req.json_body(schemas.IMPORT_URL)
        task = importer.url(
            req.context, req.glance(), body["url"], body.get("name"), body.get("public", False)
        )
    else:
        raise errors.UnsupportedMediaType(
            f"POST /bases/import takes a package ({PACKAGE}) or a URL ({JSON}), not "
            f"{req.content_type or 'no Content-Type'!r}"
        )
    return task_response(req, task)

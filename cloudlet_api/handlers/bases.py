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
from cloudlet_nova.cache import base_trait
from cloudlet_nova.objects import CloudletCreateBaseRequest

KIND = cloudlet_glance.Kind.BASE_DISK
MEMORY = cloudlet_glance.Kind.BASE_MEMORY
PACKAGE = "application/octet-stream"


def view(
    image: dict[str, Any],
    info: cloudlet_glance.CloudletImage,
    memory: dict[str, Any] | None,
    cached_on: dict[str, list[str]] | None,
) -> dict[str, Any]:
    """`memory`: the base's memory image (None when the caller cannot read it); `cached_on`:
    the hosts caching each base id, None when policy hides them (the field is left out)."""
    body = {
        "id": image["id"],
        "name": image.get("name"),
        "base_id": info.base_id,
        "memory_image_id": info.memory_image,
        "status": image.get("status"),
        "visibility": image.get("visibility"),
        "project_id": image.get("owner"),
        "size": image.get("size"),
        "disk_size": image.get("size"),
        "memory_size": memory.get("size") if memory is not None else None,
        "min_ram": image.get("min_ram"),
        "configuration": cloudlet_glance.configuration(image),
        "created_at": image.get("created_at"),
        "updated_at": image.get("updated_at"),
    }
    if cached_on is not None:
        body["cached_on"] = cached_on.get(info.base_id, [])
    return body


def memory_image(
    info: cloudlet_glance.CloudletImage,
    candidate: tuple[dict[str, Any], cloudlet_glance.CloudletImage] | None,
) -> dict[str, Any] | None:
    """The memory image the base disk names, if it is one of the same base (as the driver's
    GlanceImages.base_images requires before resuming it)."""
    if candidate is None or candidate[1].base_id != info.base_id:
        return None
    return candidate[0]


def cached_on(req: Request, base_ids: list[str]) -> dict[str, list[str]] | None:
    """Base id -> names of the compute hosts whose resource provider carries its trait (read
    with the service's identity), or None when policy hides host names. One base (show) is one
    Placement query; a list reads every provider's traits once (1 + number of providers
    queries, however many bases), as Placement lists no traits with its providers."""
    if not req.allowed(policies.CACHE_HOSTS):
        return None
    if not base_ids:
        return {}
    placement = req.service.clients.service_placement()
    hosts: dict[str, set[str]] = {}
    if len(base_ids) == 1:
        providers = placement.providers(base_trait(base_ids[0]))
        hosts[base_ids[0]] = {p["name"] for p in providers}
    else:
        wanted = {base_trait(base_id): base_id for base_id in base_ids}
        for provider in placement.providers():
            for trait in placement.traits(provider["uuid"]):
                if trait in wanted:
                    hosts.setdefault(wanted[trait], set()).add(provider["name"])
    return {base_id: sorted(names) for base_id, names in hosts.items()}


def task_response(req: Request, task: Any) -> Any:
    return json_response(
        {"task": task.view()},
        status=202,
        headers={"Location": f"{req.application_url}/tasks/{task.id}"},
    )


def list_bases(req: Request) -> Any:
    req.authorize(policies.LIST)
    query = req.query(schemas.LIST_QUERY)
    glance = req.glance()
    found = glance.cloudlet_images(KIND, query.get("base_id"))
    memories = {
        found_info.image_id: (found_image, found_info)
        for found_image, found_info in glance.cloudlet_images(MEMORY, query.get("base_id"))
    }
    hosts = cached_on(req, sorted({info.base_id for _, info in found}))
    bases = [
        view(image, info, memory_image(info, memories.get(str(info.memory_image))), hosts)
        for image, info in found
    ]
    return json_response({"bases": bases})


def show_base(req: Request) -> Any:
    req.authorize(policies.SHOW)
    glance = req.glance()
    image, info = glance.cloudlet_image(req.params_in_path["id"], KIND, "base")
    try:
        memory = glance.cloudlet_image(str(info.memory_image), MEMORY, "memory image")
    except errors.NotFound:
        memory = None  # deleted, or not readable by the caller: its size is unknown
    hosts = cached_on(req, [info.base_id])
    return json_response({"base": view(image, info, memory_image(info, memory), hosts)})


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

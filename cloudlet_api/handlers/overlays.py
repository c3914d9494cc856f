"""Overlays: Glance overlay images; capture of a running server on its compute host."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import webob
from oslo_log import log as logging

from cloudlet.errors import CloudletError
from cloudlet.overlay.reader import OverlayReader
from cloudlet.sources.glance import GlanceSource
from cloudlet_api import errors, rpc
from cloudlet_api.clients import Glance
from cloudlet_api.context import Request, json_response, no_content
from cloudlet_api.handlers.bases import task_response
from cloudlet_api.handlers.servers import start_on_host
from cloudlet_api.policies import overlays as policies
from cloudlet_api.schemas import overlays as schemas
from cloudlet_api.tasks import CAPTURE_OVERLAY
from cloudlet_nova import glance as cloudlet_glance
from cloudlet_nova.objects import CloudletCaptureRequest

KIND = cloudlet_glance.Kind.OVERLAY
LOG = logging.getLogger(__name__)


def view(image: dict[str, Any], info: cloudlet_glance.CloudletImage) -> dict[str, Any]:
    return {
        "id": image["id"],
        "name": image.get("name"),
        "base_id": info.base_id,
        "base_disk_image_id": info.disk_image,
        "status": image.get("status"),
        "visibility": image.get("visibility"),
        "project_id": image.get("owner"),
        "size": image.get("size"),
        "checksum": image.get("checksum"),
        "created_at": image.get("created_at"),
        "updated_at": image.get("updated_at"),
    }


def list_overlays(req: Request) -> Any:
    req.authorize(policies.LIST)
    query = req.query(schemas.LIST_QUERY)
    found = req.glance().cloudlet_images(KIND, query.get("base_id"))
    return json_response({"overlays": [view(image, info) for image, info in found]})


def show_overlay(req: Request) -> Any:
    """The overlay, with its chunks per image and kind (`chunks`, null if unreadable)."""
    req.authorize(policies.SHOW)
    glance = req.glance()
    image, info = glance.cloudlet_image(req.params_in_path["id"], KIND, "overlay")
    return json_response({"overlay": {**view(image, info), "chunks": chunk_kinds(glance, image)}})


def chunk_kinds(glance: Glance, image: dict[str, Any]) -> dict[str, dict[str, int]] | None:
    """From the overlay's own chunk map, verified by the engine's reader against the digests of
    its header and manifest: only the file's head is read from Glance, not its frames. None
    (and a warning in the log) when the image is no readable overlay."""
    overlay_id = image["id"]

    def downloader(image_id: str, offset: int, length: int | None) -> Iterator[bytes]:
        return glance.download(image_id, f"reading overlay {image_id}", offset)[1]

    source = GlanceSource(f"glance://{overlay_id}", downloader, size=image.get("size"))
    try:
        with (
            source.stream() as stream,
            OverlayReader.open(stream, f"overlay {overlay_id}") as reader,
        ):
            return reader.chunk_kinds()
    except (CloudletError, errors.APIError) as e:
        LOG.warning("overlay %s: no chunk kinds: %s", overlay_id, getattr(e, "detail", e))
        return None
    finally:
        source.close()


def download_overlay(req: Request) -> Any:
    """The overlay file, streamed from Glance as it arrives."""
    req.authorize(policies.DOWNLOAD)
    glance = req.glance()
    overlay_id = req.params_in_path["id"]
    image, _ = glance.cloudlet_image(overlay_id, KIND, "overlay")
    length, chunks = glance.download(overlay_id, f"downloading overlay {overlay_id}")
    resp = webob.Response(
        status=200, content_type="application/octet-stream", charset=None, app_iter=chunks
    )
    if length is not None:
        resp.content_length = length
    if image.get("name"):
        resp.content_disposition = f'attachment; filename="{image["id"]}.overlay"'
    return resp


def delete_overlay(req: Request) -> Any:
    req.authorize(policies.DELETE)
    glance = req.glance()
    overlay_id = req.params_in_path["id"]
    glance.cloudlet_image(overlay_id, KIND, "overlay")
    glance.delete_image(overlay_id, f"deleting overlay {overlay_id}")
    return no_content()


def create_overlay(req: Request) -> Any:
    req.authorize(policies.CREATE)
    body = req.json_body(schemas.CREATE)

    def send(ctxt: Any, host: str, task_id: str) -> Any:
        request = CloudletCaptureRequest(
            task_id=task_id,
            instance_uuid=body["server_id"],
            name=body["name"],
            after=body.get("after", "resume"),
            codec=body.get("codec", "zstd"),
            public=body.get("public", False),
        )
        return rpc.client(req.service.conf).capture_overlay(ctxt, host, request)

    task = start_on_host(req, body["server_id"], CAPTURE_OVERLAY, body["name"], send)
    return task_response(req, task)

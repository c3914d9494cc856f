"""Glance and Nova, called with the caller's own token (the auth plugin keystonemiddleware put in
the request), so their ownership rules apply to everything this service does for the caller.

Endpoints come from the token's catalog, chosen by the [glance] / [nova] / [placement] adapter
options. The only calls made with the service's own identity ([service_user]) are reading which
compute host runs a server, after the caller's own GET of that server succeeded, and reading
from Placement which compute hosts cache a base the caller was shown (policy
cloudlet:base:cache_hosts).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from keystoneauth1 import session as ks_session
from oslo_config import cfg
from oslo_log import log as logging

from cloudlet_api import conf as api_conf
from cloudlet_api import errors
from cloudlet_nova import glance as cloudlet_glance

LOG = logging.getLogger(__name__)

NOVA_MICROVERSION = "2.37"  # networks "auto"/"none" in server create
PLACEMENT_MICROVERSION = "1.18"  # GET /resource_providers?required=<trait>
HOST_ATTR = "OS-EXT-SRV-ATTR:host"
_CORE_IMAGE_KEYS = {
    "id",
    "name",
    "status",
    "visibility",
    "owner",
    "size",
    "checksum",
    "created_at",
    "updated_at",
    "disk_format",
    "container_format",
    "min_ram",
}
DOWNLOAD_CHUNK = 1 << 20


def _raise_for(resp: Any, what: str) -> None:
    """Map an error answer of Glance/Nova onto ours, keeping their message."""
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        message = _message(body)
    except ValueError:
        message = resp.text[:300]
    detail = f"{what}: {message}" if message else what
    kind = {
        400: errors.BadRequest,
        403: errors.Forbidden,
        404: errors.NotFound,
        409: errors.Conflict,
        413: errors.PayloadTooLarge,
    }.get(resp.status_code)
    if kind is None:
        raise errors.BadGateway(f"{detail} (HTTP {resp.status_code})")
    raise kind(detail)


def _message(body: Any) -> str:
    """The message of an error body: Nova's {"itemNotFound": {"message"}}, Glance's, or
    cloudlet-api's own {"errors": [{"detail"}]}."""
    if isinstance(body, dict):
        listed = body.get("errors")
        if isinstance(listed, list) and listed and isinstance(listed[0], dict):
            return str(listed[0].get("detail") or listed[0].get("title") or "")
        for value in body.values():
            if isinstance(value, dict) and "message" in value:
                return str(value["message"])
        return str(body.get("message") or body.get("title") or "")
    return ""


def cloudlet_view(image: dict[str, Any]) -> dict[str, Any]:
    """A Glance v2 image in the shape cloudlet_nova.glance.describe reads (Nova's image API
    moves custom properties under "properties")."""
    return {
        "id": image.get("id"),
        "properties": {k: v for k, v in image.items() if k not in _CORE_IMAGE_KEYS},
    }


class Clients:
    """Per-process factory: one keystoneauth session (connection pool) for every request."""

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf
        self.session = ks_session.Session()
        self._service_session: ks_session.Session | None = None

    def glance(self, user_auth: Any) -> Glance:
        return Glance(self._adapter(api_conf.GLANCE, user_auth))

    def nova(self, user_auth: Any) -> Nova:
        return Nova(self._adapter(api_conf.NOVA, user_auth))

    def service_nova(self) -> Nova:
        return Nova(self._service_adapter(api_conf.NOVA))

    def service_placement(self) -> Placement:
        return Placement(self._service_adapter(api_conf.PLACEMENT))

    def _service_adapter(self, group: str) -> Any:
        """An adapter acting as [service_user] (one session, created on first use)."""
        if self._service_session is None:
            auth = ks_loading.load_auth_from_conf_options(self.conf, api_conf.SERVICE_USER)
            self._service_session = ks_loading.load_session_from_conf_options(
                self.conf, api_conf.SERVICE_USER, auth=auth
            )
        return ks_loading.load_adapter_from_conf_options(
            self.conf, group, session=self._service_session
        )

    def _adapter(self, group: str, user_auth: Any) -> Any:
        return ks_loading.load_adapter_from_conf_options(
            self.conf, group, session=self.session, auth=user_auth
        )


class ServiceClient:
    """An OpenStack service's API through a keystoneauth adapter; its error answers become ours
    (same status, their message)."""

    name = ""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter

    def request(self, method: str, url: str, what: str, **kw: Any) -> Any:
        try:
            resp = self.adapter.request(url, method, raise_exc=False, **kw)
        except ks_exc.EndpointNotFound as e:
            raise errors.BadGateway(f"no {self.name} endpoint in the catalog: {e}") from e
        except ks_exc.ConnectFailure as e:
            raise errors.BadGateway(f"{self.name} is unreachable: {e}") from e
        _raise_for(resp, what)
        return resp


class Glance(ServiceClient):
    name = "Glance"

    def list_images(self, **filters: str) -> list[dict[str, Any]]:
        """Every image matching the filters (Glance pages followed)."""
        images: list[dict[str, Any]] = []
        url: str | None = "/v2/images"
        params: dict[str, Any] | None = {**filters, "limit": 200}
        while url:
            body = self.request("GET", url, "listing images", params=params).json()
            images += body.get("images", [])
            url, params = body.get("next"), None
        return images

    def get_image(self, image_id: str, what: str) -> dict[str, Any]:
        return self.request("GET", f"/v2/images/{image_id}", what).json()

    def delete_image(self, image_id: str, what: str) -> None:
        self.request("DELETE", f"/v2/images/{image_id}", what)

    def create_image(self, meta: dict[str, Any]) -> dict[str, Any]:
        return self.request(
            "POST", "/v2/images", f"creating image {meta.get('name')!r}", json=meta
        ).json()

    def upload(self, image_id: str, data: BinaryIO) -> None:
        self.request(
            "PUT",
            f"/v2/images/{image_id}/file",
            f"uploading image {image_id}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    def download(
        self, image_id: str, what: str, offset: int = 0
    ) -> tuple[int | None, Iterator[bytes]]:
        """(length if known, chunks) of the image data from `offset` on, streamed."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self.request(
            "GET", f"/v2/images/{image_id}/file", what, stream=True, headers=headers
        )
        if offset and resp.status_code != 206:
            resp.close()
            raise errors.BadGateway(f"{what}: Glance did not answer the range from {offset}")
        length = resp.headers.get("Content-Length")

        def chunks() -> Iterator[bytes]:
            try:
                yield from resp.iter_content(DOWNLOAD_CHUNK)
            finally:
                resp.close()

        return (int(length) if length else None), chunks()

    def cloudlet_image(
        self, image_id: str, kind: cloudlet_glance.Kind, noun: str
    ) -> tuple[dict[str, Any], cloudlet_glance.CloudletImage]:
        """The image and what its cloudlet properties say; 404 unless it is a `kind` image the
        caller can see."""
        image = self.get_image(image_id, f"{noun} {image_id}")
        info = describe(image)
        if info is None or info.kind is not kind:
            raise errors.NotFound(f"{noun} {image_id}: image {image_id} is not a cloudlet {noun}")
        return image, info

    def cloudlet_images(
        self, kind: cloudlet_glance.Kind, base_id: str | None = None
    ) -> list[tuple[dict[str, Any], cloudlet_glance.CloudletImage]]:
        """The `kind` images the caller can see (of one base, if given), with what their
        cloudlet properties say; images with broken properties are left out."""
        filters = {cloudlet_glance.TYPE: kind.value}
        if base_id is not None:
            filters[cloudlet_glance.BASE_ID] = base_id
        found = []
        for image in self.list_images(**filters):
            info = describe(image)
            if info is not None and info.kind is kind:
                found.append((image, info))
        return found


def describe(image: dict[str, Any]) -> cloudlet_glance.CloudletImage | None:
    """cloudlet_nova.glance.describe on a Glance v2 image; None for plain or broken ones (a broken
    one is logged: listing must not fail because one image has bad properties)."""
    from nova import exception as nova_exception

    try:
        return cloudlet_glance.describe(cloudlet_view(image))
    except nova_exception.NovaException as e:
        LOG.warning("image %s has unusable cloudlet properties: %s", image.get("id"), e)
        return None


class Nova(ServiceClient):
    name = "Nova"

    def get_server(self, server_id: str) -> dict[str, Any]:
        return self.request("GET", f"/servers/{server_id}", f"server {server_id}").json()["server"]

    def create_server(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request(
            "POST",
            "/servers",
            f"creating server {body.get('name')!r}",
            json={"server": body},
            microversion=NOVA_MICROVERSION,
        ).json()["server"]


class Placement(ServiceClient):
    name = "Placement"

    def providers(self, required_trait: str | None = None) -> list[dict[str, Any]]:
        """Every resource provider (only those with `required_trait`, if given)."""
        params = {"required": required_trait} if required_trait else None
        return self.request(
            "GET",
            "/resource_providers",
            "listing resource providers",
            params=params,
            microversion=PLACEMENT_MICROVERSION,
        ).json()["resource_providers"]

    def traits(self, provider_uuid: str) -> list[str]:
        return self.request(
            "GET",
            f"/resource_providers/{provider_uuid}/traits",
            f"traits of resource provider {provider_uuid}",
            microversion=PLACEMENT_MICROVERSION,
        ).json()["traits"]

"""Every call the dashboard makes to cloudlet-api, through the SDK (`conn.cloudlet`).

One connection per request, authenticated with the user's own Keystone token (as Horizon's
own SDK clients do), so the service applies its policy and project checks to the user. Every
error becomes a CloudletError carrying the service's own message: Horizon's error handling
takes any openstacksdk HttpException for an expired login ("Unauthorized: ..."), so none may
escape this module.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from typing import Any, BinaryIO, ParamSpec, TypeVar

import openstack
from django.conf import settings
from horizon import exceptions as horizon_exceptions
from horizon.utils import memoized
from keystoneauth1 import session, token_endpoint
from openstack import exceptions as sdk_exceptions
from openstack_auth import utils as auth_utils
from openstack_dashboard.api import base as horizon_base

from cloudlet.errors import CloudletError as EngineError
from cloudletclient.sdk import register
from cloudletclient.sdk.proxy import Download
from cloudletclient.sdk.resources import Base, Overlay, Synthesis, Task

SERVICE_TYPE = "cloudlet"
P = ParamSpec("P")
T = TypeVar("T")


class CloudletError(horizon_exceptions.Conflict):
    """cloudlet-api refused or failed; str() is the service's message (Horizon shows the text
    of its own exceptions as it is). `status_code` is the HTTP status, None if none came."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def _service_errors(call: Callable[P, T]) -> Callable[P, T]:
    """Every SDK or overlay-reading error of `call` as a CloudletError."""

    @functools.wraps(call)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return call(*args, **kwargs)
        except sdk_exceptions.HttpException as e:
            # the SDK proxy puts the service's errors[0].detail in `message` (`details` holds
            # only the HTTP reason, "Forbidden")
            raise CloudletError(e.message, e.status_code) from e
        except (sdk_exceptions.SDKException, EngineError) as e:
            raise CloudletError(str(e)) from e

    return wrapper


@memoized.memoized
def client(request: Any) -> Any:
    """`conn.cloudlet` for this request's user and project."""
    verify = False if settings.OPENSTACK_SSL_NO_VERIFY else settings.OPENSTACK_SSL_CACERT
    auth = token_endpoint.Token(
        endpoint=horizon_base.url_for(request, SERVICE_TYPE), token=request.user.token.id
    )
    sess = session.Session(auth=auth, original_ip=auth_utils.get_client_ip(request), verify=verify)
    conn = openstack.connection.Connection(
        session=sess,
        region_name=request.user.services_region,
        app_name="horizon-cloudlet",
        app_version=importlib.metadata.version("cloudlet"),
    )
    return register(conn).cloudlet


# -- bases -------------------------------------------------------------------------------


@_service_errors
def base_list(request: Any) -> list[Base]:
    return list(client(request).bases())


@_service_errors
def base_get(request: Any, base_id: str) -> Base:
    return client(request).get_base(base_id)


@_service_errors
def base_delete(request: Any, base_id: str) -> None:
    client(request).delete_base(base_id)


@_service_errors
def base_import_upload(
    request: Any, package: BinaryIO, size: int, name: str | None, public: bool
) -> Task:
    return client(request).import_base(package, size, name=name, public=public)


@_service_errors
def base_import_url(request: Any, url: str, name: str | None, public: bool) -> Task:
    return client(request).import_base(url=url, name=name, public=public)


@_service_errors
def base_create(request: Any, server_id: str, name: str, public: bool) -> Task:
    return client(request).create_base(server_id, name, public=public)


@_service_errors
def base_package(request: Any, base_id: str) -> Download:
    return client(request).open_base_package(base_id)


# -- overlays ----------------------------------------------------------------------------


@_service_errors
def overlay_list(request: Any) -> list[Overlay]:
    return list(client(request).overlays())


@_service_errors
def overlay_get(request: Any, overlay_id: str) -> Overlay:
    return client(request).get_overlay(overlay_id)


@_service_errors
def overlay_summary(request: Any, overlay_id: str) -> dict[str, Any]:
    return client(request).overlay_summary(overlay_id)


@_service_errors
def overlay_delete(request: Any, overlay_id: str) -> None:
    client(request).delete_overlay(overlay_id)


@_service_errors
def overlay_create(request: Any, server_id: str, name: str, after: str, public: bool) -> Task:
    return client(request).create_overlay(server_id, name, after=after, public=public)


@_service_errors
def overlay_file(request: Any, overlay_id: str) -> Download:
    return client(request).open_overlay_file(overlay_id)


# -- syntheses and tasks -----------------------------------------------------------------


@_service_errors
def synthesize(request: Any, overlay_id: str, name: str, flavor_id: str, network: str) -> Synthesis:
    """`network`: a network id, or "auto" / "none" (Nova's special values)."""
    if network in ("auto", "none"):
        return client(request).synthesize(overlay_id, name, flavor_id, network=network)
    return client(request).synthesize(overlay_id, name, flavor_id, network_id=network)


@_service_errors
def synthesis_list(request: Any) -> list[Synthesis]:
    return list(client(request).syntheses())


@_service_errors
def synthesis_get(request: Any, synthesis_id: str) -> Synthesis:
    return client(request).get_synthesis(synthesis_id)


@_service_errors
def task_list(request: Any, kind: str | None = None, state: str | None = None) -> list[Task]:
    query = {k: v for k, v in (("kind", kind), ("state", state)) if v}
    return list(client(request).tasks(**query))


@_service_errors
def task_get(request: Any, task_id: str) -> Task:
    return client(request).get_task(task_id)

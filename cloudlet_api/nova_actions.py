"""Elijah's server actions on Nova's endpoint, as a filter in nova-api's paste pipeline.

    POST /servers/{id}/action {"cloudlet-base": {"name": NAME}}
    POST /servers/{id}/action {"cloudlet-overlay-finish": {"overlay-name": NAME,
                                                            "after": "delete" | "resume"}}

Each becomes the cloudlet-api operation a REST caller would start (POST /bases, POST /overlays
for that server), sent to the `cloudlet` endpoint of the caller's catalog WITH THE CALLER'S
TOKEN: cloudlet-api checks its own policy rules and that the server is the caller's (Nova's
GET with that token) exactly as for its REST callers, and records the task. The answer is
cloudlet-api's: 202 with the task (Location: the task on cloudlet-api, which the caller polls),
or its error in Nova's error format. Every other request goes to Nova untouched.

Deploy (api-paste.ini of nova-api), after keystonecontext, so the caller is authenticated:

    [filter:cloudlet]
    paste.filter_factory = cloudlet_api.nova_actions:filter_factory
    # optional: interface = internal,public / region_name = ... / endpoint_override = URL
    #           timeout = 60 (seconds per call to cloudlet-api)

    keystone = ... authtoken keystonecontext cloudlet osapi_compute_app_v21
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import webob
import webob.exc
from keystoneauth1 import adapter as ks_adapter
from keystoneauth1 import session as ks_session
from oslo_log import log as logging

from cloudlet_api import errors, schemas
from cloudlet_api.clients import ServiceClient
from cloudlet_api.microversion import SERVICE_TYPE

LOG = logging.getLogger(__name__)

ACTION_PATH = re.compile(r"^/(?:(?P<project_id>[^/]+)/)?servers/(?P<server_id>[^/]+)/action/?$")
DEFAULT_TIMEOUT = 60.0
BASE = "cloudlet-base"
OVERLAY_FINISH = "cloudlet-overlay-finish"

BASE_SCHEMA = {
    "type": "object",
    "properties": {"name": schemas.NAME},
    "required": ["name"],
    "additionalProperties": False,
}
# Elijah's overlay-finish deleted the server once its overlay was made: that stays the default;
# "after": "resume" keeps it running (cloudlet-api's `after`).
OVERLAY_FINISH_SCHEMA = {
    "type": "object",
    "properties": {
        "overlay-name": schemas.NAME,
        "after": {"type": "string", "enum": ["delete", "resume"]},
    },
    "required": ["overlay-name"],
    "additionalProperties": False,
}


def _base_request(server_id: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "/bases", {"server_id": server_id, "name": args["name"]}


def _overlay_request(server_id: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    after = args.get("after", "delete")
    return "/overlays", {"server_id": server_id, "name": args["overlay-name"], "after": after}


# action -> (schema of its arguments, the cloudlet-api request it becomes)
ACTIONS: dict[str, tuple[dict[str, Any], Callable[[str, dict[str, Any]], tuple[str, dict]]]] = {
    BASE: (BASE_SCHEMA, _base_request),
    OVERLAY_FINISH: (OVERLAY_FINISH_SCHEMA, _overlay_request),
}


class CloudletAPI(ServiceClient):
    name = "cloudlet-api"


class NovaActions:
    def __init__(self, app: Callable, options: dict[str, str]) -> None:
        self.app = app
        self.session = ks_session.Session(timeout=float(options.get("timeout") or DEFAULT_TIMEOUT))
        interfaces = options.get("interface") or "internal,public"
        self.endpoint_options = {
            "service_type": SERVICE_TYPE,
            "interface": [i.strip() for i in interfaces.split(",") if i.strip()],
            "region_name": options.get("region_name") or None,
            "endpoint_override": options.get("endpoint_override") or None,
        }

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        found = self._cloudlet_action(environ)
        if found is None:
            return self.app(environ, start_response)
        server_id, action, args = found
        try:
            return self._start(environ, server_id, action, args)(environ, start_response)
        except errors.APIError as e:
            return _nova_fault(e)(environ, start_response)

    def _cloudlet_action(self, environ: dict[str, Any]) -> tuple[str, str, Any] | None:
        """(server id, action, its arguments) of a cloudlet action on the caller's own URL, or
        None for anything else (the body, read here, is left for Nova to read again)."""
        if environ.get("REQUEST_METHOD") != "POST":
            return None
        match = ACTION_PATH.match(environ.get("PATH_INFO", ""))
        if match is None:
            return None
        req = webob.Request(environ)
        context = environ.get("nova.context")
        url_project = match.group("project_id")
        if url_project and url_project != getattr(context, "project_id", None):
            return None  # Nova answers a URL naming another project
        try:
            body = json.loads(req.body)
        except ValueError:
            return None
        if not isinstance(body, dict) or len(body) != 1:
            return None
        [(action, args)] = body.items()
        if action not in ACTIONS:
            return None
        return match.group("server_id"), action, args

    def _start(self, environ: dict[str, Any], server_id: str, action: str, args: Any) -> Any:
        schema, to_request = ACTIONS[action]
        schemas.validate(schema, args, f"{action!r} argument")
        user_auth = environ.get("keystone.token_auth")
        if user_auth is None:
            LOG.error(
                "%s: no keystone.token_auth in the request: the cloudlet filter must come "
                "after authtoken in nova-api's pipeline",
                action,
            )
            raise errors.APIError(
                f"{action} is not available: nova-api's pipeline has no Keystone authentication "
                "before the cloudlet filter"
            )
        path, body = to_request(server_id, args)
        client = CloudletAPI(
            ks_adapter.Adapter(self.session, auth=user_auth, **self.endpoint_options)
        )
        resp = client.request("POST", path, f"{action} of server {server_id}", json=body)
        try:
            task = resp.json()["task"]
        except (ValueError, KeyError, TypeError):
            raise errors.BadGateway(
                f"{action} of server {server_id}: cloudlet-api answered HTTP "
                f"{resp.status_code} without a task"
            ) from None
        LOG.info("%s of server %s: cloudlet-api task %s", action, server_id, task["id"])
        out = webob.Response(status=202, content_type="application/json", charset=None)
        out.body = resp.content
        if resp.headers.get("Location"):
            out.headers["Location"] = resp.headers["Location"]
        return out


def _nova_fault(error: errors.APIError) -> Any:
    """The error in Nova's own rendering ({"itemNotFound": {"code": 404, "message": ...}})."""
    from nova.api.openstack import wsgi as nova_wsgi

    exc = webob.exc.status_map[error.status](explanation=error.detail, headers=error.headers)
    return nova_wsgi.Fault(exc)


def filter_factory(global_conf: dict[str, str], **local_conf: str) -> Callable:
    """paste.filter_factory: `[filter:cloudlet]`'s options are the keystoneauth adapter's
    (interface, region_name, endpoint_override) and timeout."""

    def make(app: Callable) -> NovaActions:
        return NovaActions(app, local_conf)

    return make

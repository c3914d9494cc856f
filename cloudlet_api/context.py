"""What a handler gets: the request, the caller's identity (from keystonemiddleware's headers),
the caller's auth plugin for Glance and Nova, and the service's shared parts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import webob
from oslo_config import cfg
from oslo_context import context as oslo_context
from oslo_policy import policy as oslo_policy

from cloudlet_api import errors, policy, schemas
from cloudlet_api.clients import Clients, Glance, Nova
from cloudlet_api.tasks import TaskStore

JSON = "application/json"


class RequestContext(oslo_context.RequestContext):
    def __init__(self, service_catalog: list | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.service_catalog = service_catalog or []


@dataclass
class Service:
    """Built once by deploy.loadapp, shared by every request."""

    conf: cfg.ConfigOpts
    enforcer: oslo_policy.Enforcer
    clients: Clients
    tasks: TaskStore
    imports: Any  # cloudlet_api.imports.Importer


class Request(webob.Request):
    service: Service
    params_in_path: dict[str, str]

    @property
    def context(self) -> RequestContext:
        if "cloudlet.context" not in self.environ:
            catalog = self.headers.get("X-Service-Catalog")
            self.environ["cloudlet.context"] = RequestContext.from_environ(
                self.environ, service_catalog=json.loads(catalog) if catalog else []
            )
        return self.environ["cloudlet.context"]

    @property
    def user_auth(self) -> Any:
        return self.environ.get("keystone.token_auth")

    def authorize(self, rule: str, project_id: str | None = None) -> None:
        """Check `rule` for the caller on an object of `project_id` (default: the caller's own
        project, for lists, creations and objects whose owner Glance or Nova checks)."""
        ctx = self.context
        if not ctx.project_id:
            raise errors.Forbidden(f"{rule} needs a project-scoped token")
        policy.authorize(
            self.service.enforcer, rule, ctx, {"project_id": project_id or ctx.project_id}
        )

    def allowed(self, rule: str) -> bool:
        """Whether `rule` lets the caller see what it guards (a field left out otherwise)."""
        try:
            self.authorize(rule)
        except errors.Forbidden:
            return False
        return True

    def glance(self) -> Glance:
        return self.service.clients.glance(self.user_auth)

    def nova(self) -> Nova:
        return self.service.clients.nova(self.user_auth)

    def json_body(self, schema: dict[str, Any]) -> dict[str, Any]:
        if self.content_type != JSON:
            raise errors.UnsupportedMediaType(
                f"the body must be {JSON}, not {self.content_type or 'missing'!r}"
            )
        if self.content_length is None:  # a chunked body could be of any size
            raise errors.LengthRequired("a JSON body needs a Content-Length header")
        try:
            body = json.loads(self.body)
        except ValueError as e:
            raise errors.BadRequest(f"the body is not valid JSON: {e}") from None
        schemas.validate(schema, body, "body")
        return body

    def query(self, schema: dict[str, Any]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for key, value in self.GET.items():
            if key in seen:
                raise errors.BadRequest(f"query parameter {key!r} is given more than once")
            seen[key] = value
        schemas.validate(schema, seen, "query parameter")
        return seen


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    resp = webob.Response(status=status, content_type=JSON, charset=None)
    resp.body = json.dumps(body).encode()
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def no_content() -> Any:
    return webob.Response(status=204)

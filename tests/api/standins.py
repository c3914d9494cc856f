"""Stand-ins for Keystone, Glance, Nova, Neutron and a compute host's cloudlet RPC endpoint.

These services cannot run inside the test suite (they need databases, a message bus and system
daemons; the all-in-one in tools/aio proves the real ones). These answer at their HTTP boundary
only, with the behaviour cloudlet-api and its client rely on: Keystone issues tokens (password
logins) and validates them for keystonemiddleware (roles expanded as Keystone's implied roles
do); Glance hides another project's private images (404) and refuses to let a non-owner change
one (403); Nova hides other projects' servers and shows the compute host only to admins; Neutron
finds networks by name. The compute host's RPC endpoint runs on oslo.messaging's in-process fake
transport and records what it was sent.
"""

from __future__ import annotations

import json
import re
import socketserver
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

IMPLIED = {
    "admin": ["admin", "manager", "member", "reader"],
    "manager": ["manager", "member", "reader"],
    "member": ["member", "reader"],
    "reader": ["reader"],
}
SERVICE_USER = ("cloudlet", "cloudlet-secret")
USER_PASSWORD = "pw"  # every persona's password (the SDK and CLI tests log in with it)
SERVICE_PROJECT = "service-project"


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class HTTPServer:
    """A WSGI app on 127.0.0.1, a free port, in a thread."""

    def __init__(self, app: Callable) -> None:
        self.httpd = make_server(
            "127.0.0.1", 0, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _json(start: Callable, status: str, body: Any, headers: list | None = None) -> list[bytes]:
    data = json.dumps(body).encode()
    start(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        + (headers or []),
    )
    return [data]


def _read(environ: dict) -> bytes:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    return environ["wsgi.input"].read(length) if length else b""


@dataclass
class Identity:
    token: str
    user_id: str
    project_id: str
    roles: list[str]


@dataclass
class Cloud:
    """The state every stand-in shares."""

    tokens: dict[str, Identity] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    image_data: dict[str, Path] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    failing_uploads: set[str] = field(default_factory=set)  # image names whose upload fails
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="glance-")))
    glance_url: str = ""
    nova_url: str = ""
    neutron_url: str = ""
    cloudlet_url: str = ""  # the catalog's cloudlet endpoint (the API under test)
    flavors: dict[str, dict[str, Any]] = field(default_factory=dict)
    networks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def identity(self, user: str, project_id: str, role: str) -> Identity:
        """A token for `user` with `role` (plus what it implies) on `project_id`."""
        token = f"tok-{uuid.uuid4().hex}"
        ident = Identity(token, user, project_id, IMPLIED.get(role, [role]))
        self.tokens[token] = ident
        return ident

    def caller(self, environ: dict) -> Identity | None:
        return self.tokens.get(environ.get("HTTP_X_AUTH_TOKEN", ""))

    # -- what tests set up directly (as if another user had done it through Glance/Nova) --

    def add_image(
        self,
        owner: str,
        name: str,
        properties: dict[str, str],
        data: bytes = b"",
        visibility: str = "private",
    ) -> str:
        image_id = str(uuid.uuid4())
        path = self.data_dir / image_id
        path.write_bytes(data)
        self.image_data[image_id] = path
        self.images[image_id] = {
            "id": image_id,
            "name": name,
            "status": "active",
            "visibility": visibility,
            "owner": owner,
            "size": len(data),
            "disk_format": "raw",
            "container_format": "bare",
            "min_ram": 0,
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
            **properties,
        }
        return image_id

    def add_server(
        self, project_id: str, name: str, host: str = "host1", status: str = "ACTIVE"
    ) -> str:
        server_id = str(uuid.uuid4())
        self.servers[server_id] = {
            "id": server_id,
            "name": name,
            "status": status,
            "tenant_id": project_id,
            "host": host,
            "image": None,
        }
        return server_id


class Keystone:
    """Identity v3: password auth for the service user; token validation for auth_token."""

    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud
        self.server = HTTPServer(self)
        self.url = self.server.url
        self.service = cloud.identity(SERVICE_USER[0], SERVICE_PROJECT, "admin")
        self.service.roles.append("service")

    def _login(self, name: str | None, password: str | None) -> Identity | None:
        if (name, password) == SERVICE_USER:
            return self.service
        if password != USER_PASSWORD:
            return None
        return next((i for i in self.cloud.tokens.values() if i.user_id == name), None)

    def _token_body(self, ident: Identity) -> dict[str, Any]:
        domain = {"id": "default", "name": "Default"}
        endpoints = {
            "identity": self.url,
            "image": self.cloud.glance_url,
            "compute": self.cloud.nova_url,
            "network": self.cloud.neutron_url,
        }
        if self.cloud.cloudlet_url:
            endpoints["cloudlet"] = self.cloud.cloudlet_url
        return {
            "token": {
                "methods": ["password"],
                "audit_ids": [uuid.uuid4().hex[:22]],
                "issued_at": "2026-01-01T00:00:00.000000Z",
                "expires_at": "2099-01-01T00:00:00.000000Z",
                "user": {"id": ident.user_id, "name": ident.user_id, "domain": domain},
                "project": {"id": ident.project_id, "name": ident.project_id, "domain": domain},
                "roles": [{"id": f"{r}-id", "name": r} for r in ident.roles],
                "catalog": [
                    {
                        "type": kind,
                        "name": kind,
                        "id": f"{kind}-svc",
                        "endpoints": [
                            {
                                "id": f"{kind}-{i}",
                                "interface": i,
                                "region": "RegionOne",
                                "region_id": "RegionOne",
                                "url": url,
                            }
                            for i in ("public", "internal")
                        ],
                    }
                    for kind, url in endpoints.items()
                ],
            }
        }

    def __call__(self, environ: dict, start: Callable) -> Iterable[bytes]:
        path, method = environ["PATH_INFO"].rstrip("/"), environ["REQUEST_METHOD"]
        v3 = {
            "id": "v3.14",
            "status": "stable",
            "updated": "2020-01-01T00:00:00Z",
            "links": [{"rel": "self", "href": f"{self.url}/v3/"}],
            "media-types": [
                {"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}
            ],
        }
        if path == "" and method == "GET":
            return _json(start, "300 Multiple Choices", {"versions": {"values": [v3]}})
        if path == "/v3" and method == "GET":
            return _json(start, "200 OK", {"version": v3})
        if path == "/v3/auth/tokens" and method == "POST":
            body = json.loads(_read(environ))
            user = body["auth"]["identity"]["password"]["user"]
            ident = self._login(user.get("name"), user.get("password"))
            if ident is None:
                return _json(start, "401 Unauthorized", {"error": {"message": "bad password"}})
            return _json(
                start, "201 Created", self._token_body(ident), [("X-Subject-Token", ident.token)]
            )
        if path == "/v3/auth/tokens" and method in ("GET", "HEAD"):
            if self.cloud.tokens.get(environ.get("HTTP_X_AUTH_TOKEN", "")) is not self.service:
                return _json(start, "401 Unauthorized", {"error": {"message": "not the service"}})
            subject = environ.get("HTTP_X_SUBJECT_TOKEN", "")
            ident = self.cloud.tokens.get(subject)
            if ident is None:
                return _json(start, "404 Not Found", {"error": {"message": "no such token"}})
            return _json(start, "200 OK", self._token_body(ident), [("X-Subject-Token", subject)])
        return _json(start, "404 Not Found", {"error": {"message": f"{method} {path}"}})


class Glance:
    """Images v2: list (property filters), show, create, upload, download, delete."""

    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud
        self.server = HTTPServer(self)
        cloud.glance_url = self.server.url
        self.lock = threading.Lock()

    def _visible(self, ident: Identity, image: dict) -> bool:
        return (
            "admin" in ident.roles
            or image["owner"] == ident.project_id
            or image["visibility"] == "public"
        )

    def __call__(self, environ: dict, start: Callable) -> Iterable[bytes]:
        ident = self.cloud.caller(environ)
        if ident is None:
            return _json(start, "401 Unauthorized", {"message": "no valid token"})
        parts = environ["PATH_INFO"].strip("/").split("/")
        method = environ["REQUEST_METHOD"]
        if parts == ["v2", "images"] and method == "GET":
            query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
            query.pop("limit", None)
            found = [
                i
                for i in self.cloud.images.values()
                if self._visible(ident, i) and all(str(i.get(k)) == v for k, v in query.items())
            ]
            return _json(start, "200 OK", {"images": found})
        if parts == ["v2", "images"] and method == "POST":
            meta = json.loads(_read(environ))
            if meta.get("visibility") == "public" and "admin" not in ident.roles:
                return _json(start, "403 Forbidden", {"message": "only admins publicize"})
            image_id = meta.pop("id", None) or str(uuid.uuid4())
            with self.lock:
                if image_id in self.cloud.images:
                    return _json(start, "409 Conflict", {"message": "image id exists"})
                image = {
                    "id": image_id,
                    "status": "queued",
                    "owner": ident.project_id,
                    "visibility": "private",
                    "size": None,
                    "created_at": "now",
                    "updated_at": "now",
                    **meta,
                }
                self.cloud.images[image_id] = image
            return _json(start, "201 Created", image)
        if len(parts) < 3 or parts[:2] != ["v2", "images"]:
            return _json(start, "404 Not Found", {"message": "no such path"})
        image = self.cloud.images.get(parts[2])
        if image is None or not self._visible(ident, image):
            return _json(start, "404 Not Found", {"message": f"image {parts[2]} not found"})
        owner = "admin" in ident.roles or image["owner"] == ident.project_id
        if len(parts) == 3 and method == "GET":
            return _json(start, "200 OK", image)
        if len(parts) == 3 and method == "DELETE":
            if not owner:
                return _json(start, "403 Forbidden", {"message": "not the owner"})
            del self.cloud.images[image["id"]]
            path = self.cloud.image_data.pop(image["id"], None)
            if path is not None:
                path.unlink(missing_ok=True)
            start("204 No Content", [])
            return []
        if parts[3:] == ["file"] and method == "PUT":
            if not owner:
                return _json(start, "403 Forbidden", {"message": "not the owner"})
            if image.get("name") in self.cloud.failing_uploads:
                return _json(start, "503 Service Unavailable", {"message": "store is full"})
            path = self.cloud.data_dir / image["id"]
            remaining = int(environ.get("CONTENT_LENGTH") or 0)
            with open(path, "wb") as out:
                while remaining:
                    block = environ["wsgi.input"].read(min(remaining, 1 << 20))
                    if not block:
                        break
                    out.write(block)
                    remaining -= len(block)
            self.cloud.image_data[image["id"]] = path
            image.update(status="active", size=path.stat().st_size)
            start("204 No Content", [])
            return []
        if parts[3:] == ["file"] and method == "GET":
            path = self.cloud.image_data[image["id"]]
            start(
                "200 OK",
                [
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Length", str(path.stat().st_size)),
                ],
            )
            return [path.read_bytes()]
        return _json(start, "405 Method Not Allowed", {"message": method})


class Nova:
    """Compute: show, find and create servers (the host attribute for admins only), flavors."""

    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud
        self.server = HTTPServer(self)
        cloud.nova_url = self.server.url

    def _view(self, ident: Identity, server: dict) -> dict:
        out = {k: v for k, v in server.items() if k != "host"}
        if "admin" in ident.roles:
            out["OS-EXT-SRV-ATTR:host"] = server["host"]
        return out

    def __call__(self, environ: dict, start: Callable) -> Iterable[bytes]:
        ident = self.cloud.caller(environ)
        if ident is None:
            return _json(start, "401 Unauthorized", {"error": {"message": "no valid token"}})
        parts = environ["PATH_INFO"].strip("/").split("/")
        method = environ["REQUEST_METHOD"]
        if parts == [""]:  # version discovery (openstacksdk)
            return _json(
                start,
                "200 OK",
                {
                    "versions": [
                        {
                            "id": "v2.1",
                            "status": "CURRENT",
                            "version": "2.96",
                            "min_version": "2.1",
                            "links": [{"rel": "self", "href": self.server.url + "/"}],
                        }
                    ]
                },
            )
        if parts == ["servers"] and method == "POST":
            body = json.loads(_read(environ))["server"]
            image = self.cloud.images.get(body["imageRef"])
            if image is None or not (
                image["owner"] == ident.project_id or image["visibility"] == "public"
            ):
                return _json(
                    start,
                    "400 Bad Request",
                    {"badRequest": {"message": f"Image {body['imageRef']} not found"}},
                )
            server_id = self.cloud.add_server(ident.project_id, body["name"], status="BUILD")
            self.cloud.servers[server_id].update(image=body["imageRef"], request=body)
            return _json(start, "202 Accepted", {"server": {"id": server_id}})
        if method == "GET" and parts[0] in ("servers", "flavors") and parts[1:] in ([], ["detail"]):
            query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
            if parts[0] == "flavors":
                return _json(start, "200 OK", {"flavors": list(self.cloud.flavors.values())})
            found = [
                self._view(ident, s)
                for s in self.cloud.servers.values()
                if s["tenant_id"] == ident.project_id
                and ("name" not in query or re.fullmatch(query["name"], s["name"]))
            ]
            return _json(start, "200 OK", {"servers": found})
        if method == "GET" and parts[0] == "flavors" and len(parts) == 2:
            if parts[1] not in self.cloud.flavors:
                return _json(start, "404 Not Found", {"itemNotFound": {"message": "no flavor"}})
            return _json(start, "200 OK", {"flavor": self.cloud.flavors[parts[1]]})
        if len(parts) == 2 and parts[0] == "servers" and method == "GET":
            server = self.cloud.servers.get(parts[1])
            if server is None or not (
                "admin" in ident.roles or server["tenant_id"] == ident.project_id
            ):
                return _json(
                    start,
                    "404 Not Found",
                    {"itemNotFound": {"message": f"Instance {parts[1]} not found"}},
                )
            return _json(start, "200 OK", {"server": self._view(ident, server)})
        return _json(start, "404 Not Found", {"itemNotFound": {"message": "no such path"}})


class Neutron:
    """Networks: show and find by name (what `--network NAME` needs)."""

    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud
        self.server = HTTPServer(self)
        cloud.neutron_url = self.server.url

    def __call__(self, environ: dict, start: Callable) -> Iterable[bytes]:
        if self.cloud.caller(environ) is None:
            return _json(start, "401 Unauthorized", {"NeutronError": {"message": "no token"}})
        parts = environ["PATH_INFO"].strip("/").split("/")
        if parts == [""]:
            return _json(
                start,
                "200 OK",
                {
                    "versions": [
                        {
                            "id": "v2.0",
                            "status": "CURRENT",
                            "links": [{"rel": "self", "href": self.server.url + "/v2.0/"}],
                        }
                    ]
                },
            )
        if parts[:2] != ["v2.0", "networks"]:
            return _json(start, "404 Not Found", {"NeutronError": {"message": "no such path"}})
        if len(parts) == 3:
            if parts[2] not in self.cloud.networks:
                return _json(start, "404 Not Found", {"NeutronError": {"message": "no network"}})
            return _json(start, "200 OK", {"network": self.cloud.networks[parts[2]]})
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        found = [n for n in self.cloud.networks.values() if query.get("name") in (None, n["name"])]
        return _json(start, "200 OK", {"networks": found})


def nova_compute_transport() -> Any:
    """The fake bus as nova-compute is on it: its own configuration, with the exchange Nova's
    configuration sets (nova.config: control_exchange "nova"), not the API's."""
    import oslo_messaging as messaging
    from oslo_config import cfg
    from oslo_messaging import opts as messaging_opts

    conf = cfg.ConfigOpts()
    conf.register_opts(dict(messaging_opts.list_opts())[None])
    conf([], project="nova", default_config_files=[])
    conf.set_override("control_exchange", "nova")
    return messaging.get_rpc_transport(conf, url="fake:/")


class ComputeHost:
    """A compute host's cloudlet RPC endpoint on the fake transport: records each request and
    reports a task for it, and answers get_synthesis from the spawn records a test sets in
    `syntheses` with the real endpoint's rule (the record's project, or an admin). The real
    endpoint and records are tested in Nova's functional framework."""

    def __init__(self, transport: Any, host: str = "host1") -> None:
        import oslo_messaging as messaging
        from nova import rpc as nova_rpc

        from cloudlet_nova.objects import CloudletObjectSerializer
        from cloudlet_nova.rpc import RPC_API_VERSION, TOPIC

        self.host = host
        self.requests: list[tuple[str, Any, Any]] = []
        self.tasks: dict[str, Any] = {}
        self.refuse: dict[str, Exception] = {}  # instance uuid -> what the host raises
        self.syntheses: dict[str, dict] = {}  # instance uuid -> its spawn record
        target = messaging.Target(topic=TOPIC, server=host, version=RPC_API_VERSION)
        serializer = nova_rpc.RequestContextSerializer(CloudletObjectSerializer())
        self.server = messaging.get_rpc_server(
            transport, target, [self], executor="threading", serializer=serializer
        )
        self.server.start()

    def _task(self, method: str, ctxt: Any, request: Any, kind: str) -> Any:
        from cloudlet_nova.objects import CloudletTask

        self.requests.append((method, ctxt, request))
        if request.instance_uuid in self.refuse:
            raise self.refuse[request.instance_uuid]
        task = CloudletTask.start(
            request.task_id, kind, self.host, instance_uuid=request.instance_uuid
        )
        self.tasks[task.id] = task
        return task

    def start_capture(self, ctxt: Any, request: Any) -> Any:
        return self._task("start_capture", ctxt, request, "capture-overlay")

    def start_create_base(self, ctxt: Any, request: Any) -> Any:
        return self._task("start_create_base", ctxt, request, "create-base")

    def get_task(self, ctxt: Any, task_id: str) -> Any:
        return self.tasks.get(task_id)

    def get_synthesis(self, ctxt: Any, instance_uuid: str) -> dict | None:
        self.requests.append(("get_synthesis", ctxt, instance_uuid))
        record = self.syntheses.get(instance_uuid)
        if record is None or not (ctxt.is_admin or record["project_id"] == ctxt.project_id):
            return None
        return record

    def stop(self) -> None:
        self.server.stop()
        self.server.wait()

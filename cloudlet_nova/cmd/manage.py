"""cloudlet-manage: operator commands that drive compute hosts over the cloudlet RPC endpoint.

    cloudlet-manage --config-file /etc/nova/nova.conf base register PACKAGE [--host H] [--name N]
    cloudlet-manage --config-file /etc/nova/nova.conf base create SERVER --name N
    cloudlet-manage --config-file /etc/nova/nova.conf overlay capture SERVER --name N
        [--after resume|delete] [--codec zstd]

It reads nova.conf for the message bus and the usual OS_* environment (an admin's credentials)
for a Keystone token: the compute host talks to Glance with that token, and the server's host is
looked up through the Nova API. `base register` is for admins only and reads packages only from
the compute host's `[cloudlet] base_import_dir`. Progress lines go to stderr, the result (image
ids) to stdout. Until the cloudlet REST API exists this is how bases and overlays get into Glance.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import nova.conf
from nova import config as nova_config
from nova import context as nova_context
from oslo_config import cfg
from oslo_utils import uuidutils

from cloudlet_nova.objects import (
    CloudletCaptureRequest,
    CloudletCreateBaseRequest,
    CloudletRegisterBaseRequest,
    CloudletTask,
    TaskState,
)
from cloudlet_nova.rpc import CloudletRPCClient

CONF = nova.conf.CONF


def _add_parsers(subparsers: Any) -> None:
    base = subparsers.add_parser("base", help="base VMs").add_subparsers(dest="action")
    base.required = True
    reg = base.add_parser("register", help="register an engine base package (.cbase)")
    reg.add_argument("package", help="path of the .cbase file ON THE COMPUTE HOST, inside its "
                     "[cloudlet] base_import_dir (absolute, or relative to that directory)")
    reg.add_argument("--host", dest="compute_host",
                     help="compute host that imports it (default: [DEFAULT] host)")
    reg.add_argument("--name", dest="image_name", help="image name (default: the base name)")
    create = base.add_parser("create", help="make a base VM of a running server")
    create.add_argument("server", help="server id")
    create.add_argument("--name", dest="image_name", required=True)
    overlay = subparsers.add_parser("overlay", help="overlays").add_subparsers(dest="action")
    overlay.required = True
    cap = overlay.add_parser("capture", help="capture a server's overlay into Glance")
    cap.add_argument("server", help="server id (booted from a cloudlet base or overlay)")
    cap.add_argument("--name", dest="image_name", required=True)
    cap.add_argument("--after", choices=("resume", "delete"), default="resume")
    cap.add_argument("--codec", default="zstd")
    for p in (reg, create, cap):
        p.add_argument("--public", action="store_true", help="make the images public")
        p.add_argument("--timeout", dest="wait_timeout", type=float, default=3600.0,
                       help="seconds to wait")


CLI_OPTS = [cfg.SubCommandOpt("category", title="commands", handler=_add_parsers)]


def _catalog_v2(catalog: list[dict]) -> list[dict]:
    """Keystone v3 catalog -> the v2 shape Nova's RequestContext expects (as keystonemiddleware
    passes it to Nova's API)."""
    out = []
    for service in catalog:
        by_region: dict[str, dict[str, str]] = {}
        for ep in service.get("endpoints", []):
            region = ep.get("region_id") or ep.get("region") or ""
            by_region.setdefault(region, {"region": region})[f"{ep['interface']}URL"] = ep["url"]
        out.append({"type": service.get("type"), "name": service.get("name"),
                    "endpoints": list(by_region.values())})  # fmt: skip
    return out


def keystone_session() -> tuple[Any, Any]:
    """A session and its access info from the OS_* environment."""
    from keystoneauth1 import session
    from keystoneauth1.identity import v3

    missing = [v for v in ("OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD") if not os.environ.get(v)]
    if missing:
        raise SystemExit(f"cloudlet-manage: set {', '.join(missing)} (source an admin rc file)")
    auth = v3.Password(
        auth_url=os.environ["OS_AUTH_URL"],
        username=os.environ["OS_USERNAME"],
        password=os.environ["OS_PASSWORD"],
        project_name=os.environ.get("OS_PROJECT_NAME", "admin"),
        user_domain_name=os.environ.get("OS_USER_DOMAIN_NAME", "Default"),
        project_domain_name=os.environ.get("OS_PROJECT_DOMAIN_NAME", "Default"),
    )
    sess = session.Session(auth=auth)
    return sess, auth.get_access(sess)


def request_context(access: Any) -> nova_context.RequestContext:
    return nova_context.RequestContext(
        user_id=access.user_id,
        project_id=access.project_id,
        roles=list(access.role_names),
        auth_token=access.auth_token,
        service_catalog=_catalog_v2(access.service_catalog.catalog),
        is_admin="admin" in access.role_names,
    )


def resolve_server(sess: Any, ref: str) -> tuple[str, str]:
    """(server id, compute host) of a server named by id or by unique name."""
    from keystoneauth1 import adapter

    nova = adapter.Adapter(sess, service_type="compute",
                           region_name=os.environ.get("OS_REGION_NAME"))  # fmt: skip
    resp = nova.get(f"/servers/{ref}", raise_exc=False)
    if resp.status_code == 404:
        found = nova.get("/servers", params={"name": f"^{re.escape(ref)}$"}).json()["servers"]
        if len(found) != 1:
            raise SystemExit(
                f"cloudlet-manage: no server with id or name {ref!r}"
                if not found
                else f"cloudlet-manage: {len(found)} servers are named {ref!r}: give its id"
            )
        resp = nova.get(f"/servers/{found[0]['id']}")
    elif resp.status_code >= 400:
        raise SystemExit(
            f"cloudlet-manage: server {ref}: HTTP {resp.status_code} {resp.text[:200]}"
        )
    server = resp.json()["server"]
    host = server.get("OS-EXT-SRV-ATTR:host")
    if not host:
        raise SystemExit(f"cloudlet-manage: server {ref} has no host (not built yet?)")
    return server["id"], host


def print_progress(task: CloudletTask) -> None:
    print(f"[{task.progress * 100:5.1f} %] {task.stage}", file=sys.stderr, flush=True)


def run(
    client: CloudletRPCClient, ctxt: Any, host: str, category: Any, server_id: str | None = None
) -> int:
    """Send the request (about server `server_id`), follow its progress, print the result;
    0 on success."""
    task_id = uuidutils.generate_uuid()
    action = (category.name, category.action)
    if action == ("base", "register"):
        task = client.register_base(ctxt, host, CloudletRegisterBaseRequest(
            task_id=task_id, package_path=category.package,
            name=category.image_name, public=category.public))  # fmt: skip
    elif action == ("base", "create"):
        task = client.create_base(ctxt, host, CloudletCreateBaseRequest(
            task_id=task_id, instance_uuid=server_id, name=category.image_name,
            public=category.public))  # fmt: skip
    else:
        task = client.capture_overlay(ctxt, host, CloudletCaptureRequest(
            task_id=task_id, instance_uuid=server_id, name=category.image_name,
            after=category.after, codec=category.codec, public=category.public))  # fmt: skip
    print(f"task {task.id} on {host}: {task.kind}", file=sys.stderr)
    task = client.wait(ctxt, host, task.id, category.wait_timeout, on_update=print_progress)
    if task.state != TaskState.SUCCEEDED:
        print(f"cloudlet-manage: {task.kind} failed: {task.error}", file=sys.stderr)
        return 1
    if task.base_id:
        print(f"base_id {task.base_id}")
    for role, image_id in sorted(task.images.items()):
        print(f"{role}_image {image_id}")
    for key, value in task.stats.items():
        print(f"  {key}: {value}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    CONF.register_cli_opts(CLI_OPTS)
    nova_config.parse_args(sys.argv if argv is None else argv, configure_db=False)
    category = CONF.category
    sess, access = keystone_session()
    server_id = None
    if category.name == "base" and category.action == "register":
        host = category.compute_host or CONF.host
    else:
        server_id, host = resolve_server(sess, category.server)
    return run(CloudletRPCClient(), request_context(access), host, category, server_id)

"""cloudlet-api over real HTTP: tokens, microversions, schema errors, limits, project isolation,
capture/base creation/synthesis reaching the right place. Keystone, Glance, Nova and the
compute host are the stand-ins of standins.py (see there why)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.api import objects
from tests.api.conftest import API, MAX_JSON, MAX_PACKAGE_MIB, PROJECT_A, PROJECT_B

VERSION = "OpenStack-API-Version"


def detail(resp) -> str:
    return resp.json()["errors"][0]["detail"]


# -- tokens and version discovery ---------------------------------------------------------


def test_version_discovery_needs_no_token(api: API) -> None:
    resp = api.call(None, "GET", "/")
    assert resp.status_code == 200
    (version,) = resp.json()["versions"]
    assert (version["min_version"], version["max_version"]) == ("1.0", "1.0")


@pytest.mark.parametrize("path", ["/bases", "/overlays", "/syntheses", "/tasks"])
def test_no_token_is_401(api: API, path: str) -> None:
    assert api.call(None, "GET", path).status_code == 401
    resp = api.call(None, "GET", path, headers={"X-Auth-Token": "tok-forged"})
    assert resp.status_code == 401


# -- microversions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "served"),
    [
        (None, "cloudlet 1.0"),
        ("cloudlet 1.0", "cloudlet 1.0"),
        ("cloudlet latest", "cloudlet 1.0"),
        ("compute 2.90", "cloudlet 1.0"),  # another service's version is not ours
    ],
)
def test_microversion_negotiated(api: API, sent: str | None, served: str) -> None:
    headers = {VERSION: sent} if sent else {}
    resp = api.call("reader", "GET", "/overlays", headers=headers)
    assert resp.status_code == 200
    assert resp.headers[VERSION] == served
    assert VERSION in resp.headers["Vary"]


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        ("cloudlet 1.1", 406),
        ("cloudlet 2.0", 406),
        ("cloudlet 0.9", 406),
        ("cloudlet one", 400),
        ("cloudlet 1", 400),
    ],
)
def test_microversion_refused(api: API, sent: str, status: int) -> None:
    resp = api.call("reader", "GET", "/overlays", headers={VERSION: sent})
    assert resp.status_code == status
    assert sent.split()[1] in detail(resp)


# -- schemas, methods, limits --------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"name": "app"}, "'server_id' is a required property"),
        ({"server_id": "not-a-uuid", "name": "app"}, "server_id"),
        ({"server_id": "2f0c4bc4-5b44-4a07-8b59-6d4f6b3c7a01", "name": ""}, "name"),
        (
            {"server_id": "2f0c4bc4-5b44-4a07-8b59-6d4f6b3c7a01", "name": "a", "after": "explode"},
            "after",
        ),
        (
            {"server_id": "2f0c4bc4-5b44-4a07-8b59-6d4f6b3c7a01", "name": "a", "colour": "red"},
            "'colour' was unexpected",
        ),
        ([], "is not of type 'object'"),
    ],
)
def test_body_schema_errors(api: API, body: object, words: str) -> None:
    requests_before = len(api.host.requests)
    resp = api.call("member", "POST", "/overlays", json=body)
    assert resp.status_code == 400
    assert words in detail(resp)
    assert len(api.host.requests) == requests_before


def test_query_schema_errors(api: API) -> None:
    resp = api.call("reader", "GET", "/tasks?state=asleep")
    assert resp.status_code == 400 and "state" in detail(resp)
    resp = api.call("reader", "GET", "/overlays?colour=red")
    assert resp.status_code == 400 and "'colour' was unexpected" in detail(resp)
    resp = api.call("reader", "GET", "/tasks?kind=synthesize&kind=import-base")
    assert resp.status_code == 400 and "more than once" in detail(resp)


def test_not_json_is_400_and_wrong_type_415(api: API) -> None:
    resp = api.call(
        "member",
        "POST",
        "/syntheses",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert resp.status_code == 400 and "not valid JSON" in detail(resp)
    resp = api.call(
        "member",
        "POST",
        "/syntheses",
        data=b"x=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status_code == 415


def test_unknown_path_404_wrong_method_405(api: API) -> None:
    assert api.call("reader", "GET", "/nothing").status_code == 404
    resp = api.call("reader", "PUT", "/overlays")
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "GET, POST"


def test_json_body_over_limit_is_413(api: API) -> None:
    resp = api.call("member", "POST", "/overlays", json={"name": "x" * MAX_JSON})
    assert resp.status_code == 413
    assert "max_json_body_size" in detail(resp)


def _raw_upload_start(api: API, persona: str, length: int) -> socket.socket:
    """Send the headers of a package upload (and nothing of the body)."""
    url = urlsplit(api.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(
        (
            f"POST /bases/import HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"X-Auth-Token: {api.env.tokens[persona]}\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
        ).encode()
    )
    return sock


def _response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return int(data.split(b" ", 2)[1]), data


def test_package_over_limit_is_413_before_the_body_is_read(api: API) -> None:
    sock = _raw_upload_start(api, "member", MAX_PACKAGE_MIB * (1 << 20) + 1)
    status, data = _response(sock)
    assert status == 413
    assert b"max_package_size" in data


def test_upload_without_length_is_411(api: API) -> None:
    resp = api.call(
        "member",
        "POST",
        "/bases/import",
        data=iter([b"chunked"]),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 411


def test_imports_beyond_the_limit_get_429(api_factory: Callable[..., API]) -> None:
    api = api_factory(max_concurrent_imports=1)
    slow = _raw_upload_start(api, "member", 1000)
    slow.sendall(b"x" * 10)  # the import holds its slot while its body trickles in
    spool = Path(api.conf.api.state_path) / "imports"
    deadline = time.monotonic() + 30
    while not list(spool.glob("*.cbase")):  # it is being received: it has the slot
        assert time.monotonic() < deadline, "the upload was never received"
        time.sleep(0.02)
    resp = api.call(
        "member",
        "POST",
        "/bases/import",
        data=b"y",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 429
    assert "maximum of 1 package imports" in detail(resp)
    assert resp.headers["Retry-After"]
    slow.sendall(b"x" * 990)
    status, _ = _response(slow)
    assert status == 202


# -- what reaches the compute host, Glance and Nova ----------------------------------------


def test_capture_goes_to_the_servers_host_with_the_callers_identity(api: API) -> None:
    server = objects.server(api, PROJECT_A)
    resp = api.call(
        "member", "POST", "/overlays", json={"server_id": server, "name": "app", "after": "delete"}
    )
    assert resp.status_code == 202
    task = resp.json()["task"]
    assert resp.headers["Location"].endswith(f"/tasks/{task['id']}")
    method, ctxt, request = api.host.requests[-1]
    assert method == "start_capture"
    assert (request.instance_uuid, request.name, request.after) == (server, "app", "delete")
    assert request.task_id == task["id"]
    assert (ctxt.project_id, ctxt.user_id) == (PROJECT_A, "member-user")
    assert ctxt.auth_token == api.env.tokens["member"]
    # the host's progress shows through GET /tasks/{id}
    host_task = api.host.tasks[task["id"]]
    host_task.stage, host_task.progress = "capture memory", 0.4
    shown = api.call("reader", "GET", f"/tasks/{task['id']}").json()["task"]
    assert (shown["stage"], shown["progress"], shown["host"]) == ("capture memory", 0.4, "host1")
    host_task.state, host_task.images = "succeeded", {"overlay": "img-1"}
    shown = api.call("reader", "GET", f"/tasks/{task['id']}").json()["task"]
    assert (shown["state"], shown["images"]) == ("succeeded", {"overlay": "img-1"})


def test_capture_of_a_stopped_server_is_409(api: API) -> None:
    server = objects.server(api, PROJECT_A)
    api.env.cloud.servers[server]["status"] = "SHUTOFF"
    sent = len(api.host.requests)
    resp = api.call("member", "POST", "/bases", json={"server_id": server, "name": "warm"})
    assert resp.status_code == 409
    assert "SHUTOFF" in detail(resp)
    assert len(api.host.requests) == sent


def test_a_hosts_refusal_is_the_callers_error_and_fails_the_task(api: API) -> None:
    from nova import exception as nova_exception

    server = objects.server(api, PROJECT_A)
    api.host.refuse[server] = nova_exception.InstanceInvalidState(
        attr="vm_state", instance_uuid=server, state="paused", method="capture"
    )
    resp = api.call("member", "POST", "/overlays", json={"server_id": server, "name": "app"})
    assert resp.status_code == 409
    assert "refused" in detail(resp) and "paused" in detail(resp)
    failed = api.call("reader", "GET", "/tasks?kind=capture-overlay&state=failed").json()
    assert any(t["server_id"] == server and "paused" in t["error"] for t in failed["tasks"])


def test_synthesis_is_a_server_create_from_the_overlay(api: API) -> None:
    overlay = objects.overlay(api, PROJECT_A)
    resp = api.call(
        "member",
        "POST",
        "/syntheses",
        json={
            "overlay_id": overlay,
            "name": "app1",
            "flavor_id": "m1.small",
            "network_id": "9b1c2f3e-1d2c-4b5a-8e9f-0a1b2c3d4e5f",
        },
    )
    assert resp.status_code == 202
    synthesis = resp.json()["synthesis"]
    server = api.env.cloud.servers[synthesis["id"]]
    assert server["request"] == {
        "name": "app1",
        "imageRef": overlay,
        "flavorRef": "m1.small",
        "networks": [{"uuid": "9b1c2f3e-1d2c-4b5a-8e9f-0a1b2c3d4e5f"}],
    }
    shown = api.call("reader", "GET", f"/syntheses/{synthesis['id']}").json()["synthesis"]
    assert (shown["state"], shown["server"]["status"]) == ("running", "BUILD")
    server["status"] = "ACTIVE"
    shown = api.call("reader", "GET", f"/syntheses/{synthesis['id']}").json()["synthesis"]
    assert (shown["state"], shown["progress"], shown["overlay_id"]) == ("succeeded", 1.0, overlay)
    listed = api.call("reader", "GET", "/tasks?kind=synthesize&state=succeeded").json()["tasks"]
    assert synthesis["task_id"] in [t["id"] for t in listed]


def test_synthesis_statistics_come_from_its_compute_host(api: API) -> None:
    overlay = objects.overlay(api, PROJECT_A)
    body = {"overlay_id": overlay, "name": "app1", "flavor_id": "1", "network": "none"}
    created = api.call("member", "POST", "/syntheses", json=body).json()["synthesis"]
    assert created["statistics"] is None  # nothing recorded before the host spawned it
    server_id = created["id"]
    shown = api.call("reader", "GET", f"/syntheses/{server_id}").json()["synthesis"]
    assert shown["statistics"] is None  # the host has no record yet
    api.host.syntheses[server_id] = objects.synthesis_record(server_id, PROJECT_A)
    shown = api.call("reader", "GET", f"/syntheses/{server_id}").json()["synthesis"]
    stats = shown["statistics"]
    assert (stats["state"], stats["error"], stats["started_at"]) == (
        "running", None, "2026-12-08T00:00:00+00:00"
    )
    assert [s["name"] for s in stats["stages"]] == [
        "fetch base", "open + verify manifest", "apply overlay", "restore memory"
    ]  # fmt: skip
    assert stats["stages"][2] == {"name": "apply overlay", "start": 0.3, "end": 2.5,
                                  "seconds": 1.0, "bytes": 4096, "failed": False}  # fmt: skip
    assert stats["counters"] == {"frames fetched on demand": 3}
    # the host was asked in the caller's name (it scopes records to their project)
    _, ctxt, asked = api.host.requests[-1]
    assert (asked, ctxt.project_id, ctxt.is_admin) == (server_id, PROJECT_A, False)
    [row] = [s for s in api.call("reader", "GET", "/syntheses").json()["syntheses"]
             if s["id"] == server_id]  # fmt: skip
    assert row["statistics"] == stats
    # a record of another project (a host answers None to this caller): no statistics
    api.host.syntheses[server_id] = objects.synthesis_record(server_id, PROJECT_B)
    shown = api.call("reader", "GET", f"/syntheses/{server_id}").json()["synthesis"]
    assert shown["statistics"] is None


@pytest.mark.parametrize("network", ["none", "auto"])
def test_synthesis_with_novas_special_networks(api: API, network: str) -> None:
    overlay = objects.overlay(api, PROJECT_A)
    body = {"overlay_id": overlay, "name": "app1", "flavor_id": "1", "network": network}
    resp = api.call("member", "POST", "/syntheses", json=body)
    assert resp.status_code == 202
    server = api.env.cloud.servers[resp.json()["synthesis"]["id"]]
    assert server["request"]["networks"] == network


@pytest.mark.parametrize(
    ("network", "words"),
    [
        ({"network": "some"}, "'some' is not one of ['auto', 'none']"),
        (
            {"network": "none", "network_id": "9b1c2f3e-1d2c-4b5a-8e9f-0a1b2c3d4e5f"},
            "should not be valid",
        ),
    ],
)
def test_synthesis_network_schema_errors(api: API, network: dict, words: str) -> None:
    overlay = objects.overlay(api, PROJECT_A)
    servers = len(api.env.cloud.servers)
    body = {"overlay_id": overlay, "name": "app1", "flavor_id": "1", **network}
    resp = api.call("member", "POST", "/syntheses", json=body)
    assert resp.status_code == 400
    assert words in detail(resp)
    assert len(api.env.cloud.servers) == servers


def test_synthesis_from_a_base_image_is_404(api: API) -> None:
    disk, _, _ = objects.base(api, PROJECT_A)
    servers = len(api.env.cloud.servers)
    resp = api.call(
        "member", "POST", "/syntheses", json={"overlay_id": disk, "name": "x", "flavor_id": "1"}
    )
    assert resp.status_code == 404
    assert "not a cloudlet overlay" in detail(resp)
    assert len(api.env.cloud.servers) == servers


def test_overlay_show_download_delete(api: API) -> None:
    overlay = objects.overlay(api, PROJECT_A)
    shown = api.call("reader", "GET", f"/overlays/{overlay}").json()["overlay"]
    assert shown["project_id"] == PROJECT_A and len(shown["base_id"]) == 64
    resp = api.call("reader", "GET", f"/overlays/{overlay}/file")
    assert resp.content == objects.OVERLAY_DATA
    assert api.call("member", "DELETE", f"/overlays/{overlay}").status_code == 204
    assert api.call("reader", "GET", f"/overlays/{overlay}").status_code == 404


def test_base_in_use_cannot_be_deleted(api: API) -> None:
    overlay = objects.overlay(api, PROJECT_A)
    disk = api.env.cloud.images[overlay]["cloudlet_base_disk_image"]
    resp = api.call("manager", "DELETE", f"/bases/{disk}")
    assert resp.status_code == 409
    assert overlay in detail(resp)
    assert disk in api.env.cloud.images


def test_base_delete_removes_both_images(api: API) -> None:
    disk, memory, _ = objects.base(api, PROJECT_A)
    assert api.call("manager", "DELETE", f"/bases/{disk}").status_code == 204
    assert disk not in api.env.cloud.images and memory not in api.env.cloud.images


# -- project isolation ---------------------------------------------------------------------


def test_another_project_cannot_see_or_touch_a_projects_objects(api: API) -> None:
    overlay = objects.overlay(api, PROJECT_A)
    disk = api.env.cloud.images[overlay]["cloudlet_base_disk_image"]
    server = objects.server(api, PROJECT_A)
    task = objects.task(api, "member")
    synthesis = objects.synthesis(api, "member")
    images, servers, sent = (
        dict(api.env.cloud.images),
        dict(api.env.cloud.servers),
        len(api.host.requests),
    )

    listed = api.call("member_b", "GET", "/overlays").json()["overlays"]
    assert overlay not in [o["id"] for o in listed]
    assert disk not in [b["id"] for b in api.call("member_b", "GET", "/bases").json()["bases"]]
    assert task not in [t["id"] for t in api.call("member_b", "GET", "/tasks").json()["tasks"]]
    assert synthesis not in [
        s["id"] for s in api.call("member_b", "GET", "/syntheses").json()["syntheses"]
    ]
    for method, path, kw in [
        ("GET", f"/overlays/{overlay}", {}),
        ("GET", f"/overlays/{overlay}/file", {}),
        ("DELETE", f"/overlays/{overlay}", {}),
        ("GET", f"/bases/{disk}", {}),
        ("DELETE", f"/bases/{disk}", {}),
        ("GET", f"/tasks/{task}", {}),
        ("GET", f"/syntheses/{synthesis}", {}),
        ("POST", "/overlays", {"json": {"server_id": server, "name": "steal"}}),
        ("POST", "/bases", {"json": {"server_id": server, "name": "steal"}}),
        ("POST", "/syntheses", {"json": {"overlay_id": overlay, "name": "s", "flavor_id": "1"}}),
    ]:
        persona = "manager_b" if method == "DELETE" else "member_b"
        resp = api.call(persona, method, path, **kw)
        assert resp.status_code == 404, (method, path, resp.text)
    assert api.env.cloud.images == images
    assert api.env.cloud.servers == servers
    assert len(api.host.requests) == sent


def test_a_public_base_is_visible_but_not_deletable_by_another_project(api: API) -> None:
    disk, _, _ = objects.base(api, PROJECT_A, visibility="public")
    assert api.call("reader_b", "GET", f"/bases/{disk}").status_code == 200
    resp = api.call("manager_b", "DELETE", f"/bases/{disk}")
    assert resp.status_code == 403  # Glance's ownership rule
    assert disk in api.env.cloud.images


def test_concurrent_reads_are_served(api: API) -> None:
    """The service is called from several threads at once (uwsgi threads)."""
    overlay = objects.overlay(api, PROJECT_B)
    codes: list[int] = []

    def read() -> None:
        codes.append(api.call("reader_b", "GET", f"/overlays/{overlay}").status_code)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 8

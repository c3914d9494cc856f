"""The HTTP JSON API: auth, routing, JSON errors, allow-list, size bounds, upload streaming.

A real server on 127.0.0.1 and real HTTP requests; the synthesis behind it is a stand-in
(tests/unit/synthesis_standin.py) because only the HTTP layer is under test here.
"""

import http.client
import json
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudlet.errors import ServerError
from cloudlet.home import CloudletHome
from cloudlet.server import manager as manager_module
from cloudlet.server.api import MAX_JSON_BODY, ApiServer, without_server_paths
from cloudlet.server.auth import load_or_create_token, token_path
from cloudlet.server.manager import SynthesisManager
from cloudlet.sources import AllowList
from tests.unit.synthesis_standin import MAGIC, StandInSynthesis

TOKEN = "s3cret-token"


class Client:
    def __init__(self, api: ApiServer, token: str | None = TOKEN) -> None:
        self.host, self.port = api.address
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict | None = None,
        chunked: bool = False,
    ) -> tuple[int, dict, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        hdrs = dict(headers or {})
        if self.token is not None:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        if chunked:
            conn.request(
                method, path, body=iter([body[:5], body[5:]]), headers=hdrs, encode_chunked=True
            )
        else:
            conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, (json.loads(data) if data else {}), resp

    def post_json(self, path: str, obj: object) -> tuple[int, dict]:
        status, body, _ = self.request(
            "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"}
        )
        return status, body


@pytest.fixture
def home(tmp_path: Path) -> CloudletHome:
    return CloudletHome(tmp_path / "home")


@pytest.fixture
def serve(home: CloudletHome, tmp_path: Path):
    """Start a server with the given manager options; everything stopped and joined after."""
    started: list[tuple[SynthesisManager, ApiServer]] = []
    threads_before = set(threading.enumerate())

    def start(**kwargs) -> tuple[SynthesisManager, ApiServer]:
        manager = SynthesisManager(home, prepare=StandInSynthesis.prepare, timeout=60, **kwargs)
        api = ApiServer(manager, TOKEN, ("127.0.0.1", 0))
        api.start()
        started.append((manager, api))
        return manager, api

    yield start
    for manager, api in started:
        manager.shutdown()
        api.stop()
    assert set(threading.enumerate()) <= threads_before  # no request or worker thread left


def wait_state(client: Client, sid: str, state: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        status, body, _ = client.request("GET", f"/v1/syntheses/{sid}")
        assert status == 200, body
        if body["state"] == state or time.monotonic() > deadline:
            assert body["state"] == state, body
            return body
        time.sleep(0.05)


# --- token -----------------------------------------------------------------------------------


def test_token_is_generated_private_and_reused(home: CloudletHome):
    path = token_path(home)
    token = load_or_create_token(path)
    assert len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == token


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
    ],
)
def test_requests_without_the_token_get_401(serve, headers):
    _, api = serve()
    client = Client(api, token=None)
    for method, path in [
        ("GET", "/v1/syntheses"),
        ("GET", "/v1/bases"),
        ("GET", "/nope"),
        ("DELETE", "/v1/syntheses/abc"),
    ]:
        status, body, resp = client.request(method, path, headers=headers)
        assert status == 401
        assert "token" in body["error"]
        assert resp.getheader("WWW-Authenticate") == "Bearer"


# --- routing and JSON errors ------------------------------------------------------------------


def test_routing_and_json_errors(serve):
    _, api = serve()
    client = Client(api)
    assert client.request("GET", "/v1/syntheses")[:2] == (200, {"syntheses": []})
    assert client.request("GET", "/v1/bases")[:2] == (200, {"bases": []})
    status, body, _ = client.request("GET", "/v2/whatever")
    assert status == 404 and "no such resource" in body["error"]
    status, body, resp = client.request("PUT", "/v1/syntheses")
    assert status == 405 and "GET, POST" in body["error"]
    status, body, _ = client.request("GET", "/v1/syntheses/0123abcd")
    assert status == 404 and "no synthesis 0123abcd" in body["error"]
    assert client.request("DELETE", "/v1/syntheses/0123abcd")[0] == 404


@pytest.mark.parametrize(
    "body,message",
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b"{}", "overlay_url"),
        (b'{"overlay_url": "x", "bogus": 1}', "unknown keys: bogus"),
        (b'{"overlay_url": "x", "forwards": ["tcp:0.0.0.0:8080:80"]}', "127.0.0.1 only"),
        (b'{"overlay_url": "x", "forwards": ["nonsense"]}', "bad forward"),
        (b'{"overlay_url": "x", "early_start": "yes"}', "early_start"),
        (b'{"overlay_url": "x", "fetch_deadline": -1}', "fetch_deadline"),
    ],
)
def test_bad_create_requests_get_400(serve, body, message):
    _, api = serve()
    status, answer, _ = Client(api).request("POST", "/v1/syntheses", body)
    assert status == 400
    assert message in answer["error"]


def test_json_bodies_are_bounded(serve):
    _, api = serve()
    client = Client(api)
    big = json.dumps({"overlay_url": "x" * MAX_JSON_BODY}).encode()
    status, body, _ = client.request("POST", "/v1/syntheses", big)
    assert status == 413 and "at most" in body["error"]
    status, body, _ = client.request("POST", "/v1/syntheses", big, chunked=True)
    assert status == 413
    with socket.create_connection(api.address, timeout=60) as s:  # no Content-Length at all
        s.sendall(f"POST /v1/syntheses HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        assert s.makefile("rb").readline().split()[1] == b"411"


def test_upload_size_is_bounded(serve):
    _, api = serve()
    api.max_upload = 1000
    status, body, _ = Client(api).request("POST", "/v1/syntheses/upload", MAGIC + b"x" * 1000)
    assert status == 413


# --- where overlays may come from ------------------------------------------------------------


def test_urls_refused_without_allow_list(serve):
    _, api = serve()
    status, body = Client(api).post_json("/v1/syntheses", {"overlay_url": "http://h/x.overlay"})
    assert status == 403
    assert "--allow" in body["error"]
    status, body = Client(api).post_json("/v1/syntheses", {"overlay_url": "x.overlay"})
    assert status == 403
    assert "--overlay-dir" in body["error"]


def test_allow_list_decides_which_urls(serve):
    manager, api = serve(allow=AllowList.parse(["http://127.0.0.1:9/overlays/"]))
    client = Client(api)
    status, body = client.post_json("/v1/syntheses", {"overlay_url": "http://127.0.0.1:9/x"})
    assert status == 403 and "not under any allowed prefix" in body["error"]
    status, body = client.post_json(
        "/v1/syntheses", {"overlay_url": "http://127.0.0.1:9/overlays/../secret"}
    )
    assert status == 403
    status, body = client.post_json(
        "/v1/syntheses", {"overlay_url": "http://127.0.0.1:9/overlays/app.overlay"}
    )
    assert status == 202, body
    assert body["source"] == "http://127.0.0.1:9/overlays/app.overlay"
    assert StandInSynthesis.made[-1].spec.allow is manager.allow


def test_overlay_dir_files_only_inside_it(serve, tmp_path: Path):
    d = tmp_path / "overlays"
    d.mkdir()
    (d / "app.overlay").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"x")
    _, api = serve(overlay_dir=d)
    client = Client(api)
    status, body = client.post_json("/v1/syntheses", {"overlay_url": "../secret"})
    assert status == 403 and "outside" in body["error"]
    status, body = client.post_json("/v1/syntheses", {"overlay_url": "missing.overlay"})
    assert status == 502 and "no overlay missing.overlay" in body["error"]
    status, body = client.post_json("/v1/syntheses", {"overlay_url": "app.overlay"})
    assert status == 202, body
    assert StandInSynthesis.made[-1].spec.source == d / "app.overlay"


# --- uploads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_upload_create_status_list_delete(serve, chunked):
    manager, api = serve()
    client = Client(api)
    payload = MAGIC + bytes(range(256)) * 40000  # 10 MiB: more than the pipe holds
    status, body, resp = client.request(
        "POST",
        "/v1/syntheses/upload?early_start=false&forwards=tcp:8080:80",
        payload,
        chunked=chunked,
    )
    assert status == 202, body
    sid = body["id"]
    assert resp.getheader("Location") == f"/v1/syntheses/{sid}"
    assert body["forwards"] == ["tcp:8080:80"] and body["early_start"] is False
    done = wait_state(client, sid, "complete")
    assert done["progress"]["bytes_fetched"] == len(payload)
    assert "apply overlay" in done["stats"]["stages"]
    synth = StandInSynthesis.made[-1]
    assert synth.spec.runner.host.forwards[0].host_port == 8080
    assert [s["id"] for s in client.request("GET", "/v1/syntheses")[1]["syntheses"]] == [sid]
    status, _, _ = client.request("DELETE", f"/v1/syntheses/{sid}")
    assert status == 204
    assert synth.closed
    assert client.request("GET", f"/v1/syntheses/{sid}")[0] == 404
    assert manager.statuses() == []


def test_upload_of_a_non_overlay_gets_422_and_is_forgotten(serve):
    manager, api = serve()
    status, body, _ = Client(api).request("POST", "/v1/syntheses/upload", b"JUNK" * 1000)
    assert status == 422
    assert "not an overlay" in body["error"]
    assert manager.statuses() == []


def test_at_most_max_running(serve):
    _, api = serve(max_running=1)
    client = Client(api)
    status, first, _ = client.request("POST", "/v1/syntheses/upload", MAGIC)
    assert status == 202
    status, body, _ = client.request("POST", "/v1/syntheses/upload", MAGIC)
    assert status == 429
    assert "--max-running" in body["error"]
    assert client.request("DELETE", f"/v1/syntheses/{first['id']}")[0] == 204
    assert client.request("POST", "/v1/syntheses/upload", MAGIC)[0] == 202


# --- as an attacker would ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "TRACE", "FOO"])
def test_every_method_is_checked_for_the_token_first_and_answered_in_json(serve, method):
    _, api = serve()
    for token, status in ((None, 401), (TOKEN, 405 if method != "FOO" else 501)):
        conn = http.client.HTTPConnection(*api.address, timeout=60)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request(method, "/v1/syntheses", headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        assert resp.status == status, data
        assert resp.getheader("Content-Type") == "application/json"
        if method != "HEAD":  # a HEAD answer has headers only
            assert "error" in json.loads(data)


def test_a_token_file_others_can_read_is_refused(home: CloudletHome):
    path = token_path(home)
    load_or_create_token(path)
    path.chmod(0o644)
    with pytest.raises(ServerError, match="mode 0644.*chmod 600"):
        load_or_create_token(path)


def test_error_messages_for_clients_name_no_server_paths(tmp_path: Path):
    """What the API and 8021 send back: where the server keeps things is none of the client's
    business (an upload is called "upload", not its pipe's descriptor)."""
    assert without_server_paths(f"cannot open overlay {tmp_path}/x.overlay: gone") == (
        "cannot open overlay .../x.overlay: gone"
    )
    assert without_server_paths("needs base VM ab, not in /root/.cloudlet: import it") == (
        "needs base VM ab, not in .../.cloudlet: import it"
    )
    for kept in ("overlay http://h:8/a/b.overlay: frame 1/3 fails", "upload is not an overlay"):
        assert without_server_paths(kept) == kept


def test_an_upload_trickling_in_loses_its_slot(serve, monkeypatch):
    """1 byte/s held a --max-running slot without limit, each read well within its timeout."""
    monkeypatch.setattr(manager_module, "UPLOAD_GRACE", 1.0)
    monkeypatch.setattr(manager_module, "MIN_UPLOAD_RATE", 1000)
    manager, api = serve(max_running=1)

    def trickle() -> Iterator[bytes]:
        yield MAGIC
        for _ in range(50):
            time.sleep(0.1)
            yield b"x"

    conn = http.client.HTTPConnection(*api.address, timeout=60)
    conn.request("POST", "/v1/syntheses/upload", body=trickle(), encode_chunked=True,
                 headers={"Authorization": f"Bearer {TOKEN}"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 408 and "KiB/s this server requires" in body["error"], body
    assert manager.statuses() == []  # the slot is free again


def test_a_restarted_server_sweeps_what_a_killed_one_left(home: CloudletHome):
    """After kill -9 the run directories stayed until the next synthesis started."""
    left = home.runs / "synthesis-pid999999999.1.abc"  # no such process
    (left / "mnt").mkdir(parents=True)
    mine = home.new_run_dir("synthesis")  # a live owner's: kept
    manager = SynthesisManager(home, prepare=StandInSynthesis.prepare, timeout=60)
    try:
        assert not left.exists() and mine.exists()
    finally:
        manager.shutdown()

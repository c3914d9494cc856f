"""`cloudlet serve` on real QEMU guests (TCG): uploads, URLs, the 8021 protocol, clean-up.

The server runs as a user runs it, in a subprocess; clients are the HTTP client of
cloudlet/cli/remote.py, a raw-socket 8021 client written from docs/protocol-8021.md, and the
`cloudlet synthesize --server` command. Base and overlay: the session's (conftest.py).
"""

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from cloudlet.cli.remote import ServerClient
from cloudlet.errors import ServerError
from cloudlet.hypervisor.qemu import free_port
from tests.functional.conftest import cloudlet, http_get, leftovers
from tests.rangeserver import RangeServer

pytestmark = pytest.mark.qemu

DISK_PAGE = "hello from the cloudlet overlay"  # what the customised guest serves on port 80


class Served:
    def __init__(
        self, proc: subprocess.Popen, home: Path, http_port: int, port_8021: int, log: Path
    ):
        self.proc = proc
        self.log = log
        self.home = home
        self.url = f"http://127.0.0.1:{http_port}"
        self.address_8021 = ("127.0.0.1", port_8021)
        self.token = (home / "server.token").read_text().strip()
        self.client = ServerClient(self.url, self.token, timeout=120)


def start_server(home: Path, *extra: str) -> Served:
    http_port, port_8021 = free_port(), free_port()
    log = home.parent / f"serve-{http_port}.log"  # the server's log, shown when a test fails
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloudlet.cli.main",
                "-v",
                "serve",
                "--listen",
                f"127.0.0.1:{http_port}",
                "--listen-8021",
                f"127.0.0.1:{port_8021}",
                "--timeout",
                "300",
                *extra,
            ],
            env=dict(os.environ, CLOUDLET_HOME=str(home)),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    deadline = time.monotonic() + 60
    while proc.poll() is None:
        line = proc.stdout.readline()
        if "8021 protocol on" in line:
            return Served(proc, home, http_port, port_8021, log)
        assert time.monotonic() < deadline, "cloudlet serve did not come up within 60 s"
    raise AssertionError(f"cloudlet serve exited {proc.returncode}: {log.read_text()}")


def stop_server(served: Served) -> None:
    served.proc.send_signal(signal.SIGTERM)
    try:
        assert served.proc.wait(timeout=300) == 0, served.log.read_text()[-4000:]
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()
        served.proc.stdout.close()


@pytest.fixture(scope="module")
def ranges(overlay: Path) -> Iterator[RangeServer]:
    with RangeServer(overlay.parent) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(home_a: Path, ranges: RangeServer) -> Iterator[Served]:
    served = start_server(home_a, "--max-running", "4", "--allow", ranges.url("/"))
    yield served
    stop_server(served)
    assert_clean(home_a)


def assert_clean(home: Path) -> None:
    """No QEMU, no mount and no run directory of this home left (waits up to 60 s)."""
    deadline = time.monotonic() + 60
    while True:
        qemu = subprocess.run(
            ["pgrep", "-f", f"qemu-system.*{home}"], capture_output=True, text=True
        ).stdout.split()
        mounts = [m for m in Path("/proc/mounts").read_text().splitlines() if str(home) in m]
        runs = list((home / "runs").iterdir())
        if not (qemu or mounts or runs or leftovers(home)):
            return
        assert time.monotonic() < deadline, f"left behind: {qemu} {mounts} {runs}"
        time.sleep(0.5)


def wait_state(served: Served, sid: str, states: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + 300
    while True:
        status = served.client.status(sid)
        assert status["state"] != "failed", status
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


def upload(served: Served, overlay: Path, port: int) -> dict:
    return served.client.upload(
        overlay, early_start=True, forwards=[f"tcp:{port}:80"], fetch_deadline=120
    )


def test_upload_synthesis_answers_then_delete_cleans_up(server: Served, overlay: Path):
    port = free_port()
    created = upload(server, overlay, port)
    assert created["source"] == "upload"
    wait_state(server, created["id"], ("running", "complete"))
    assert DISK_PAGE in http_get(port, timeout=120)
    done = wait_state(server, created["id"], ("complete",))
    assert done["stats"]["stages"], done
    server.client.delete(created["id"])
    assert server.client.request("GET", "/v1/syntheses") == {"syntheses": []}
    assert_clean(server.home)
    # one synthesis, one id: the engine's own log lines use the id the API gave
    assert f"synthesis {created['id']}: overlay complete and verified" in server.log.read_text()


def test_an_upload_longer_than_its_overlay_is_answered_and_its_vm_stopped(
    server: Served, overlay: Path, tmp_path: Path
):
    """Past the last frame nobody read the upload: the server's write blocked for ever, the
    request was never answered and the VM kept its --max-running slot."""
    padded = tmp_path / "padded.overlay"
    padded.write_bytes(overlay.read_bytes() + os.urandom(8 << 20))  # more than the pipe holds
    with pytest.raises(ServerError, match="goes on past the end of its overlay"):
        upload(server, padded, free_port())
    assert server.client.request("GET", "/v1/syntheses") == {"syntheses": []}
    assert_clean(server.home)


def test_url_synthesis_from_a_range_server(server: Served, overlay: Path, ranges: RangeServer):
    port = free_port()
    created = server.client.create(
        ranges.url(overlay.name), early_start=True, forwards=[f"tcp:{port}:80"]
    )
    assert DISK_PAGE in http_get(port, timeout=120)
    wait_state(server, created["id"], ("complete",))
    assert any(rng for _, _, rng in ranges.requests)  # fetched by Range requests
    server.client.delete(created["id"])
    assert_clean(server.home)


def send(sock: socket.socket, msg: dict) -> None:
    data = msgpack.packb(msg, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(data)) + data)


def recv(sock: socket.socket) -> dict | None:
    head = sock.recv(4, socket.MSG_WAITALL)
    if not head:
        return None
    return msgpack.unpackb(sock.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL))


def session(served: Served) -> tuple[socket.socket, str]:
    sock = socket.create_connection(served.address_8021, timeout=300)
    send(sock, {"command": 0x15, "token": served.token})
    reply = recv(sock)
    assert reply["command"] == 0x01, reply
    return sock, reply["session_id"]


def test_8021_push_with_early_start(server: Served, overlay: Path):
    port = free_port()
    data = overlay.read_bytes()
    sock, sid = session(server)
    with sock:
        send(
            sock,
            {
                "command": 0x11,
                "session_id": sid,
                "overlay_size": len(data),
                "options": {"early-start": True, "show-statistics": True},
                "forwards": [f"tcp:{port}:80"],
            },
        )
        assert recv(sock)["state"] == "accepted"
        for i in range(0, len(data), 1 << 20):
            send(sock, {"command": 0x12, "session_id": sid, "data": data[i : i + (1 << 20)]})
        send(sock, {"command": 0x13, "session_id": sid})
        running = recv(sock)
        assert running["command"] == 0x01 and running["state"] == "running", running
        done = recv(sock)
        assert done["command"] == 0x04, done
        assert done["statistics"]["stages"]
        assert DISK_PAGE in http_get(port, timeout=120)
        send(sock, {"command": 0x16, "session_id": sid})
        assert recv(sock) == {"command": 0x01, "state": "closed"}
    assert_clean(server.home)


def test_8021_disconnect_mid_upload_ends_the_session(server: Served, overlay: Path):
    """The guest runs (early start) while the last bytes are still missing; then the peer
    goes away: the VM is stopped and every file of the synthesis removed."""
    data = overlay.read_bytes()
    sock, sid = session(server)
    with sock:
        send(
            sock,
            {
                "command": 0x11,
                "session_id": sid,
                "overlay_size": len(data),
                "forwards": [f"tcp:{free_port()}:80"],
                "fetch_deadline": 300.0,
            },
        )
        accepted = recv(sock)
        assert accepted["state"] == "accepted"
        sent = len(data) - 65536
        for i in range(0, sent, 1 << 20):
            send(
                sock,
                {"command": 0x12, "session_id": sid, "data": data[i : min(sent, i + (1 << 20))]},
            )
        wait_state(server, accepted["synthesis_id"], ("running",))
    deadline = time.monotonic() + 300
    while server.client.request("GET", "/v1/syntheses")["syntheses"]:
        assert time.monotonic() < deadline, server.log.read_text()[-4000:]
        time.sleep(0.2)
    assert_clean(server.home)


def test_four_syntheses_at_once(server: Served, overlay: Path):
    ports = [free_port() for _ in range(4)]
    created: list[dict] = []
    errors: list[BaseException] = []

    def one(port: int) -> None:
        try:
            created.append(upload(server, overlay, port))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,)) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        for port in ports:
            assert DISK_PAGE in http_get(port, timeout=300)
        for c in created:
            wait_state(server, c["id"], ("complete",))
    finally:
        for c in created:
            server.client.delete(c["id"])
    assert_clean(server.home)


def test_cli_client_uploads_checks_and_deletes(server: Served, overlay: Path):
    port = free_port()
    token_file = server.home / "server.token"
    done = cloudlet(
        server.home,
        "synthesize",
        str(overlay),
        "--server",
        server.url,
        "--token-file",
        str(token_file),
        "--check-and-exit",
        "-f",
        f"tcp:{port}:80",
        "--check-url",
        f"http://127.0.0.1:{port}/",
    )
    assert DISK_PAGE in done.stdout
    assert "statistics:" in done.stdout
    assert server.client.request("GET", "/v1/syntheses") == {"syntheses": []}
    assert_clean(server.home)


def test_cli_client_ctrl_c_deletes_the_remote_synthesis(server: Served, overlay: Path):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloudlet.cli.main",
            "synthesize",
            str(overlay),
            "--server",
            server.url,
            "-f",
            f"tcp:{port}:80",
        ],
        env=dict(os.environ, CLOUDLET_HOME=str(server.home)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in proc.stdout:
            if "press Ctrl-C" in line:
                break
        assert DISK_PAGE in http_get(port, timeout=120)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert server.client.request("GET", "/v1/syntheses") == {"syntheses": []}
    assert_clean(server.home)


def test_sigterm_stops_every_synthesis(home_a: Path, overlay: Path):
    """A second server on the same home: SIGTERM while a guest runs leaves nothing behind."""
    served = start_server(home_a)
    port = free_port()
    created = upload(served, overlay, port)
    wait_state(served, created["id"], ("running", "complete"))
    stop_server(served)
    assert_clean(home_a)

"""The 8021 front end, driven by a client written from docs/protocol-8021.md (raw sockets and
msgpack, none of the server's classes). The synthesis behind it is a stand-in
(tests/unit/synthesis_standin.py): only framing, order and session handling are under test."""

import socket
import struct
import threading
import time
from pathlib import Path

import msgpack
import pytest

from cloudlet.home import CloudletHome
from cloudlet.server.manager import SynthesisManager
from cloudlet.server.protocol8021 import Server8021
from tests.unit.synthesis_standin import MAGIC, StandInSynthesis

TOKEN = "s3cret-token"
SEND_META, SEND_OVERLAY, FINISH = 0x11, 0x12, 0x13
SESSION_CREATE, SESSION_CLOSE, SEND_OVERLAY_URL = 0x15, 0x16, 0x17
SUCCESS, FAILED, SYNTHESIS_DONE = 0x01, 0x02, 0x04


def send(sock: socket.socket, msg: dict) -> None:
    data = msgpack.packb(msg, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(data)) + data)


def recv(sock: socket.socket) -> dict | None:
    head = sock.recv(4, socket.MSG_WAITALL)
    if not head:
        return None
    (n,) = struct.unpack(">I", head)
    return msgpack.unpackb(sock.recv(n, socket.MSG_WAITALL), raw=False)


@pytest.fixture
def server(tmp_path: Path):
    threads_before = set(threading.enumerate())
    manager = SynthesisManager(
        CloudletHome(tmp_path / "home"), prepare=StandInSynthesis.prepare, timeout=60
    )
    srv = Server8021(manager, TOKEN, ("127.0.0.1", 0))
    srv.start()
    yield srv
    manager.shutdown()
    srv.stop()
    assert set(threading.enumerate()) <= threads_before


def connect(server: Server8021) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=60)
    return sock


def open_session(server: Server8021) -> tuple[socket.socket, str]:
    sock = connect(server)
    send(sock, {"command": SESSION_CREATE, "token": TOKEN})
    reply = recv(sock)
    assert reply["command"] == SUCCESS and reply["state"] == "created", reply
    return sock, reply["session_id"]


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + 60
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("early_start", [True, False])
def test_push_synthesis_then_close(server, early_start):
    overlay = MAGIC + bytes(range(256)) * 12000  # ~3 MiB in 1 MiB messages
    sock, sid = open_session(server)
    assert len(sid) == 32 and int(sid, 16) >= 0
    with sock:
        send(
            sock,
            {
                "command": SEND_META,
                "session_id": sid,
                "overlay_size": len(overlay),
                "options": {"early-start": early_start, "show-statistics": True},
                "forwards": ["tcp:8080:80"],
            },
        )
        accepted = recv(sock)
        assert accepted["command"] == SUCCESS and accepted["state"] == "accepted", accepted
        for i in range(0, len(overlay), 1 << 20):
            send(
                sock,
                {"command": SEND_OVERLAY, "session_id": sid, "data": overlay[i : i + (1 << 20)]},
            )
        send(sock, {"command": FINISH, "session_id": sid})
        running = recv(sock)
        assert running["command"] == SUCCESS and running["state"] == "running", running
        done = recv(sock)
        assert done["command"] == SYNTHESIS_DONE, done
        assert done["synthesis_id"] == accepted["synthesis_id"]
        assert "apply overlay" in done["statistics"]["stages"]
        synth = StandInSynthesis.made[-1]
        assert synth.received == len(overlay)
        assert synth.spec.sink.early is early_start
        assert synth.spec.runner.host.forwards[0].guest_port == 80
        send(sock, {"command": SESSION_CLOSE, "session_id": sid})
        assert recv(sock) == {"command": SUCCESS, "state": "closed"}
        assert recv(sock) is None  # the server closed the connection
    assert synth.closed
    assert server.manager.statuses() == []


def test_disconnect_mid_upload_ends_the_session(server):
    sock, sid = open_session(server)
    send(sock, {"command": SEND_META, "session_id": sid, "overlay_size": 10 << 20})
    assert recv(sock)["state"] == "accepted"
    send(sock, {"command": SEND_OVERLAY, "session_id": sid, "data": MAGIC + b"x" * 1000})
    wait_until(
        lambda: StandInSynthesis.made and StandInSynthesis.made[-1].received > 0,
        "the upload never reached the synthesis",
    )
    synth = StandInSynthesis.made[-1]
    sock.close()
    wait_until(lambda: server.manager.statuses() == [], "the session's synthesis was not removed")
    assert synth.closed


@pytest.mark.parametrize(
    "first,error",
    [
        ({"command": SESSION_CREATE, "token": "wrong"}, "token"),
        ({"command": SESSION_CREATE}, "token"),
        ({"command": SEND_META, "session_id": "x", "overlay_size": 5}, "SESSION_CREATE"),
        ({"nocommand": 1}, "command"),
    ],
)
def test_bad_session_create_fails_and_closes(server, first, error):
    with connect(server) as sock:
        send(sock, first)
        reply = recv(sock)
        assert reply["command"] == FAILED and error in reply["error"], reply
        assert recv(sock) is None


def test_oversized_and_garbage_frames_fail(server):
    with connect(server) as sock:
        sock.sendall(struct.pack(">I", 64 << 20))
        reply = recv(sock)
        assert reply["command"] == FAILED and "at most" in reply["error"]
        assert recv(sock) is None
    with connect(server) as sock:
        sock.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
        assert recv(sock)["command"] == FAILED


@pytest.mark.parametrize(
    "message,error",
    [
        ({"command": SEND_META, "session_id": "0" * 32, "overlay_size": 5}, "session_id"),
        ({"command": SEND_META, "session_id": None, "overlay_size": 5}, "session_id"),
        ({"command": SEND_META}, "overlay_size"),
        ({"command": SEND_OVERLAY, "data": b"x"}, "between SEND_META and FINISH"),
        ({"command": FINISH}, "FINISH only after"),
        ({"command": 0x14}, "unknown"),
        ({"command": SEND_OVERLAY_URL, "overlay_url": "http://127.0.0.1:9/x"}, "--allow"),
        ({"command": SEND_META, "overlay_size": 5, "forwards": ["tcp:0.0.0.0:80:80"]}, "127.0.0.1"),
    ],
)
def test_protocol_errors_fail_the_session(server, message, error):
    sock, sid = open_session(server)
    with sock:
        msg = {"session_id": sid, **message}
        send(sock, {k: v for k, v in msg.items() if v is not None})
        reply = recv(sock)
        assert reply["command"] == FAILED and error in reply["error"], reply
        assert recv(sock) is None
    wait_until(lambda: server.manager.statuses() == [], "a synthesis was left behind")


def test_more_bytes_than_announced_fail(server):
    sock, sid = open_session(server)
    with sock:
        send(sock, {"command": SEND_META, "session_id": sid, "overlay_size": 8})
        assert recv(sock)["state"] == "accepted"
        send(sock, {"command": SEND_OVERLAY, "session_id": sid, "data": MAGIC + b"x" * 10})
        reply = recv(sock)
        assert reply["command"] == FAILED and "more overlay bytes" in reply["error"], reply
    wait_until(lambda: server.manager.statuses() == [], "the synthesis was left behind")


def test_a_failed_synthesis_is_reported(server):
    sock, sid = open_session(server)
    with sock:
        send(sock, {"command": SEND_META, "session_id": sid, "overlay_size": 8})
        assert recv(sock)["state"] == "accepted"
        send(sock, {"command": SEND_OVERLAY, "session_id": sid, "data": b"JUNKJUNK"})
        send(sock, {"command": FINISH, "session_id": sid})
        reply = recv(sock)
        assert reply["command"] == FAILED and "not an overlay" in reply["error"], reply
        assert recv(sock) is None
    wait_until(lambda: server.manager.statuses() == [], "the synthesis was left behind")


def test_an_unauthenticated_msgpack_bomb_costs_nothing(server):
    """Before SESSION_CREATE, a 2 MiB frame of 2M empty maps grew the server by ~91 MiB."""
    bomb = msgpack.packb([{}] * (2 << 20))
    with connect(server) as sock:
        sock.sendall(struct.pack(">I", len(bomb)))  # refused on its length: the rest unread
        reply = recv(sock)
        assert reply["command"] == FAILED and "at most 4096" in reply["error"]
    small = msgpack.packb({"command": SESSION_CREATE, "token": TOKEN, "x": [{}] * 2000})
    with connect(server) as sock:  # within the size bound, still bounded per container
        sock.sendall(struct.pack(">I", len(small)) + small)
        reply = recv(sock)
        assert reply["command"] == FAILED and "not valid msgpack" in reply["error"]

"""Elijah's synthesis protocol on TCP 8021, over the same SynthesisManager as the HTTP API.

Each message is a 4-byte big-endian length and a msgpack map; docs/protocol-8021.md is the spec.
A session lives as long as the connection that created it: a peer that disconnects (or falls
silent mid-upload) ends it, and its VM is stopped and its files removed.
"""

import enum
import logging
import secrets
import socket
import struct
import threading
from typing import Any

import msgpack

from cloudlet.errors import CloudletError, ServerError, SynthesisNotFound
from cloudlet.server.api import without_server_paths
from cloudlet.server.auth import token_matches
from cloudlet.server.manager import Job, Options, SynthesisManager, UploadPipe, UploadRate

LOG = logging.getLogger(__name__)

MAX_FRAME = 2 << 20  # bytes of one msgpack map
MAX_HELLO = 4 << 10  # bytes of the first message, decoded before the token is checked
MAX_ITEMS = 1024  # elements of any one msgpack array, and (/16) entries of any one map
MAX_DATA = 1 << 20  # bytes of overlay in one SEND_OVERLAY
IDLE_TIMEOUT = 60.0  # seconds a peer may stay silent before its synthesis is under way
FRAME_TIMEOUT = 60.0  # seconds the rest of a frame may take once its length has arrived
POLL = 0.2  # seconds between looks at a synthesis's state
_LENGTH = struct.Struct(">I")


class Command(enum.IntEnum):
    SEND_META = 0x11
    SEND_OVERLAY = 0x12
    FINISH = 0x13
    SESSION_CREATE = 0x15
    SESSION_CLOSE = 0x16
    SEND_OVERLAY_URL = 0x17


class Reply(enum.IntEnum):
    SUCCESS = 0x01
    FAILED = 0x02
    ON_DEMAND = 0x03  # reserved: this server never sends it (frames are fetched server-side)
    SYNTHESIS_DONE = 0x04


class ProtocolError(CloudletError):
    """The peer broke the protocol; the message goes back to it in a FAILED reply."""


def encode(message: dict[str, Any]) -> bytes:
    data = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(data)) + data


def read_message(
    sock: socket.socket, idle: float | None, max_frame: int = MAX_FRAME
) -> dict[str, Any] | None:
    """The next message; None when the peer closed between messages.

    Waits up to `idle` seconds (None: as long as the connection lives) for a message to begin,
    then FRAME_TIMEOUT for the rest of it. Decoding is bounded by `max_frame` bytes and by
    MAX_ITEMS per container, so a message costs memory in proportion to its few bytes.
    """
    sock.settimeout(idle)
    head = _recv_exact(sock, _LENGTH.size, eof_ok=True)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    if length > max_frame:
        raise ProtocolError(f"message of {length} bytes; at most {max_frame} allowed here")
    sock.settimeout(FRAME_TIMEOUT)
    body = _recv_exact(sock, length, eof_ok=False)
    try:
        message = msgpack.unpackb(
            body,
            raw=False,
            max_bin_len=MAX_DATA,
            max_str_len=MAX_DATA,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS // 16,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"message is not valid msgpack: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("command"), int):
        raise ProtocolError('message must be a map with an integer "command"')
    return message


def _recv_exact(sock: socket.socket, n: int, eof_ok: bool) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            if eof_ok and not buf:
                return None
            raise ConnectionError(f"connection closed {n - len(buf)} bytes into a message")
        buf += part
    return bytes(buf)


class Server8021:
    """Accepts connections on its own thread; one thread per session."""

    def __init__(
        self,
        manager: SynthesisManager,
        token: str,
        address: tuple[str, int],
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.manager = manager
        self.token = token
        self.idle_timeout = idle_timeout
        try:
            self._listener = socket.create_server(address)
        except OSError as exc:
            raise ServerError(
                f"cannot listen on {address[0]}:{address[1]}: {exc.strerror}"
            ) from None
        self._sessions: set[_Session] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._accept, name="8021-accept")

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # the listener was closed by stop()
            _keepalive(conn)
            with self._lock:
                if self._closing:
                    conn.close()
                    return
                session = _Session(self, conn, f"{peer[0]}:{peer[1]}")
                self._sessions.add(session)
            session.thread.start()

    def stop(self) -> None:
        """Close the listener, end every session (their VMs stopped), join all threads."""
        with self._lock:
            self._closing = True
            sessions = list(self._sessions)
        if self._thread.ident is not None:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
            self._thread.join()
        self._listener.close()
        for session in sessions:
            session.abort()
        for session in sessions:
            session.thread.join()

    def _forget(self, session: "_Session") -> None:
        with self._lock:
            self._sessions.discard(session)


def _keepalive(conn: socket.socket) -> None:
    """Notice a peer that vanished without closing (its session may be silent for hours)."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)


class _Session:
    """One connection: SESSION_CREATE, one synthesis (pushed or by URL), SESSION_CLOSE."""

    def __init__(self, server: Server8021, conn: socket.socket, peer: str) -> None:
        self.server = server
        self.conn = conn
        self.peer = peer
        self.session_id: str | None = None
        self.job: Job | None = None
        self.pipe: UploadPipe | None = None
        self.expected = 0  # overlay bytes announced in SEND_META
        self.received = 0
        self.rate = UploadRate()  # restarted by SEND_META
        self.in_use = False  # after FINISH / SEND_OVERLAY_URL: the peer may stay silent
        self.show_statistics = False
        self._send_lock = threading.Lock()
        self._failed = False
        self._closing = False  # the session itself is deleting its synthesis
        self._ended = threading.Event()
        self._watcher: threading.Thread | None = None
        self.thread = threading.Thread(target=self._run, name=f"8021-{peer}")

    def abort(self) -> None:
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- sending -------------------------------------------------------------------------------

    def send(self, reply: Reply, **fields: Any) -> None:
        with self._send_lock:
            if self._failed:
                return  # after FAILED the session is over: nothing else is sent
            self._failed = reply == Reply.FAILED
            self.conn.settimeout(FRAME_TIMEOUT)
            self.conn.sendall(encode({"command": int(reply), **fields}))

    def fail(self, error: str) -> None:
        """Tell the peer why the session ends, then end it."""
        LOG.info("8021 session from %s failed: %s", self.peer, error)
        try:
            self.send(Reply.FAILED, error=without_server_paths(error))
        except OSError:
            pass
        self.abort()

    # --- the session ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except ProtocolError as exc:
            self.fail(str(exc))
        except CloudletError as exc:
            self.fail(str(exc))
        except ValueError as exc:
            self.fail(str(exc))
        except OSError as exc:  # disconnect, timeout: the session just ends
            LOG.info("8021 session from %s ended: %s", self.peer, exc)
        except Exception as exc:
            LOG.exception("8021 session from %s", self.peer)
            self.fail(f"internal error: {exc}")
        finally:
            self._end()

    def _end(self) -> None:
        self._ended.set()
        self._closing = True
        if self.pipe is not None:
            self.pipe.close()  # the synthesis sees the overlay end (if it still reads it)
        if self.job is not None:
            try:
                self.server.manager.delete(self.job.id)
            except SynthesisNotFound:
                pass  # deleted through the HTTP API, or by the server shutting down
            except CloudletError as exc:
                LOG.error("ending 8021 session from %s: %s", self.peer, exc)
        if self._watcher is not None:
            self._watcher.join()
        self.conn.close()
        self.server._forget(self)

    def _serve(self) -> None:
        # nothing unauthenticated may cost more than a few KiB: the first message is small
        first = read_message(self.conn, self.server.idle_timeout, max_frame=MAX_HELLO)
        if first is None:
            return
        if first["command"] != Command.SESSION_CREATE:
            raise ProtocolError("the first message must be SESSION_CREATE (0x15)")
        token = first.get("token")
        if not isinstance(token, str) or not token_matches(token, self.server.token):
            raise ProtocolError("missing or wrong token")
        self.session_id = secrets.token_hex(16)
        self.send(Reply.SUCCESS, state="created", session_id=self.session_id)
        while True:
            message = read_message(self.conn, None if self.in_use else self.server.idle_timeout)
            if message is None:
                LOG.info("8021 peer %s disconnected", self.peer)
                return
            if message.get("session_id") != self.session_id:
                raise ProtocolError("unknown session_id")
            command = message["command"]
            if command == Command.SESSION_CLOSE:
                self._close_synthesis()
                self.send(Reply.SUCCESS, state="closed")
                return
            handler = {
                Command.SEND_META: self._send_meta,
                Command.SEND_OVERLAY_URL: self._send_overlay_url,
                Command.SEND_OVERLAY: self._send_overlay,
                Command.FINISH: self._finish,
            }.get(command)
            if handler is None:
                raise ProtocolError(f"unknown or out-of-place command 0x{command:02x}")
            handler(message)

    def _options(self, message: dict[str, Any]) -> Options:
        if self.job is not None:
            raise ProtocolError("this session already has a synthesis")
        opts = message.get("options", {})
        if not isinstance(opts, dict):
            raise ProtocolError('"options" must be a map')
        self.show_statistics = bool(opts.get("show-statistics", False))
        return Options.parse(
            opts.get("early-start", True),
            message.get("forwards", []),
            message.get("fetch_deadline", 60.0),
        )

    def _send_meta(self, message: dict[str, Any]) -> None:
        options = self._options(message)
        size = message.get("overlay_size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ProtocolError('SEND_META needs "overlay_size": the overlay length in bytes')
        self.expected = size
        self.rate = UploadRate()
        self.job, self.pipe = self.server.manager.create_upload(options, size)
        self._accepted()

    def _send_overlay_url(self, message: dict[str, Any]) -> None:
        options = self._options(message)
        url = message.get("overlay_url")
        if not isinstance(url, str) or not url:
            raise ProtocolError('SEND_OVERLAY_URL needs "overlay_url": a string')
        self.job = self.server.manager.create(url, options)
        self.in_use = True
        self._accepted()

    def _accepted(self) -> None:
        assert self.job is not None
        self.job.on_stop(self._stopped)
        self.send(Reply.SUCCESS, state="accepted", synthesis_id=self.job.id)
        self._watcher = threading.Thread(target=self._watch, name=f"8021-watch-{self.job.id}")
        self._watcher.start()

    def _send_overlay(self, message: dict[str, Any]) -> None:
        if self.pipe is None or self.in_use:
            raise ProtocolError("SEND_OVERLAY only between SEND_META and FINISH")
        data = message.get("data")
        if not isinstance(data, bytes):
            raise ProtocolError('SEND_OVERLAY needs "data": binary')
        self.received += len(data)
        if self.received > self.expected:
            raise ProtocolError(f"more overlay bytes than the {self.expected} announced")
        self.rate.check(self.received)
        try:
            self.pipe.write(data)
        except BrokenPipeError:
            raise ProtocolError(self._why_ended()) from None

    def _finish(self, message: dict[str, Any]) -> None:
        if self.pipe is None or self.in_use:
            raise ProtocolError("FINISH only after SEND_META and the overlay's bytes")
        if self.received != self.expected:
            raise ProtocolError(f"FINISH after {self.received} of {self.expected} bytes")
        self.in_use = True
        self.pipe.close()

    def _why_ended(self) -> str:
        assert self.job is not None
        self.job.thread.join(FRAME_TIMEOUT)  # its status is final once the worker is done
        return self.job.status().get("error") or "the synthesis ended before the overlay did"

    def _stopped(self) -> None:
        """The synthesis was stopped by someone else (HTTP DELETE, server shutdown)."""
        if not self._closing:
            self.fail("the synthesis was stopped on the server (deleted, or the server stops)")

    def _close_synthesis(self) -> None:
        self._closing = True
        if self.job is not None:
            job, self.job = self.job, None
            self.server.manager.delete(job.id)

    def _watch(self) -> None:
        """Report the synthesis's progress: SUCCESS once the guest runs, then SYNTHESIS_DONE."""
        job = self.job
        assert job is not None
        running_sent = False
        while not self._ended.wait(POLL):
            status = job.status()
            state = status.get("state")
            try:
                if state == "failed":
                    self.fail(status.get("error") or "the synthesis failed")
                    return
                if state in ("running", "complete") and not running_sent:
                    running_sent = True
                    self.send(Reply.SUCCESS, state="running", synthesis_id=job.id)
                if state == "complete":
                    extra = {"statistics": status.get("stats", {})} if self.show_statistics else {}
                    self.send(Reply.SYNTHESIS_DONE, synthesis_id=job.id, **extra)
                    return
            except OSError:
                return

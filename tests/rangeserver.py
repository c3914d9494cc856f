"""A real HTTP/1.1 file server on 127.0.0.1 with Range support and fault injection, for tests.

    with RangeServer(root_dir) as srv:
        url = srv.url("x.overlay")
        srv.faults.drop_after = 123456   # cut responses after that many body bytes ...
        srv.faults.times = 1             # ... once (None: every time)
        ...
        srv.requests                     # [(method, path, range header or None), ...]

Faults (all off by default; assign a fresh Faults() to reset):
  drop_after   close the connection after this many body bytes of a response
  drop_at      close the connection when a response reaches this file offset (no progress past it)
  stall_after  stop sending after this many body bytes, for stall_for seconds (None: until stop)
  stall_at     stop sending when a response reaches this file offset, as stall_after (a source
               gone silent: a new request for those bytes goes silent there too)
  status       answer every request with this status and an empty body (404, 503, ...)
  times        how many of the faults above may still fire (None: unlimited); each fire counts 1
  truncate_to  serve every file as if only its first N bytes existed (a shorter object)
  short_by     promise the full length but send N bytes fewer, then close (a cut body)
  corrupt_at   flip the byte at this file offset in every body that covers it
  ignore_range answer 200 with the whole file, as a server without Range support does
  rate         bytes per second per response (a slow link)
  redirects    {"/request-path": "Location"}: answer 302 for those paths

stop() (or leaving the with block) closes the port: later requests are refused. Every handler
thread is joined; stalled responses are released at once.
"""

import email.utils
import os
import posixpath
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from socketserver import ThreadingMixIn
from types import TracebackType
from urllib.parse import unquote, urlsplit

_BLOCK = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Faults:
    drop_after: int | None = None
    drop_at: int | None = None
    stall_after: int | None = None
    stall_at: int | None = None
    stall_for: float | None = None
    status: int | None = None
    times: int | None = None
    truncate_to: int | None = None
    short_by: int | None = None
    corrupt_at: int | None = None
    ignore_range: bool = False
    rate: float | None = None
    redirects: dict[str, str] = field(default_factory=dict)


class _Server(ThreadingMixIn, HTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins every handler thread
    allow_reuse_address = True

    def __init__(self, owner: "RangeServer", address: tuple[str, int]) -> None:
        self.owner = owner
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 30  # an idle keep-alive connection is dropped after this

    def setup(self) -> None:
        super().setup()
        # headers and body are separate writes: without this, Nagle + delayed ACK add 40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.owner._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        self.server.owner._track(self.connection, False)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        owner = self.server.owner
        faults = owner.faults
        range_header = self.headers.get("Range")
        path = urlsplit(self.path).path
        owner.requests.append((self.command, path, range_header))
        if path in faults.redirects:
            self._empty(302, Location=faults.redirects[path])
            return
        if faults.status is not None and owner._fire():
            self._empty(faults.status)
            return
        file = owner._resolve(path)
        if file is None:
            self._empty(404)
            return
        size = file.stat().st_size
        if faults.truncate_to is not None:
            size = min(size, faults.truncate_to)
        start, end = 0, size
        status = 200
        match = _RANGE.match(range_header or "")
        if match and not faults.ignore_range and match.group(1) + match.group(2):
            first, last = match.groups()
            if first:
                start = int(first)
                end = min(size, int(last) + 1) if last else size
            else:
                start = max(0, size - int(last))
            if start >= size or end <= start:
                self._empty(416, **{"Content-Range": f"bytes */{size}"})
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        stat = file.stat()
        self.send_header("ETag", f'"{stat.st_mtime_ns:x}-{size:x}"')
        self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            self._send_body(file, start, end)

    def _send_body(self, file: Path, start: int, end: int) -> None:
        owner = self.server.owner
        faults = owner.faults
        cut = end if faults.short_by is None else max(start, end - faults.short_by)
        drop = end
        if faults.drop_after is not None:
            drop = min(drop, start + faults.drop_after)
        if faults.drop_at is not None and start <= faults.drop_at < end:
            drop = min(drop, faults.drop_at)
        stall = end if faults.stall_after is None else min(end, start + faults.stall_after)
        if faults.stall_at is not None and start <= faults.stall_at < end:
            stall = min(stall, faults.stall_at)
        began = time.monotonic()
        pos = start
        with open(file, "rb") as f:
            while pos < min(end, cut):
                if pos == drop and owner._fire():
                    return self._hang_up()
                if pos == stall and owner._fire():
                    owner._stopping.wait(faults.stall_for)
                    return self._hang_up()
                stop = min(end, cut, pos + _BLOCK)
                for point in (drop, stall):
                    if pos < point < stop:
                        stop = point
                block = bytearray(os.pread(f.fileno(), stop - pos, pos))
                if faults.corrupt_at is not None and pos <= faults.corrupt_at < pos + len(block):
                    block[faults.corrupt_at - pos] ^= 0xFF
                if not block:  # the file shrank under us
                    return self._hang_up()
                try:
                    self.wfile.write(block)
                except OSError:
                    return self._hang_up()
                pos += len(block)
                if faults.rate:
                    ahead = (pos - start) / faults.rate - (time.monotonic() - began)
                    if ahead > 0 and owner._stopping.wait(ahead):
                        return self._hang_up()
        if cut < end:
            self._hang_up()

    def _empty(self, status: int, **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _hang_up(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class RangeServer:
    """Serves the files under `root` at http://127.0.0.1:<port>/ (https with `tls=(cert, key)`)."""

    def __init__(self, root: str | os.PathLike[str], tls: tuple[Path, Path] | None = None) -> None:
        self.root = Path(root).resolve()
        self.faults = Faults()
        self.requests: list[tuple[str, str, str | None]] = []
        self.fired = 0  # how many times a counted fault has fired
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server = _Server(self, ("127.0.0.1", 0))
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self._stopped = False

    def url(self, name: str = "") -> str:
        return f"{self.scheme}://{self.host}:{self.port}/{name.lstrip('/')}"

    def stop(self) -> None:
        """Close the port, release stalls, cut open connections and join every thread."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._thread.join(timeout=30)

    def __enter__(self) -> "RangeServer":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _fire(self) -> bool:
        """Whether a counted fault may fire now (and count it)."""
        with self._lock:
            if self.faults.times is not None:
                if self.faults.times <= 0:
                    return False
                self.faults.times -= 1
            self.fired += 1
            return True

    def _resolve(self, path: str) -> Path | None:
        relative = posixpath.normpath(unquote(path)).lstrip("/")
        file = (self.root / relative).resolve()
        if not file.is_relative_to(self.root) or not file.is_file():
            return None
        return file

    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

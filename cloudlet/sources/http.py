"""Overlays on any static web server (nginx, busybox httpd, S3 pre-signed URLs) via HTTP Range.

Only standard Range semantics are relied on: a ranged GET answered 206 with a Content-Range that
is checked against what was asked. A server that ignores Range (200) still works: the body is
skipped up to the offset, and the source reports itself as not random access so nobody fetches
frames on demand from it. Every request has bounded connect and read timeouts; a transfer that
drops is resumed from the byte it reached (cloudlet.sources.resume).
"""

import http.client
import io
import logging
import re
import socket
import ssl
import threading
from typing import BinaryIO, cast
from urllib.parse import urljoin

from cloudlet.errors import SourceError, SourceNotAllowed, TruncatedOverlay
from cloudlet.sources.allow import AllowList, RemoteURL
from cloudlet.sources.base import OverlaySource
from cloudlet.sources.resume import (
    DEFAULT_POLICY,
    TRANSIENT_ERRORS,
    Backoff,
    ResumingReader,
    RetryPolicy,
    Transient,
    read_exactly,
)

LOG = logging.getLogger(__name__)

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_BUFFER = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)\s*$")
_HEADERS = {"Accept-Encoding": "identity", "User-Agent": "cloudlet-overlay-source/1"}


class _Connection:
    """One keep-alive connection, reopened when the origin changes; abortable from any thread."""

    def __init__(self, timeout: float, tls: ssl.SSLContext) -> None:
        self._timeout = timeout
        self._tls = tls
        self._conn: http.client.HTTPConnection | None = None
        self._origin: tuple[str, str, int] | None = None

    def get(self, url: RemoteURL) -> http.client.HTTPConnection:
        if self._conn is None or self._origin != url.origin:
            self.close()
            if url.scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    url.host, url.port, timeout=self._timeout, context=self._tls
                )
            else:
                self._conn = http.client.HTTPConnection(url.host, url.port, timeout=self._timeout)
            self._origin = url.origin
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def abort(self) -> None:
        """Wake a thread blocked on this connection (close() alone does not interrupt recv)."""
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.close()


class _Transfer:
    """A response body being read; closing it mid-body closes its connection (not reusable)."""

    def __init__(self, response: http.client.HTTPResponse, conn: _Connection) -> None:
        self._response = response
        self._conn = conn

    def readinto(self, buffer: memoryview) -> int:
        return self._response.readinto(buffer)

    def close(self) -> None:
        if not self._response.isclosed() or self._response.length:  # unread or cut short
            self._conn.close()


class HttpSource(OverlaySource):
    """An overlay at an http(s) URL that the allow-list accepts."""

    def __init__(
        self,
        url: str,
        allow: AllowList,
        *,
        timeout: float = 30.0,
        policy: RetryPolicy = DEFAULT_POLICY,
        probe: bool = True,
    ) -> None:
        self._allow = allow
        self._start = allow.check(url)
        self.url = str(self._start)
        self._timeout = timeout
        self._policy = policy
        self._tls = ssl.create_default_context()
        self._target = self._start  # where redirects led last time
        self._size: int | None = None
        self._etag: str | None = None
        self._aborted = threading.Event()
        self._lock = threading.Lock()
        self._conn = _Connection(timeout, self._tls)  # for read_range (keep-alive)
        self._live: set[_Connection] = {self._conn}
        if probe:
            self._probe()

    @classmethod
    def from_location(
        cls, location: str, *, allow: AllowList | None, timeout: float
    ) -> "HttpSource":
        if allow is None:
            raise SourceNotAllowed(
                f"overlay URL {location} refused: remote sources need an allow-list "
                "(AllowList.parse(entries), or AllowList.any() for a user's own command line)"
            )
        return cls(location, allow, timeout=timeout)

    def size(self) -> int | None:
        return self._size

    def stream(self, offset: int = 0) -> BinaryIO:
        conn = self._new_connection()

        def release() -> None:
            conn.close()
            with self._lock:
                self._live.discard(conn)

        reader = ResumingReader(
            lambda pos, end: self._open(conn, pos, end),
            offset,
            self._size,
            self._backoff(),
            on_close=release,
        )
        return cast(BinaryIO, io.BufferedReader(reader, buffer_size=_BUFFER))

    def read_range(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset}+{length}")
        self._check_open()
        if self._size is not None and offset + length > self._size:
            raise TruncatedOverlay(
                f"overlay {self.url} is {self._size} bytes long; needed bytes up to "
                f"{offset + length}: the uploaded copy was cut short"
            )
        if not length:
            return b""
        end = offset + length
        with ResumingReader(
            lambda pos, stop: self._open(self._conn, pos, stop), offset, end, self._backoff()
        ) as reader:
            return read_exactly(reader, length)

    def clone(self) -> "HttpSource":
        self._check_open()
        twin = HttpSource(
            self.url, self._allow, timeout=self._timeout, policy=self._policy, probe=False
        )
        twin._target, twin._size, twin._etag = self._target, self._size, self._etag
        twin.random_access = self.random_access
        twin.stall_limit = self.stall_limit
        return twin

    def close(self) -> None:
        """Idempotent; from another thread it aborts reads in progress (they raise SourceError)."""
        self._aborted.set()
        with self._lock:
            live = list(self._live)
        for conn in live:
            conn.abort()

    # -- requests ---------------------------------------------------------------------------

    def _new_connection(self) -> _Connection:
        self._check_open()
        conn = _Connection(self._timeout, self._tls)
        with self._lock:
            self._live.add(conn)
        return conn

    def _check_open(self) -> None:
        if self._aborted.is_set():
            raise SourceError(f"overlay source {self.url} is closed")

    def _backoff(self) -> Backoff:
        return Backoff(f"overlay {self.url}", self._policy, self._aborted, self.stall_limit)

    def _probe(self) -> None:
        """Size, ETag and Range support from a one-byte request; fails fast on 404 and the like."""
        backoff = self._backoff()
        while True:
            try:
                response = self._request(self._conn, 0, 1)
                if response.status == 416:  # an empty object has no byte 0
                    self._size = self._unsatisfied_total(response)
                elif response.status == 200:
                    self._check_identity(response, _content_length(response))
                    self.random_access = False
                    LOG.warning(
                        "%s: the server ignores Range requests; streams start at byte 0 and "
                        "skip, and frames are not fetched on demand",
                        self.url,
                    )
                else:
                    self._accept(response, 0, 1)
                    response.read(1)
                if not response.isclosed():
                    self._conn.close()
                return
            except TRANSIENT_ERRORS as e:
                self._conn.close()
                backoff.failed(e, 0)
            except BaseException:
                self._conn.close()
                raise

    def _open(self, conn: _Connection, pos: int, end: int | None) -> _Transfer:
        """A transfer whose next byte is byte `pos` of the overlay."""
        try:
            response = self._request(conn, pos, end)
            if response.status == 416:
                total = self._unsatisfied_total(response)
                raise TruncatedOverlay(
                    f"overlay {self.url} is now {total} bytes long; needed bytes from {pos}: "
                    "it was replaced or cut short on the server"
                )
            self._accept(response, pos, end)
        except BaseException:
            conn.close()
            raise
        return _Transfer(response, conn)

    def _request(self, conn: _Connection, pos: int, end: int | None) -> http.client.HTTPResponse:
        """GET with a Range header, following allowed redirects."""
        headers = dict(_HEADERS, Range=f"bytes={pos}-{'' if end is None else end - 1}")
        url = self._target
        for _ in range(MAX_REDIRECTS + 1):
            client = conn.get(url)
            try:
                client.request("GET", url.target, headers=headers)
                response = client.getresponse()
            except ssl.SSLCertVerificationError as e:
                raise SourceError(
                    f"overlay {self.url}: the TLS certificate of {url.host} is not trusted "
                    f"({e.verify_message})"
                ) from e
            if response.status not in _REDIRECTS:
                self._target = url
                return response
            location = response.getheader("Location")
            conn.close()  # do not read a redirect's body
            if not location:
                raise SourceError(
                    f"overlay {self.url}: redirect {response.status} without Location"
                )
            url = self._allow.check(urljoin(str(url), location))
            LOG.info("%s: redirected to %s", self.url, url)
        raise SourceError(f"overlay {self.url}: more than {MAX_REDIRECTS} redirects")

    def _accept(self, response: http.client.HTTPResponse, pos: int, end: int | None) -> None:
        """Check a response's status and headers; skip to `pos` if the server ignored Range."""
        status = response.status
        if status == 206:
            first, last, total = _content_range(response, self.url)
            self._check_identity(response, total)
            if end is not None:
                wanted_last = end - 1
            else:
                wanted_last = last if total is None else total - 1
            # More than asked is harmless (busybox httpd reads "bytes=0-0" as "bytes=0-"): the
            # transfer stops at `end` and the connection is then dropped, not reused.
            if first != pos or last < wanted_last:
                raise SourceError(
                    f"overlay {self.url}: asked for bytes {pos}-{wanted_last}, the server sent "
                    f"{first}-{last}: is a proxy or the server mangling Range requests?"
                )
        elif status == 200:
            self._check_identity(response, _content_length(response))
            if pos:
                _skip(response, pos)
        elif status >= 500:
            raise Transient(f"server answered {status} {response.reason}")
        else:
            raise SourceError(
                f"overlay {self.url}: the server answered {status} {response.reason}"
                + (" (no such file there)" if status == 404 else "")
                + (" (access refused)" if status in (401, 403) else "")
            )

    def _check_identity(self, response: http.client.HTTPResponse, total: int | None) -> None:
        """The same object every time: size and ETag unchanged, bytes not transformed."""
        encoding = response.getheader("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise SourceError(
                f"overlay {self.url}: the server compresses it on the fly "
                f"(Content-Encoding: {encoding}); serve it as a plain file"
            )
        if total is not None and self._size is not None and total < self._size:
            raise TruncatedOverlay(
                f"overlay {self.url} shrank from {self._size} to {total} bytes while being read"
            )
        if total is not None and self._size is not None and total != self._size:
            raise SourceError(
                f"overlay {self.url} grew from {self._size} to {total} bytes while being read"
            )
        self._size = total if self._size is None else self._size
        etag = response.getheader("ETag")
        if etag is not None and self._etag is not None and etag != self._etag:
            raise SourceError(
                f"overlay {self.url} changed on the server while being read (ETag {self._etag} "
                f"became {etag})"
            )
        self._etag = self._etag or etag

    def _unsatisfied_total(self, response: http.client.HTTPResponse) -> int:
        match = _UNSATISFIED_RANGE.match(response.getheader("Content-Range", ""))
        if match is None:
            raise SourceError(f"overlay {self.url}: 416 without a usable Content-Range")
        total = int(match.group(1))
        self._check_identity(response, total)
        return total


def _content_range(response: http.client.HTTPResponse, url: str) -> tuple[int, int, int | None]:
    header = response.getheader("Content-Range", "")
    match = _CONTENT_RANGE.match(header)
    if match is None:
        raise SourceError(f"overlay {url}: 206 with an unusable Content-Range {header!r}")
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)), total


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.getheader("Content-Length")
    return int(value) if value is not None and value.strip().isdigit() else None


def _skip(response: http.client.HTTPResponse, count: int) -> None:
    """Discard `count` bytes of a body (a server that ignored Range sent it from byte 0)."""
    LOG.debug("skipping %d bytes of a 200 response", count)
    scratch = bytearray(min(count, _BUFFER))
    view = memoryview(scratch)
    while count:
        n = response.readinto(view[: min(count, len(view))])
        if not n:
            raise Transient(f"response ended {count} bytes before the requested offset")
        count -= n

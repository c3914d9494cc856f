"""The HTTP JSON API (`/v1/...`) of `cloudlet serve`; docs/server.md is its reference."""

import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from cloudlet.errors import (
    CloudletError,
    ConfigMismatch,
    OverlayError,
    ServerBusy,
    ServerError,
    SourceError,
    SourceNotAllowed,
    SynthesisNotFound,
    WrongBase,
)
from cloudlet.server.auth import bearer, token_matches
from cloudlet.server.manager import Job, Options, SynthesisManager, UploadRate, UploadTooSlow

LOG = logging.getLogger(__name__)

MAX_JSON_BODY = 64 << 10  # bytes; a create request is a few hundred
MAX_UPLOAD = 64 << 30  # bytes; overlays are far smaller than the VMs they rebuild
UPLOAD_READ = 1 << 20  # bytes read from the client at a time
DRAIN_LIMIT = 64 << 20  # request bytes discarded after an early error, so the client sees it
REQUEST_TIMEOUT = 60.0  # seconds any single read from or write to a client may take

# most specific first: a subclass must win over its base class
_STATUS_OF: list[tuple[type[BaseException], HTTPStatus]] = [
    (SourceNotAllowed, HTTPStatus.FORBIDDEN),
    (SourceError, HTTPStatus.BAD_GATEWAY),
    (ServerBusy, HTTPStatus.TOO_MANY_REQUESTS),
    (SynthesisNotFound, HTTPStatus.NOT_FOUND),
    (ServerError, HTTPStatus.SERVICE_UNAVAILABLE),
    (WrongBase, HTTPStatus.CONFLICT),
    (ConfigMismatch, HTTPStatus.CONFLICT),
    (OverlayError, HTTPStatus.UNPROCESSABLE_ENTITY),
    (CloudletError, HTTPStatus.BAD_REQUEST),
    (ValueError, HTTPStatus.BAD_REQUEST),
]


def status_of(exc: BaseException) -> HTTPStatus:
    for cls, status in _STATUS_OF:
        if isinstance(exc, cls):
            return status
    return HTTPStatus.INTERNAL_SERVER_ERROR


class HttpError(Exception):
    """Ends a request with this status and {"error": message}."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


_ID = r"(?P<id>[0-9a-f]{1,64})"
_ROUTES: list[tuple[str, re.Pattern, str]] = [
    ("GET", re.compile(r"/v1/bases"), "bases"),
    ("GET", re.compile(r"/v1/syntheses"), "list"),
    ("POST", re.compile(r"/v1/syntheses"), "create"),
    ("POST", re.compile(r"/v1/syntheses/upload"), "upload"),
    ("GET", re.compile(rf"/v1/syntheses/{_ID}"), "get"),
    ("DELETE", re.compile(rf"/v1/syntheses/{_ID}"), "delete"),
]


class ApiServer:
    """The API on a ThreadingHTTPServer; `start()` serves from a thread, `stop()` joins it all."""

    def __init__(
        self,
        manager: SynthesisManager,
        token: str,
        address: tuple[str, int],
        max_upload: int = MAX_UPLOAD,
    ) -> None:
        self.manager = manager
        self.token = token
        self.max_upload = max_upload
        try:
            self.httpd = _HTTPServer(address, _Handler)
        except OSError as exc:
            raise ServerError(
                f"cannot listen on {address[0]}:{address[1]}: {exc.strerror}"
            ) from None
        self.httpd.api = self
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="api-server"
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, then wait for the requests in progress (each one is bounded)."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins the request threads: nothing is left behind
    api: ApiServer


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "cloudlet"
    timeout = REQUEST_TIMEOUT

    def do_GET(self) -> None:  # noqa: N802 (the names http.server dispatches to)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    # methods no route takes still get the token check first, then a JSON 405
    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._handle("OPTIONS")

    def do_TRACE(self) -> None:  # noqa: N802
        self._handle("TRACE")

    def do_CONNECT(self) -> None:  # noqa: N802
        self._handle("CONNECT")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, an unknown method) as JSON too;
        past the headers, an unknown method from a client without the token gets 401."""
        headers = getattr(self, "headers", None)
        if headers is not None and code == HTTPStatus.NOT_IMPLEMENTED and not token_matches(
            bearer(headers.get("Authorization")), self.server.api.token
        ):
            code, message = HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token"
        self.close_connection = True
        self._body_read = True  # nothing of a request http.server refused is read on purpose
        self._error(HTTPStatus(code), message or HTTPStatus(code).phrase)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base signature)
        LOG.debug("%s %s", self.address_string(), format % args)

    # --- dispatch ------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        self.close_connection = True  # one request per connection: no keep-alive bookkeeping
        self._body_read = False
        api = self.server.api
        try:
            if not token_matches(bearer(self.headers.get("Authorization")), api.token):
                raise HttpError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")
            parts = urlsplit(self.path)
            name, params = self._route(method, parts.path)
            getattr(self, f"_api_{name}")(parse_qs(parts.query), **params)
        except HttpError as exc:
            self._error(exc.status, str(exc))
        except (CloudletError, ValueError) as exc:
            self._error(status_of(exc), str(exc))
        except OSError as exc:  # the client went away or timed out: nobody to answer
            LOG.info("%s %s: %s", method, self.path, exc)
        except Exception as exc:
            LOG.exception("%s %s failed", method, self.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc}")

    def _route(self, method: str, path: str) -> tuple[str, dict[str, str]]:
        allowed = []
        for verb, pattern, name in _ROUTES:
            m = pattern.fullmatch(path)
            if m:
                if verb == method:
                    return name, m.groupdict()
                allowed.append(verb)
        if allowed:
            raise HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{method} not allowed here (use {', '.join(allowed)})",
            )
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such resource: {path}")

    # --- endpoints -----------------------------------------------------------------------------

    def _api_bases(self, query: dict) -> None:
        self._json(HTTPStatus.OK, {"bases": self.server.api.manager.bases()})

    def _api_list(self, query: dict) -> None:
        self._json(HTTPStatus.OK, {"syntheses": self.server.api.manager.statuses()})

    def _api_get(self, query: dict, id: str) -> None:  # noqa: A002 (route parameter)
        self._json(HTTPStatus.OK, self.server.api.manager.get(id).status())

    def _api_delete(self, query: dict, id: str) -> None:  # noqa: A002
        self.server.api.manager.delete(id)
        self._send(HTTPStatus.NO_CONTENT, b"", None)

    def _api_create(self, query: dict) -> None:
        body = self._read_json()
        url = body.get("overlay_url")
        if not isinstance(url, str) or not url:
            raise HttpError(HTTPStatus.BAD_REQUEST, 'the body needs "overlay_url": a string')
        unknown = set(body) - {"overlay_url", "early_start", "forwards", "fetch_deadline"}
        if unknown:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown keys: {', '.join(sorted(unknown))}")
        options = Options.parse(
            body.get("early_start", True),
            body.get("forwards", []),
            body.get("fetch_deadline", 60.0),
        )
        self._accepted(self.server.api.manager.create(url, options))

    def _api_upload(self, query: dict) -> None:
        options = Options.parse(
            _query_bool(query, "early_start", True),
            query.get("forwards", []),
            _query_float(query, "fetch_deadline", 60.0),
        )
        size, chunks = self._body(self.server.api.max_upload)  # checks the length up front
        manager = self.server.api.manager
        job, pipe = manager.create_upload(options, size)
        self._uploading = True
        job.on_stop(self._abort_upload)
        rate, received = UploadRate(), 0
        try:
            with pipe:
                for chunk in chunks:
                    received += len(chunk)
                    rate.check(received)
                    pipe.write(chunk)
            self._body_read = True
        except BrokenPipeError:  # the synthesis ended before the upload did: wait for why
            job.thread.join(self.server.api.manager.timeout)
        except (OSError, HttpError, UploadTooSlow) as exc:
            self._uploading = False
            manager.delete(job.id)  # the client never learned the id: nobody else would
            if isinstance(exc, UploadTooSlow):
                raise HttpError(HTTPStatus.REQUEST_TIMEOUT, str(exc)) from None
            if isinstance(exc, HttpError):
                raise
            LOG.info("upload for synthesis %s broke off: %s", job.id, exc)
            return
        finally:
            self._uploading = False
        self._accepted(job)

    def _abort_upload(self) -> None:
        """The synthesis is being stopped: a client still sending it an overlay is cut off."""
        if self._uploading:
            self.connection.shutdown(socket.SHUT_RDWR)

    def _accepted(self, job: Job) -> None:
        """202 once the overlay's manifest was checked, or the error that stopped it."""
        job.wait_prepared(self.server.api.manager.timeout)
        if job.exception is not None:
            exc = job.exception
            self.server.api.manager.delete(job.id)  # reported here, so not kept
            self._error(status_of(exc), str(exc))
            return
        self._json(HTTPStatus.ACCEPTED, job.status(), location=f"/v1/syntheses/{job.id}")

    # --- request bodies ------------------------------------------------------------------------

    def _read_json(self) -> dict:
        data = b"".join(self._body(MAX_JSON_BODY)[1])
        self._body_read = True
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return body

    def _body(self, limit: int) -> tuple[int | None, Iterator[bytes]]:
        """The body's length (None if chunked) and its pieces; 413 beyond `limit` bytes."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None, self._chunked(limit)
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send Content-Length or a chunked body")
        try:
            n = int(length)
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if n < 0:
            raise HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is negative")
        if n > limit:
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body may be {limit} bytes at most"
            )
        return n, self._fixed(n)

    def _fixed(self, n: int) -> Iterator[bytes]:
        while n:
            chunk = self.rfile.read(min(n, UPLOAD_READ))
            if not chunk:
                raise ConnectionError(f"the client closed the connection {n} bytes early")
            n -= len(chunk)
            yield chunk

    def _chunked(self, limit: int) -> Iterator[bytes]:
        total = 0
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise ConnectionError("the chunked body ended or has an overlong size line")
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise HttpError(HTTPStatus.BAD_REQUEST, "malformed chunk size") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return
            total += size
            if total > limit:
                raise HttpError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body may be {limit} bytes at most"
                )
            yield from self._fixed(size)
            if self.rfile.readline(3).strip():
                raise HttpError(HTTPStatus.BAD_REQUEST, "a chunk is longer than its size")

    def _drain(self) -> None:
        """Discard what is left of the request (bounded) so the client reads our answer
        instead of a connection reset."""
        try:
            self.connection.shutdown(socket.SHUT_WR)  # the answer is complete
            self.connection.settimeout(5)
            left = DRAIN_LIMIT
            while left > 0:
                data = self.rfile.read1(min(left, UPLOAD_READ))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass

    # --- responses -----------------------------------------------------------------------------

    def _error(self, status: HTTPStatus, message: str) -> None:
        extra = {"WWW-Authenticate": "Bearer"} if status == HTTPStatus.UNAUTHORIZED else None
        try:
            self._json(status, {"error": without_server_paths(message)}, headers=extra)
        except OSError:
            return
        if not self._body_read and self.command in ("POST", "PUT", "PATCH"):
            self._drain()

    def _json(
        self,
        status: HTTPStatus,
        body: object,
        location: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        extra = dict(headers or {})
        if location:
            extra["Location"] = location
        self._send(status, json.dumps(body).encode() + b"\n", "application/json", extra)

    def _send(
        self,
        status: HTTPStatus,
        data: bytes,
        content_type: str | None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()


_SERVER_PATH = re.compile(r"(?<![\w:/.%-])/(?:[\w.+@=-]+/)*([\w.+@=-]+)/?")


def without_server_paths(message: str) -> str:
    """An error message for a client: absolute paths on this server cut to their last part
    (…/disk.raw). URLs keep their paths: a '/' after a host name or '//' is not a path start."""
    return _SERVER_PATH.sub(lambda m: f".../{m.group(1)}", message)


def _query_bool(query: dict[str, list[str]], name: str, default: bool) -> bool:
    values = query.get(name)
    if not values:
        return default
    value = values[-1].lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ValueError(f"{name} must be true or false, not {values[-1]!r}")


def _query_float(query: dict[str, list[str]], name: str, default: float) -> float:
    values = query.get(name)
    if not values:
        return default
    try:
        return float(values[-1])
    except ValueError:
        raise ValueError(f"{name} must be a number, not {values[-1]!r}") from None

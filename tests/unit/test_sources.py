"""Overlay sources against real files and a real HTTP server on 127.0.0.1 (tests/rangeserver.py)."""

import hashlib
import io
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudlet.errors import SourceError, SourceNotAllowed, TruncatedOverlay
from cloudlet.sources import (
    AllowList,
    StreamSource,
    available_schemes,
    open_source,
    scheme_of,
)
from cloudlet.sources.file import FileSource
from cloudlet.sources.glance import GlanceSource
from cloudlet.sources.http import HttpSource
from cloudlet.sources.resume import RetryPolicy
from tests.rangeserver import Faults, RangeServer

SIZE = 3 * (1 << 20) + 12345
FAST = RetryPolicy(retries=3, first_delay=0.05, max_delay=0.2)
BOUND = 60.0  # generous: CI is a loaded 2-core machine


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def overlay(tmp_path: Path, payload: bytes) -> Path:
    path = tmp_path / "app.overlay"
    path.write_bytes(payload)
    return path


@pytest.fixture
def server(overlay: Path) -> Iterator[RangeServer]:
    before = set(threading.enumerate())
    with RangeServer(overlay.parent) as srv:
        yield srv
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leftover, f"threads left behind: {leftover}"


def http_source(srv: RangeServer, name: str = "app.overlay", **kw: object) -> HttpSource:
    allow = AllowList.parse([srv.url()])
    return HttpSource(srv.url(name), allow, timeout=kw.pop("timeout", 5.0), policy=FAST, **kw)  # type: ignore[arg-type]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(f: io.BufferedIOBase | object, block: int = 200_000) -> bytes:
    out = bytearray()
    while chunk := f.read(block):  # type: ignore[attr-defined]
        out += chunk
    return bytes(out)


# -- plugins ------------------------------------------------------------------------------------


def test_plugins_are_registered() -> None:
    assert {"file", "http", "https", "glance"} <= set(available_schemes())


@pytest.mark.parametrize(
    ("location", "scheme"),
    [
        ("x.overlay", "file"),
        ("/abs/x.overlay", "file"),
        ("name:with-colon", "file"),
        ("file:///x", "file"),
        ("HTTPS://h/x", "https"),
        ("glance://abc", "glance"),
    ],
)
def test_scheme_of(location: str, scheme: str) -> None:
    assert scheme_of(location) == scheme


def test_unknown_scheme_names_the_installed_ones() -> None:
    with pytest.raises(SourceError, match=r"no source plugin for ftp://.*http"):
        open_source("ftp://host/x.overlay", allow=AllowList.any())


# -- local files --------------------------------------------------------------------------------


@pytest.mark.parametrize("as_url", [False, True])
def test_file_source(overlay: Path, payload: bytes, as_url: bool) -> None:
    location = f"file://{overlay}" if as_url else str(overlay)
    with open_source(location) as src:
        assert isinstance(src, FileSource) and src.random_access
        assert src.size() == SIZE
        assert src.read_range(1000, 5000) == payload[1000:6000]
        assert src.read_range(SIZE - 7, 7) == payload[-7:]
        assert src.read_range(5, 0) == b""
        with src.stream(123_456) as f:
            assert read_all(f) == payload[123_456:]
        with pytest.raises(TruncatedOverlay, match="cut short"):
            src.read_range(SIZE - 10, 11)
        twin = src.clone()
        stream = twin.stream(SIZE - 100)
    twin.close()
    assert stream.read() == payload[-100:]  # a stream outlives its source (own descriptor)
    stream.close()


def test_relative_path_still_reopens_after_the_working_directory_changes(
    overlay: Path, payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demand connection clones the source while a FUSE mount has moved the process to /."""
    monkeypatch.chdir(overlay.parent)
    with open_source(overlay.name) as src:
        monkeypatch.chdir("/")
        with src.clone() as twin:
            assert twin.read_range(SIZE - 10, 10) == payload[-10:]


def test_missing_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="No such file"):
        open_source(tmp_path / "nope.overlay")
    with pytest.raises(SourceError, match="local file"):
        open_source("file://otherhost/x.overlay")


# -- HTTP ---------------------------------------------------------------------------------------


def test_ranged_reads_are_exact(server: RangeServer, payload: bytes) -> None:
    with http_source(server) as src:
        assert src.size() == SIZE and src.random_access
        for offset, length in [(0, 1), (0, 4096), (1 << 20, 1 << 20), (SIZE - 1, 1), (77, 0)]:
            assert src.read_range(offset, length) == payload[offset : offset + length]
        with pytest.raises(TruncatedOverlay):
            src.read_range(SIZE - 5, 6)
    ranges = [r for _, _, r in server.requests]
    assert "bytes=1048576-2097151" in ranges


def test_open_source_over_http(server: RangeServer, payload: bytes) -> None:
    with open_source(server.url("app.overlay"), allow=AllowList.parse([server.url()])) as src:
        assert isinstance(src, HttpSource)
        assert src.read_range(10, 10) == payload[10:20]


@pytest.mark.parametrize("offset", [0, 1, 1 << 20, SIZE - 1, SIZE])
def test_stream_from_offset(server: RangeServer, payload: bytes, offset: int) -> None:
    with http_source(server) as src, src.stream(offset) as f:
        assert read_all(f) == payload[offset:]


def test_dropped_stream_resumes_where_it_stopped(server: RangeServer, payload: bytes) -> None:
    server.faults = Faults(drop_after=1_000_003, times=1)
    with http_source(server) as src, src.stream() as f:
        assert sha(read_all(f)) == sha(payload)
    assert server.fired == 1
    assert ("GET", "/app.overlay", f"bytes=1000003-{SIZE - 1}") in server.requests


def test_every_response_cut_still_completes(server: RangeServer, payload: bytes) -> None:
    """Each resumed request delivers more, so a flaky server is slow, not fatal."""
    server.faults = Faults(drop_after=700_000)
    with http_source(server) as src:
        with src.stream(5) as f:
            assert sha(read_all(f)) == sha(payload[5:])
        assert src.read_range(100, 2_000_000) == payload[100:2_000_100]
    assert server.fired >= 5


def test_stalled_body_resumes(server: RangeServer, payload: bytes) -> None:
    server.faults = Faults(stall_after=5000, times=1)
    with http_source(server, timeout=1.0) as src, src.stream() as f:
        assert sha(read_all(f)) == sha(payload)
    assert server.fired == 1


def test_a_silent_server_fails_at_the_stall_limit_whatever_the_retries_left(
    server: RangeServer,
) -> None:
    server.faults = Faults(stall_after=5000)  # every response goes silent, connections open
    allow = AllowList.parse([server.url()])
    patient = RetryPolicy(retries=1000, first_delay=0.05, max_delay=0.2)
    with HttpSource(server.url("app.overlay"), allow, timeout=1.0, policy=patient) as src:
        src.stall_limit = 3.0
        started = time.monotonic()
        silent = "no byte arrived for .* fetch deadline is 3 s"
        with src.stream() as f, pytest.raises(SourceError, match=silent):
            read_all(f)
        with src.clone() as twin, pytest.raises(SourceError, match="fetch deadline is 3 s"):
            twin.read_range(0, 10_000)  # a demand fetch: the same bound
    assert time.monotonic() - started < BOUND


def test_body_always_shorter_than_promised_fails_bounded(server: RangeServer) -> None:
    with http_source(server) as src:
        server.faults = Faults(short_by=1000)
        started = time.monotonic()
        with src.stream(SIZE - 5000) as f, pytest.raises(SourceError, match=f"byte {SIZE - 1000}"):
            read_all(f)
    assert time.monotonic() - started < BOUND


def test_repeated_drops_at_one_byte_fail_bounded(server: RangeServer) -> None:
    with http_source(server) as src:
        server.faults = Faults(drop_at=2_000_000)
        started = time.monotonic()
        with src.stream() as f, pytest.raises(SourceError) as info:
            read_all(f)
    assert time.monotonic() - started < BOUND
    assert server.url("app.overlay") in str(info.value)
    assert "byte 2000000" in str(info.value)


def test_default_policy_gives_up_bounded(server: RangeServer) -> None:
    with open_source(server.url("app.overlay"), allow=AllowList.any(), timeout=5) as src:
        server.faults = Faults(drop_at=100)
        started = time.monotonic()
        with pytest.raises(SourceError, match="failed 6 times in a row"):
            src.read_range(0, 1000)
    assert time.monotonic() - started < BOUND


@pytest.mark.parametrize(
    ("status", "words"), [(404, "404 .*no such file"), (403, "403 .*access refused")]
)
def test_client_errors_fail_at_once(server: RangeServer, status: int, words: str) -> None:
    name = "missing.overlay" if status == 404 else "app.overlay"
    if status != 404:
        server.faults = Faults(status=status)
    started = time.monotonic()
    with pytest.raises(SourceError, match=words):
        http_source(server, name)
    assert time.monotonic() - started < BOUND
    assert len(server.requests) == 1  # not retried


def test_server_errors_are_retried_then_reported(server: RangeServer, payload: bytes) -> None:
    server.faults = Faults(status=503, times=2)
    with http_source(server) as src:
        assert src.read_range(0, 10) == payload[:10]
    server.faults = Faults(status=503)
    with pytest.raises(SourceError, match="503"):
        http_source(server)


def test_server_gone_is_a_bounded_source_error(server: RangeServer) -> None:
    server.faults.rate = 2e6  # so that the stream is still running when the server stops
    src = http_source(server)
    stream = src.stream()
    assert stream.read(10)
    server.stop()
    started = time.monotonic()
    with pytest.raises(SourceError, match="app.overlay"):
        src.read_range(0, 100)
    with pytest.raises(SourceError):
        read_all(stream)
    assert time.monotonic() - started < BOUND
    stream.close()
    src.close()
    with pytest.raises(SourceError, match="app.overlay"):
        http_source(server)


def test_server_ignoring_range_still_works(server: RangeServer, payload: bytes) -> None:
    server.faults = Faults(ignore_range=True)
    with http_source(server) as src:
        assert not src.random_access  # no demand fetches from such a server
        assert src.size() == SIZE
        assert src.read_range(2_000_000, 100) == payload[2_000_000:2_000_100]
        with src.stream(1_500_000) as f:
            assert sha(read_all(f)) == sha(payload[1_500_000:])


def test_object_shrinking_on_the_server(server: RangeServer) -> None:
    with http_source(server) as src:
        server.faults = Faults(truncate_to=SIZE - 1000)
        with pytest.raises(TruncatedOverlay, match="shrank|cut short"):
            src.read_range(1000, 100)
        with pytest.raises(TruncatedOverlay):
            read_all(src.stream(SIZE - 10))


def test_clone_reads_independently(server: RangeServer, payload: bytes) -> None:
    with http_source(server) as src, src.clone() as twin:
        results: dict[str, bytes] = {}

        def fetch() -> None:
            results["twin"] = twin.read_range(3000, 1 << 20)

        thread = threading.Thread(target=fetch)
        thread.start()
        with src.stream() as f:
            results["main"] = read_all(f)
        thread.join(BOUND)
    assert results["main"] == payload
    assert results["twin"] == payload[3000 : 3000 + (1 << 20)]
    assert sum(1 for method, _, _ in server.requests if method == "GET") == 3  # no second probe


def test_close_aborts_a_blocked_read(server: RangeServer) -> None:
    server.faults = Faults(stall_after=1000)  # until the server stops
    src = http_source(server, timeout=120.0)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            read_all(src.stream())
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    deadline = time.monotonic() + BOUND
    while server.fired == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    src.close()
    thread.join(BOUND)
    assert not thread.is_alive()
    assert time.monotonic() - started < BOUND
    assert isinstance(errors[0], SourceError) and "closed" in str(errors[0])


def test_https_with_verified_certificate(
    tmp_path: Path, overlay: Path, payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with RangeServer(overlay.parent, tls=(cert, key)) as srv:
        allow = AllowList.parse([srv.url()])
        with pytest.raises(SourceError, match="certificate of 127.0.0.1 is not trusted"):
            HttpSource(srv.url("app.overlay"), allow, timeout=5, policy=FAST)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        with open_source(srv.url("app.overlay"), allow=allow) as src, src.stream(99) as f:
            assert sha(read_all(f)) == sha(payload[99:])


# -- allow-list ---------------------------------------------------------------------------------

ALLOW = AllowList.parse(["https://store.example:8443/overlays/", "http://cache.example/exact"])


@pytest.mark.parametrize(
    "url",
    [
        "https://store.example:8443/overlays/app.overlay",
        "HTTPS://Store.Example.:8443/overlays/a/b.overlay?sig=abc",
        "https://store.example:8443/overlays/x/../app.overlay",
        "https://store.example:8443/overlays//./app.overlay",
        "http://cache.example/exact",
        "http://cache.example:80/exact/below",
    ],
)
def test_allowed_urls(url: str) -> None:
    assert ALLOW.allows(url)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://other.example:8443/overlays/app.overlay", "not under"),  # host
        ("https://store.example/overlays/app.overlay", "not under"),  # port (443)
        ("http://store.example:8443/overlays/app.overlay", "not under"),  # scheme
        ("https://store.example:8443/other/app.overlay", "not under"),  # prefix
        ("http://cache.example/exactly", "not under"),  # prefix ends at a segment
        ("https://store.example:8443/overlays/../secret", "not under"),
        ("https://store.example:8443/../overlays/x", "climbs above"),
        ("https://store.example:8443/overlays/%252e%252e/secret", "encoded"),  # decoded twice
        ("https://store.example:8443/overlays/%2e%2e/secret", "encoded"),
        ("https://store.example:8443/overlays/%2E%2e/secret", "encoded"),
        ("https://store.example:8443/overlays%2f..%2fsecret", "encoded"),
        ("https://store.example:8443/overlays/..\\secret", "encoded"),
        ("https://user@store.example:8443/overlays/app.overlay", "credentials"),
        ("https://u:p@store.example:8443/overlays/app.overlay", "credentials"),
        ("https://store.example:8443/overlays/a b", "spaces"),
        ("ftp://store.example:8443/overlays/app.overlay", "only http"),
        ("https://store.example:99999/overlays/app.overlay", "invalid port"),
    ],
)
def test_refused_urls(url: str, why: str) -> None:
    with pytest.raises(SourceNotAllowed, match=why):
        ALLOW.check(url)


def test_normalised_url_is_what_gets_fetched() -> None:
    url = ALLOW.check("HTTPS://Store.Example:8443/overlays/x/.././app.overlay?sig=1#frag")
    assert str(url) == "https://store.example:8443/overlays/app.overlay?sig=1"
    assert str(AllowList.any().check("http://h:80/a/")) == "http://h/a/"


def test_nothing_remote_without_an_explicit_allow_list(overlay: Path) -> None:
    with pytest.raises(SourceNotAllowed, match="need an allow-list"):
        open_source("http://127.0.0.1:1/app.overlay")
    with pytest.raises(SourceNotAllowed, match="no remote sources"):
        open_source("http://127.0.0.1:1/app.overlay", allow=AllowList.parse([]))
    with pytest.raises(SourceNotAllowed, match="credentials"):
        AllowList.any().check("http://me@127.0.0.1/x")
    open_source(overlay, allow=AllowList.parse([])).close()  # files stay allowed


def test_bad_allow_list_entries() -> None:
    with pytest.raises(TypeError):
        AllowList.parse("https://host/")
    with pytest.raises(SourceError, match="invalid allow-list entry"):
        AllowList.parse(["https://user@host/"])
    with pytest.raises(SourceError, match="no query"):
        AllowList.parse(["https://host/?a=b"])


def test_redirects_follow_the_allow_list(server: RangeServer, payload: bytes) -> None:
    server.faults.redirects = {
        "/moved.overlay": "/app.overlay",
        "/away.overlay": "http://localhost:1/app.overlay",
        "/loop.overlay": "/loop.overlay",
    }
    with http_source(server, "moved.overlay") as src:
        assert src.read_range(5, 5) == payload[5:10]
    with pytest.raises(SourceNotAllowed, match="localhost"):
        http_source(server, "away.overlay")
    with pytest.raises(SourceError, match="redirects"):
        http_source(server, "loop.overlay")


# -- uploads ------------------------------------------------------------------------------------


def test_stream_source_is_one_shot(payload: bytes) -> None:
    upload = io.BytesIO(payload)
    src = StreamSource(upload, size=len(payload))
    assert not src.random_access and src.size() == SIZE
    with pytest.raises(SourceError, match="byte 0"):
        src.stream(10)
    assert src.stream(0) is upload
    with pytest.raises(SourceError, match="already read"):
        src.stream(0)
    with pytest.raises(SourceError, match="not random access"):
        src.read_range(0, 1)
    with pytest.raises(SourceError, match="one-shot"):
        src.clone()
    src.close()
    assert upload.closed


# -- Glance seam --------------------------------------------------------------------------------


class FakeGlance:
    """Stands in for Glance (no OpenStack on this machine): serves ranges of bytes in pieces."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        self.data = data
        self.fail_at = fail_at
        self.calls: list[tuple[str, int, int | None]] = []

    def __call__(self, image_id: str, offset: int, length: int | None) -> Iterator[bytes]:
        self.calls.append((image_id, offset, length))
        end = len(self.data) if length is None else offset + length
        for pos in range(offset, end, 100_000):
            if self.fail_at is not None and pos >= self.fail_at:
                self.fail_at = None
                raise ConnectionResetError("glance connection reset")
            yield self.data[pos : min(end, pos + 100_000)]


def test_glance_url_alone_is_refused() -> None:
    """A URL carries no user: only a caller with the user's downloader opens a Glance overlay."""
    with pytest.raises(SourceError, match="requesting user's credentials"):
        open_source("glance://0f1e2d3c-aaaa-bbbb-cccc-000000000000")


def test_glance_source_through_the_downloader(payload: bytes) -> None:
    glance = FakeGlance(payload, fail_at=1_000_000)
    src = GlanceSource("glance://img-1", glance)
    with src:
        with src.stream(50) as f:
            assert sha(read_all(f)) == sha(payload[50:])
        assert glance.calls[:2] == [("img-1", 50, None), ("img-1", 1_000_050, None)]
        assert src.clone().read_range(123, 300_000) == payload[123:300_123]
        assert glance.calls[-1] == ("img-1", 123, 300_000)
    with pytest.raises(SourceError, match="glance://<image-id>"):
        GlanceSource("glance://img/../x", glance)


# -- real static web servers --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_static_server(kind: str, root: Path, port: int, scratch: Path) -> subprocess.Popen:
    if kind == "busybox":
        argv = ["busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(root)]
    else:
        conf = scratch / "nginx.conf"
        conf.write_text(
            f"daemon off; master_process off; pid {scratch}/nginx.pid; error_log stderr;\n"
            "events {}\n"
            f"http {{ access_log off; client_body_temp_path {scratch}; proxy_temp_path {scratch};\n"
            f"  fastcgi_temp_path {scratch}; uwsgi_temp_path {scratch}; scgi_temp_path {scratch};\n"
            f"  server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n"
        )
        argv = ["nginx", "-c", str(conf), "-p", str(scratch)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("kind", ["busybox", "nginx"])
def test_plain_static_servers_can_host_overlays(
    kind: str, overlay: Path, payload: bytes, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    port = _free_port()
    proc = _start_static_server(kind, overlay.parent, port, scratch)
    try:
        deadline = time.monotonic() + BOUND
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, f"{kind} did not start"
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/app.overlay"
        with open_source(url, allow=AllowList.parse([f"http://127.0.0.1:{port}/"])) as src:
            assert src.random_access and src.size() == SIZE
            assert src.read_range(SIZE - 4097, 4097) == payload[-4097:]
            with src.stream(1_000_001) as f:
                assert sha(read_all(f)) == sha(payload[1_000_001:])
        with pytest.raises(SourceError, match="404"):
            open_source(url + ".missing", allow=AllowList.any())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

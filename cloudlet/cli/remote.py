"""`cloudlet synthesize --server URL`: the same synthesis, run by a `cloudlet serve` elsewhere.

A local overlay file is uploaded (streamed, never read whole); a URL is handed to the server to
fetch. The remote synthesis is deleted at the end (--check-and-exit, Ctrl-C, or an error).
"""

import argparse
import http.client
import json
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from cloudlet.cli.common import wait_for_url
from cloudlet.errors import ServerError
from cloudlet.home import CloudletHome
from cloudlet.server.auth import read_token, token_path
from cloudlet.stats import Progress, Stage, Stats

UPLOAD_CHUNK = 1 << 20
POLL = 0.5  # seconds between status requests


def add_remote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        metavar="URL",
        help="synthesize on this cloudlet server (`cloudlet serve`, e.g. http://host:8022) "
        "instead of here; forwards then open on the server's 127.0.0.1",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="the server's token (default: $CLOUDLET_HOME/server.token)",
    )


class ServerClient:
    """The HTTP JSON API of docs/server.md, one connection per request."""

    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServerError(f"--server must be an http(s)://host:port URL, not {url!r}")
        self.url = url.rstrip("/")
        self._parts = parts
        self.token = token
        self.timeout = timeout

    def _connect(self) -> http.client.HTTPConnection:
        cls = (
            http.client.HTTPSConnection
            if self._parts.scheme == "https"
            else http.client.HTTPConnection
        )
        return cls(self._parts.hostname, self._parts.port, timeout=self.timeout)

    def _headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        conn = self._connect()
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = self._headers(**({"Content-Type": "application/json"} if data else {}))
            conn.request(method, path, body=data, headers=headers)
            return _answer(conn.getresponse(), method, path)
        except OSError as exc:
            raise ServerError(f"cannot reach the server at {self.url}: {exc}") from None
        finally:
            conn.close()

    def create(self, overlay_url: str, **options: Any) -> dict:
        return self.request("POST", "/v1/syntheses", {"overlay_url": overlay_url, **options})

    def upload(
        self,
        path: Path,
        *,
        early_start: bool,
        forwards: list[str],
        fetch_deadline: float,
        progress: Progress | None = None,
    ) -> dict:
        """Stream the file to the server; the answer comes once all of it was received."""
        query = urlencode(
            {
                "early_start": str(early_start).lower(),
                "forwards": forwards,
                "fetch_deadline": fetch_deadline,
            },
            doseq=True,
        )
        target = f"/v1/syntheses/upload?{query}"
        size = path.stat().st_size
        conn = self._connect()
        try:
            conn.putrequest("POST", target)
            headers = self._headers(
                **{"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            )
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            sent = 0
            with path.open("rb") as f:
                while chunk := f.read(UPLOAD_CHUNK):
                    if _readable(conn):
                        break  # the server answered before the end: an error to show
                    try:
                        conn.send(chunk)
                    except OSError:
                        break  # connection cut: the answer (if any) says why
                    sent += len(chunk)
                    if progress:
                        progress(sent)
            if progress:
                progress.done()
            return _answer(conn.getresponse(), "POST", target)
        except OSError as exc:
            raise ServerError(f"uploading {path} to {self.url} failed: {exc}") from None
        finally:
            conn.close()

    def status(self, synthesis_id: str) -> dict:
        return self.request("GET", f"/v1/syntheses/{synthesis_id}")

    def delete(self, synthesis_id: str) -> None:
        self.request("DELETE", f"/v1/syntheses/{synthesis_id}")


def _readable(conn: http.client.HTTPConnection) -> bool:
    return conn.sock is not None and bool(select.select([conn.sock], [], [], 0)[0])


def _answer(resp: http.client.HTTPResponse, method: str, path: str) -> Any:
    data = resp.read()
    if 200 <= resp.status < 300:
        return json.loads(data) if data else None
    try:
        message = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        message = data[:200].decode(errors="replace") or resp.reason
    if resp.status == 401:
        message += " (pass the server's token file with --token-file)"
    raise ServerError(
        f"the server refused {method} {path.split('?')[0]} ({resp.status}): {message}"
    )


def run_remote(home: CloudletHome, args: argparse.Namespace) -> int:
    """`cloudlet synthesize --server URL OVERLAY|URL` (uses the synthesize verb's arguments)."""
    client = ServerClient(args.server, read_token(args.token_file or token_path(home)))
    options = {
        "early_start": getattr(args, "early_start", True),
        "forwards": [f"{f.proto}:{f.host_port}:{f.guest_port}" for f in args.forward],
        "fetch_deadline": getattr(args, "fetch_deadline", 60.0),
    }
    overlay = str(args.overlay)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    start = time.monotonic()
    if "://" in overlay or overlay.startswith("file:"):
        status = client.create(overlay, **options)
    else:
        path = Path(overlay)
        if not path.is_file():
            raise ServerError(f"{path} is not a file (a URL needs its scheme, e.g. https://)")
        progress = Progress("upload", path.stat().st_size)
        status = client.upload(path, progress=progress, **options)
    try:
        return _follow(client, status, args, start)
    finally:
        client.delete(status["id"])


def _follow(client: ServerClient, status: dict, args: argparse.Namespace, start: float) -> int:
    synthesis_id = status["id"]
    # one progress line for every wait: the server counts bytes from the request on, so must
    # its rate (a line per wait divided all bytes so far by the last wait's seconds)
    line = Progress("synthesis", None)
    line.start = start
    status = _wait_for(client, synthesis_id, ("running", "complete"), args.timeout, line)
    answers: dict[str, str] = {}
    for url in args.check_url:
        answers[url] = wait_for_url(url, args.timeout)
        if not args.json:
            print(f"{url} answered: {answers[url].strip()[:200]}")
    first = time.monotonic() - start
    status = _wait_for(client, synthesis_id, ("complete",), args.timeout, line)
    stats = _stats_of(status)
    if args.check_url:
        stats.counters["first response after s"] = round(first, 3)
    if args.json:
        print(json.dumps({**stats.as_dict(), "id": synthesis_id, "server": client.url,
                          "responses": answers}), flush=True)
    else:
        print(f"VM synthesized by {client.url} (synthesis {synthesis_id}) and running")
        print("statistics:")
        print(stats.render())
    if not args.check_and_exit:
        say = sys.stderr if args.json else sys.stdout  # stdout holds just the JSON
        print("VM running on the server; press Ctrl-C to stop it", file=say, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping the VM", file=say, flush=True)
    return 0


def _wait_for(
    client: ServerClient,
    synthesis_id: str,
    states: tuple[str, ...],
    timeout: float,
    line: Progress,
) -> dict:
    """Poll until the synthesis reaches one of `states`, showing progress on `line`."""
    deadline = time.monotonic() + timeout
    shown = False
    while True:
        status = client.status(synthesis_id)
        state = status.get("state")
        if state == "failed":
            raise ServerError(f"the synthesis failed on the server: {status.get('error')}")
        if state in ("stopping", "stopped"):
            raise ServerError("the synthesis was stopped on the server")
        progress = status.get("progress") or {}
        total, done = progress.get("bytes_total"), progress.get("bytes_fetched")
        if isinstance(done, int):
            line.label = f"synthesis ({state})"
            line.total = total if isinstance(total, int) else None
            line(done)
            shown = True
        if state in states:
            if shown:
                line.done()
            return status
        if time.monotonic() > deadline:
            raise ServerError(
                f"synthesis {synthesis_id} still {state} after {timeout:.0f} s (see --timeout)"
            )
        time.sleep(POLL)


def _stats_of(status: dict) -> Stats:
    """The server's statistics as a Stats, so they print like a local synthesis's."""
    raw = status.get("stats") or {}
    stats = Stats(counters=dict(raw.get("counters", {})))
    for name, st in raw.get("stages", {}).items():
        stats.stages[name] = Stage(name, st.get("seconds", 0.0), st.get("bytes", 0))
    return stats

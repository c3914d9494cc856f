"""An emulated network link between two network namespaces this module creates (no netem here).

    client ns  --loopback-->  delay relay  --veth, tbf both ways-->  server ns: nginx

Rate: a tbf qdisc on both veth ends. Delay: this kernel has no netem, so a userspace TCP relay in
the client namespace holds every chunk it receives, in each direction, for RTT/2 from the moment
it arrived (a timestamped queue), and holds a new connection's first request for one more RTT
(the TCP handshake a real path would cost). What it cannot emulate: TCP on the shaped hop sees a
near-zero RTT, so slow start ramps faster than it would over the real path.

Clients inside the client namespace reach the server at `EmulatedLink.url(name)`; the relay logs
each downstream write (monotonic time, bytes), so a run can count what had arrived at a moment.
Everything (processes, namespaces, veth) goes away in `close()`, also on errors.

    python benchmarks/netlink.py [--rate-mbit 38] [--rtt-ms 20]     # set up, measure, tear down
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# RFC 2544's benchmarking range, used only on the veth pair between our own two namespaces.
CLIENT_ADDR, SERVER_ADDR, PREFIX = "198.18.0.1", "198.18.0.2", 30
RELAY_PORT = 8080
NS_PATTERN = re.compile(r"^clbench(\d+)[cs]$")
QUEUE_LIMIT = 64 << 20  # bytes a relay direction may hold before it stops reading


@dataclass(frozen=True)
class LinkSpec:
    name: str
    rate_mbit: float
    rtt_ms: float


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def sweep_stale() -> None:
    """Remove the namespaces (and their processes) of benchmark runs that were killed."""
    for line in sh("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        m = NS_PATTERN.match(name)
        if not m or Path(f"/proc/{m.group(1)}").exists():
            continue
        for pid in sh("ip", "netns", "pids", name).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        sh("ip", "netns", "del", name)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class EmulatedLink:
    """Two namespaces joined by a rate-limited veth pair, a delay relay and an nginx server."""

    def __init__(self, spec: LinkSpec, serve_dir: Path):
        self.spec = spec
        self.serve_dir = serve_dir
        self.client_ns = f"clbench{os.getpid()}c"
        self.server_ns = f"clbench{os.getpid()}s"
        self.work = Path(tempfile.mkdtemp(prefix="cloudlet-link-"))
        self.relay_log = self.work / "relay.log"
        self._procs: list[subprocess.Popen] = []
        self._namespaces: list[str] = []

    # -- set-up ------------------------------------------------------------------------------
    def __enter__(self) -> EmulatedLink:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _setup(self) -> None:
        sweep_stale()
        for ns in (self.client_ns, self.server_ns):
            sh("ip", "netns", "add", ns)
            self._namespaces.append(ns)
        sh(
            "ip",
            "link",
            "add",
            "vc",
            "netns",
            self.client_ns,
            "type",
            "veth",
            "peer",
            "name",
            "vs",
            "netns",
            self.server_ns,
        )
        rate_bps = self.spec.rate_mbit * 1e6
        burst = max(15_000, int(rate_bps / 8 * 0.002))  # 2 ms of data, at least 10 MTUs
        limit = max(4 * burst, int(rate_bps / 8 * 0.05))  # 50 ms of queue
        for ns, dev, addr in (
            (self.client_ns, "vc", CLIENT_ADDR),
            (self.server_ns, "vs", SERVER_ADDR),
        ):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh(
                "tc",
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                f"{int(rate_bps)}bit",
                "burst",
                str(burst),
                "limit",
                str(limit),
            )
        (self.work / "nginx.conf").write_text(
            f"""worker_processes 1;
daemon off;
user root;
pid {self.work}/nginx.pid;
error_log {self.work}/nginx-error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {self.work}/body;
    server {{ listen {SERVER_ADDR}:80; root {self.serve_dir}; }}
}}
"""
        )
        self._spawn(
            self.server_ns,
            [
                "nginx",
                "-e",
                str(self.work / "nginx-error.log"),
                "-p",
                str(self.work),
                "-c",
                str(self.work / "nginx.conf"),
            ],
        )
        relay = self._spawn(
            self.client_ns,
            [
                sys.executable,
                __file__,
                "_relay",
                str(RELAY_PORT),
                SERVER_ADDR,
                "80",
                str(self.spec.rtt_ms / 2000),
                str(self.relay_log),
            ],
            stdout=subprocess.PIPE,
        )
        if relay.stdout.readline().strip() != b"ready":
            raise RuntimeError("the delay relay did not start")
        self._wait_server()

    def _spawn(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL, **kw)
        self._procs.append(proc)
        return proc

    def _wait_server(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(
                self.in_client([sys.executable, __file__, "_probe", "rtt", "1"]),
                capture_output=True,
                check=False,
                timeout=60,
            )
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                log = (self.work / "nginx-error.log").read_text(errors="replace")
                raise RuntimeError(f"nginx in {self.server_ns} did not answer: {log[-2000:]}")
            time.sleep(0.2)

    # -- use ---------------------------------------------------------------------------------
    def in_client(self, argv: list[str]) -> list[str]:
        """The command line that runs `argv` inside the client namespace."""
        return ["ip", "netns", "exec", self.client_ns, *argv]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{RELAY_PORT}/{name}"

    def delivered(self, t0: float, t1: float) -> int:
        """Bytes the relay handed to clients between monotonic times t0 and t1."""
        total = 0
        with open(self.relay_log) as log:
            for line in log:
                t, n = line.split()
                if t0 <= float(t) < t1:
                    total += int(n)
        return total

    def measure(self) -> dict:
        """Achieved rate (bulk download over the whole path) and RTT (small request round trip)."""
        size = int(min(max(self.spec.rate_mbit * 1e6 / 8 * 2.0, 4 << 20), 128 << 20))
        bulk = self.serve_dir / "_bulk"
        with open(bulk, "wb") as f:
            f.write(os.urandom(1 << 20) * (size >> 20))
        (self.serve_dir / "_small").write_bytes(b"x")
        try:
            out = {}
            for what, arg in (("rtt", "20"), ("rate", "_bulk")):
                done = subprocess.run(
                    self.in_client([sys.executable, __file__, "_probe", what, arg]),
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=300,
                )
                out.update(json.loads(done.stdout))
            return out
        finally:
            bulk.unlink()

    def describe(self) -> str:
        return (
            f"veth pair between netns {self.client_ns} and {self.server_ns}, tbf "
            f"{self.spec.rate_mbit:g} Mbit/s on both ends; delay: userspace TCP relay in the "
            f"client netns holding each direction's bytes {self.spec.rtt_ms / 2:g} ms "
            f"(+1 RTT before a new connection's first request); server: nginx "
            f"{nginx_version()} in the server netns"
        )

    # -- tear-down ---------------------------------------------------------------------------
    def close(self) -> None:
        for proc in reversed(self._procs):
            stop(proc)
        self._procs.clear()
        for ns in self._namespaces:
            for pid in sh("ip", "netns", "pids", ns).split():  # anything a run left behind
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", ns)
        self._namespaces.clear()
        shutil.rmtree(self.work, ignore_errors=True)


def nginx_version() -> str:
    done = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    return done.stderr.strip().split("/")[-1]


# -- the delay relay (runs in the client namespace) ------------------------------------------


class DelayedPipe:
    """One direction of a relayed connection: bytes leave `delay` seconds after they arrived."""

    def __init__(
        self, src: socket.socket, dst: socket.socket, delay: float, not_before: float, log
    ) -> None:
        self.src, self.dst, self.delay, self.not_before, self.log = src, dst, delay, not_before, log
        self.queue: collections.deque = collections.deque()
        self.held = 0
        self.dead = False  # the writer failed: stop reading
        self.cond = threading.Condition()
        self.threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._write, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.src.recv(1 << 18)
            except OSError:
                data = b""
            due = max(time.monotonic() + self.delay, self.not_before)
            with self.cond:
                while self.held > QUEUE_LIMIT and not self.dead:
                    self.cond.wait()
                if self.dead:
                    return
                self.queue.append((due, data))
                self.held += len(data)
                self.cond.notify_all()
            if not data:
                return

    def _write(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                due, data = self.queue.popleft()
                self.held -= len(data)
                self.cond.notify_all()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not data:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(data)
            except OSError:
                with self.cond:  # the reader stops; shutdown wakes it if it is in recv()
                    self.dead = True
                    self.cond.notify_all()
                try:
                    self.src.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if self.log is not None:
                self.log(len(data))


def relay(port: int, host: str, upstream_port: int, delay: float, log_path: str) -> None:
    lock = threading.Lock()
    log_file = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def log(n: int) -> None:
        with lock:
            log_file.write(f"{time.monotonic():.6f} {n}\n")

    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    print("ready", flush=True)
    while True:
        client, _ = listener.accept()
        accepted = time.monotonic()
        try:
            server = socket.create_connection((host, upstream_port), timeout=10)
        except OSError:
            client.close()
            continue
        server.settimeout(None)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipes = [
            DelayedPipe(client, server, delay, accepted + 3 * delay, None),  # handshake: +1 RTT
            DelayedPipe(server, client, delay, 0.0, log),
        ]
        threading.Thread(target=_close_when_done, args=(pipes, client, server), daemon=True).start()


def _close_when_done(pipes: list[DelayedPipe], *socks: socket.socket) -> None:
    for p in pipes:
        for t in p.threads:
            t.join()
    for s in socks:
        s.close()


# -- probes (run in the client namespace) ----------------------------------------------------


def probe(what: str, arg: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", RELAY_PORT, timeout=60)
    if what == "rtt":
        times = []
        for _ in range(int(arg)):
            start = time.monotonic()
            conn.request("GET", "/_small" if int(arg) > 1 else "/")
            resp = conn.getresponse()
            resp.read()
            times.append(time.monotonic() - start)
            if resp.status >= 500:
                raise SystemExit(1)
        times.sort()
        print(json.dumps({"rtt_ms": 1000 * times[len(times) // 2]}))
    else:
        start = time.monotonic()
        conn.request("GET", f"/{arg}")
        resp = conn.getresponse()
        n = 0
        while chunk := resp.read(1 << 20):
            n += len(chunk)
        seconds = time.monotonic() - start
        print(json.dumps({"rate_mbit": n * 8 / seconds / 1e6, "bulk_bytes": n}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_relay":
        _, _, port, host, uport, delay, log = sys.argv
        return relay(int(port), host, int(uport), float(delay), log)
    if len(sys.argv) > 1 and sys.argv[1] == "_probe":
        return probe(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description="set up an emulated link, measure it, tear it down")
    ap.add_argument("--rate-mbit", type=float, default=38)
    ap.add_argument("--rtt-ms", type=float, default=20)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    serve = Path(tempfile.mkdtemp(prefix="cloudlet-serve-"))
    try:
        with EmulatedLink(LinkSpec("cli", args.rate_mbit, args.rtt_ms), serve) as link:
            print(link.describe())
            print(json.dumps(link.measure()))
    finally:
        shutil.rmtree(serve, ignore_errors=True)


if __name__ == "__main__":
    main()

"""A small QMP (QEMU Machine Protocol) client over a unix socket.

Just enough for cloudlet: greeting, capabilities negotiation, commands with a timeout, file
descriptor passing (getfd) and event collection. Every read is bounded by a deadline, so a hung
QEMU turns into a HypervisorError instead of a hung caller.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloudlet.errors import HypervisorError

LOG = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0


class QMPClient:
    """One QMP connection. Not thread-safe: use it from one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0

    def connect(
        self, timeout: float = DEFAULT_TIMEOUT, check: Callable[[], None] | None = None
    ) -> None:
        """Connect (retrying while the socket is not there yet) and negotiate capabilities.

        `check` runs between retries and raises to give up at once (QEMU exited: its socket
        file stays behind and refuses connections).
        """
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if check is not None:
                    check()
                if time.monotonic() >= deadline:
                    raise HypervisorError(
                        f"QMP socket {self.path} did not accept a connection in {timeout:.0f} s"
                    ) from exc
                time.sleep(0.05)
        self._sock = sock
        self.greeting = self._read_message(deadline)
        if "QMP" not in self.greeting:
            raise HypervisorError(f"QMP socket {self.path} sent no greeting: {self.greeting!r}")
        self.execute("qmp_capabilities", timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        fds: list[int] | None = None,
    ) -> Any:
        """Run one command and return its "return" value; an error reply raises HypervisorError.

        `fds` are passed with SCM_RIGHTS alongside the command (for getfd / add-fd).
        """
        if self._sock is None:
            raise HypervisorError(f"QMP {self.path}: not connected")
        self._next_id += 1
        msg_id = f"cl-{self._next_id}"
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        deadline = time.monotonic() + timeout
        try:
            self._sock.settimeout(timeout)
            if fds:
                socket.send_fds(self._sock, [data], fds)
            else:
                self._sock.sendall(data)
        except OSError as exc:
            raise QMPConnectionLost(f"QMP {command}: cannot send to {self.path}: {exc}") from exc
        while True:
            reply = self._read_message(deadline, what=command)
            if reply.get("id") != msg_id:
                continue  # events are collected by _read_message; stray replies are dropped
            if "error" in reply:
                err = reply["error"]
                raise HypervisorError(
                    f"QEMU refused {command}: {err.get('desc', err)} ({err.get('class', '?')})"
                )
            return reply.get("return")

    def poll_events(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Read whatever events arrive within `timeout` seconds; return all collected so far."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._read_message(deadline, what="events")
        except _Timeout:
            pass
        return self.events

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        """Wait for (and consume) the first event named `name`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name:
                    return self.events.pop(i)
            try:
                self._read_message(deadline, what=f"event {name}")
            except _Timeout as exc:
                raise HypervisorError(f"no QMP event {name} within {timeout:.0f} s") from exc

    def _read_message(self, deadline: float, what: str = "greeting") -> dict[str, Any]:
        """Next non-event message; events met on the way are appended to self.events."""
        assert self._sock is not None
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1 :]
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError as exc:
                    raise HypervisorError(f"QMP {self.path}: bad message {line[:200]!r}") from exc
                if "event" in msg:
                    LOG.debug("QMP event %s", msg.get("event"))
                    self.events.append(msg)
                    continue
                return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout(f"QMP {self.path}: no reply to {what} in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise _Timeout(f"QMP {self.path}: no reply to {what} in time") from exc
            except OSError as exc:
                raise QMPConnectionLost(f"QMP {self.path}: connection failed: {exc}") from exc
            if not chunk:
                raise QMPConnectionLost(f"QMP {self.path}: QEMU closed the connection ({what})")
            self._buf += chunk


class QMPConnectionLost(HypervisorError):
    """The QMP socket closed or failed: QEMU is most likely exiting."""


class _Timeout(HypervisorError):
    """A QMP read hit its deadline."""

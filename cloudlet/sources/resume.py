"""A sequential reader that survives dropped connections by reopening at the byte it reached.

Remote sources (HTTP ranges, Glance downloads) hand it an `open_at(position)` that starts a new
transfer from a byte offset; a transfer that fails with a transient error, or ends early, is
replaced by a new one from where it stopped. Failures in a row without a byte of progress are
bounded, with a short backoff between them, so a dead server surfaces as SourceError in seconds
while a flaky one that keeps delivering still completes.
"""

import http.client
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cloudlet.errors import SourceError

LOG = logging.getLogger(__name__)


class Transient(Exception):
    """A failure worth retrying from the same byte (server 5xx, a cut or stalled transfer)."""


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    Transient,
    OSError,  # refused, reset, timed out, unreachable
    http.client.HTTPException,  # malformed status line, incomplete read
)


class Transfer(Protocol):
    """One attempt at reading onwards from a position."""

    def readinto(self, buffer: memoryview) -> int: ...  # 0 at the end of this transfer

    def close(self) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # failures in a row without progress before giving up
    first_delay: float = 0.1
    max_delay: float = 2.0

    def delay(self, failures: int) -> float:
        return min(self.max_delay, self.first_delay * 3 ** (failures - 1))


DEFAULT_POLICY = RetryPolicy()


class Backoff:
    """Counts failures in a row at one position; sleeps between them, gives up after too many,
    or (with a stall limit) once no byte arrived for that long, however many attempts that was:
    a silent server costs one bound, not retries x timeout."""

    def __init__(
        self,
        what: str,
        policy: RetryPolicy,
        aborted: threading.Event,
        stall_limit: float | None = None,
    ) -> None:
        self._what = what
        self._policy = policy
        self._aborted = aborted
        self._failures = 0
        self._stall_limit = stall_limit
        self._progress_at = time.monotonic()

    def progressed(self) -> None:
        self._failures = 0
        self._progress_at = time.monotonic()

    def failed(self, error: BaseException, position: int) -> None:
        """Wait before the next attempt, or raise SourceError if this was one too many."""
        self.check_aborted(position)
        self._failures += 1
        silent = time.monotonic() - self._progress_at
        if self._stall_limit is not None and silent >= self._stall_limit:
            raise SourceError(
                f"{self._what}: no byte arrived for {silent:.0f} s at byte {position} (the "
                f"fetch deadline is {self._stall_limit:g} s); last error: {describe(error)}"
            ) from error
        if self._failures > self._policy.retries:
            raise SourceError(
                f"{self._what}: reading from byte {position} failed {self._failures} times "
                f"in a row; last error: {describe(error)}"
            ) from error
        delay = self._policy.delay(self._failures)
        if self._stall_limit is not None:
            delay = min(delay, self._stall_limit - silent)
        LOG.warning(
            "%s: %s at byte %d; retrying in %.1f s (%d/%d)",
            self._what, describe(error), position, delay, self._failures, self._policy.retries,
        )  # fmt: skip
        self._aborted.wait(delay)
        self.check_aborted(position)

    def check_aborted(self, position: int) -> None:
        if self._aborted.is_set():
            raise SourceError(f"{self._what}: closed while reading at byte {position}")


class ResumingReader(io.RawIOBase):
    """Bytes [start, end) (end None: until a transfer ends cleanly) across retried transfers."""

    def __init__(
        self,
        open_at: Callable[[int, int | None], Transfer],
        start: int,
        end: int | None,
        backoff: Backoff,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._open_at = open_at
        self._pos = start
        self._end = end
        self._backoff = backoff
        self._on_close = on_close
        self._transfer: Transfer | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("read from a closed overlay stream")
        view = memoryview(buffer).cast("B")
        if self._end is not None:
            view = view[: max(0, self._end - self._pos)]
        if not view:
            return 0
        while True:
            self._backoff.check_aborted(self._pos)
            try:
                if self._transfer is None:
                    self._transfer = self._open_at(self._pos, self._end)
                n = self._transfer.readinto(view)
            except Exception as e:
                self._backoff.check_aborted(self._pos)  # an abort shows up as any error
                if not isinstance(e, TRANSIENT_ERRORS):
                    raise
                error: BaseException = e
            else:
                if n:
                    self._pos += n
                    self._backoff.progressed()
                    return n
                if self._end is None:
                    return 0
                error = Transient(f"the transfer ended before byte {self._end}")
            self._drop_transfer()
            self._backoff.failed(error, self._pos)

    def _drop_transfer(self) -> None:
        if self._transfer is not None:
            transfer, self._transfer = self._transfer, None
            transfer.close()

    def close(self) -> None:
        if not self.closed:
            try:
                self._drop_transfer()
            finally:
                if self._on_close is not None:
                    self._on_close()
        super().close()


def describe(error: BaseException) -> str:
    """An error as one line, with its type when the message alone says little (timeouts)."""
    text = str(error)
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def read_exactly(reader: ResumingReader, length: int) -> bytes:
    """Read `length` bytes (fewer only if the reader's range ends first)."""
    out = bytearray(length)
    view = memoryview(out)
    got = 0
    while got < length:
        n = reader.readinto(view[got:])
        if not n:
            break
        got += n
    del view
    return bytes(out) if got == length else bytes(out[:got])

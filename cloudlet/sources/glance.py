"""Overlays stored as Glance images ("glance://<image-id>"), through the downloader of the user
whose request reads them.

The engine has no OpenStack imports, so it cannot talk to Glance itself: the compute host builds
`GlanceSource(url, downloader)` with a callable `(image_id, offset, length | None) ->
Iterator[bytes]` that downloads a byte range with the requesting user's credentials (Glance, not
our allow-list, decides who may read what), and hands the opened source to the synthesis. There
is no process-wide downloader: a URL alone carries no user, so open_source() refuses it.
The downloader signals a failure worth retrying from the same byte by raising OSError
(ConnectionError, TimeoutError); anything else ends the read.
"""

import io
import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO, cast
from urllib.parse import urlsplit

from cloudlet.errors import SourceError
from cloudlet.sources.allow import AllowList
from cloudlet.sources.base import OverlaySource
from cloudlet.sources.resume import (
    DEFAULT_POLICY,
    Backoff,
    ResumingReader,
    RetryPolicy,
    read_exactly,
)

LOG = logging.getLogger(__name__)

Downloader = Callable[[str, int, int | None], Iterator[bytes]]
_IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_BUFFER = 1 << 20


class _Chunks:
    """A transfer over a downloader's iterator of byte strings."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readinto(self, buffer: memoryview) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk).cast("B")
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


class GlanceSource(OverlaySource):
    """An overlay in a Glance image; ranges and resumed streams go through the downloader."""

    def __init__(
        self,
        url: str,
        downloader: Downloader,
        *,
        size: int | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        parts = urlsplit(url)
        image_id = parts.netloc
        if (
            parts.scheme.lower() != "glance"
            or parts.path.strip("/")
            or not _IMAGE_ID.match(image_id)
        ):
            raise SourceError(f"{url!r} is not a Glance overlay location (glance://<image-id>)")
        self.image_id = image_id
        self.url = f"glance://{image_id}"
        self._downloader = downloader
        self._size = size
        self._policy = policy
        self._aborted = threading.Event()

    @classmethod
    def from_location(
        cls, location: str, *, allow: AllowList | None, timeout: float
    ) -> "GlanceSource":
        """Refused: only a caller holding the user's credentials opens a Glance overlay."""
        raise SourceError(
            f"{location}: a Glance overlay is read with the requesting user's credentials: the "
            "compute host opens it (GlanceSource with that user's downloader), not a URL alone"
        )

    def size(self) -> int | None:
        return self._size

    def stream(self, offset: int = 0) -> BinaryIO:
        self._check_open()
        reader = ResumingReader(self._open, offset, self._size, self._backoff())
        return cast(BinaryIO, io.BufferedReader(reader, buffer_size=_BUFFER))

    def read_range(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset}+{length}")
        self._check_open()
        if not length:
            return b""
        with ResumingReader(self._open, offset, offset + length, self._backoff()) as reader:
            return read_exactly(reader, length)

    def clone(self) -> "GlanceSource":
        self._check_open()
        twin = GlanceSource(self.url, self._downloader, size=self._size, policy=self._policy)
        twin.stall_limit = self.stall_limit
        return twin

    def close(self) -> None:
        self._aborted.set()

    def _open(self, pos: int, end: int | None) -> _Chunks:
        return _Chunks(self._downloader(self.image_id, pos, None if end is None else end - pos))

    def _backoff(self) -> Backoff:
        return Backoff(f"overlay {self.url}", self._policy, self._aborted, self.stall_limit)

    def _check_open(self) -> None:
        if self._aborted.is_set():
            raise SourceError(f"overlay source {self.url} is closed")

"""Overlays in local files (plain paths and file:// URLs): positional reads, random access."""

import io
import logging
import os
from pathlib import Path
from typing import BinaryIO, cast
from urllib.parse import unquote, urlsplit

from cloudlet.errors import SourceError, TruncatedOverlay
from cloudlet.sources.allow import AllowList
from cloudlet.sources.base import OverlaySource

LOG = logging.getLogger(__name__)
_BUFFER = 1 << 20


def path_of(location: str | os.PathLike[str]) -> Path:
    """The local path a plain path or file:// URL names."""
    if isinstance(location, os.PathLike) or not location.lower().startswith("file:"):
        return Path(location)
    parts = urlsplit(location)
    if parts.netloc not in ("", "localhost"):
        raise SourceError(f"{location}: file:// URLs must name a local file (file:///path)")
    return Path(unquote(parts.path))


class FileSource(OverlaySource):
    """One local file, read with pread so streams and ranges share a descriptor but no offset."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        # absolute now: clone() reopens it later, maybe after the working directory changed
        self.path = path_of(path).absolute()
        self.url = str(self.path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceError(f"cannot open overlay {self.path}: {e.strerror}") from e
        self._size = os.fstat(self._fd).st_size

    @classmethod
    def from_location(
        cls, location: str, *, allow: AllowList | None, timeout: float
    ) -> "FileSource":
        """Local files need no allow-list: whoever names a path can read it anyway."""
        return cls(location)

    def size(self) -> int:
        return self._size

    def stream(self, offset: int = 0) -> BinaryIO:
        self._check_open()
        raw = _PreadStream(os.dup(self._fd), offset, self.url)
        return cast(BinaryIO, io.BufferedReader(raw, buffer_size=_BUFFER))

    def read_range(self, offset: int, length: int) -> bytes:
        self._check_open()
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset}+{length}")
        data = os.pread(self._fd, length, offset)
        while len(data) < length:
            more = os.pread(self._fd, length - len(data), offset + len(data))
            if not more:
                raise TruncatedOverlay(
                    f"overlay {self.url} ends at byte {offset + len(data)}; "
                    f"needed bytes up to {offset + length}: the file was cut short"
                )
            data += more
        return data

    def clone(self) -> "FileSource":
        self._check_open()
        return FileSource(self.path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _check_open(self) -> None:
        if self._fd < 0:
            raise SourceError(f"overlay source {self.url} is closed")


class _PreadStream(io.RawIOBase):
    """A sequential view from an offset through its own descriptor (a dup: the source may close
    first); pread, so the shared file offset is never moved."""

    def __init__(self, fd: int, offset: int, name: str) -> None:
        super().__init__()
        self._fd = fd
        self._pos = offset
        self.name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            n = os.preadv(self._fd, [buffer], self._pos)
        except OSError as e:
            raise SourceError(f"reading overlay {self.name} at byte {self._pos}: {e}") from e
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()

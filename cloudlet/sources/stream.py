"""An overlay arriving as a one-shot stream (an upload being received): read once, in order."""

from typing import BinaryIO

from cloudlet.errors import SourceError
from cloudlet.sources.base import OverlaySource


class StreamSource(OverlaySource):
    """Wraps a binary stream it then owns; stream(0) hands it out once, nothing else is possible.

    Frames cannot be fetched on demand from an upload (random_access is False): a consumer must
    read it front to back, as the overlay's frame order intends.
    """

    random_access = False

    def __init__(self, f: BinaryIO, url: str = "upload", size: int | None = None) -> None:
        self._f: BinaryIO | None = f
        self._taken = False
        self.url = url
        self._size = size

    def size(self) -> int | None:
        return self._size

    def stream(self, offset: int = 0) -> BinaryIO:
        if self._f is None:
            raise SourceError(f"overlay {self.url} is closed")
        if self._taken:
            raise SourceError(f"overlay {self.url} is a one-shot stream and was already read")
        if offset:
            raise SourceError(
                f"overlay {self.url} is a one-shot stream: it can only be read from byte 0, "
                f"not {offset}"
            )
        self._taken = True
        return self._f

    def read_range(self, offset: int, length: int) -> bytes:
        raise SourceError(
            f"overlay {self.url} is not random access (a one-shot stream): "
            f"cannot read bytes {offset}+{length}"
        )

    def clone(self) -> OverlaySource:
        raise SourceError(f"overlay {self.url} is a one-shot stream: it cannot be opened twice")

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()

"""The overlay source interface every plugin (file, HTTP, Glance, upload) implements."""

import abc
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from cloudlet.sources.allow import AllowList


class OverlaySource(abc.ABC):
    """One overlay at one location. One thread at a time; clone() for a second connection.

    close() may be called from another thread to abort: a read blocked on the network then
    fails promptly with SourceError instead of waiting for its timeout.
    """

    url: str  # for messages; never carries credentials
    random_access: bool = True  # False for one-shot streams (uploads)
    # remote sources: once no byte arrived for this long, reads fail whatever the retries left
    stall_limit: float | None = None

    @abc.abstractmethod
    def size(self) -> int | None:
        """Total length in bytes, if known."""

    @abc.abstractmethod
    def stream(self, offset: int = 0) -> BinaryIO:
        """A sequential reader from `offset` to the end; read(n) returns b"" at the end."""

    @abc.abstractmethod
    def read_range(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`, or SourceError / TruncatedOverlay."""

    @abc.abstractmethod
    def clone(self) -> "OverlaySource":
        """The same overlay through an independent connection (for a second thread)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and descriptors; idempotent."""

    def __enter__(self) -> "OverlaySource":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


class SourcePlugin(Protocol):
    """What an entry point in `cloudlet.overlay_sources` names: a class with this constructor."""

    @classmethod
    def from_location(
        cls, location: str, *, allow: "AllowList | None", timeout: float
    ) -> OverlaySource: ...

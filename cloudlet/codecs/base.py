"""The codec plugin interface: a named, levelled compressor for independent byte blocks.

Every block (frame, chunk map, blob) is compressed on its own so it can be fetched and decoded
alone. Decompression is always bounded by the raw size the (digest-checked) manifest declares, so
a malicious or damaged block cannot inflate into unbounded memory.
"""

import abc
from typing import ClassVar

from cloudlet.errors import CorruptOverlay


class Codec(abc.ABC):
    """A compressor; instances are safe to share between threads."""

    name: ClassVar[str]
    default_level: ClassVar[int | None] = None
    min_level: ClassVar[int | None] = None
    max_level: ClassVar[int | None] = None

    def __init__(self, level: int | None = None) -> None:
        if level is None:
            level = self.default_level
        elif self.min_level is not None and self.max_level is not None:
            if not self.min_level <= level <= self.max_level:
                raise ValueError(
                    f"codec {self.name}: level {level} is outside "
                    f"{self.min_level}..{self.max_level}"
                )
        self.level = level

    @abc.abstractmethod
    def compress(self, data: bytes | memoryview) -> bytes:
        """Compress one independent block."""

    @abc.abstractmethod
    def decompress(self, data: bytes | memoryview, raw_size: int) -> bytes:
        """Decompress one block, refusing (CorruptOverlay) more than `raw_size` bytes of output."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} level={self.level}>"


class NullCodec(Codec):
    """Stores blocks as they are: for incompressible frames, where decoding would only cost CPU."""

    name = "none"

    def compress(self, data: bytes | memoryview) -> bytes:
        return bytes(data)

    def decompress(self, data: bytes | memoryview, raw_size: int) -> bytes:
        if len(data) > raw_size:
            raise CorruptOverlay(f"stored block is {len(data)} bytes, more than {raw_size}")
        return bytes(data)

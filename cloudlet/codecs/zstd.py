"""zstd: the default codec, fast to compress and very fast to decompress."""

import threading

import zstandard

from cloudlet.codecs.base import Codec
from cloudlet.errors import CorruptOverlay


class ZstdCodec(Codec):
    """Standard zstd frames with the content size in the header and no checksum (the overlay
    carries a sha256 of every compressed block)."""

    name = "zstd"
    default_level = 3
    min_level = -7
    max_level = 22

    def __init__(self, level: int | None = None) -> None:
        super().__init__(level)
        # zstandard contexts are not thread-safe; one per thread, reused across blocks.
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(
                level=self.level, write_content_size=True, write_checksum=False
            )
        return c

    def compress(self, data: bytes | memoryview) -> bytes:
        return self._compressor().compress(data)

    def decompress(self, data: bytes | memoryview, raw_size: int) -> bytes:
        try:
            declared = zstandard.frame_content_size(data)
            if declared > raw_size:
                raise CorruptOverlay(
                    f"zstd block declares {declared} bytes, more than the {raw_size} expected"
                )
            if declared >= 0:  # zstd itself refuses output beyond the declared content size
                out = zstandard.ZstdDecompressor().decompress(data)
            else:  # no size in the frame header: read at most one byte past the bound
                with zstandard.ZstdDecompressor().stream_reader(bytes(data)) as reader:
                    out = b""
                    while len(out) <= raw_size:
                        more = reader.read(raw_size + 1 - len(out))
                        if not more:
                            break
                        out += more
        except zstandard.ZstdError as e:
            raise CorruptOverlay(f"zstd block does not decode: {e}") from e
        if len(out) > raw_size:
            raise CorruptOverlay(f"zstd block inflates past its declared {raw_size} bytes")
        return out

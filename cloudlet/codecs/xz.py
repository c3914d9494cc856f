"""xz (LZMA2): slowest, smallest; for slow links where every byte counts."""

import lzma

from cloudlet.codecs.base import Codec
from cloudlet.errors import CorruptOverlay


class XzCodec(Codec):
    """Standard .xz streams (CRC32 check), one per block; `xz -d` decodes any of them."""

    name = "xz"
    default_level = 6
    min_level = 0
    max_level = 9

    def compress(self, data: bytes | memoryview) -> bytes:
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=self.level)

    def decompress(self, data: bytes | memoryview, raw_size: int) -> bytes:
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            out = d.decompress(data, max_length=raw_size + 1)
        except lzma.LZMAError as e:
            raise CorruptOverlay(f"xz block does not decode: {e}") from e
        if len(out) > raw_size:
            raise CorruptOverlay(f"xz block inflates past its declared {raw_size} bytes")
        if not d.eof:
            raise CorruptOverlay("xz block ends before its end-of-stream marker")
        return out

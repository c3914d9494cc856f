"""The libvirt save container (`virsh save` files) around a QEMU migration stream.

Layout (libvirt src/qemu/qemu_saveimage.h, struct _virQEMUSaveHeader, 92 bytes):

    char magic[16]     "LibvirtQemudSave" ("LibvirtQemudPart" while libvirt is still writing)
    u32 version        2 (1: no cookie)
    u32 data_len       bytes of XML + cookie + zero padding that follow the header
    u32 was_running    resume the guest after restore
    u32 compressed     0 raw, 1 gzip, 2 bzip2, 3 xz, 4 lzop, 5 zstd
    u32 cookieOffset   offset of the cookie XML inside the data (0: none)
    u32 unused[14]

The u32s are in the saving host's byte order (libvirt detects a byte-swapped version). The
migration stream starts at 92 + data_len.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from cloudlet.errors import MemoryStreamError

LOG = logging.getLogger(__name__)

SAVE_MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
SAVE_VERSION = 2
HEADER_SIZE = 92
XML_PADDING = 64 * 1024  # libvirt leaves this much room so the XML can be edited in place
MAX_DATA_LEN = 64 << 20  # far above any domain XML: a larger value means a corrupt header

FORMATS = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd"}

_FIELDS = "5I14I"


@dataclass
class LibvirtSaveHeader:
    """What a libvirt save file says before its migration stream."""

    xml: str
    was_running: bool
    stream_offset: int = 0
    version: int = SAVE_VERSION
    data_len: int = 0  # 0: choose (XML + cookie + 64 KiB) when writing
    compressed: int = 0
    cookie: str | None = None
    byteorder: str = "<"


def is_save_file(prefix: bytes) -> bool:
    """True when `prefix` (the first 16 bytes of a file) is a libvirt save magic."""
    return prefix[:16] in (SAVE_MAGIC, PARTIAL_MAGIC)


def read_header(f: BinaryIO) -> LibvirtSaveHeader:
    """Read the header, XML and cookie; leaves `f` at the migration stream (works on pipes)."""
    raw = _read_exact(f, HEADER_SIZE, "the libvirt save header")
    magic = raw[:16]
    if magic == PARTIAL_MAGIC:
        raise MemoryStreamError(
            "libvirt save file is incomplete (magic LibvirtQemudPart): the save did not finish"
        )
    if magic != SAVE_MAGIC:
        raise MemoryStreamError(f"not a libvirt save file: starts with {magic!r}")
    order = "<"
    version = struct.unpack_from("<I", raw, 16)[0]
    if version not in (1, 2) and struct.unpack_from(">I", raw, 16)[0] in (1, 2):
        order = ">"
    version, data_len, was_running, compressed, cookie_offset = struct.unpack_from(
        order + "5I", raw, 16
    )
    if version not in (1, 2):
        raise MemoryStreamError(f"libvirt save file version {version} is not supported (1, 2)")
    if compressed != 0:
        fmt = FORMATS.get(compressed, f"format {compressed}")
        raise MemoryStreamError(
            f"libvirt save file is compressed ({fmt}); only raw saves can be read. Set "
            'save_image_format = "raw" in /etc/libvirt/qemu.conf and save again'
        )
    if data_len > MAX_DATA_LEN:
        raise MemoryStreamError(f"libvirt save header announces {data_len} bytes of XML: corrupt")
    data = _read_exact(f, data_len, "the domain XML of the libvirt save file")
    if version == 1 or cookie_offset == 0:
        xml_bytes, cookie_bytes = data, None
    else:
        if cookie_offset > data_len:
            raise MemoryStreamError(
                f"libvirt save cookie offset {cookie_offset} is beyond its data ({data_len})"
            )
        xml_bytes, cookie_bytes = data[:cookie_offset], data[cookie_offset:]
    return LibvirtSaveHeader(
        xml=_cstr(xml_bytes),
        was_running=bool(was_running),
        stream_offset=HEADER_SIZE + data_len,
        version=version,
        data_len=data_len,
        compressed=compressed,
        cookie=None if cookie_bytes is None else _cstr(cookie_bytes),
        byteorder=order,
    )


def write_save_file(
    out: BinaryIO,
    header: LibvirtSaveHeader,
    stream_writer: Callable[[BinaryIO], None],
) -> LibvirtSaveHeader:
    """Write a libvirt save file: header, XML (+cookie), then `stream_writer(out)` writes QEVM.

    Keeps `header.data_len` when the (possibly edited) XML still fits, as libvirt does, else
    grows it. On a seekable `out` the magic says "partial" until the stream is complete, so an
    interrupted write is never mistaken for a good save. Returns the header as written.
    """
    if header.compressed != 0:
        raise MemoryStreamError("writing compressed libvirt save files is not supported")
    xml = header.xml.encode() + b"\0"
    cookie = header.cookie.encode() + b"\0" if header.cookie is not None else b""
    used = len(xml) + len(cookie)
    data_len = header.data_len if header.data_len >= used else used + XML_PADDING
    cookie_offset = len(xml) if cookie else 0
    seekable = _seekable(out)
    start = out.tell() if seekable else 0
    fields = struct.pack(
        "<5I14I", SAVE_VERSION, data_len, int(header.was_running), 0, cookie_offset, *[0] * 14
    )
    out.write((PARTIAL_MAGIC if seekable else SAVE_MAGIC) + fields)
    out.write(xml + cookie + bytes(data_len - used))
    stream_writer(out)
    if seekable:
        out.flush()
        end = out.tell()
        out.seek(start)
        out.write(SAVE_MAGIC)
        out.seek(end)
    out.flush()
    LOG.info("wrote libvirt save file: %d bytes of XML space", data_len)
    return LibvirtSaveHeader(
        xml=header.xml,
        was_running=header.was_running,
        stream_offset=HEADER_SIZE + data_len,
        version=SAVE_VERSION,
        data_len=data_len,
        compressed=0,
        cookie=header.cookie,
    )


def _seekable(f: BinaryIO) -> bool:
    try:
        return f.seekable()
    except (AttributeError, OSError, ValueError):
        return False


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    parts = []
    got = 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            raise MemoryStreamError(f"libvirt save file truncated: {what} needs {n} bytes")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _cstr(data: bytes) -> str:
    """A NUL-terminated (and NUL-padded) string."""
    return data.split(b"\0", 1)[0].decode("utf-8")

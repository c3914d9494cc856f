"""QEMU migration stream <-> flat memory image, without a forked QEMU.

A memory snapshot is the stream QEMU writes for `migrate` (or libvirt's `virsh save`). Only its
`ram` section matters to dedup: `parse_stream` turns it into a flat image (RAM blocks back to back)
plus a `MemoryLayout` holding everything else verbatim; `emit_stream` writes a stream that
`qemu -incoming` accepts from such an image and layout.

Stream grammar handled (QEMU 7.2 to 10.0, migration/savevm.c and migration/ram.c; the
per-version details are in docs/qemu-stream.md):

    "QEVM" be32(3) [0x07 config] ram:START{MEM_SIZE+blocks, EOS} ram:PART{pages, EOS}*
    [COMMAND SWITCHOVER_START] ram:END{pages, EOS} <tail: device sections, EOF,
    optional VMDESCRIPTION JSON>

Every section ends with a footer 0x7e + be32 section id on machine types that send footers.
QEMU >= 10.0 sends the SWITCHOVER_START command on machine types >= 10.0; it is kept in the
layout and emitted back in the same place. Anything else (other iterative sections, other
commands such as postcopy's, compressed or XBZRLE pages, RDMA hooks) is refused with
MemoryStreamError naming what was found and where.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cloudlet.errors import MemoryStreamError
from cloudlet.fsutil import data_ranges
from cloudlet.hashing import zero_chunk_mask

LOG = logging.getLogger(__name__)

PAGE_SIZE = 4096  # x86 TARGET_PAGE_SIZE: the low 12 bits of a page address carry the flags
FLAG_MASK = PAGE_SIZE - 1

QEVM_MAGIC = b"QEVM"
QEVM_VERSION = 3

# Section types (migration/savevm.c).
SEC_EOF = 0x00
SEC_START = 0x01
SEC_PART = 0x02
SEC_END = 0x03
SEC_FULL = 0x04
SEC_SUBSECTION = 0x05
SEC_VMDESCRIPTION = 0x06
SEC_CONFIGURATION = 0x07
SEC_COMMAND = 0x08
SEC_FOOTER = 0x7E

_SECTION_NAMES = {
    SEC_EOF: "EOF",
    SEC_START: "SECTION_START",
    SEC_PART: "SECTION_PART",
    SEC_END: "SECTION_END",
    SEC_FULL: "SECTION_FULL",
    SEC_SUBSECTION: "SUBSECTION",
    SEC_VMDESCRIPTION: "VMDESCRIPTION",
    SEC_CONFIGURATION: "CONFIGURATION",
    SEC_COMMAND: "COMMAND",
    SEC_FOOTER: "SECTION_FOOTER",
}

# RAM_SAVE flags (migration/ram.c), in the low bits of each record's be64 address word.
RAM_SAVE_FLAG_FULL = 0x01  # obsolete since 2009
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200

# QEMU_VM_COMMAND numbers (migration/savevm.c, enum qemu_vm_cmd).
MIG_CMD_SWITCHOVER_START = 11
_COMMAND_NAMES = {
    0: "INVALID",
    1: "OPEN_RETURN_PATH",
    2: "PING",
    3: "POSTCOPY_ADVISE",
    4: "POSTCOPY_LISTEN",
    5: "POSTCOPY_RUN",
    6: "POSTCOPY_RAM_DISCARD",
    7: "PACKAGED",
    8: "ENABLE_COLO",
    9: "POSTCOPY_RESUME",
    10: "RECV_BITMAP",
    MIG_CMD_SWITCHOVER_START: "SWITCHOVER_START",
}
# Layout.extra key: version of the QEMU that wrote the stream ("10.0.2"), set by the capture.
SAVED_BY_QEMU = "qemu_version"
# Layout.extra key: the stream had SWITCHOVER_START before the ram END section (QEMU >= 10.0).
SWITCHOVER_START = "switchover_start"

_FLAG_NAMES = {
    RAM_SAVE_FLAG_FULL: "FULL (obsolete)",
    RAM_SAVE_FLAG_ZERO: "ZERO",
    RAM_SAVE_FLAG_MEM_SIZE: "MEM_SIZE",
    RAM_SAVE_FLAG_PAGE: "PAGE",
    RAM_SAVE_FLAG_EOS: "EOS",
    RAM_SAVE_FLAG_CONTINUE: "CONTINUE",
    RAM_SAVE_FLAG_XBZRLE: "XBZRLE (xbzrle capability)",
    RAM_SAVE_FLAG_HOOK: "HOOK (RDMA migration)",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE (compress capability)",
    RAM_SAVE_FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH (multifd capability)",
}

_READ_SIZE = 4 << 20  # bytes asked of the source per refill
_WRITE_BATCH = 4 << 20  # contiguous page bytes gathered before one pwrite
_EMIT_WINDOW = 1 << 20  # image bytes scanned for zero pages at a time when emitting
_OUT_BATCH = 1 << 20  # small output pieces gathered before one write
_MIN_HOLE = 256 << 10  # shorter holes may be read and scanned with the data around them
_ZERO_BATCH = 1 << 17  # ZERO records built per numpy array for a hole (1.1 MiB of stream)

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

LAYOUT_MAGIC = b"CLMEMLAY"
LAYOUT_VERSION = 1
_LAYOUT_HEAD = struct.Struct("<8sIQQQ")  # magic, version, json len, head len, tail len

_ZERO_REC = np.dtype([("addr", ">u8"), ("fill", "u1")])
_PAGE_REC = np.dtype([("addr", ">u8"), ("data", "u1", (PAGE_SIZE,))])


def flag_names(flags: int) -> str:
    """Human-readable names of a RAM_SAVE flag word, for error messages."""
    names = [name for bit, name in _FLAG_NAMES.items() if flags & bit]
    unknown = flags & ~sum(_FLAG_NAMES)
    if unknown:
        names.append(f"unknown 0x{unknown:x}")
    return "|".join(names) or "none"


@dataclass
class RamBlock:
    """One QEMU RAM block (`pc.ram`, `pc.bios`, ...) and where it sits in the flat image."""

    name: str
    length: int
    offset: int


@dataclass
class MemoryLayout:
    """Everything of a migration stream except the page contents, to re-emit it exactly."""

    blocks: list[RamBlock]
    page_size: int = PAGE_SIZE
    head: bytes = b""  # magic, version, configuration section: bytes before the ram START
    tail: bytes = b""  # device sections, EOF, VMDESCRIPTION: bytes after the ram END section
    section_id: int = 0
    instance_id: int = 0
    ram_version: int = 4
    footers: bool = True  # whether sections end with 0x7e + id (all modern machine types)
    machine: str | None = None  # machine type from the configuration section, e.g. pc-i440fx-7.2
    extra: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Size of the flat memory image in bytes."""
        if not self.blocks:
            return 0
        last = self.blocks[-1]
        return last.offset + _align(last.length, self.page_size)

    @property
    def saved_by(self) -> str | None:
        """Version of the QEMU that wrote the stream; None when the capture did not record it
        (layouts made before cloudlet kept it)."""
        version = self.extra.get(SAVED_BY_QEMU)
        return version if isinstance(version, str) else None

    @property
    def ram_total(self) -> int:
        """Sum of block lengths: the MEM_SIZE value of the stream."""
        return sum(b.length for b in self.blocks)

    def block(self, name: str) -> RamBlock:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def ram_compatible(self, other: MemoryLayout) -> bool:
        """True when both snapshots have the same RAM blocks (names, lengths, order)."""
        return self.page_size == other.page_size and [(b.name, b.length) for b in self.blocks] == [
            (b.name, b.length) for b in other.blocks
        ]

    def to_bytes(self) -> bytes:
        """Serialise into a small versioned container (stored beside a memory image)."""
        meta = {
            "blocks": [[b.name, b.length, b.offset] for b in self.blocks],
            "page_size": self.page_size,
            "section_id": self.section_id,
            "instance_id": self.instance_id,
            "ram_version": self.ram_version,
            "footers": self.footers,
            "machine": self.machine,
            "extra": self.extra,
        }
        js = json.dumps(meta, sort_keys=True).encode()
        return (
            _LAYOUT_HEAD.pack(LAYOUT_MAGIC, LAYOUT_VERSION, len(js), len(self.head), len(self.tail))
            + js
            + self.head
            + self.tail
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> MemoryLayout:
        """Inverse of to_bytes; rejects anything that is not a complete, consistent layout."""
        data = bytes(data)
        if len(data) < _LAYOUT_HEAD.size or data[:8] != LAYOUT_MAGIC:
            raise MemoryStreamError("not a cloudlet memory layout (bad magic)")
        _, version, js_len, head_len, tail_len = _LAYOUT_HEAD.unpack_from(data)
        if version != LAYOUT_VERSION:
            raise MemoryStreamError(
                f"memory layout version {version} is not supported (this engine reads "
                f"{LAYOUT_VERSION})"
            )
        if _LAYOUT_HEAD.size + js_len + head_len + tail_len != len(data):
            raise MemoryStreamError(
                f"memory layout is {len(data)} bytes, its header announces "
                f"{_LAYOUT_HEAD.size + js_len + head_len + tail_len}: truncated or corrupt"
            )
        pos = _LAYOUT_HEAD.size
        try:
            meta = json.loads(data[pos : pos + js_len])
            blocks = [RamBlock(str(n), int(ln), int(o)) for n, ln, o in meta["blocks"]]
            layout = cls(
                blocks=blocks,
                page_size=int(meta["page_size"]),
                section_id=int(meta["section_id"]),
                instance_id=int(meta["instance_id"]),
                ram_version=int(meta["ram_version"]),
                footers=bool(meta["footers"]),
                machine=meta["machine"],
                extra=dict(meta.get("extra") or {}),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise MemoryStreamError(f"memory layout metadata is corrupt: {exc}") from exc
        pos += js_len
        layout.head = data[pos : pos + head_len]
        layout.tail = data[pos + head_len :]
        layout._check()
        return layout

    def _check(self) -> None:
        if self.page_size != PAGE_SIZE:
            raise MemoryStreamError(f"page size {self.page_size} is not supported ({PAGE_SIZE})")
        offset = 0
        for b in self.blocks:
            if b.offset != offset or b.length <= 0 or b.length % self.page_size:
                raise MemoryStreamError(f"memory layout has an inconsistent RAM block {b}")
            offset += b.length
        if not self.head.startswith(QEVM_MAGIC):
            raise MemoryStreamError("memory layout head does not start a QEMU migration stream")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class _Reader:
    """Sequential reader of a (possibly unseekable) source that knows its byte offset."""

    def __init__(self, src: BinaryIO, progress: Callable[[int], None] | None = None) -> None:
        self._src = src
        self._buf = b""
        self._pos = 0
        self._base = 0  # stream offset of self._buf[0]
        self._progress = progress
        self.capture: bytearray | None = None

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _fill(self, n: int, what: str) -> None:
        """Make n bytes available at self._pos, or raise a truncation error."""
        avail = len(self._buf) - self._pos
        if avail >= n:
            return
        parts = [self._buf[self._pos :]]
        self._base += self._pos
        self._pos = 0
        while avail < n:
            chunk = self._src.read(max(n - avail, _READ_SIZE))
            if not chunk:
                self._buf = b"".join(parts)
                raise MemoryStreamError(
                    f"migration stream truncated at byte {self._base + avail}: "
                    f"{n - avail} more bytes needed for {what}"
                )
            parts.append(chunk)
            avail += len(chunk)
        self._buf = b"".join(parts)
        if self._progress:
            self._progress(self._base)

    def take(self, n: int, what: str) -> memoryview:
        self._fill(n, what)
        view = memoryview(self._buf)[self._pos : self._pos + n]
        self._pos += n
        if self.capture is not None:
            self.capture += view
        return view

    def peek_u8(self, what: str) -> int:
        self._fill(1, what)
        return self._buf[self._pos]

    def u8(self, what: str) -> int:
        self._fill(1, what)
        v = self._buf[self._pos]
        self._pos += 1
        if self.capture is not None:
            self.capture.append(v)
        return v

    def be32(self, what: str) -> int:
        return _BE32.unpack(self.take(4, what))[0]

    def be64(self, what: str) -> int:
        self._fill(8, what)
        v = _BE64.unpack_from(self._buf, self._pos)[0]
        if self.capture is not None:
            self.capture += self._buf[self._pos : self._pos + 8]
        self._pos += 8
        return v

    def str8(self, what: str) -> str:
        n = self.u8(what)
        return bytes(self.take(n, what)).decode("utf-8", "replace")

    def buffered(self) -> tuple[bytes, int, int]:
        """(buffer, position, bytes available) for vectorised look-ahead without reading."""
        return self._buf, self._pos, len(self._buf) - self._pos

    def skip(self, n: int) -> None:
        """Consume n bytes already buffered (see `buffered`)."""
        assert self.capture is None and n <= len(self._buf) - self._pos
        self._pos += n

    def rest(self) -> bytes:
        parts = [self._buf[self._pos :]]
        while chunk := self._src.read(_READ_SIZE):
            parts.append(chunk)
        data = b"".join(parts)
        self._base += self._pos + len(data)
        self._buf, self._pos = b"", 0
        return data


class _ImageWriter:
    """Writes pages into the flat image, gathering contiguous pages into large pwrites."""

    def __init__(self, fd: int, size: int, page_size: int) -> None:
        self._fd = fd
        self._page = page_size
        self._written = np.zeros(size // page_size, dtype=bool)  # pages holding data on disk
        self._start = 0
        self._pending = bytearray()
        self._fills: dict[int, bytes] = {}

    def page(self, offset: int, data: memoryview | bytes) -> None:
        end = self._start + len(self._pending)
        if offset != end or len(self._pending) >= _WRITE_BATCH:
            self.flush()
            self._start = offset
        self._pending += data
        self._written[offset // self._page] = True

    def fill(self, offset: int, byte: int) -> None:
        """A ZERO record: a page of one repeated byte (QEMU only sends 0, but reads any)."""
        if byte == 0 and not self._written[offset // self._page]:
            return  # still a hole of the fresh sparse file: nothing to write
        data = self._fills.get(byte)
        if data is None:
            data = self._fills[byte] = bytes([byte]) * self._page
        self.page(offset, data)

    def zero_run(self, offset: int, count: int) -> None:
        """`count` ZERO records with fill byte 0 from `offset` on: only rewritten pages cost."""
        first = offset // self._page
        for i in np.flatnonzero(self._written[first : first + count]).tolist():
            self.fill(offset + i * self._page, 0)

    def flush(self) -> None:
        if self._pending:
            view = memoryview(self._pending)
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], self._start + done)
            self._pending = bytearray()


def parse_stream(
    src: BinaryIO, image: Path, progress: Callable[[int], None] | None = None
) -> MemoryLayout:
    """Read a QEMU migration stream once, writing its RAM into `image` (fresh, sparse).

    `progress` is called now and then with the number of stream bytes consumed so far.
    """
    r = _Reader(src, progress)
    layout = _parse_head(r)
    try:
        with open(image, "wb") as f:
            _parse_ram(r, layout, f.fileno())
            layout.tail = _parse_tail(r)
    except BaseException:
        # A half-written image must not be mistaken for a snapshot's memory.
        Path(image).unlink(missing_ok=True)
        raise
    if progress:
        progress(r.offset)
    LOG.info(
        "parsed migration stream: %d bytes, %d RAM blocks, %d MiB image",
        r.offset,
        len(layout.blocks),
        layout.size >> 20,
    )
    return layout


def _parse_head(r: _Reader) -> MemoryLayout:
    """Magic, version, configuration section: kept verbatim as the layout's head."""
    r.capture = bytearray()
    magic = bytes(r.take(4, "the stream magic"))
    if magic != QEVM_MAGIC:
        raise MemoryStreamError(
            f"not a QEMU migration stream: starts with {magic!r}, expected {QEVM_MAGIC!r}"
        )
    version = r.be32("the stream version")
    if version != QEVM_VERSION:
        raise MemoryStreamError(
            f"migration stream version {version} is not supported (expected {QEVM_VERSION})"
        )
    machine = None
    extra: dict = {}
    if r.peek_u8("the first section") == SEC_CONFIGURATION:
        r.u8("configuration")
        n = r.be32("configuration name length")
        machine = bytes(r.take(n, "machine name")).decode("utf-8", "replace")
        while r.peek_u8("the first section") == SEC_SUBSECTION:
            _parse_config_subsection(r, extra)
    layout = MemoryLayout(blocks=[], head=bytes(r.capture), machine=machine, extra=extra)
    r.capture = None
    return layout


def _parse_config_subsection(r: _Reader, extra: dict) -> None:
    at = r.offset
    r.u8("subsection")
    name = r.str8("subsection name")
    r.be32("subsection version")
    if name == "configuration/target-page-bits":
        bits = r.be32("target page bits")
        if 1 << bits != PAGE_SIZE:
            raise MemoryStreamError(
                f"migration stream uses {1 << bits}-byte target pages; only {PAGE_SIZE} is "
                "supported"
            )
    elif name == "configuration/capabilities":
        caps = [r.str8("capability name") for _ in range(r.be32("capability count"))]
        extra["capabilities"] = caps
        if "x-ignore-shared" in caps:
            raise MemoryStreamError(
                f"migration stream at byte {at} was saved with x-ignore-shared: its RAM is not "
                "in the stream; save again without that migration capability"
            )
    elif name == "configuration/uuid":
        extra["uuid"] = bytes(r.take(16, "VM uuid")).hex()
    else:
        raise MemoryStreamError(
            f"unknown configuration subsection {name!r} at byte {at}: this QEMU is newer than "
            "the stream parser knows"
        )


def _section_header(r: _Reader, what: str) -> tuple[int, int, int]:
    """Read a section type byte and id; returns (type, id, offset of the type byte)."""
    at = r.offset
    kind = r.u8(what)
    if kind in (SEC_START, SEC_PART, SEC_END, SEC_FULL):
        return kind, r.be32("section id"), at
    name = _SECTION_NAMES.get(kind, f"unknown section type 0x{kind:02x}")
    raise MemoryStreamError(f"unexpected {name} at byte {at} while reading {what}")


def _footer(r: _Reader, layout: MemoryLayout, section_id: int) -> None:
    if not layout.footers:
        return
    at = r.offset
    kind = r.u8("section footer")
    if kind != SEC_FOOTER:
        raise MemoryStreamError(f"missing section footer at byte {at} (found 0x{kind:02x})")
    got = r.be32("section footer id")
    if got != section_id:
        raise MemoryStreamError(
            f"section footer at byte {at} closes section {got}, expected {section_id}"
        )


def _parse_ram(r: _Reader, layout: MemoryLayout, fd: int) -> None:
    kind, sid, at = _section_header(r, "the ram section")
    if kind != SEC_START:
        raise MemoryStreamError(f"expected the ram SECTION_START at byte {at}, found type {kind}")
    name = r.str8("section name")
    layout.instance_id = r.be32("instance id")
    layout.ram_version = r.be32("section version")
    if name != "ram":
        raise MemoryStreamError(
            f"iterative section {name!r} at byte {at} is not supported (only 'ram'): disable "
            "block migration / dirty-bitmap migration"
        )
    if layout.ram_version != 4:
        raise MemoryStreamError(f"ram section version {layout.ram_version} is not supported (4)")
    layout.section_id = sid
    _parse_block_list(r, layout)
    os.ftruncate(fd, layout.size)
    writer = _ImageWriter(fd, layout.size, layout.page_size)
    state = _RamState(layout)
    _ram_records(r, state, writer)  # rest of the START section
    # Footer presence is learnt from the first section end: 0x7e cannot start a section.
    layout.footers = r.peek_u8("section footer") == SEC_FOOTER
    _footer(r, layout, sid)
    while True:
        while r.peek_u8("ram pages") == SEC_COMMAND:
            _switchover_start(r, layout)
        kind, got, at = _section_header(r, "ram pages")
        if layout.extra.get(SWITCHOVER_START) and kind != SEC_END:
            raise MemoryStreamError(
                f"{_SECTION_NAMES.get(kind)} at byte {at} after the SWITCHOVER_START command: "
                "only the ram SECTION_END may follow it"
            )
        if kind == SEC_START:
            other = r.str8("section name")
            raise MemoryStreamError(
                f"second iterative section {other!r} at byte {at} is not supported (only 'ram')"
            )
        if kind == SEC_FULL:
            raise MemoryStreamError(f"device section at byte {at} before the ram section ended")
        if got != sid:
            raise MemoryStreamError(
                f"iterative section {got} at byte {at} is not the ram section ({sid})"
            )
        _ram_records(r, state, writer)
        _footer(r, layout, sid)
        if kind == SEC_END:
            break
    writer.flush()


def _switchover_start(r: _Reader, layout: MemoryLayout) -> None:
    """The one command accepted: QEMU >= 10.0's SWITCHOVER_START (no payload) before ram END."""
    at = r.offset
    r.u8("command")
    cmd = _BE16.unpack(r.take(2, "command number"))[0]
    length = _BE16.unpack(r.take(2, "command length"))[0]
    name = _COMMAND_NAMES.get(cmd, "unknown")
    if cmd != MIG_CMD_SWITCHOVER_START or length != 0:
        raise MemoryStreamError(
            f"unexpected COMMAND {name} ({cmd}, {length} bytes) at byte {at} while reading ram "
            "pages: save the snapshot without postcopy / return path / COLO"
        )
    if layout.extra.get(SWITCHOVER_START):
        raise MemoryStreamError(f"second SWITCHOVER_START command at byte {at}")
    layout.extra[SWITCHOVER_START] = True


def _parse_block_list(r: _Reader, layout: MemoryLayout) -> None:
    at = r.offset
    word = r.be64("the RAM size record")
    flags = word & FLAG_MASK
    if flags != RAM_SAVE_FLAG_MEM_SIZE:
        raise MemoryStreamError(
            f"ram section at byte {at} starts with flags {flag_names(flags)} (0x{flags:x}), "
            "expected MEM_SIZE"
        )
    total = word & ~FLAG_MASK
    remaining = total
    offset = 0
    while remaining > 0:
        bat = r.offset
        name = r.str8("RAM block name")
        length = r.be64("RAM block length")
        if not name or length == 0 or length % PAGE_SIZE or length > remaining:
            raise MemoryStreamError(
                f"implausible RAM block {name!r} of {length} bytes at byte {bat} (the stream may "
                "carry postcopy hugepage sizes or x-ignore-shared addresses, not supported)"
            )
        layout.blocks.append(RamBlock(name, length, offset))
        offset += length
        remaining -= length


@dataclass
class _RamState:
    layout: MemoryLayout
    last: RamBlock | None = None

    def __post_init__(self) -> None:
        self.by_name = {b.name: b for b in self.layout.blocks}


def _ram_records(r: _Reader, state: _RamState, writer: _ImageWriter) -> None:
    """Page records of one ram section, up to and including its EOS."""
    page_size = PAGE_SIZE
    by_name = state.by_name
    while True:
        at = r.offset
        word = r.be64("a RAM record")
        flags = word & FLAG_MASK
        addr = word & ~FLAG_MASK
        if flags == RAM_SAVE_FLAG_EOS:
            return
        kind = flags & ~RAM_SAVE_FLAG_CONTINUE
        if kind not in (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE):
            raise MemoryStreamError(
                f"unsupported RAM record flags {flag_names(flags)} (0x{flags:x}) at byte {at}: "
                "save the snapshot without compress/xbzrle/multifd/rdma/postcopy"
            )
        if flags & RAM_SAVE_FLAG_CONTINUE:
            block = state.last
            if block is None:
                raise MemoryStreamError(f"CONTINUE record at byte {at} with no block before it")
        else:
            name = r.str8("RAM block name")
            block = by_name.get(name)
            if block is None:
                raise MemoryStreamError(f"page record at byte {at} names unknown block {name!r}")
            state.last = block
        if addr >= block.length:
            raise MemoryStreamError(
                f"page record at byte {at} is at 0x{addr:x}, beyond block {block.name!r} "
                f"of {block.length} bytes"
            )
        if kind == RAM_SAVE_FLAG_PAGE:
            writer.page(block.offset + addr, r.take(page_size, "page data"))
        else:
            fill = r.u8("zero page fill byte")
            writer.fill(block.offset + addr, fill)
            if fill == 0:
                _skip_zero_run(r, block, addr, writer)


_ZERO_RUN_MAX = 1 << 16  # records examined per look-ahead
_ZERO_RUN_MIN = 16  # below this, the plain loop is as fast


def _skip_zero_run(r: _Reader, block: RamBlock, addr: int, writer: _ImageWriter) -> None:
    """Consume the run of ZERO|CONTINUE records for the pages after `addr`, vectorised.

    Zero pages dominate idle guests (9 bytes each in the stream); one Python iteration per
    record would make parsing a mostly-free 16 GiB guest take seconds.
    """
    buf, pos, avail = r.buffered()
    k = min(avail // _ZERO_REC.itemsize, _ZERO_RUN_MAX, (block.length - addr) // PAGE_SIZE - 1)
    if k < _ZERO_RUN_MIN:
        return
    recs = np.frombuffer(buf, dtype=_ZERO_REC, count=k, offset=pos)
    want = (addr + PAGE_SIZE * np.arange(1, k + 1, dtype=np.uint64)) | np.uint64(
        RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
    )
    ok = (recs["addr"] == want) & (recs["fill"] == 0)
    m = k if ok.all() else int(np.argmin(ok))
    if m:
        writer.zero_run(block.offset + addr + PAGE_SIZE, m)
        r.skip(m * _ZERO_REC.itemsize)


def _parse_tail(r: _Reader) -> bytes:
    """Everything after the ram END section, kept verbatim after a check that it is complete."""
    at = r.offset
    tail = r.rest()
    complete = _has_vm_description(tail) or (tail.endswith(bytes([SEC_EOF])) and len(tail) > 1)
    if not complete:
        raise MemoryStreamError(
            f"migration stream truncated: the device state after byte {at} does not end with "
            "EOF (or EOF + VM description)"
        )
    return tail


def _has_vm_description(tail: bytes) -> bool:
    """Whether `tail` ends with EOF + VMDESCRIPTION: 0x00 0x06 be32(len) and len bytes of JSON.

    Found by structure, not by the JSON's first key: QEMU 7.2 starts it with "page_size", 8.2
    and later with "configuration". JSON holds no NUL byte, so the EOF is one of the last
    0x00 0x06 pairs; the first from the end whose length reaches exactly the end is it.
    """
    marker = bytes([SEC_EOF, SEC_VMDESCRIPTION])
    end = len(tail)
    while (i := tail.rfind(marker, 0, end)) >= 0:
        if i + 6 < len(tail) and tail[i + 6] == ord("{"):
            if _BE32.unpack_from(tail, i + 2)[0] == len(tail) - i - 6:
                return True
        end = i + 1  # the next candidate may overlap this one (0x00 0x06 0x00 0x06 ...)
    return False


class _Output:
    """Batches many small writes; large pieces go straight through."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._buf = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        if len(data) >= _OUT_BATCH:
            self.flush()
            self._out.write(data)
            return
        self._buf += data
        if len(self._buf) >= _OUT_BATCH:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._out.write(self._buf)
            self._buf = bytearray()


def emit_stream(
    layout: MemoryLayout, image: Path, out: BinaryIO, skip_blocks: Collection[str] = ()
) -> None:
    """Write a migration stream for `qemu -incoming` from a flat image and its layout.

    Every page is sent (ZERO records for zero pages) so the result does not depend on what
    the receiving QEMU had in RAM before (ROMs are loaded at start-up). Blocks named in
    `skip_blocks` get no page records: QEMU maps them from a file that already holds them
    (early start maps guest RAM from cloudletfs, so pages load when the guest touches them).
    """
    layout._check()
    size = os.path.getsize(image)
    if size < layout.size:
        raise MemoryStreamError(
            f"memory image {image} is {size} bytes, its layout needs {layout.size}"
        )
    o = _Output(out)
    sid = layout.section_id
    footer = bytes([SEC_FOOTER]) + _BE32.pack(sid) if layout.footers else b""
    eos = _BE64.pack(RAM_SAVE_FLAG_EOS)
    o.write(layout.head)
    hdr = bytearray([SEC_START]) + _BE32.pack(sid) + _str8(b"ram")
    hdr += struct.pack(">II", layout.instance_id, layout.ram_version)
    hdr += _BE64.pack(layout.ram_total | RAM_SAVE_FLAG_MEM_SIZE)
    for b in layout.blocks:
        hdr += _str8(b.name.encode()) + _BE64.pack(b.length)
    o.write(hdr + eos + footer)
    o.write(bytes([SEC_PART]) + _BE32.pack(sid))
    with open(image, "rb") as f:
        fd = f.fileno()
        for b in layout.blocks:
            if b.name not in skip_blocks:
                _emit_block(o, fd, b)
        if os.fstat(fd).st_size < layout.size:  # holes past a new end would read as zeros
            raise MemoryStreamError(f"memory image {image} was truncated while being emitted")
    o.write(eos + footer)
    if layout.extra.get(SWITCHOVER_START):
        o.write(bytes([SEC_COMMAND]) + _BE16.pack(MIG_CMD_SWITCHOVER_START) + _BE16.pack(0))
    o.write(bytes([SEC_END]) + _BE32.pack(sid) + eos + footer)
    o.write(layout.tail)
    o.flush()
    out.flush()


def _str8(name: bytes) -> bytes:
    if len(name) > 255:
        raise MemoryStreamError(f"RAM block name {name!r} is longer than 255 bytes")
    return bytes([len(name)]) + name


def _emit_block(o: _Output, fd: int, block: RamBlock) -> None:
    """Records for every page of a block: holes become ZERO records without being read."""
    name = _str8(block.name.encode())
    buf = memoryview(bytearray(_EMIT_WINDOW))  # reused: records copy what they keep
    pos = 0  # block-relative offset of the next page to emit
    ranges = data_ranges(fd, block.offset, block.offset + block.length, PAGE_SIZE, _MIN_HOLE)
    for start, end in ranges:
        s, e = start - block.offset, end - block.offset
        if s > pos:
            _emit_zeros(o, name, pos, (s - pos) // PAGE_SIZE)
        while s < e:
            n = min(_EMIT_WINDOW, e - s)
            if os.preadv(fd, [buf[:n]], block.offset + s) != n:
                raise MemoryStreamError(f"memory image ends inside block {block.name!r}")
            _emit_window(o, name, buf[:n], s)
            s += n
        pos = e
    if pos < block.length:
        _emit_zeros(o, name, pos, (block.length - pos) // PAGE_SIZE)


def _emit_window(o: _Output, name: bytes, data: memoryview, base: int) -> None:
    """Records for the pages of `data`, read from block-relative offset `base`."""
    zero = zero_chunk_mask(data)
    first = 0
    if base == 0:
        # The block's first page names it; every later record says CONTINUE.
        if zero[0]:
            o.write(_BE64.pack(RAM_SAVE_FLAG_ZERO) + name + b"\0")
        else:
            o.write(_BE64.pack(RAM_SAVE_FLAG_PAGE) + name + data[:PAGE_SIZE])
        first = 1
    _emit_runs(o, data, zero, first, base)


def _emit_zeros(o: _Output, name: bytes, base: int, count: int) -> None:
    """ZERO records (fill 0) for `count` pages from block-relative `base`, built with numpy."""
    if count and base == 0:
        o.write(_BE64.pack(RAM_SAVE_FLAG_ZERO) + name + b"\0")
        base += PAGE_SIZE
        count -= 1
    flags = np.uint64(RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE)
    while count:
        k = min(count, _ZERO_BATCH)
        rec = np.zeros(k, dtype=_ZERO_REC)
        rec["addr"] = (
            np.arange(k, dtype=np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(base)
        ) | flags
        o.write(rec.view(np.uint8).data)
        base += k * PAGE_SIZE
        count -= k


def _emit_runs(o: _Output, data: memoryview, zero: np.ndarray, first: int, base: int) -> None:
    """Records for pages [first:] of a window, one numpy record array per run of one kind."""
    n = len(zero)
    if first >= n:
        return
    edges = np.flatnonzero(zero[first + 1 :] != zero[first:-1]) + first + 1
    starts = np.concatenate(([first], edges))
    ends = np.concatenate((edges, [n]))
    pages = np.frombuffer(data, dtype=np.uint8).reshape(n, PAGE_SIZE)
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        addrs = base + np.arange(s, e, dtype=np.uint64) * PAGE_SIZE
        if zero[s]:
            rec = np.zeros(e - s, dtype=_ZERO_REC)
            rec["addr"] = addrs | (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE)
        else:
            rec = np.empty(e - s, dtype=_PAGE_REC)
            rec["addr"] = addrs | (RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE)
            rec["data"] = pages[s:e]
        o.write(rec.view(np.uint8).data)


def open_snapshot(path: Path) -> tuple[BinaryIO, str]:
    """Open a memory snapshot positioned at its QEVM stream.

    Returns (file, kind) where kind is "qemu" (a bare migration stream) or "libvirt" (a
    `virsh save` file; its header is in cloudlet.memory.libvirt). The caller closes the file.
    """
    from cloudlet.memory import libvirt

    f = open(path, "rb")  # handed to the caller, who closes it
    try:
        prefix = f.read(16)
        f.seek(0)
        if prefix[:4] == QEVM_MAGIC:
            return f, "qemu"
        if libvirt.is_save_file(prefix):
            header = libvirt.read_header(f)
            f.seek(header.stream_offset)
            return f, "libvirt"
    except BaseException:
        f.close()
        raise
    f.close()
    raise MemoryStreamError(
        f"{path} is neither a QEMU migration stream nor a libvirt save file "
        f"(starts with {prefix!r})"
    )

"""QEMU migration stream parser and emitter on crafted streams, and the libvirt container."""

import io
import os
import random
import struct
import threading
from pathlib import Path

import pytest

from cloudlet import fsutil
from cloudlet.errors import MemoryStreamError
from cloudlet.memory import libvirt
from cloudlet.memory.stream import (
    PAGE_SIZE,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_FULL,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    SAVED_BY_QEMU,
    SWITCHOVER_START,
    MemoryLayout,
    RamBlock,
    emit_stream,
    open_snapshot,
    parse_stream,
)

SID = 2
MACHINE = b"pc-i440fx-7.2"
BLOCKS = [("pc.ram", 8 * PAGE_SIZE), ("pc.bios", 2 * PAGE_SIZE)]


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def str8(s: str) -> bytes:
    return bytes([len(s)]) + s.encode()


def footer(sid: int = SID) -> bytes:
    return b"\x7e" + be32(sid)


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE_SIZE


def rec(addr: int, flags: int, block: str | None = None, payload: bytes = b"") -> bytes:
    """One RAM record; `block` names the block (omit it with CONTINUE)."""
    return be64(addr | flags) + (str8(block) if block else b"") + payload


HEAD = b"QEVM" + be32(3) + b"\x07" + be32(len(MACHINE)) + MACHINE
EOS = be64(RAM_SAVE_FLAG_EOS)
# A device section and EOF as QEMU writes after the ram END section (copied verbatim).
TAIL = b"\x04" + be32(3) + str8("timer") + be32(0) + be32(2) + bytes(range(17)) + footer(3) + b"\0"


def start_section(blocks=BLOCKS, name: str = "ram") -> bytes:
    body = be64(sum(n for _, n in blocks) | RAM_SAVE_FLAG_MEM_SIZE)
    body += b"".join(str8(b) + be64(n) for b, n in blocks)
    return b"\x01" + be32(SID) + str8(name) + be32(0) + be32(4) + body + EOS + footer()


def section(records: bytes, kind: int = 0x02) -> bytes:
    return bytes([kind]) + be32(SID) + records + EOS + footer()


def stream(*parts: bytes, head: bytes = HEAD, tail: bytes = TAIL) -> bytes:
    """HEAD, ram START, the given PART sections, an empty ram END, TAIL."""
    return head + start_section() + b"".join(parts) + section(b"", 0x03) + tail


def parse(data: bytes, tmp_path: Path, name: str = "mem.img") -> tuple[MemoryLayout, bytes]:
    image = tmp_path / name
    layout = parse_stream(io.BytesIO(data), image)
    return layout, image.read_bytes()


def pages_of(image: bytes) -> list[bytes]:
    return [image[i : i + PAGE_SIZE] for i in range(0, len(image), PAGE_SIZE)]


# A stream using every flag QEMU 7.2 emits: PAGE, ZERO, CONTINUE, MEM_SIZE, EOS.
BASIC = stream(
    section(
        rec(0, RAM_SAVE_FLAG_PAGE, "pc.ram", page(1))
        + rec(PAGE_SIZE, RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE, payload=b"\0")
        + rec(2 * PAGE_SIZE, RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE, payload=page(2))
        + rec(PAGE_SIZE, RAM_SAVE_FLAG_PAGE, "pc.bios", page(3))
    )
)


def test_parse_lays_blocks_back_to_back_and_writes_pages(tmp_path):
    layout, image = parse(BASIC, tmp_path)
    assert layout.blocks == [
        RamBlock("pc.ram", 8 * PAGE_SIZE, 0),
        RamBlock("pc.bios", 2 * PAGE_SIZE, 8 * PAGE_SIZE),
    ]
    assert layout.size == len(image) == 10 * PAGE_SIZE
    assert layout.machine == "pc-i440fx-7.2"
    assert layout.head == HEAD and layout.tail == TAIL
    assert layout.section_id == SID and layout.ram_version == 4 and layout.footers
    pages = pages_of(image)
    assert pages[0] == page(1) and pages[1] == page(0) and pages[2] == page(2)
    assert pages[9] == page(3)  # pc.bios page 1
    assert all(p == page(0) for i, p in enumerate(pages) if i not in (0, 2, 9))


def test_image_is_sparse_and_fresh(tmp_path):
    image = tmp_path / "mem.img"
    image.write_bytes(b"\xff" * (64 * PAGE_SIZE))  # stale content must not survive
    parse_stream(io.BytesIO(BASIC), image)
    st = os.stat(image)
    assert st.st_size == 10 * PAGE_SIZE
    assert image.read_bytes().count(b"\xff") == 0
    # Only the three data pages need blocks (filesystems may round up a little).
    assert st.st_blocks * 512 <= 8 * PAGE_SIZE


def test_continue_carries_the_block_across_sections(tmp_path):
    data = stream(
        section(rec(0, RAM_SAVE_FLAG_PAGE, "pc.bios", page(7))),
        section(rec(PAGE_SIZE, RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE, payload=page(8))),
    )
    _, image = parse(data, tmp_path)
    pages = pages_of(image)
    assert pages[8] == page(7) and pages[9] == page(8)
    assert pages[1] == page(0)  # not pc.ram


def test_pages_sent_twice_last_one_wins(tmp_path):
    z = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
    p = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
    data = stream(
        section(
            rec(0, RAM_SAVE_FLAG_PAGE, "pc.ram", page(1))
            + rec(PAGE_SIZE, p, payload=page(2))
            + rec(2 * PAGE_SIZE, p, payload=page(3))
        ),
        section(
            rec(0, z, payload=b"\0")  # a later zero page clears the earlier data
            + rec(PAGE_SIZE, p, payload=page(9))  # a later page replaces the earlier one
            + rec(3 * PAGE_SIZE, z, payload=b"\x5a")  # ZERO with a fill byte is written
            + rec(3 * PAGE_SIZE, p, payload=page(4))
            + rec(4 * PAGE_SIZE, z, payload=b"\x5a")
            + rec(2 * PAGE_SIZE, z, payload=b"\0")
        ),
    )
    _, image = parse(data, tmp_path)
    pages = pages_of(image)
    assert pages[0] == page(0)
    assert pages[1] == page(9)
    assert pages[2] == page(0)
    assert pages[3] == page(4)
    assert pages[4] == page(0x5A)


@pytest.mark.parametrize("seed", range(4))
def test_random_record_sequences_match_a_simple_model(tmp_path, seed):
    """Long zero runs (parsed vectorised), rewrites and fills in any order: last record wins."""
    rng = random.Random(seed)
    npages = 300
    blocks = [("pc.ram", npages * PAGE_SIZE)]
    expected = [0] * npages
    sections = []
    for _ in range(4):
        records = rec(0, RAM_SAVE_FLAG_ZERO, "pc.ram", b"\0")
        expected[0] = 0
        while len(records) < 200_000:
            start = rng.randrange(npages)
            run = rng.choice([1, 5, 40, 250])
            kind = rng.choice(["page", "zero", "zero", "fill"])
            for i in range(start, min(npages, start + run)):
                if kind == "page" or (kind == "fill" and rng.random() < 0.1):
                    value = rng.randrange(1, 256)
                    records += rec(i * PAGE_SIZE, RAM_SAVE_FLAG_PAGE | 0x20, payload=page(value))
                elif kind == "fill":
                    value = rng.randrange(1, 256)
                    records += rec(i * PAGE_SIZE, RAM_SAVE_FLAG_ZERO | 0x20, payload=bytes([value]))
                else:
                    value = 0
                    records += rec(i * PAGE_SIZE, RAM_SAVE_FLAG_ZERO | 0x20, payload=b"\0")
                expected[i] = value
        sections.append(section(records))
    data = HEAD + start_section(blocks) + b"".join(sections) + section(b"", 0x03) + TAIL
    _, image = parse(data, tmp_path)
    assert [p[0] for p in pages_of(image)] == expected
    assert pages_of(image) == [page(v) for v in expected]


@pytest.mark.parametrize(
    ("flag", "name"),
    [
        (RAM_SAVE_FLAG_XBZRLE, "XBZRLE"),
        (RAM_SAVE_FLAG_COMPRESS_PAGE, "COMPRESS_PAGE"),
        (RAM_SAVE_FLAG_HOOK, "HOOK"),
        (RAM_SAVE_FLAG_MULTIFD_FLUSH, "MULTIFD_FLUSH"),
        (RAM_SAVE_FLAG_FULL, "FULL"),
        (RAM_SAVE_FLAG_MEM_SIZE, "MEM_SIZE"),
        (0x400, "unknown 0x400"),
    ],
)
def test_unknown_flag_fails_naming_flag_and_offset(tmp_path, flag, name):
    good = rec(0, RAM_SAVE_FLAG_PAGE, "pc.ram", page(1))
    data = stream(section(good + rec(PAGE_SIZE, flag | RAM_SAVE_FLAG_CONTINUE, payload=page(2))))
    offset = len(HEAD) + len(start_section()) + 5 + len(good)
    with pytest.raises(MemoryStreamError, match=rf"{name}.* at byte {offset}\b"):
        parse(data, tmp_path)


@pytest.mark.parametrize(
    "cut",
    [
        2,  # inside the magic
        len(HEAD) + 3,  # inside the ram START header
        len(HEAD) + 30,  # inside the block list
        len(HEAD) + len(start_section()) + 5 + 8 + 7 + 100,  # inside a page
        len(BASIC) - len(TAIL) - 2,  # inside the END section footer
        len(BASIC) - len(TAIL),  # the device state is missing
        len(BASIC) - 1,  # the EOF byte is missing
    ],
)
def test_truncated_stream_fails(tmp_path, cut):
    with pytest.raises(MemoryStreamError, match="truncated"):
        parse(BASIC[:cut], tmp_path)
    assert not (tmp_path / "mem.img").exists()  # no half-written image left behind


def test_stream_with_vm_description_is_complete(tmp_path):
    desc = b'{"page_size": 4096, "devices": []}'
    tail = TAIL + b"\x06" + be32(len(desc)) + desc
    layout, _ = parse(stream(head=HEAD, tail=tail), tmp_path)
    assert layout.tail == tail
    with pytest.raises(MemoryStreamError, match="truncated"):
        parse(stream(tail=tail[:-3]), tmp_path)


# What QEMU >= 10.0 writes for machine types >= 10.0: SWITCHOVER_START (command 11, no payload)
# between the last ram PART and the ram END; the VM description JSON starts with "configuration"
# (QEMU >= 8.2, whatever the machine type).
SWITCHOVER = b"\x08" + struct.pack(">HH", 11, 0)
DESC_10 = b'{"configuration": {"vmsd_name": "configuration"}, "devices": []}'
TAIL_10 = TAIL + b"\x06" + be32(len(DESC_10)) + DESC_10
PART = section(rec(0, RAM_SAVE_FLAG_PAGE, "pc.ram", page(7)))
QEMU10 = HEAD + start_section() + PART + SWITCHOVER + section(b"", 0x03) + TAIL_10


def test_qemu10_stream_parses_and_emits_back_its_switchover_command(tmp_path):
    layout, image = parse(QEMU10, tmp_path)
    assert layout.extra[SWITCHOVER_START] is True
    assert layout.tail == TAIL_10 and pages_of(image)[0] == page(7)
    out = io.BytesIO()
    emit_stream(layout, tmp_path / "mem.img", out)
    data = out.getvalue()
    end = section(b"", 0x03) + TAIL_10
    assert data.endswith(EOS + footer() + SWITCHOVER + end)  # same place as QEMU put it
    assert data.count(SWITCHOVER) == 1
    layout2, image2 = parse(data, tmp_path, "again.img")
    assert layout2 == layout and image2 == image
    # a layout stored before the key existed (7.2 streams) emits no command
    assert SWITCHOVER_START not in parse(BASIC, tmp_path, "old.img")[0].extra


def test_vm_description_is_found_by_structure_not_by_first_key(tmp_path):
    # a description 0x0600 bytes long: its length field itself holds 0x00 0x06
    desc = b'{"configuration": "' + b"x" * (0x600 - 21) + b'"}'
    assert len(desc) == 0x600
    tail = TAIL + b"\x06" + be32(len(desc)) + desc
    layout, _ = parse(stream(tail=tail), tmp_path)
    assert layout.tail == tail
    for broken in (tail[:-1], TAIL[:-1] + b"\x06" + be32(len(desc)) + desc, tail + b"}"):
        with pytest.raises(MemoryStreamError, match="does not end with EOF"):
            parse(stream(tail=broken), tmp_path)


START = HEAD + start_section()
END = section(b"", 0x03) + TAIL


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        (START + PART, b"\x08" + struct.pack(">HH", 3, 4) + bytes(4) + END,
         r"unexpected COMMAND POSTCOPY_ADVISE \(3, 4 bytes\) at byte {at} "),
        (START, b"\x08" + struct.pack(">HH", 99, 0) + END,
         r"unexpected COMMAND unknown \(99, 0 bytes\) at byte {at} "),
        (START, b"\x08" + struct.pack(">HH", 11, 2) + bytes(2) + END,
         r"COMMAND SWITCHOVER_START \(11, 2 bytes\) at byte {at} "),
        (START + SWITCHOVER, PART + END,
         "SECTION_PART at byte {at} after the SWITCHOVER_START command"),
        (START + SWITCHOVER, SWITCHOVER + END, "second SWITCHOVER_START command at byte {at}"),
    ],
    ids=["postcopy", "unknown", "switchover-with-payload", "part-after", "twice"],
)  # fmt: skip
def test_commands_other_than_one_switchover_start_fail_with_name_and_offset(
    tmp_path, before, after, message
):
    with pytest.raises(MemoryStreamError, match=message.format(at=len(before))):
        parse(before + after, tmp_path)


def test_layout_keeps_the_qemu_version_that_saved_it(tmp_path):
    layout, _ = parse(BASIC, tmp_path)
    assert layout.saved_by is None  # as in layouts stored before cloudlet recorded it
    layout.extra[SAVED_BY_QEMU] = "10.0.2"
    assert MemoryLayout.from_bytes(layout.to_bytes()).saved_by == "10.0.2"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"NOPE" + bytes(100), "not a QEMU migration stream"),
        (b"QEVM" + be32(2) + bytes(100), "version 2"),
        (
            HEAD + start_section(name="block") + TAIL,
            "iterative section 'block'",
        ),
        (
            stream(section(rec(0, RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE, payload=page(1)))),
            "CONTINUE record",
        ),
        (stream(section(rec(0, RAM_SAVE_FLAG_ZERO, "vga.vram", b"\0"))), "unknown block"),
        (
            stream(section(rec(8 * PAGE_SIZE, RAM_SAVE_FLAG_ZERO, "pc.ram", b"\0"))),
            "beyond block 'pc.ram'",
        ),
        (
            HEAD + start_section() + b"\x08" + bytes(20),
            "COMMAND",
        ),
        (
            HEAD
            + b"\x05"
            + str8("configuration/capabilities")
            + be32(1)
            + be32(1)
            + str8("x-ignore-shared")
            + start_section(),
            "x-ignore-shared",
        ),
        (
            HEAD + start_section() + b"\x01" + be32(3) + str8("dirty-bitmap") + bytes(20),
            "second iterative section 'dirty-bitmap'",
        ),
        (HEAD + start_section() + b"\x02" + be32(9) + EOS, "not the ram section"),
    ],
)
def test_unsupported_or_malformed_streams_fail_clearly(tmp_path, data, message):
    with pytest.raises(MemoryStreamError, match=message):
        parse(data, tmp_path)


def test_configuration_subsections_are_kept_in_head(tmp_path):
    head = (
        HEAD
        + b"\x05"
        + str8("configuration/capabilities")
        + be32(1)
        + be32(1)
        + str8("validate-uuid")
        + b"\x05"
        + str8("configuration/uuid")
        + be32(1)
        + bytes(range(16))
    )
    layout, _ = parse(stream(head=head), tmp_path)
    assert layout.head == head
    assert layout.extra["capabilities"] == ["validate-uuid"]
    assert layout.extra["uuid"] == bytes(range(16)).hex()


def test_parse_reads_a_pipe_once_and_reports_progress(tmp_path):
    r, w = os.pipe()

    def feed():
        with os.fdopen(w, "wb") as f:
            for i in range(0, len(BASIC), 1000):
                f.write(BASIC[i : i + 1000])

    thread = threading.Thread(target=feed)
    thread.start()
    seen: list[int] = []
    with os.fdopen(r, "rb", buffering=0) as f:  # unbuffered: reads come back short
        layout = parse_stream(f, tmp_path / "mem.img", progress=seen.append)
    thread.join(timeout=10)
    assert layout.size == 10 * PAGE_SIZE
    assert seen == sorted(seen) and seen[-1] == len(BASIC)
    assert (tmp_path / "mem.img").read_bytes() == parse(BASIC, tmp_path, "b.img")[1]


def test_emit_writes_canonical_stream_that_parses_back(tmp_path):
    layout, image = parse(BASIC, tmp_path)
    out = io.BytesIO()
    emit_stream(layout, tmp_path / "mem.img", out)
    data = out.getvalue()
    c = RAM_SAVE_FLAG_CONTINUE
    ram = rec(0, RAM_SAVE_FLAG_PAGE, "pc.ram", page(1)) + rec(PAGE_SIZE, RAM_SAVE_FLAG_ZERO | c)
    ram += b"\0" + rec(2 * PAGE_SIZE, RAM_SAVE_FLAG_PAGE | c, payload=page(2))
    ram += b"".join(rec(i * PAGE_SIZE, RAM_SAVE_FLAG_ZERO | c, payload=b"\0") for i in range(3, 8))
    ram += rec(0, RAM_SAVE_FLAG_ZERO, "pc.bios", b"\0")
    ram += rec(PAGE_SIZE, RAM_SAVE_FLAG_PAGE | c, payload=page(3))
    assert data == HEAD + start_section() + section(ram) + section(b"", 0x03) + TAIL
    layout2, image2 = parse(data, tmp_path, "again.img")
    assert layout2 == layout and image2 == image


def test_emit_refuses_a_short_image(tmp_path):
    layout, _ = parse(BASIC, tmp_path)
    os.truncate(tmp_path / "mem.img", PAGE_SIZE)
    with pytest.raises(MemoryStreamError, match="needs"):
        emit_stream(layout, tmp_path / "mem.img", io.BytesIO())


def test_layout_round_trips_and_rejects_garbage(tmp_path):
    layout, _ = parse(BASIC, tmp_path)
    blob = layout.to_bytes()
    assert MemoryLayout.from_bytes(blob) == layout
    for bad, message in [
        (b"garbage" * 10, "bad magic"),
        (blob[:-1], "truncated"),
        (blob[:8] + struct.pack("<I", 99) + blob[12:], "version 99"),
        (blob.replace(b'"blocks"', b'"blocksX"'), "corrupt"),
    ]:
        with pytest.raises(MemoryStreamError, match=message):
            MemoryLayout.from_bytes(bad)


def test_ram_compatible(tmp_path):
    layout, _ = parse(BASIC, tmp_path)
    same = MemoryLayout.from_bytes(layout.to_bytes())
    same.tail = b"other device state"
    assert layout.ram_compatible(same)
    other = MemoryLayout.from_bytes(layout.to_bytes())
    other.blocks[0].length += PAGE_SIZE
    assert not layout.ram_compatible(other)


# --- libvirt save container -------------------------------------------------------------------

XML = "<domain type='qemu'><name>base</name></domain>"
COOKIE = "<qemuDomainSaveCookie><cpu/></qemuDomainSaveCookie>"


def test_libvirt_save_file_round_trip(tmp_path):
    path = tmp_path / "vm.save"
    header = libvirt.LibvirtSaveHeader(xml=XML, was_running=True, cookie=COOKIE)
    with open(path, "wb") as f:
        written = libvirt.write_save_file(f, header, lambda out: out.write(BASIC))
    raw = path.read_bytes()
    assert raw[:16] == b"LibvirtQemudSave"
    version, data_len, running, compressed, cookie_off = struct.unpack_from("<5I", raw, 16)
    xml_len = len(XML) + 1
    assert (version, running, compressed, cookie_off) == (2, 1, 0, xml_len)
    assert data_len == xml_len + len(COOKIE) + 1 + 64 * 1024  # room for edits, like libvirt
    assert raw[92 + data_len :] == BASIC == raw[written.stream_offset :]
    with open(path, "rb") as f:
        got = libvirt.read_header(f)
        assert f.tell() == got.stream_offset == 92 + data_len
    assert (got.xml, got.cookie, got.was_running) == (XML, COOKIE, True)
    f, kind = open_snapshot(path)
    with f:
        assert kind == "libvirt"
        layout = parse_stream(f, tmp_path / "mem.img")
    assert layout == parse(BASIC, tmp_path, "direct.img")[0]


def test_libvirt_edited_xml_keeps_or_grows_data_len(tmp_path):
    header = libvirt.LibvirtSaveHeader(xml=XML, was_running=False, data_len=4096)
    out = io.BytesIO()
    assert libvirt.write_save_file(out, header, lambda o: o.write(BASIC)).data_len == 4096
    header.xml = "<domain>" + "x" * 5000 + "</domain>"
    out = io.BytesIO()
    grown = libvirt.write_save_file(out, header, lambda o: o.write(BASIC))
    assert grown.data_len > 5000
    out.seek(0)
    got = libvirt.read_header(out)
    assert got.xml == header.xml and got.cookie is None and not got.was_running
    assert out.read(4) == b"QEVM"


def test_libvirt_reads_a_big_endian_header():
    data = XML.encode() + b"\0" * 100
    raw = b"LibvirtQemudSave" + struct.pack(">5I14I", 2, len(data), 1, 0, 0, *[0] * 14) + data
    got = libvirt.read_header(io.BytesIO(raw + b"QEVM"))
    assert got.xml == XML and got.stream_offset == len(raw) and got.byteorder == ">"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"LibvirtQemudSave" + struct.pack("<5I14I", 2, 10, 1, 3, 0, *[0] * 14), "xz"),
        (b"LibvirtQemudPart" + bytes(76), "incomplete"),
        (b"LibvirtQemudSave" + struct.pack("<5I14I", 7, 10, 1, 0, 0, *[0] * 14), "version 7"),
        (b"LibvirtQemudSave" + struct.pack("<5I14I", 2, 1000, 1, 0, 0, *[0] * 14), "truncated"),
        (b"LibvirtQemudSave", "truncated"),
        (b"SomethingElse!!!" + bytes(76), "not a libvirt save file"),
    ],
)
def test_libvirt_bad_headers_fail_clearly(raw, message):
    with pytest.raises(MemoryStreamError, match=message):
        libvirt.read_header(io.BytesIO(raw + bytes(20)))


def test_open_snapshot_recognises_bare_streams_and_garbage(tmp_path):
    bare = tmp_path / "bare"
    bare.write_bytes(BASIC)
    f, kind = open_snapshot(bare)
    with f:
        assert kind == "qemu" and f.read(4) == b"QEVM"
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF" + bytes(100))
    with pytest.raises(MemoryStreamError, match="neither"):
        open_snapshot(junk)


# --- Emitting from sparse images: holes are skipped, the stream is byte-identical. ---

KIB, MIB = 1 << 10, 1 << 20


def full_scan_stream(layout: MemoryLayout, image: Path) -> bytes:
    """The canonical stream as a plain model: read every page, one record per page."""
    data = image.read_bytes()
    c = RAM_SAVE_FLAG_CONTINUE
    ram = b""
    for b in layout.blocks:
        for addr in range(0, b.length, PAGE_SIZE):
            p = data[b.offset + addr : b.offset + addr + PAGE_SIZE]
            name = None if addr else b.name
            flags = 0 if addr == 0 else c
            if p == bytes(PAGE_SIZE):
                ram += rec(addr, RAM_SAVE_FLAG_ZERO | flags, name, b"\0")
            else:
                ram += rec(addr, RAM_SAVE_FLAG_PAGE | flags, name, p)
    blocks = [(b.name, b.length) for b in layout.blocks]
    return HEAD + start_section(blocks) + section(ram) + section(b"", 0x03) + TAIL


def sparse_image(path: Path, size: int, writes: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        os.ftruncate(f.fileno(), size)
        for offset, data in writes:
            os.pwrite(f.fileno(), data, offset)


def layout_of(blocks: list[tuple[str, int]]) -> MemoryLayout:
    ram, offset = [], 0
    for name, length in blocks:
        ram.append(RamBlock(name, length, offset))
        offset += length
    return MemoryLayout(blocks=ram, head=HEAD, tail=TAIL, section_id=SID)


def emitted(layout: MemoryLayout, image: Path) -> bytes:
    out = io.BytesIO()
    emit_stream(layout, image, out)
    return out.getvalue()


SPARSE_BLOCKS = [("pc.ram", 5 * MIB), ("vga.vram", 2 * MIB), ("pc.bios", 256 * KIB)]
SPARSE_BLOCKS += [("pc.rom", 128 * KIB)]


def sparse_writes() -> list[tuple[int, bytes]]:
    rnd = random.Random(7)

    def data(pages: int, zero_every: int = 0) -> bytes:
        return b"".join(
            bytes(PAGE_SIZE) if zero_every and i % zero_every == 0 else rnd.randbytes(PAGE_SIZE)
            for i in range(pages)
        )

    return [
        (0, data(1)),  # the first page of pc.ram is data: a named PAGE record
        (MIB - 3 * PAGE_SIZE, data(8, zero_every=3)),  # crosses the 1 MiB window mid-extent
        (MIB + 700 * KIB, data(5)),  # starts and ends mid-window
        (2 * MIB + 64 * KIB, bytes(300 * KIB)),  # allocated but all zeros
        (3 * MIB + 512 * KIB, bytes(PAGE_SIZE - 1) + b"\1"),  # one non-zero byte, at the end
        # hole from here over the pc.ram / vga.vram boundary: vga.vram starts in a hole
        (5 * MIB + 600 * KIB, data(3)),
        (7 * MIB - 2 * PAGE_SIZE, data(5, zero_every=2)),  # crosses vga.vram / pc.bios
        # the rest of pc.bios and all of pc.rom: a hole up to the end of the file
    ]


@pytest.mark.parametrize("min_hole", [None, PAGE_SIZE])
@pytest.mark.parametrize("seek", [True, False], ids=["seek-data", "no-seek-data"])
def test_emit_from_sparse_image_equals_full_scan(tmp_path, monkeypatch, min_hole, seek):
    """Skipping holes changes nothing in the stream, whatever the extents and block limits."""
    from cloudlet.memory import stream as stream_mod

    if min_hole:
        monkeypatch.setattr(stream_mod, "_MIN_HOLE", min_hole)  # skip every hole, exactly
    if not seek:
        monkeypatch.setattr(fsutil, "_SEEK_DATA", None)  # a filesystem without holes
    layout = layout_of(SPARSE_BLOCKS)
    image = tmp_path / "mem.img"
    sparse_image(image, layout.size, sparse_writes())
    with open(image, "r+b") as f:  # an unwritten (preallocated) extent inside a hole
        os.posix_fallocate(f.fileno(), 4 * MIB, 64 * KIB)
    data = emitted(layout, image)
    assert data == full_scan_stream(layout, image)
    layout2, image2 = parse(data, tmp_path, "again.img")
    assert layout2.blocks == layout.blocks and image2 == image.read_bytes()


@pytest.mark.parametrize("seed", range(6))
def test_emit_random_sparse_images_equals_full_scan(tmp_path, monkeypatch, seed):
    from cloudlet.memory import stream as stream_mod

    rnd = random.Random(seed)
    monkeypatch.setattr(stream_mod, "_MIN_HOLE", rnd.choice([PAGE_SIZE, 64 * KIB, 256 * KIB]))
    layout = layout_of([("pc.ram", 3 * MIB), ("x", rnd.randrange(1, 64) * PAGE_SIZE)])
    layout.blocks.append(RamBlock("y", 512 * KIB, layout.size))
    writes = []
    for _ in range(rnd.randrange(0, 30)):
        offset = rnd.randrange(0, layout.size // PAGE_SIZE) * PAGE_SIZE
        n = rnd.randrange(1, 40) * PAGE_SIZE
        n = min(n, layout.size - offset)
        writes.append((offset, rnd.choice([bytes(n), rnd.randbytes(n)])))
    image = tmp_path / "mem.img"
    sparse_image(image, layout.size, writes)
    assert emitted(layout, image) == full_scan_stream(layout, image)


def test_emit_skips_long_holes_and_reads_all_data(tmp_path):
    """The ranges read cover every data extent but not the long holes between them."""
    from cloudlet.fsutil import data_ranges
    from cloudlet.memory.stream import _MIN_HOLE

    layout = layout_of(SPARSE_BLOCKS)
    image = tmp_path / "mem.img"
    writes = sparse_writes()
    sparse_image(image, layout.size, writes)
    if os.stat(image).st_blocks * 512 >= layout.size:
        pytest.skip("the filesystem of tmp_path does not keep holes")
    with open(image, "rb") as f:
        ranges = list(data_ranges(f.fileno(), 0, layout.size, PAGE_SIZE, _MIN_HOLE))
    assert ranges == sorted(ranges) and all(s < e for s, e in ranges)
    assert all(e <= s2 for (_, e), (s2, _) in zip(ranges, ranges[1:], strict=False))
    for offset, data in writes:
        assert any(s <= offset and offset + len(data) <= e for s, e in ranges)
    # 0.4 MiB of data, 7 long holes: each is read at most _MIN_HOLE into it, the rest never
    assert sum(e - s for s, e in ranges) <= 400 * KIB + 7 * _MIN_HOLE
    assert ranges[-1][1] <= 7 * MIB + 3 * PAGE_SIZE + _MIN_HOLE  # the trailing hole is skipped

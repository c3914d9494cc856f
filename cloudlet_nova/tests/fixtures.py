"""Real engine files for the Nova tests, made without QEMU, and fakelibvirt's save/restore.

The base VM is a real cloudlet base (registered with the engine's store: chunk indexes, base id)
whose memory snapshot is a QEMU migration stream the engine can parse and emit, but whose pages
were written by this module rather than by a booted guest: libvirtd and QEMU cannot run inside
Nova's functional framework, where fakelibvirt stands for both.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import fixtures
import numpy as np
from nova import exception
from nova.tests.fixtures import libvirt as fakelibvirt
from nova.tests.fixtures.nova import PROJECT_ID

from cloudlet.basevm.store import BaseStore, BaseVM
from cloudlet.hashing import file_sha256
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.config import VMConfig
from cloudlet.memory import libvirt as savefile
from cloudlet.memory.stream import MemoryLayout, RamBlock, emit_stream, parse_stream
from cloudlet.overlay.create import OverlaySpec, build_overlay
from cloudlet.stats import Stats
from cloudlet_nova import glance

PROJECT_A = PROJECT_ID  # the project of the test's own API client (self.api)
PROJECT_B = "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0"
MiB = 1 << 20
PAGE = 4096
MEMORY_MIB = 4  # the snapshot's RAM; flavors booting it need exactly this
_MACHINE = b"pc-i440fx-7.2"
_SID = 2


def _be32(v: int) -> bytes:
    return struct.pack(">I", v)


# A stream head (magic, version, configuration section) and a device section + EOF after RAM,
# as QEMU 7.2 writes them; the engine copies both verbatim.
_HEAD = b"QEVM" + _be32(3) + b"\x07" + _be32(len(_MACHINE)) + _MACHINE
_TAIL = (b"\x04" + _be32(3) + bytes([5]) + b"timer" + _be32(0) + _be32(2) + bytes(range(17))
         + b"\x7e" + _be32(3) + b"\0")


def _layout() -> MemoryLayout:
    blocks = [RamBlock("pc.ram", MEMORY_MIB * MiB, 0), RamBlock("pc.bios", 64 * 1024,
                                                                   MEMORY_MIB * MiB)]
    return MemoryLayout(blocks=blocks, head=_HEAD, tail=_TAIL, section_id=_SID)


def _write_pages(path: Path, pages: dict[int, bytes]) -> None:
    with open(path, "r+b") as f:
        for number, data in pages.items():
            f.seek(number * PAGE)
            f.write(data)


def make_base(home: CloudletHome, seed: int = 0, append: str | None = None) -> BaseVM:
    """A small real base VM (1 MiB disk, 4 MiB + BIOS memory) registered in `home`; with
    `append`, a kernel-booted one (a stand-in kernel and initrd, that command line)."""
    rng = np.random.default_rng(seed)
    staging = home.make_staging_dir("test-base-")
    disk = bytearray(MiB)
    disk[: 256 * 1024] = rng.bytes(256 * 1024)
    (staging / "disk.raw").write_bytes(bytes(disk))
    layout = _layout()
    with open(staging / "memory.img", "wb") as f:
        f.truncate(layout.size)
    _write_pages(staging / "memory.img", {p: rng.bytes(PAGE) for p in (0, 1, 7, 300, 1024)})
    (staging / "memory.layout").write_bytes(layout.to_bytes())
    config = VMConfig(machine=_MACHINE.decode(), memory_mib=MEMORY_MIB)
    if append is not None:
        (staging / "kernel").write_bytes(b"stand-in kernel %d" % seed)
        (staging / "initrd").write_bytes(b"stand-in initrd %d" % seed)
        config = VMConfig(machine=_MACHINE.decode(), memory_mib=MEMORY_MIB, append=append,
                          kernel_sha256=file_sha256(staging / "kernel"),
                          initrd_sha256=file_sha256(staging / "initrd"))
    (staging / "vm-config.json").write_text(json.dumps(config.to_dict()))
    return BaseStore(home).add_from_directory(staging, f"test-base-{seed}")


def base_stream(base: BaseVM) -> bytes:
    """The QEMU stream the engine emits for the base's snapshot (what a restore must load)."""
    out = io.BytesIO()
    emit_stream(MemoryLayout.from_bytes(base.memory_layout_path.read_bytes()), base.memory_path,
                out)
    return out.getvalue()


@dataclass
class Overlay:
    path: Path
    disk_sha256: str  # the customised disk, as synthesis must rebuild it
    stream_sha256: str  # the customised memory, as the restore must load it


def make_overlay(base: BaseVM, work: Path) -> Overlay:
    """Customise the base's images (disk and memory pages) and capture an overlay of them."""
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(99)
    disk = work / "custom-disk.raw"
    shutil.copyfile(base.disk_path, disk)
    disk.chmod(0o644)
    _write_pages(disk, {3: b"customised disk page".ljust(PAGE, b"!"), 200: rng.bytes(PAGE)})
    memory = work / "custom-memory.img"
    shutil.copyfile(base.memory_path, memory)
    memory.chmod(0o644)
    _write_pages(memory, {2: rng.bytes(PAGE), 500: b"customised memory".ljust(PAGE, b"?")})
    layout = MemoryLayout.from_bytes(base.memory_layout_path.read_bytes())
    stream = io.BytesIO()
    emit_stream(layout, memory, stream)
    snapshot = work / "custom.stream"
    snapshot.write_bytes(stream.getvalue())
    out = work / "custom.overlay"
    build_overlay(base, snapshot, disk, OverlaySpec(output=out), Stats(), work_dir=work)
    return Overlay(
        path=out,
        disk_sha256=hashlib.sha256(disk.read_bytes()).hexdigest(),
        stream_sha256=hashlib.sha256(stream.getvalue()).hexdigest(),
    )


@dataclass
class GlanceBase:
    disk_image: str
    memory_image: str


def upload_base(glance_fixture: object, base: BaseVM, *, memory_image: str | None = None,
                disk_data: bytes | None = None, memory_data: bytes | None = None,
                owner: str = PROJECT_A, visibility: str = "private") -> GlanceBase:
    """Register `base` in the GlanceFixture as the two images of docs/nova.md, owned by
    `owner` (the disk's memory link and the data of either image can be replaced)."""
    disk_id, memory_id = str(uuid.uuid4()), str(uuid.uuid4())
    base_id = base.id
    bundle = io.BytesIO(memory_data or b"")
    if memory_data is None:
        glance.write_memory_bundle(base, bundle)
    glance_fixture.create(None, {
        "id": memory_id, "name": f"{base.name}-memory", "disk_format": "raw",
        "container_format": "bare", "status": "active", "owner": owner, "visibility": visibility,
        "properties": glance.base_memory_properties(base_id, disk_id),
    }, data=io.BytesIO(bundle.getvalue()))
    glance_fixture.create(None, {
        "id": disk_id, "name": base.name, "disk_format": "raw", "container_format": "bare",
        "status": "active", "min_ram": 0, "min_disk": 0, "owner": owner, "visibility": visibility,
        "properties": glance.base_disk_properties(base_id, memory_image or memory_id),
    }, data=io.BytesIO(disk_data if disk_data is not None else base.disk_path.read_bytes()))
    return GlanceBase(disk_id, memory_id)


def upload_overlay(glance_fixture: object, data: bytes, base_id: str, disk_image: str, *,
                   owner: str = PROJECT_A, visibility: str = "private") -> str:
    image_id = str(uuid.uuid4())
    glance_fixture.create(None, {
        "id": image_id, "name": "overlay", "disk_format": "raw", "container_format": "bare",
        "status": "active", "owner": owner, "visibility": visibility,
        "properties": glance.overlay_properties(base_id, disk_image),
    }, data=io.BytesIO(data))
    return image_id


class GlanceAsGlanceFixture(fixtures.Fixture):
    """Nova's GlanceFixture made to answer as Glance does about who may read an image and what
    its data hashes to. Glance cannot run inside Nova's functional framework; its fixture (one
    dict of images) lets every context read every image and records no digests, which would
    make every isolation test pass vacuously. With this:

    - an image is readable (show, download, listing) by an admin, by its owner's project, or by
      anyone when its visibility is public/community; otherwise show and download answer
      ImageNotFound (Glance's 404 for another project's image). Calls the test makes itself
      (context None) stand for the operator and read everything;
    - an image created by a project is owned by it (top-level `owner`, as Nova's image API
      returns Glance's attribute); images the test creates name their owner;
    - on create, os_hash_algo/os_hash_value (sha512) and checksum (md5) are computed from the
      data; values a caller tries to set are dropped, as Glance forbids setting them;
    - only an admin or the owner deletes an image.
    """

    def __init__(self, glance_fixture: object) -> None:
        super().__init__()
        self.glance = glance_fixture

    @staticmethod
    def readable(context: object, image: dict) -> bool:
        if context is None or getattr(context, "is_admin", False):
            return True
        if image.get("visibility", "public") in ("public", "community"):
            return True
        return image.get("owner") is not None and image.get("owner") == context.project_id

    def _setUp(self) -> None:
        g = self.glance
        show, create, detail, delete = g.show, g.create, g.detail, g.delete

        def visible_show(context, image_id, include_locations=False, show_deleted=True):
            image = show(context, image_id, include_locations=include_locations,
                         show_deleted=show_deleted)
            if not self.readable(context, image):
                raise exception.ImageNotFound(image_id=image_id)
            return image

        def hashed_create(context, metadata, data=None):
            metadata = dict(metadata)
            props = dict(metadata.get("properties") or {})
            for key in ("os_hash_algo", "os_hash_value", "checksum"):
                metadata.pop(key, None)
                props.pop(key, None)
            metadata["properties"] = props
            if context is not None:
                metadata["owner"] = context.project_id
            payload = data.read() if data is not None else None
            if payload is not None:
                metadata.update(os_hash_algo="sha512", size=len(payload),
                                os_hash_value=hashlib.sha512(payload).hexdigest(),
                                checksum=hashlib.md5(payload).hexdigest())  # noqa: S324
            return create(context, metadata,
                          data=io.BytesIO(payload) if payload is not None else None)

        def visible_detail(context, **kwargs):
            return [i for i in detail(context, **kwargs) if self.readable(context, i)]

        def owner_delete(context, image_id):
            image = show(context, image_id)
            if not (context is None or context.is_admin
                    or image.get("owner") == context.project_id):
                raise exception.ImageNotAuthorized(image_id=image_id)
            return delete(context, image_id)

        for name, new in (("show", visible_show), ("create", hashed_create),
                          ("detail", visible_detail), ("delete", owner_delete)):
            self.useFixture(fixtures.MockPatchObject(g, name, new))


@dataclass
class Restore:
    save_file: str
    dxml: str
    flags: int
    header_xml: str
    was_running: bool
    stream_sha256: str


class SaveRestoreFixture(fixtures.Fixture):
    """fakelibvirt with virDomainRestoreFlags and virDomainSaveFlags, which it lacks.

    restoreFlags reads the save file as libvirt would (header, XML, QEMU stream), records what it
    got, keeps the memory it restored (parsed by the engine, as QEMU would hold it) and starts the
    defined domain named by the XML, paused or running per the flags. saveFlags writes a libvirt
    save file of that memory back; `customise(uuid, stream_bytes) -> stream_bytes` can stand for
    a guest that changed its memory in between.
    """

    SAVE_RUNNING = 2  # libvirt's VIR_DOMAIN_SAVE_RUNNING / _PAUSED values
    SAVE_PAUSED = 4

    def __init__(self, scratch: Path) -> None:
        super().__init__()
        self.scratch = scratch
        self.restores: list[Restore] = []
        self.streams: dict[str, bytes] = {}  # domain uuid -> the memory it holds (a QEMU stream)
        self.customise = None

    def _setUp(self) -> None:
        fx = self
        for name, value in (("VIR_DOMAIN_SAVE_RUNNING", self.SAVE_RUNNING),
                            ("VIR_DOMAIN_SAVE_PAUSED", self.SAVE_PAUSED)):
            self.useFixture(fixtures.MonkeyPatch(f"{fakelibvirt.__name__}.{name}", value))

        def restore_flags(conn: fakelibvirt.Connection, frm: str, dxml: str | None = None,
                          flags: int = 0) -> int:
            with open(frm, "rb") as f:
                header = savefile.read_header(f)
                f.seek(header.stream_offset)
                stream = f.read()
            xml = dxml or header.xml
            # the engine must be able to parse it back, as QEMU loads it
            parse_stream(io.BytesIO(stream), fx.scratch / f"restored-{uuid.uuid4()}.img")
            fx.restores.append(Restore(frm, dxml or "", flags, header.xml, header.was_running,
                                       hashlib.sha256(stream).hexdigest()))
            dom_uuid = ElementTree.fromstring(xml).findtext("uuid")
            dom = conn.lookupByUUIDString(dom_uuid)
            if dom.isActive():
                raise fakelibvirt.make_libvirtError(
                    fakelibvirt.libvirtError, "Requested operation is not valid: domain is "
                    "already active", error_code=fakelibvirt.VIR_ERR_OPERATION_INVALID)
            fx.streams[dom_uuid] = stream
            dom.createWithFlags(0)
            if flags & fx.SAVE_PAUSED:
                dom.suspend()
            return 0

        def save_flags(dom: fakelibvirt.Domain, to: str, dxml: str | None = None,
                       flags: int = 0) -> int:
            stream = fx.streams[dom.UUIDString()]
            if fx.customise is not None:
                stream = fx.customise(dom.UUIDString(), stream)
            with open(to, "wb") as f:
                savefile.write_save_file(
                    f, savefile.LibvirtSaveHeader(xml=dxml or dom.XMLDesc(0), was_running=True),
                    lambda out: out.write(stream))
            dom.destroy()
            return 0

        self.useFixture(fixtures.MonkeyPatch(
            f"{fakelibvirt.__name__}.Connection.restoreFlags", restore_flags))
        self.useFixture(fixtures.MonkeyPatch(
            f"{fakelibvirt.__name__}.Domain.saveFlags", save_flags))

"""Cloudlet images in Glance: the properties that mark them, and streaming their data.

A base VM is two Glance images; an overlay is a third (docs/nova.md has the table):

    base disk     disk_format raw, the base's disk.raw; bootable by plain Nova too
                  cloudlet_type=base-disk  cloudlet_base_id=<id>  cloudlet_memory_image=<uuid>
    base memory   the memory bundle (below); never booted
                  cloudlet_type=base-memory  cloudlet_base_id=<id>  cloudlet_disk_image=<uuid>
    overlay       an overlay file (docs/overlay-format.md)
                  cloudlet_type=overlay  cloudlet_base_id=<id>  cloudlet_base_disk_image=<uuid>

<id> is the engine's base id (cloudlet.basevm.identity): the cache recomputes it from the
downloaded files and refuses a mismatch, so the properties are hints, never trusted. What binds an
image to a base is its content hash, which Glance computes at upload (os_hash_algo,
os_hash_value) and no user can set: see cloudlet_nova.cache.

The memory bundle is a zstd-compressed tar stream of vm-config.json, memory.layout, kernel and
initrd (when the base has them) and memory.img, in that order.
"""

from __future__ import annotations

import enum
import hashlib
import io
import os
import queue
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard
from nova import exception as nova_exception
from oslo_log import log as logging

from cloudlet.basevm.identity import is_base_id
from cloudlet.basevm.store import CONFIG, INITRD, KERNEL, LAYOUT, MEMORY, BaseVM
from cloudlet.hashing import READ_SIZE
from cloudlet.sources.glance import GlanceSource
from cloudlet_nova import errors, hardware

LOG = logging.getLogger(__name__)

TYPE = "cloudlet_type"
BASE_ID = "cloudlet_base_id"
MEMORY_IMAGE = "cloudlet_memory_image"  # on a base disk: its memory image
DISK_IMAGE = "cloudlet_disk_image"  # on a base memory image: its disk image
BASE_DISK_IMAGE = "cloudlet_base_disk_image"  # on an overlay: the base disk image to fetch
HASH_ALGO = "os_hash_algo"  # Glance's own digest of the image data (read-only to users)
HASH_VALUE = "os_hash_value"

BUNDLE_MEMBERS = (CONFIG, LAYOUT, KERNEL, INITRD, MEMORY)
_QUEUE_DEPTH = 8  # chunks in flight between the download thread and the reader


class Kind(enum.StrEnum):
    BASE_DISK = "base-disk"
    BASE_MEMORY = "base-memory"
    OVERLAY = "overlay"


@dataclass(frozen=True)
class ContentHash:
    """The digest Glance computed of an image's data when it was uploaded (os_hash_algo,
    os_hash_value: sha512 by default). Users cannot set it, so unlike a property it names
    the content."""

    algo: str
    value: str

    def __str__(self) -> str:
        return f"{self.algo}:{self.value}"

    def new_hasher(self) -> Any:
        return hashlib.new(self.algo)


def content_hash(image: dict[str, Any]) -> ContentHash | None:
    """Glance's digest of an image's data (top-level attributes, as Nova's image API returns
    them; never taken from the user-set properties), or None when Glance recorded none or
    uses an algorithm this Python cannot compute."""
    algo, value = image.get(HASH_ALGO), image.get(HASH_VALUE)
    if not algo or not value or str(algo).lower() not in hashlib.algorithms_available:
        return None
    return ContentHash(str(algo).lower(), str(value).lower())


@dataclass(frozen=True)
class CloudletImage:
    """What a Glance image's cloudlet properties say, and Glance's digest of its data."""

    image_id: str
    kind: Kind
    base_id: str
    memory_image: str | None = None  # base disk -> memory image
    disk_image: str | None = None  # base memory -> disk image; overlay -> base disk image
    content: ContentHash | None = None
    cpu: str | None = None  # the base's CPU as announced (hardware.CPU_PROPERTY); a hint


def base_disk_properties(
    base_id: str, memory_image_id: str, cpu: str | None = None
) -> dict[str, str]:
    """With `cpu` (the base's VMConfig.cpu), the pin and the trait that schedule it."""
    return {
        TYPE: Kind.BASE_DISK.value, BASE_ID: base_id, MEMORY_IMAGE: memory_image_id,
        **hardware.image_properties(cpu),
    }  # fmt: skip


def base_memory_properties(base_id: str, disk_image_id: str) -> dict[str, str]:
    return {TYPE: Kind.BASE_MEMORY.value, BASE_ID: base_id, DISK_IMAGE: disk_image_id}


def overlay_properties(
    base_id: str, base_disk_image_id: str, cpu: str | None = None
) -> dict[str, str]:
    return {
        TYPE: Kind.OVERLAY.value, BASE_ID: base_id, BASE_DISK_IMAGE: base_disk_image_id,
        **hardware.image_properties(cpu),
    }  # fmt: skip


def describe(image: dict[str, Any]) -> CloudletImage | None:
    """The cloudlet view of a Glance image dict (as nova.image.glance.API.get returns), or None
    for a plain image. Raises CloudletImageInvalid when the properties are incomplete."""
    props = image.get("properties") or {}
    image_id = str(image.get("id"))
    if TYPE not in props:
        return None
    try:
        kind = Kind(props[TYPE])
    except ValueError:
        raise errors.CloudletImageInvalid(
            image_id=image_id,
            reason=f"{TYPE}={props[TYPE]!r} is not one of {[k.value for k in Kind]}",
        ) from None
    base_id = props.get(BASE_ID, "")
    if not is_base_id(base_id):
        raise errors.CloudletImageInvalid(
            image_id=image_id, reason=f"{BASE_ID}={base_id!r} is not a 64-hex-digit base id"
        )
    link = {Kind.BASE_DISK: MEMORY_IMAGE, Kind.BASE_MEMORY: DISK_IMAGE}.get(kind, BASE_DISK_IMAGE)
    if not props.get(link):
        if kind is Kind.BASE_DISK:
            raise errors.MissingMemoryImage(
                image_id=image_id, reason=f"the base disk image has no {MEMORY_IMAGE} property"
            )
        raise errors.CloudletImageInvalid(image_id=image_id, reason=f"{link} is not set")
    return CloudletImage(
        image_id=image_id,
        kind=kind,
        base_id=base_id,
        memory_image=props[link] if kind is Kind.BASE_DISK else None,
        disk_image=None if kind is Kind.BASE_DISK else props[link],
        content=content_hash(image),
        cpu=props.get(hardware.CPU_PROPERTY),
    )


class GlanceImages:
    """The Glance calls the driver makes, through Nova's own image API (auth, endpoints, retries
    and the functional tests' GlanceFixture all come with it)."""

    def __init__(self, context: Any, api: Any = None) -> None:
        from nova.image import glance as nova_glance

        self.context = context
        self.api = api if api is not None else nova_glance.API()

    def show(self, image_id: str) -> dict[str, Any]:
        return self.api.get(self.context, image_id)

    def describe(self, image_id: str) -> CloudletImage | None:
        return describe(self.show(image_id))

    def base_images(self, image: CloudletImage) -> tuple[CloudletImage, CloudletImage]:
        """The base disk and memory images that base disk or overlay `image` resumes, as this
        context (the booting user's) reads them: each must be readable, of its kind and hold
        the base id `image` names. Whether their contents really are that base is the cache's
        check (BaseCache.ensure). Raises a CloudletImageUnacceptable subclass."""
        disk = image
        if image.kind is Kind.OVERLAY:
            assert image.disk_image is not None  # describe requires it on an overlay
            disk = self._readable(image, image.disk_image, "base disk image")
            if disk.kind is not Kind.BASE_DISK:
                raise errors.WrongBase(
                    image_id=image.image_id,
                    reason=f"its base disk image {image.disk_image} is not a cloudlet base disk "
                    "image",
                )
            if disk.base_id != image.base_id:
                raise errors.WrongBase(
                    image_id=image.image_id,
                    reason=f"it needs base {image.base_id}, its base disk image "
                    f"{disk.image_id} holds base {disk.base_id}",
                )
        assert disk.memory_image is not None  # describe requires it on a base disk
        memory = self._readable(image, disk.memory_image, "memory image")
        if memory.kind is not Kind.BASE_MEMORY:
            raise errors.MissingMemoryImage(
                image_id=image.image_id,
                reason=f"image {memory.image_id} is not a cloudlet base memory image",
            )
        if memory.base_id != disk.base_id:
            raise errors.WrongBase(
                image_id=image.image_id,
                reason=f"its memory image {memory.image_id} belongs to base {memory.base_id}, "
                f"not {disk.base_id}",
            )
        return disk, memory

    def _readable(self, asked_by: CloudletImage, image_id: str, role: str) -> CloudletImage:
        """A cloudlet image this context may read. Glance answers 404 alike for an image that
        does not exist and one of another project: so does the fault."""
        try:
            image = self.describe(image_id)
        except (nova_exception.ImageNotFound, nova_exception.ImageNotAuthorized):
            raise errors.BaseAccessDenied(
                image_id=asked_by.image_id, base=asked_by.base_id[:16],
                reason=f"its {role} {image_id} is missing or not readable by this project",
            ) from None
        if image is None:
            raise errors.CloudletImageInvalid(
                image_id=asked_by.image_id, reason=f"its {role} {image_id} is no cloudlet image"
            )
        return image

    def fetch_verified(self, image: CloudletImage, consume: Callable[[BinaryIO], Any]) -> Any:
        """Run `consume` over the image's data, hashed as it is read; the rest is drained and
        the digest must be the one Glance recorded at upload (DigestMismatch otherwise), so
        what was consumed is exactly the content `image.content` names."""
        assert image.content is not None  # BaseCache.ensure refuses images without one
        with self.open(image.image_id) as stream:
            reader = _HashingReader(stream, image.content.new_hasher())
            result = consume(reader)
            while reader.read(READ_SIZE):
                pass
        if reader.hexdigest() != image.content.value:
            raise errors.DigestMismatch(
                image_id=image.image_id,
                reason=f"its data does not have the {image.content.algo} digest Glance "
                "recorded at upload",
            )
        return result

    def overlay_source(self, image: CloudletImage) -> GlanceSource:
        """The overlay image as the engine reads it, downloaded with this context (the booting
        user's credentials: Glance decides what they may read)."""
        return GlanceSource(f"glance://{image.image_id}", self._download_range)

    def _download_range(self, image_id: str, offset: int, length: int | None) -> Iterator[bytes]:
        """The engine's Glance downloader. Nova's image API downloads whole images, so a range
        from `offset` > 0 reads and drops the bytes before it: a synthesis into plain images
        reads its overlay once from byte 0 and never asks for another range."""
        with self.open(image_id) as stream:
            while offset > 0:
                dropped = stream.read(min(offset, READ_SIZE))
                if not dropped:
                    return
                offset -= len(dropped)
            while length is None or length > 0:
                block = stream.read(READ_SIZE if length is None else min(length, READ_SIZE))
                if not block:
                    return
                if length is not None:
                    length -= len(block)
                yield block

    def open(self, image_id: str) -> ImageStream:
        """A sequential reader over the image data, filled by a download thread as it arrives."""
        return ImageStream(lambda sink: self.api.download(self.context, image_id, data=sink),
                           name=f"glance image {image_id}")


class _HashingReader(io.RawIOBase):
    """Reads through to `raw`, feeding every byte read to `hasher`."""

    def __init__(self, raw: io.RawIOBase, hasher: Any) -> None:
        super().__init__()
        self._raw = raw
        self._hasher = hasher

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._raw.readinto(b)
        self._hasher.update(memoryview(b)[:n])
        return n

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


class _Closed(Exception):
    """The reader went away: stop the download."""


class ImageStream(io.RawIOBase):
    """File-like reader fed by a thread that runs `download(sink)`; sink.write() blocks when the
    reader is behind (bounded memory) and fails once the reader is closed."""

    def __init__(self, download: Callable[[Any], Any], name: str) -> None:
        super().__init__()
        self.name = name
        self._q: queue.Queue[bytes | BaseException | None] = queue.Queue(_QUEUE_DEPTH)
        self._buf = b""
        self._eof = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(download,), name="glance-download", daemon=True
        )
        self._thread.start()

    def _run(self, download: Callable[[Any], Any]) -> None:
        try:
            download(self)
        except BaseException as e:  # handed to the reader, raised there
            self._put(e)
        else:
            self._put(None)

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        if item is not None and not isinstance(item, BaseException):
            raise _Closed()

    def write(self, data: bytes) -> int:  # the download thread's side
        if data:
            self._put(bytes(data))
        return len(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf and not self._eof:
            item = self._q.get()
            if item is None:
                self._eof = True
            elif isinstance(item, BaseException):
                self._eof = True
                raise item
            else:
                self._buf = item
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._q.get(timeout=0.1)
                except queue.Empty:
                    pass
            self._thread.join()
        super().close()


def write_sparse(src: BinaryIO, out: BinaryIO) -> int:
    """Copy `src` to `out` seeking over all-zero blocks; returns the length."""
    zero = bytes(READ_SIZE)
    total = 0
    while True:
        block = src.read(READ_SIZE)
        if not block:
            break
        if block == zero[: len(block)]:
            out.seek(len(block), os.SEEK_CUR)
        else:
            out.write(block)
        total += len(block)
    out.truncate(total)
    return total


def write_memory_bundle(base: BaseVM, out: BinaryIO) -> None:
    """Write the base-memory image data of `base` (see the module docstring) to `out`."""
    with zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False) as z:
        with tarfile.open(fileobj=z, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name in BUNDLE_MEMBERS:
                path = base.path / name
                if name in base.files:
                    info = tarfile.TarInfo(name)
                    info.size = path.stat().st_size
                    info.mode = 0o444
                    with open(path, "rb") as f:
                        tar.addfile(info, f)


def read_memory_bundle(src: BinaryIO, dest: Path, image_id: str) -> list[str]:
    """Extract a memory bundle into `dest` (memory.img sparse); returns the member names.

    Only the known member names are accepted, each once; the contents are checked later by
    recomputing the base id."""
    names: list[str] = []
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(src, closefd=False)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if member.name not in BUNDLE_MEMBERS or member.name in names or not member.isfile():
                    raise errors.CloudletImageInvalid(
                        image_id=image_id,
                        reason=f"memory bundle member {member.name!r} is not expected",
                    )
                f = tar.extractfile(member)
                assert f is not None  # isfile() above
                with open(dest / member.name, "wb") as out:
                    write_sparse(f, out)
                names.append(member.name)
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
        raise errors.CloudletImageInvalid(
            image_id=image_id, reason=f"the memory bundle is damaged: {e}"
        ) from e
    missing = {CONFIG, LAYOUT, MEMORY} - set(names)
    if missing:
        raise errors.MissingMemoryImage(
            image_id=image_id, reason=f"the memory bundle lacks {sorted(missing)}"
        )
    return names

"""Base-VM packages (.cbase): move a base VM between cloudlets as one verifiable stream.

A package is a zstd-compressed POSIX (pax) tar stream. The first member is `manifest.json`, then
the base's files, small ones first: vm-config.json, memory.layout, kernel, initrd, memory.img,
disk.raw. Chunk indexes are not shipped: the importer rebuilds them, and with them recomputes the
image digests and the base id, so nothing in a package is trusted. Export and import both stream
(bounded memory for any image size) and both are atomic: a temp file renamed into place, a
staging directory registered in one step or removed.
"""

import hashlib
import json
import logging
import os
import shutil
import tarfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from cloudlet.basevm.identity import (
    canonical_json,
    compute_base_id,
    config_sha256,
    is_base_id,
)
from cloudlet.basevm.store import (
    CONFIG,
    DISK,
    INDEXED_IMAGES,
    INITRD,
    KERNEL,
    LAYOUT,
    MEMORY,
    PRIMARY_FILES,
    REQUIRED_FILES,
    BaseStore,
    BaseVM,
    FileInfo,
    read_config,
)
from cloudlet.errors import BaseExists, BasePackageError
from cloudlet.fsutil import fsync_dir
from cloudlet.hashing import READ_SIZE
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.config import VMConfig
from cloudlet.hypervisor.qemu import check_host_can_resume
from cloudlet.index import ChunkIndex
from cloudlet.memory.stream import MemoryLayout
from cloudlet.overlay.format import MAGIC as OVERLAY_MAGIC

log = logging.getLogger(__name__)

PACKAGE_FORMAT = "cloudlet-base-package"
PACKAGE_VERSION = 1
SUFFIX = ".cbase"
MANIFEST = "manifest.json"
MEMBER_ORDER = (CONFIG, LAYOUT, KERNEL, INITRD, MEMORY, DISK)
ZSTD_LEVEL = 3
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # every package is one zstd frame
_STREAM_BUFFER = 4 * READ_SIZE
_GiB = 1 << 30
MAX_MANIFEST_SIZE = 16 << 20
_MAX_TRAILER = 1 << 20  # zero padding allowed after the tar end
# Anything larger is a corrupt or hostile manifest, refused before a byte is written.
MAX_FILE_SIZE = {
    DISK: 16 << 40,
    MEMORY: 4 << 40,
    LAYOUT: 1 * _GiB,
    CONFIG: 16 << 20,
    KERNEL: 1 * _GiB,
    INITRD: 4 * _GiB,
}


@dataclass
class PackageManifest:
    """What a package promises: the base id, its digests, and every file with size + sha256."""

    base_id: str
    name: str
    created: str
    config: dict[str, Any]
    disk_digest: str
    memory_digest: str
    files: dict[str, FileInfo]
    version: int = PACKAGE_VERSION

    @classmethod
    def for_base(cls, base: BaseVM) -> "PackageManifest":
        return cls(
            base_id=base.id,
            name=base.name,
            created=base.created.isoformat(),
            config=base.config,
            disk_digest=base.disk_digest,
            memory_digest=base.memory_digest,
            files={n: base.files[n] for n in MEMBER_ORDER if n in base.files},
        )

    def to_bytes(self) -> bytes:
        doc = {
            "format": PACKAGE_FORMAT,
            "version": self.version,
            "base_id": self.base_id,
            "name": self.name,
            "created": self.created,
            "config": self.config,
            "disk_digest": self.disk_digest,
            "memory_digest": self.memory_digest,
            "files": [
                {"name": n, "size": f.size, "sha256": f.sha256} for n, f in self.files.items()
            ],
        }
        return json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> "PackageManifest":
        """Parse and validate a manifest; every problem is a BasePackageError saying which."""
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BasePackageError(f"{MANIFEST} is not valid JSON: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != PACKAGE_FORMAT:
            raise BasePackageError(f"not a cloudlet base-VM package ({MANIFEST} has no format tag)")
        if doc.get("version") != PACKAGE_VERSION:
            raise BasePackageError(
                f"base-VM package version {doc.get('version')!r} is not supported (this cloudlet "
                f"reads version {PACKAGE_VERSION}): export it again with a matching cloudlet"
            )

        def field(key: str, kind: type) -> Any:
            value = doc.get(key)
            if not isinstance(value, kind):
                raise BasePackageError(
                    f"{MANIFEST}: field {key!r} is missing or not a {kind.__name__}"
                )
            return value

        base_id = field("base_id", str)
        for key in ("base_id", "disk_digest", "memory_digest"):
            if not is_base_id(field(key, str)):
                raise BasePackageError(f"{MANIFEST}: {key} {doc[key]!r} is not 64 hex digits")
        files: dict[str, FileInfo] = {}
        for entry in field("files", list):
            if not isinstance(entry, dict):
                raise BasePackageError(f"{MANIFEST}: a files entry is not an object")
            name, size, sha = entry.get("name"), entry.get("size"), entry.get("sha256")
            if name not in PRIMARY_FILES:
                raise BasePackageError(f"{MANIFEST}: unexpected file {name!r} in the file list")
            if name in files:
                raise BasePackageError(f"{MANIFEST}: file {name} is listed twice")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BasePackageError(f"{MANIFEST}: {name} has an invalid size {size!r}")
            if size > MAX_FILE_SIZE[name]:
                raise BasePackageError(
                    f"{MANIFEST}: {name} claims {size} bytes, more than the "
                    f"{MAX_FILE_SIZE[name]} a base VM may hold: the package is corrupt"
                )
            if not isinstance(sha, str) or not is_base_id(sha):
                raise BasePackageError(f"{MANIFEST}: {name} has an invalid sha256 {sha!r}")
            files[name] = FileInfo(size, sha)
        for name in REQUIRED_FILES:
            if name not in files:
                raise BasePackageError(f"{MANIFEST}: the file list has no {name}")
        return cls(
            base_id=base_id,
            name=field("name", str),
            created=field("created", str),
            config=field("config", dict),
            disk_digest=doc["disk_digest"],
            memory_digest=doc["memory_digest"],
            files=files,
            version=doc["version"],
        )


@dataclass
class ImportResult:
    base: BaseVM
    already_present: bool  # the base was registered before: nothing was written
    manifest: PackageManifest


# -- export -------------------------------------------------------------------------------


class _HashingReader:
    """File wrapper that hashes (and counts) what tarfile copies out of it."""

    def __init__(self, f: BinaryIO, progress: Callable[[int], None] | None, done: int) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self._progress = progress
        self.done = done

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        self.done += len(data)
        if self._progress:
            self._progress(self.done)
        return data


def export_base(
    store: BaseStore | CloudletHome,
    query: str,
    dest: Path,
    *,
    level: int = ZSTD_LEVEL,
    threads: int = -1,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write the base `query` (id, prefix or name) as a package at `dest`; returns `dest`.

    The files are re-hashed on the way out, so a base damaged on this disk is never shipped.
    `threads` is zstd's worker count (-1: one per CPU). `progress` gets file bytes read so far
    (the total is the sum of base.files sizes of the primary files).
    """
    store = _as_store(store)
    base = store.get(query)
    manifest = PackageManifest.for_base(base)
    manifest_bytes = manifest.to_bytes()
    dest = Path(dest).absolute()
    if not dest.parent.is_dir():
        raise BasePackageError(f"cannot write {dest}: {dest.parent} is not a directory")
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    mtime = int(base.created.timestamp())
    cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    try:
        with open(tmp, "xb") as raw:
            with cctx.stream_writer(raw, closefd=False) as zw:
                # bufsize matters: tarfile's stream buffer re-slices itself per bufsize written.
                with tarfile.open(
                    fileobj=zw,
                    mode="w|",
                    format=tarfile.PAX_FORMAT,
                    bufsize=_STREAM_BUFFER,
                    copybufsize=READ_SIZE,
                ) as tar:
                    info = _tarinfo(MANIFEST, len(manifest_bytes), mtime)
                    tar.addfile(info, _BytesReader(manifest_bytes))
                    done = 0
                    for name, want in manifest.files.items():
                        path = base.path / name
                        size = path.stat().st_size
                        if size != want.size:
                            raise BasePackageError(
                                f"base {base.short_id}: {name} is {size} bytes, registered as "
                                f"{want.size}; run `cloudlet base verify {base.short_id}`"
                            )
                        with open(path, "rb") as f:
                            reader = _HashingReader(f, progress, done)
                            tar.addfile(_tarinfo(name, size, mtime), reader)
                            done = reader.done
                        if reader.sha.hexdigest() != want.sha256:
                            raise BasePackageError(
                                f"base {base.short_id}: {name} no longer matches its sha256; "
                                f"run `cloudlet base verify {base.short_id}`"
                            )
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("exported base %s (%s) to %s", base.id, base.name, dest)
    return dest


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk = bytes(self._data[self._pos : end])
        self._pos += len(chunk)
        return chunk


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.type = tarfile.REGTYPE
    return info


# -- import -------------------------------------------------------------------------------


def read_manifest(package: Path) -> PackageManifest:
    """The manifest of a package, reading only its first member."""
    with _CountingReader(package, None) as f, _PackageStream(f, package) as stream:
        return _read_manifest(stream.tar, package)


def import_base(
    store: BaseStore | CloudletHome,
    package: Path,
    *,
    name: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Verify and register the base in `package` (under `name`, default the package's name).

    Every member is checked against the manifest while it streams into a staging directory;
    the indexes are rebuilt and the base id recomputed from the written files. A failure raises
    BasePackageError and leaves nothing behind. A base already registered is reported
    (`already_present`) and not written again. `progress` gets package bytes read so far (the
    total is the package's size).
    """
    store = _as_store(store)
    package = Path(package)
    with _CountingReader(package, progress) as f, _PackageStream(f, package) as stream:
        manifest = _read_manifest(stream.tar, package)
        what = f"base {manifest.name!r} ({manifest.base_id[:12]}) in {package}"
        config = VMConfig.from_dict(manifest.config)
        check_host_can_resume(config, [], what)  # before reading GBs of images
        if store.contains(manifest.base_id):
            existing = store.get(manifest.base_id)
            log.info(
                "base %s from %s is already registered as %r", existing.id, package, existing.name
            )
            return ImportResult(existing, True, manifest)
        staging = store.home.make_staging_dir("import-")
        try:
            verified = _extract_members(stream.tar, package, manifest, staging)
            stream.finish()
            _check_contents(staging, manifest, verified)
            layout = MemoryLayout.from_bytes((staging / LAYOUT).read_bytes())
            check_host_can_resume(config, [layout.saved_by], what)
            try:
                base = store.add_from_directory(
                    staging, name or manifest.name, file_sha256=verified
                )
            except BaseExists:  # registered by someone else while we were importing
                return ImportResult(store.get(manifest.base_id), True, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("imported base %s (%s) from %s", base.id, base.name, package)
    return ImportResult(base, False, manifest)


def _as_store(store: BaseStore | CloudletHome) -> BaseStore:
    return store if isinstance(store, BaseStore) else BaseStore(store)


class _CountingReader:
    """The raw package file, reporting how far into it the decompressor has read."""

    def __init__(self, path: Path, progress: Callable[[int], None] | None) -> None:
        try:
            self._f = open(path, "rb")  # noqa: SIM115 - closed by __exit__
        except OSError as e:
            raise BasePackageError(f"cannot open base package {path}: {e.strerror}") from e
        self._progress = progress
        self.done = 0
        try:
            _check_magic(self._f.read(len(_ZSTD_MAGIC)), path)
        except BaseException:
            self._f.close()
            raise
        self._f.seek(0)

    def __enter__(self) -> "_CountingReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.done += len(data)
        if self._progress:
            self._progress(self.done)
        return data


class _PackageStream:
    """A tar stream reader over zstd; decoding errors become BasePackageError."""

    def __init__(self, f: BinaryIO | _CountingReader, package: Path) -> None:
        self._f = f
        self._package = package

    def __enter__(self) -> "_PackageStream":
        dctx = zstandard.ZstdDecompressor()
        self._reader = dctx.stream_reader(self._f, read_size=READ_SIZE, closefd=False)
        try:
            self.tar = tarfile.open(fileobj=self._reader, mode="r|", bufsize=_STREAM_BUFFER)
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
            raise _corrupt(self._package, e) from e
        return self

    def finish(self) -> None:
        """Read to the end of the zstd frame (which checks its checksum); refuse trailing data.

        The tar end leaves at most a record of zero padding. Bytes already inside tarfile's
        read-ahead buffer are not seen here (they are never written anywhere). A package cut
        inside the final checksum bytes is not noticed either, but by then every member has
        passed its sha256.
        """
        rest = self._reader.read(_MAX_TRAILER + 1)
        while chunk := self._reader.read(_MAX_TRAILER + 1):
            rest += chunk
            if len(rest) > _MAX_TRAILER:
                break
        if len(rest) > _MAX_TRAILER or rest.count(0) != len(rest):
            raise BasePackageError(f"{self._package}: unexpected data after the last member")

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> None:
        self.tar.close()
        self._reader.close()
        if isinstance(exc, (tarfile.TarError, zstandard.ZstdError, EOFError)):
            raise _corrupt(self._package, exc) from exc


def _check_magic(head: bytes, package: Path) -> None:
    """A file that is not a zstd stream at all is the wrong file, not a damaged package."""
    if head == _ZSTD_MAGIC:
        return
    what = "a cloudlet overlay" if head == OVERLAY_MAGIC[: len(head)] and head else "not zstd"
    raise BasePackageError(
        f"{package} is not a base package ({what}): a .cbase file comes from "
        "`cloudlet base export`"
    )


def _corrupt(package: Path, e: BaseException) -> BasePackageError:
    return BasePackageError(
        f"{package} is truncated or corrupt ({type(e).__name__}: {e}): fetch or export it again"
    )


def _read_manifest(tar: tarfile.TarFile, package: Path) -> PackageManifest:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isreg():
        raise BasePackageError(
            f"{package}: the first member is {first.name if first else 'missing'!s}, not "
            f"{MANIFEST}: not a cloudlet base-VM package"
        )
    if first.size > MAX_MANIFEST_SIZE:
        raise BasePackageError(f"{package}: {MANIFEST} is {first.size} bytes: too large")
    f = tar.extractfile(first)
    assert f is not None  # a regular file always has a reader
    data = f.read()
    if len(data) != first.size:
        raise BasePackageError(f"{package} is truncated inside {MANIFEST}")
    return PackageManifest.from_bytes(data)


def _extract_members(
    tar: tarfile.TarFile,
    package: Path,
    manifest: PackageManifest,
    staging: Path,
) -> dict[str, str]:
    """Stream every member into `staging`, checking names, sizes and sha256 against the
    manifest; returns the verified sha256 per file."""
    verified: dict[str, str] = {}
    while (member := tar.next()) is not None:
        name = member.name
        if name.startswith("/") or ".." in name.split("/") or "/" in name or "\\" in name:
            raise BasePackageError(
                f"{package}: member {name!r} points outside the package (path traversal)"
            )
        if name not in manifest.files:
            raise BasePackageError(f"{package}: unexpected member {name!r} (not in {MANIFEST})")
        if name in verified:
            raise BasePackageError(f"{package}: member {name} appears twice")
        if not member.isreg():
            raise BasePackageError(f"{package}: member {name} is not a regular file")
        want = manifest.files[name]
        if member.size != want.size:
            raise BasePackageError(
                f"{package}: member {name} is {member.size} bytes, {MANIFEST} says {want.size}"
            )
        source = tar.extractfile(member)
        assert source is not None
        sha = hashlib.sha256()
        written = copy_sparse(source, staging / name, want.size, sha.update)
        if written != want.size:
            raise BasePackageError(
                f"{package} is truncated: member {name} ends after {written} of {want.size} bytes"
            )
        got = sha.hexdigest()
        if got != want.sha256:
            raise BasePackageError(
                f"{package}: member {name} has sha256 {got}, {MANIFEST} says {want.sha256}: "
                "the package is corrupt; fetch or export it again"
            )
        verified[name] = got
    missing = [n for n in manifest.files if n not in verified]
    if missing:
        raise BasePackageError(
            f"{package} ends without member(s) {', '.join(missing)}: it is truncated or incomplete"
        )
    return verified


def _check_contents(staging: Path, manifest: PackageManifest, verified: dict[str, str]) -> None:
    """Rebuild the chunk indexes and recompute the base id from the files written."""
    config = read_config(staging / CONFIG)
    if canonical_json(config) != canonical_json(manifest.config):
        raise BasePackageError(f"{CONFIG} differs from the configuration in {MANIFEST}")
    digests = {}
    for index, filename in INDEXED_IMAGES.items():
        digests[index] = ChunkIndex.build(staging / filename, staging, index).image_digest
        claimed = manifest.disk_digest if index == "disk" else manifest.memory_digest
        if digests[index] != claimed:
            raise BasePackageError(
                f"{filename}: image digest {digests[index]} differs from {claimed} in {MANIFEST}"
            )
    base_id = compute_base_id(
        digests["disk"],
        digests["memory"],
        verified[LAYOUT],
        config,
        verified.get(KERNEL),
        verified.get(INITRD),
    )
    if base_id != manifest.base_id:
        raise BasePackageError(
            f"the package contents have base id {base_id}, {MANIFEST} says {manifest.base_id} "
            f"(config sha256 {config_sha256(config)}): the package is inconsistent"
        )


_ZERO_BLOCK = bytes(READ_SIZE)


def copy_sparse(
    src: BinaryIO,
    dst: Path,
    size: int | None = None,
    on_block: Callable[[bytes], None] | None = None,
) -> int:
    """Copy `size` bytes (or to EOF) of a stream into a new file `dst`, seeking over all-zero
    1 MiB blocks.

    Memory images are mostly zeros: this keeps them sparse on disk. `on_block` sees every block
    (hashing). Returns the bytes copied; the caller checks it against what it expected.
    """
    done = 0
    # `on_block` (sha256) runs in a worker while this thread writes and reads the next block.
    with (
        open(dst, "xb") as out,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-hash") as pool,
    ):
        pending = None
        while size is None or done < size:
            want = READ_SIZE if size is None else min(READ_SIZE, size - done)
            block = src.read(want)
            if not block:
                break
            if on_block:
                if pending is not None:
                    pending.result()
                pending = pool.submit(on_block, block)
            if len(block) == READ_SIZE and block == _ZERO_BLOCK:
                out.seek(len(block), os.SEEK_CUR)
            else:
                out.write(block)
            done += len(block)
        out.truncate(done)
        if pending is not None:
            pending.result()
    return done

"""The base-VM store: base directories under $CLOUDLET_HOME/bases/<id> and their sqlite registry.

The registry is the truth: a base exists when its row exists. A directory is published by one
atomic rename inside the same write transaction that inserts its row, so readers never see a
half-written base, and a crash leaves at worst an unregistered directory that the next add of the
same id replaces.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloudlet import hashing
from cloudlet.basevm.identity import canonical_json, compute_base_id, config_sha256, is_base_id
from cloudlet.errors import AmbiguousBase, BaseExists, BaseNotFound, BaseVMError
from cloudlet.fsutil import clone_sparse
from cloudlet.hashing import iter_windows, window_digests
from cloudlet.home import CloudletHome
from cloudlet.index import ChunkIndex

log = logging.getLogger(__name__)

DISK = "disk.raw"
MEMORY = "memory.img"
LAYOUT = "memory.layout"
CONFIG = "vm-config.json"
KERNEL = "kernel"
INITRD = "initrd"
REQUIRED_FILES = (DISK, MEMORY, LAYOUT, CONFIG)
OPTIONAL_FILES = (KERNEL, INITRD)
PRIMARY_FILES = REQUIRED_FILES + OPTIONAL_FILES
# Chunk indexes (cloudlet.index.ChunkIndex) of the two images, by index name.
INDEXED_IMAGES = {"disk": DISK, "memory": MEMORY}
_INDEX_FILE = re.compile(r"(disk|memory)\.[A-Za-z0-9_]+\.npy")

MAX_NAME_LENGTH = 200
MIN_PREFIX_LENGTH = 4
SHORT_ID_LENGTH = 12
SQLITE_TIMEOUT = 30.0  # seconds to wait for another process's write transaction

SCHEMA_VERSION = 1
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE bases (
            id TEXT NOT NULL,
            name TEXT NOT NULL,
            created TEXT NOT NULL,
            disk_size INTEGER NOT NULL,
            memory_size INTEGER NOT NULL,
            disk_digest TEXT NOT NULL,
            memory_digest TEXT NOT NULL,
            config TEXT NOT NULL,
            files TEXT NOT NULL
        )""",
        "CREATE UNIQUE INDEX bases_id ON bases (id)",
        "CREATE INDEX bases_name ON bases (name)",
    ),
}


@dataclass(frozen=True)
class FileInfo:
    """Size and sha256 of one file of a base, as registered."""

    size: int
    sha256: str


@dataclass
class BaseVM:
    """A registered base VM: where its files are and what they must hash to."""

    id: str
    name: str
    created: datetime
    path: Path
    disk_size: int
    memory_size: int
    disk_digest: str  # image digest (tree of 4 KiB chunk digests)
    memory_digest: str
    config: dict[str, Any]
    files: dict[str, FileInfo]

    @property
    def short_id(self) -> str:
        return self.id[:SHORT_ID_LENGTH]

    @property
    def disk_path(self) -> Path:
        return self.path / DISK

    @property
    def memory_path(self) -> Path:
        return self.path / MEMORY

    @property
    def memory_layout_path(self) -> Path:
        return self.path / LAYOUT

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def kernel_path(self) -> Path | None:
        return self.path / KERNEL if KERNEL in self.files else None

    @property
    def initrd_path(self) -> Path | None:
        return self.path / INITRD if INITRD in self.files else None

    def summary(self) -> dict[str, Any]:
        """Plain data for listings (`cloudlet base list --json`, the server's GET /v1/bases)."""
        return {
            "id": self.id,
            "name": self.name,
            "created": self.created.isoformat(),
            "disk_size": self.disk_size,
            "memory_size": self.memory_size,
            "config": self.config,
        }

    def chunk_index(self, image: str) -> ChunkIndex:
        """The chunk index of image "disk" or "memory" (digests mapped, not read whole)."""
        return ChunkIndex.load(self.path, image)

    @property
    def layout_sha256(self) -> str:
        return self.files[LAYOUT].sha256

    @property
    def kernel_sha256(self) -> str | None:
        return self.files[KERNEL].sha256 if KERNEL in self.files else None

    @property
    def initrd_sha256(self) -> str | None:
        return self.files[INITRD].sha256 if INITRD in self.files else None

    def expected_id(self) -> str:
        """The id recomputed from the registered digests (equals `id` unless tampered with)."""
        return compute_base_id(
            self.disk_digest,
            self.memory_digest,
            self.layout_sha256,
            self.config,
            self.kernel_sha256,
            self.initrd_sha256,
        )


class BaseStore:
    """Registry + directories of the base VMs of one CloudletHome."""

    def __init__(self, home: CloudletHome) -> None:
        self.home = home
        self._migrate()

    # -- registry -------------------------------------------------------------------------

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """One connection per operation; transactions are explicit (BEGIN IMMEDIATE ... COMMIT)."""
        conn = sqlite3.connect(self.home.registry, timeout=SQLITE_TIMEOUT, isolation_level=None)
        with closing(conn):
            conn.row_factory = sqlite3.Row
            yield conn

    def _migrate(self) -> None:
        with self._db() as conn:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("registry %s: journal mode is %s, not WAL", self.home.registry, mode)
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise BaseVMError(
                        f"registry {self.home.registry} has schema version {version}, newer than "
                        f"this cloudlet understands ({SCHEMA_VERSION}): upgrade cloudlet"
                    )
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    log.info("registry %s: migrating schema to version %d", self.home.registry, v)
                    for statement in _MIGRATIONS[v]:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {v}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _row_to_base(self, row: sqlite3.Row) -> BaseVM:
        files = {
            k: FileInfo(int(v["size"]), v["sha256"]) for k, v in json.loads(row["files"]).items()
        }
        return BaseVM(
            id=row["id"],
            name=row["name"],
            created=datetime.fromisoformat(row["created"]),
            path=self.home.base_dir(row["id"]),
            disk_size=row["disk_size"],
            memory_size=row["memory_size"],
            disk_digest=row["disk_digest"],
            memory_digest=row["memory_digest"],
            config=json.loads(row["config"]),
            files=files,
        )

    def _select(self, conn: sqlite3.Connection, where: str, args: tuple) -> list[BaseVM]:
        rows = conn.execute(f"SELECT * FROM bases WHERE {where} ORDER BY created, id", args)
        return [self._row_to_base(r) for r in rows]

    # -- queries --------------------------------------------------------------------------

    def contains(self, base_id: str) -> bool:
        with self._db() as conn:
            return (
                conn.execute("SELECT 1 FROM bases WHERE id = ?", (base_id,)).fetchone() is not None
            )

    def get(self, query: str) -> BaseVM:
        """The base named by its full id, its name, or a unique id prefix (>= 4 hex digits).

        Tried in that order, so a name wins over an id prefix that happens to spell it.
        """
        q = query.strip()
        with self._db() as conn:
            if is_base_id(q):
                found = self._select(conn, "id = ?", (q,))
                if found:
                    return found[0]
                raise BaseNotFound(f"no base VM with id {q} (see `cloudlet base list`)")
            named = self._select(conn, "name = ?", (q,))
            if len(named) == 1:
                return named[0]
            if len(named) > 1:
                raise AmbiguousBase(
                    f"{len(named)} base VMs are named {q!r}: use an id instead "
                    f"({', '.join(b.short_id for b in named)})"
                )
            prefix = q.lower()
            if len(prefix) >= MIN_PREFIX_LENGTH and re.fullmatch(r"[0-9a-f]+", prefix):
                matches = self._select(conn, "substr(id, 1, ?) = ?", (len(prefix), prefix))
                if len(matches) == 1:
                    return matches[0]
                if len(matches) > 1:
                    raise AmbiguousBase(
                        f"id prefix {prefix!r} matches {len(matches)} base VMs: "
                        + ", ".join(f"{b.short_id} ({b.name})" for b in matches)
                        + "; give more digits"
                    )
        raise BaseNotFound(
            f"no base VM with name, id or id prefix {query!r} in {self.home.path} "
            "(see `cloudlet base list`; id prefixes need at least "
            f"{MIN_PREFIX_LENGTH} hex digits)"
        )

    # -- add ------------------------------------------------------------------------------

    def add_from_directory(
        self,
        staging_dir: Path,
        name: str,
        *,
        file_sha256: Mapping[str, str] | None = None,
    ) -> BaseVM:
        """Register the base VM in `staging_dir`, moving the directory into bases/<id>.

        The directory holds disk.raw, memory.img, memory.layout, vm-config.json and optionally
        kernel, initrd and the chunk indexes (built here when missing). It is consumed on
        success and left as it was on failure. `file_sha256` carries digests the caller has
        just verified (package import) so they are not read again. Adding contents that are
        already registered raises BaseExists: the existing base is kept, the directory is not
        touched.
        """
        _check_name(name)
        src = Path(staging_dir).absolute()
        present = _scan_directory(src)
        config = read_config(src / CONFIG)

        known = dict(file_sha256 or {})
        to_hash = [n for n in present if n in PRIMARY_FILES and n not in known]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="base-sha256") as pool:
            # sha256 runs beside the index build; both mostly release the GIL in hashlib.
            pending = {n: pool.submit(hashing.file_sha256, src / n) for n in to_hash}
            image_digests = {idx: _ensure_index(src, idx, present) for idx in INDEXED_IMAGES}
            known.update({n: f.result() for n, f in pending.items()})
        present = _scan_directory(src)  # now with the index files
        for n in present:
            if n not in known:
                known[n] = hashing.file_sha256(src / n)
        files = {n: FileInfo((src / n).stat().st_size, known[n]) for n in sorted(present)}

        base_id = compute_base_id(
            image_digests["disk"],
            image_digests["memory"],
            files[LAYOUT].sha256,
            config,
            files[KERNEL].sha256 if KERNEL in files else None,
            files[INITRD].sha256 if INITRD in files else None,
        )
        if self.contains(base_id):
            raise _exists(self.get(base_id))

        moved_from: Path | None = None
        if os.stat(src).st_dev != os.stat(self.home.tmp).st_dev:
            # Not on our filesystem: copy next to bases/ first so publishing stays one rename.
            log.info("copying %s into %s (another filesystem)", src, self.home.tmp)
            moved_from, src = src, self.home.make_staging_dir("copy-")
            for n in present:
                clone_sparse(moved_from / n, src / n)

        base = BaseVM(
            id=base_id,
            name=name,
            created=datetime.now(UTC),
            path=self.home.base_dir(base_id),
            disk_size=files[DISK].size,
            memory_size=files[MEMORY].size,
            disk_digest=image_digests["disk"],
            memory_digest=image_digests["memory"],
            config=config,
            files=files,
        )
        try:
            self._publish(src, base)
        except BaseException:
            if moved_from is not None:
                shutil.rmtree(src, ignore_errors=True)
            raise
        if moved_from is not None:
            shutil.rmtree(moved_from, ignore_errors=True)
        log.info("registered base VM %s (%s)", base.id, name)
        return base

    def _publish(self, src: Path, base: BaseVM) -> None:
        """Insert the row and rename the directory into place in one write transaction."""
        files_json = json.dumps(
            {n: {"size": f.size, "sha256": f.sha256} for n, f in base.files.items()}, sort_keys=True
        )
        for n in base.files:
            (src / n).chmod(0o444)  # bases are immutable; VMs run on copy-on-write layers
        src.chmod(0o700)
        with self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("SELECT 1 FROM bases WHERE id = ?", (base.id,)).fetchone():
                    raise _exists(self._select(conn, "id = ?", (base.id,))[0])
                conn.execute(
                    "INSERT INTO bases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        base.id,
                        base.name,
                        base.created.isoformat(),
                        base.disk_size,
                        base.memory_size,
                        base.disk_digest,
                        base.memory_digest,
                        canonical_json(base.config).decode("utf-8"),
                        files_json,
                    ),
                )
                if base.path.exists():
                    log.warning("replacing unregistered leftover directory %s", base.path)
                    self._discard(base.path)
                os.rename(src, base.path)
                try:
                    conn.execute("COMMIT")
                except BaseException:
                    os.rename(base.path, src)
                    raise
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                for n in base.files:
                    if (src / n).exists():
                        (src / n).chmod(0o644)
                raise

    def _discard(self, path: Path) -> None:
        """Move a directory out of bases/ (atomic), then delete it."""
        trash = self.home.tmp / f"deleting-{path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # -- delete / verify ------------------------------------------------------------------

    def delete(self, query: str) -> BaseVM:
        """Unregister a base and delete its files.

        There is no in-use tracking: stop VMs and overlay captures that use the base first
        (running QEMUs keep their open files, but their copy-on-write disks lose their backing
        file).
        """
        base = self.get(query)
        with self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM bases WHERE id = ?", (base.id,))
                trash = None
                if base.path.exists():
                    trash = self.home.tmp / f"deleting-{base.id}-{uuid.uuid4().hex[:8]}"
                    os.rename(base.path, trash)
                try:
                    conn.execute("COMMIT")
                except BaseException:
                    if trash is not None:
                        os.rename(trash, base.path)
                    raise
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        log.info("deleted base VM %s (%s)", base.id, base.name)
        return base

    def verify(self, query: str, progress: Callable[[int], None] | None = None) -> BaseVM:
        """Re-read every file of a base and check it against the registry; raise on the first
        difference, naming the file. `progress` gets the bytes read so far."""
        base = self.get(query)
        if not base.path.is_dir():
            raise BaseVMError(
                f"base {base.short_id} ({base.name}): directory {base.path} is missing"
            )
        on_disk = set(os.listdir(base.path))
        for n in sorted(set(base.files) - on_disk):
            raise BaseVMError(f"base {base.short_id}: file {n} is missing from {base.path}")
        for n in sorted(on_disk - set(base.files)):
            raise BaseVMError(f"base {base.short_id}: unexpected file {n} in {base.path}")
        done = 0
        for n, info in sorted(base.files.items()):
            path = base.path / n
            size = path.stat().st_size
            if size != info.size:
                raise BaseVMError(
                    f"base {base.short_id}: {n} is {size} bytes, registered as {info.size}: the "
                    "file is damaged; delete the base and import it again"
                )
            if n in (DISK, MEMORY):
                sha, image = image_sha256_and_digest(path, size)
                expected = base.disk_digest if n == DISK else base.memory_digest
                if image != expected:
                    raise BaseVMError(
                        f"base {base.short_id}: image digest of {n} is {image}, registered as "
                        f"{expected}: the file is damaged; delete the base and import it again"
                    )
            else:
                sha = hashing.file_sha256(path)
            if sha != info.sha256:
                raise BaseVMError(
                    f"base {base.short_id}: sha256 of {n} is {sha}, registered as {info.sha256}: "
                    "the file is damaged; delete the base and import it again"
                )
            done += size
            if progress:
                progress(done)
        if config_sha256(read_config(base.config_path)) != config_sha256(base.config):
            raise BaseVMError(f"base {base.short_id}: {CONFIG} differs from the registry")
        if base.expected_id() != base.id:
            raise BaseVMError(
                f"base {base.short_id}: registered digests give id {base.expected_id()}, not "
                f"{base.id}: the registry entry is damaged"
            )
        return base

    # Last in the class body: from here on `list` names this method, not the builtin.
    def list(self) -> list[BaseVM]:
        """Every registered base, oldest first."""
        with self._db() as conn:
            return self._select(conn, "1", ())


# -- helpers ------------------------------------------------------------------------------


def _exists(existing: BaseVM) -> BaseExists:
    return BaseExists(
        f"base VM {existing.id} is already registered as {existing.name!r}: same contents, "
        "nothing to add"
    )


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise BaseVMError(f"base VM name {name!r} must be non-empty without surrounding spaces")
    if len(name) > MAX_NAME_LENGTH or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BaseVMError(
            f"base VM name {name!r} must be at most {MAX_NAME_LENGTH} printable characters"
        )


def _scan_directory(path: Path) -> list[str]:
    """The file names in a base directory; refuse anything a base does not hold."""
    if not path.is_dir():
        raise BaseVMError(f"{path} is not a directory")
    names = sorted(os.listdir(path))
    for n in names:
        if n not in PRIMARY_FILES and not _INDEX_FILE.fullmatch(n):
            raise BaseVMError(
                f"unexpected file {n} in base directory {path}: a base holds only "
                f"{', '.join(PRIMARY_FILES)} and chunk indexes"
            )
        if (path / n).is_symlink() or not (path / n).is_file():
            raise BaseVMError(f"{path / n} must be a regular file")
    for n in REQUIRED_FILES:
        if n not in names:
            raise BaseVMError(f"base directory {path} has no {n}")
    return names


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BaseVMError(f"cannot read the VM configuration {path}: {e}") from e
    if not isinstance(config, dict):
        raise BaseVMError(f"{path} must hold a JSON object")
    return config


def _ensure_index(directory: Path, index: str, present: list[str]) -> str:
    """The image digest from the chunk index `index`, building the index if it is missing."""
    image = directory / INDEXED_IMAGES[index]
    if all(f"{index}.{kind}.npy" in present for kind in ("digests", "lookup")):
        idx = ChunkIndex.load(directory, index)
    else:
        log.info("building the %s chunk index of %s", index, image)
        idx = ChunkIndex.build(image, directory, index)
    return idx.image_digest


def image_sha256_and_digest(path: Path, size: int | None = None) -> tuple[str, str]:
    """Plain sha256 and chunk-tree image digest of an image in one read."""
    sha, tree = hashlib.sha256(), hashlib.sha256()  # tree: the chunk digests, as tree_digest
    for _, data in iter_windows(path, size):
        sha.update(data)
        tree.update(window_digests(data).tobytes())
    return sha.hexdigest(), tree.hexdigest()

"""The FUSE filesystem of one synthesis: its images, views of them, stats.json and trace.jsonl.

QEMU starts on these files before the overlay has fully arrived (early start); a read of a chunk
still on its way waits, bounded, for the pipeline to supply it.
"""

import atexit
import errno
import itertools
import json
import logging
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from cloudlet.errors import FilesystemError
from cloudletfs.mount import FuseMount, mfusepy
from cloudletfs.state import ChunkStore, ImageSpec, View

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"
TRACE_FILE = "trace.jsonl"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


class _Operations(mfusepy.Operations):
    """FUSE callbacks (run on libfuse's threads): map each file to the chunk store."""

    use_ns = True

    def __init__(self, store: ChunkStore, views: Sequence[View], on_ready: Callable[[], None],
                 report: Callable[[str], bytes], max_readahead: int | None) -> None:
        self._store = store
        self._max_readahead = max_readahead
        self._views = {"/" + v.name: v for v in views}
        self._images = {"/" + name: name for name in store.names()}
        self._reports = {"/" + STATS_FILE: STATS_FILE, "/" + TRACE_FILE: TRACE_FILE}
        self._on_ready = on_ready
        self._report = report
        self._snapshots: dict[int, bytes] = {}
        self._handles = itertools.count(1)
        self._lock = threading.Lock()
        self._uid, self._gid = os.getuid(), os.getgid()
        self._time = time.time_ns()

    def init_with_config(self, conn: mfusepy.fuse_conn_info, config: object) -> None:
        if self._max_readahead is not None:
            conn.max_readahead = self._max_readahead
        self._on_ready()

    def _size(self, path: str) -> int:
        if path in self._images:
            return self._store.image_size(self._images[path])
        if path in self._views:
            return self._views[path].length
        if path in self._reports:
            return 0  # generated at open and served with direct_io: the size is not known
        raise mfusepy.FuseOSError(errno.ENOENT)

    def getattr(self, path: str, fh: object = None) -> dict:
        times = {"st_atime": self._time, "st_mtime": self._time, "st_ctime": self._time}
        owner = {"st_uid": self._uid, "st_gid": self._gid, **times}
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o700, "st_nlink": 2, **owner}
        size = self._size(path)
        mode = 0o400 if path in self._reports else 0o600
        return {"st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": size,
                "st_blocks": -(-size // 512), "st_blksize": 4096, **owner}

    def readdir(self, path: str, fh: object) -> list[str]:
        if path != "/":
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", *(p[1:] for p in (*self._images, *self._views, *self._reports))]

    def open(self, path: str, fi: mfusepy.fuse_file_info) -> int:
        self._size(path)  # ENOENT for unknown names
        if fi.flags & os.O_TRUNC and path not in self._reports:
            raise mfusepy.FuseOSError(errno.EPERM)  # images have a fixed size
        with self._lock:
            fi.fh = next(self._handles)
            if path in self._reports:
                if fi.flags & _WRITE_FLAGS:
                    raise mfusepy.FuseOSError(errno.EACCES)
                self._snapshots[fi.fh] = self._report(self._reports[path])
                fi.direct_io = 1
        return 0

    def release(self, path: str, fh: mfusepy.fuse_file_info) -> int:
        with self._lock:
            self._snapshots.pop(fh.fh, None)
        return 0

    def read(self, path: str, size: int, offset: int, fh: mfusepy.fuse_file_info) -> bytes:
        if path in self._images:
            return self._store.read(self._images[path], offset, size)
        view = self._views.get(path)
        if view is not None:
            if offset >= view.length:
                return b""
            return self._store.read(view.image, view.offset + offset,
                                    min(size, view.length - offset))
        with self._lock:
            data = self._snapshots.get(fh.fh, b"")
        return data[offset : offset + size]

    def write(self, path: str, data: bytes, offset: int, fh: mfusepy.fuse_file_info) -> int:
        if path in self._images:
            return self._store.write(self._images[path], offset, data)
        raise mfusepy.FuseOSError(errno.EROFS)  # views are read-only windows

    def truncate(self, path: str, length: int, fh: object = None) -> int:
        if path in self._reports or length != self._size(path):
            raise mfusepy.FuseOSError(errno.EPERM)
        return 0


class CloudletFS:
    """The images of one synthesis, served from base + layer files while chunks still arrive.

    Reads of PENDING chunks call `on_demand(frame)` (must not block) and wait up to
    `fetch_deadline` seconds; then the read fails with EIO and the filesystem is failed, so later
    pending reads fail at once. Guest writes are copy-on-write into the layer files.

    A kernel read covers the readahead window too (128 KiB unless `max_readahead` bytes is
    given), so a read waits for every pending chunk in it; smaller windows cut the wait of a
    guest's first touch, larger ones prefetch. `allow_other` lets other users (libvirt's qemu)
    reach the files. `on_failure(error)` is called (on a thread of its own) when the fs fails
    itself: a read passed the deadline, or on_demand raised.
    """

    def __init__(self, mountpoint: Path, images: list[ImageSpec], views: Sequence[View] = (), *,
                 on_demand: Callable[[int], None], fetch_deadline: float = 60.0,
                 trace: bool = True, allow_other: bool = False,
                 max_readahead: int | None = None,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        names = [spec.name for spec in images] + [v.name for v in views]
        sizes = {spec.name: spec.size for spec in images}
        for name in names:
            if "/" in name or name in (STATS_FILE, TRACE_FILE, "", ".", ".."):
                raise FilesystemError(f"{name!r} cannot name a file of the mount")
        if len(set(names)) != len(names):
            raise FilesystemError(f"file names of the mount are not unique: {names}")
        for v in views:
            if v.image not in sizes or v.offset < 0 or v.length < 0 \
                    or v.offset + v.length > sizes[v.image]:
                raise FilesystemError(f"view {v.name} does not lie inside an image of the mount")
        self.mountpoint = Path(mountpoint)
        self._names = set(names)
        self._store = ChunkStore(images, on_demand, fetch_deadline, trace, on_failure)
        self._mount = FuseMount(
            self.mountpoint,
            _Operations(self._store, views, self._on_ready, self._report, max_readahead),
            fsname="cloudletfs",
            allow_other=allow_other,
        )

    def _on_ready(self) -> None:
        self._mount.mark_ready()

    def _report(self, name: str) -> bytes:
        if name == STATS_FILE:
            return json.dumps(self.stats(), indent=1).encode() + b"\n"
        return b"".join(json.dumps(row).encode() + b"\n" for row in self.trace())

    def mount(self, timeout: float = 30.0) -> None:
        """Mount; returns once the kernel talks to the filesystem (FilesystemError if not
        within `timeout`)."""
        self._store.start_clock()
        self._mount.start(timeout)
        _live.add(self)

    def path(self, name: str) -> Path:
        """Path of an image, a view, stats.json or trace.jsonl in the mount."""
        if name not in self._names and name not in (STATS_FILE, TRACE_FILE):
            raise FilesystemError(f"no file named {name} in the mount at {self.mountpoint}")
        return self.mountpoint / name

    def write_chunks(self, name: str, chunks: np.ndarray, data: np.ndarray) -> None:
        """Overlay chunks arrived: (len(chunks), 4096) uint8 rows; never over the guest's."""
        self._store.write_chunks(name, chunks, data)

    def zero_chunks(self, name: str, chunks: np.ndarray) -> None:
        """Chunks that read as zeros; never over the guest's."""
        self._store.zero_chunks(name, chunks)

    def fail(self, error: BaseException) -> None:
        """The missing chunks will not arrive: waiting and later pending reads fail with EIO."""
        self._store.fail(error)

    def stats(self) -> dict:
        return self._store.stats()

    def trace(self) -> list[dict]:
        """First access per chunk: {"t","image","chunk","op","state","frame","wait"}."""
        return self._store.trace()

    def unmount(self, timeout: float = 10.0) -> None:
        """Release waiting reads (EIO), unmount (bounded), close the files."""
        self._store.interrupt()
        self._mount.stop(timeout)
        _live.discard(self)
        self._store.close()

    def __enter__(self) -> "CloudletFS":
        self.mount()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.unmount()


_live: "weakref.WeakSet[CloudletFS]" = weakref.WeakSet()


@atexit.register
def _unmount_all() -> None:
    """A process that exits with its own mount up hangs for ever in the kernel (closing a file
    of the mount waits for serving threads that are gone): unmount what is still mounted."""
    for fs in list(_live):
        try:
            fs.unmount(5.0)
        except FilesystemError as e:
            log.error("at exit: %s", e)

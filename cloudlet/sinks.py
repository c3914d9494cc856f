"""Where synthesized chunks go: the ChunkSink protocol and FileSink (plain output files).

A sink only stores bytes; hashing the chunks and verifying the result digests is the pipeline's
job, so every sink (plain files here, the cloudletfs mount in synthesis) gets verification for
free and a sink is committed only once both images are proven right.
"""

import ctypes
import errno
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cloudlet.chunks import CHUNK_SIZE, Target, chunk_count
from cloudlet.errors import CloudletError
from cloudlet.fsutil import clone_sparse, fsync_dir

if TYPE_CHECKING:
    from cloudlet.pipeline import BaseImages

LOG = logging.getLogger(__name__)

_ZERO_WINDOW = 1 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class ChunkSink(Protocol):
    """Receives the chunks of the two result images from the pipeline's one applier thread."""

    def write(self, target: Target, chunks: np.ndarray, data: np.ndarray) -> None:
        """Store rows of `data` ((k, 4096) uint8) at the sorted int64 `chunks`.

        The sink trims a partial last chunk of the image.
        """

    def zero(self, target: Target, chunks: np.ndarray) -> None:
        """Make the sorted `chunks` read as zeros."""

    def frame_applied(self, index: int) -> None:
        """Every chunk that frame `index` supplies has been written."""

    def abort(self, error: BaseException) -> None:
        """Synthesis failed: readers waiting for chunks must fail now; nothing looks complete."""

    def commit(self) -> None:
        """Everything was written and both result digests verified."""


class FileSink:
    """Plain output files: sparse (reflinked where possible) copies of the base images, cut or
    extended to the result sizes, under temporary names until commit() renames them into place.
    """

    def __init__(
        self,
        base: "BaseImages",
        out_disk: Path,
        out_memory: Path,
        sizes: dict[Target, int],
        fsync: bool = False,
    ) -> None:
        self._fsync = fsync
        self._lock = threading.Lock()  # abort() may come from any thread while a write runs
        self._state = "open"
        self.written_bytes = 0  # bytes written into the outputs (holes excluded)
        outs = {
            Target.DISK: (Path(base.disk), Path(out_disk)),
            Target.MEMORY: (Path(base.memory), Path(out_memory)),
        }
        bases = {b.resolve() for b, _ in outs.values()}
        for _, out in outs.values():
            if out.resolve() in bases:
                raise ValueError(f"output {out} would overwrite a base image")
        self._files: dict[Target, _OutputFile] = {}
        try:
            for target, (src, out) in outs.items():
                self._files[target] = _OutputFile(src, out, sizes[target])
        except BaseException:
            self._discard()
            raise

    def write(self, target: Target, chunks: np.ndarray, data: np.ndarray) -> None:
        with self._lock:
            self._check_open()
            self.written_bytes += self._files[target].write(chunks, data)

    def zero(self, target: Target, chunks: np.ndarray) -> None:
        with self._lock:
            self._check_open()
            self.written_bytes += self._files[target].zero(chunks)

    def frame_applied(self, index: int) -> None:
        """Plain files have no readers waiting for a frame."""

    def abort(self, error: BaseException) -> None:
        with self._lock:
            if self._state != "open":
                return
            self._state = "aborted"
            self._discard()
        LOG.debug("discarded partial outputs: %s", error)

    def commit(self) -> None:
        with self._lock:
            self._check_open()
            try:
                for f in self._files.values():
                    f.finish(self._fsync)
                for f in self._files.values():
                    os.replace(f.tmp, f.out)
                if self._fsync:
                    for parent in {f.out.parent for f in self._files.values()}:
                        fsync_dir(parent)
            except BaseException:
                self._state = "aborted"
                self._discard()
                raise
            self._state = "committed"

    def _check_open(self) -> None:
        if self._state != "open":
            raise CloudletError(f"the synthesized images were already {self._state}")

    def _discard(self) -> None:
        for f in self._files.values():
            f.discard()


class _OutputFile:
    """One result image being built under a temporary name next to its final path."""

    def __init__(self, base: Path, out: Path, size: int) -> None:
        self.out = out
        self.size = size
        self.count = chunk_count(size)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        self.fd = fd
        self.tmp = Path(tmp)
        try:
            clone_sparse(base, self.tmp)
            os.ftruncate(fd, size)  # cp wrote into the same inode as fd
        except BaseException:
            self.discard()
            raise

    def write(self, chunks: np.ndarray, data: np.ndarray) -> int:
        """Write each run of consecutive chunks with one pwrite; returns bytes written."""
        if len(chunks) == 0:
            return 0
        written = 0
        partial = self.size % CHUNK_SIZE
        for s, e in _runs(chunks):
            first = int(chunks[s])
            buf = memoryview(np.ascontiguousarray(data[s:e])).cast("B")
            if partial and first + (e - s) == self.count:
                buf = buf[: len(buf) - (CHUNK_SIZE - partial)]
            _pwrite_all(self.fd, buf, first * CHUNK_SIZE)
            written += len(buf)
        return written

    def zero(self, chunks: np.ndarray) -> int:
        """Punch holes over the chunks; returns bytes written where holes are not supported."""
        written = 0
        for s, e in _runs(chunks):
            offset = int(chunks[s]) * CHUNK_SIZE
            length = min(int(chunks[e - 1] + 1) * CHUNK_SIZE, self.size) - offset
            written += _zero_range(self.fd, offset, length)
        return written

    def finish(self, fsync: bool) -> None:
        if fsync:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


def _runs(chunks: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index pairs of the runs of consecutive numbers in sorted `chunks`."""
    breaks = np.flatnonzero(np.diff(chunks) != 1) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    ends = np.concatenate((breaks, [len(chunks)])).tolist()
    return list(zip(starts, ends, strict=True))


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf = buf[n:]
        offset += n


_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _zero_range(fd: int, offset: int, length: int) -> int:
    """Make a range read as zeros: punch a hole, or write zeros where that is not supported.

    Returns the bytes actually written (0 for a hole).
    """
    if _fallocate is not None:
        if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return 0
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, f"punching a hole: {os.strerror(err)}")
    zeros = memoryview(bytes(min(length, _ZERO_WINDOW)))
    done = 0
    while done < length:
        n = min(len(zeros), length - done)
        _pwrite_all(fd, zeros[:n], offset + done)
        done += n
    return length

"""Chunk state of the images one synthesis serves: where each 4 KiB chunk is read from, waiting
for the chunks still on their way, copy-on-write of guest writes, statistics and access trace.

Nothing here knows about FUSE: fs.py turns file operations into these calls.
"""

import enum
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloudlet.chunks import CHUNK_SIZE, chunk_count
from cloudlet.errors import FetchTimeout, FilesystemError

log = logging.getLogger(__name__)


class ChunkState(enum.IntEnum):
    """Where the bytes of one chunk are now."""

    BASE = 0  # the base image, same offset
    ZERO = 1  # zeros
    PENDING = 2  # not arrived yet: a read waits for its frame
    PRESENT = 3  # the layer file, supplied by the overlay
    WRITTEN = 4  # the layer file, written by the guest (the overlay never overwrites it)


_STATE_NAMES = [s.name.lower() for s in ChunkState]


@dataclass
class ImageSpec:
    """One image of the mount. The filesystem owns `state` and `frame` once given and updates
    them in place; `base` is only ever read."""

    name: str  # file name in the mount, e.g. "disk.raw", "memory.img"
    size: int
    base: Path | None  # read-only base image for BASE chunks
    layer: Path  # sparse file holding PRESENT and WRITTEN chunks (created if missing)
    state: np.ndarray  # uint8 per chunk, ChunkState values
    frame: np.ndarray  # int32 per chunk: the frame that supplies a PENDING chunk, else -1


@dataclass
class View:
    """A read-only file showing bytes [offset, offset + length) of an image: QEMU's
    memory-backend-file maps a RAM block from offset 0 of a file."""

    name: str
    image: str
    offset: int
    length: int


def _interrupted() -> OSError:
    return OSError(errno.EIO, "cloudletfs: the chunk will never arrive")


class _Image:
    """An image's spec with its open files and first-access marks."""

    def __init__(self, spec: ImageSpec) -> None:
        n = chunk_count(spec.size)
        self.name = spec.name
        self.size = spec.size
        self.state = spec.state
        self.frame = spec.frame
        if self.state.dtype != np.uint8 or self.state.shape != (n,):
            raise ValueError(f"{spec.name}: state must be uint8[{n}], is {self.state.dtype}"
                             f"{list(self.state.shape)}")
        if self.frame.shape != (n,):
            raise ValueError(f"{spec.name}: frame must have {n} entries")
        if spec.base is None and (self.state == ChunkState.BASE).any():
            raise ValueError(f"{spec.name}: BASE chunks but no base image")
        self.seen = np.zeros(n, dtype=bool)
        self.base_fd = os.open(spec.base, os.O_RDONLY | os.O_CLOEXEC) if spec.base else None
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self.layer_fd: int | None = os.open(spec.layer, flags, 0o600)
        if os.fstat(self.layer_fd).st_size != spec.size:
            os.ftruncate(self.layer_fd, spec.size)

    def close(self) -> None:
        for fd in (self.base_fd, self.layer_fd):
            if fd is not None:
                os.close(fd)
        self.base_fd = self.layer_fd = None


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes at `offset`; past the end of the file reads as zeros (a base image may be
    shorter than the image it underlies)."""
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            return data + bytes(length - len(data))
        data += more
    return data


def _pwrite_full(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of the runs of equal values, so each run is one pread."""
    cuts = (np.flatnonzero(np.diff(values)) + 1).tolist()
    return list(zip([0, *cuts], [*cuts, len(values)], strict=True))


class ChunkStore:
    """The images' chunk state behind one mount, shared by the FUSE threads (guest reads and
    writes) and the pipeline's applier (write_chunks / zero_chunks).

    `_cond` guards the state arrays and counters and wakes readers when chunks arrive; `_layer`
    serialises every write to a layer file so a guest write and the overlay's copy of the same
    chunk never interleave (the guest's data wins).
    """

    def __init__(
        self,
        images: list[ImageSpec],
        on_demand: Callable[[int], None],
        fetch_deadline: float,
        trace: bool,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._images: dict[str, _Image] = {}
        try:
            for spec in images:
                if spec.name in self._images:
                    raise ValueError(f"two images named {spec.name}")
                self._images[spec.name] = _Image(spec)
        except BaseException:
            self.close()
            raise
        self._on_demand = on_demand
        self._on_failure = on_failure
        self._deadline = fetch_deadline
        self._tracing = trace
        self._cond = threading.Condition()
        self._layer = threading.Lock()
        self._error: BaseException | None = None
        self._closing = False
        self._t0 = time.monotonic()
        self._trace: list[tuple[float, str, int, str, int, int, float]] = []
        self._counts = dict.fromkeys(
            ("reads", "read_bytes", "writes", "write_bytes", "demand_misses", "frames_demanded",
             "eio"), 0)
        self._wait_total = 0.0
        self._wait_max = 0.0

    def image_size(self, name: str) -> int:
        return self._image(name).size

    def names(self) -> list[str]:
        return list(self._images)

    def start_clock(self) -> None:
        """Trace times count from here (the mount)."""
        self._t0 = time.monotonic()

    # -- the guest's side (FUSE threads) --------------------------------------------------

    def read(self, name: str, offset: int, size: int) -> bytes:
        """Bytes of an image, waiting (bounded) for pending chunks; OSError(EIO) if they cannot
        arrive."""
        img = self._image(name)
        end = min(offset + size, img.size)
        if offset >= end:
            return b""
        c0, c1 = offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1
        states = self._wait(img, c0, c1, "read")
        with self._cond:
            self._counts["reads"] += 1
            self._counts["read_bytes"] += end - offset
        return self._assemble(img, offset, end, c0, states)

    def write(self, name: str, offset: int, data: bytes) -> int:
        """A guest write, copy-on-write into the layer: a partly written chunk first gets its
        current content (waiting for it if pending); the base is never written."""
        img = self._image(name)
        end = offset + len(data)
        if end > img.size:
            raise OSError(errno.EFBIG, f"{name} has a fixed size of {img.size} bytes")
        if not data:
            return 0
        c0, c1 = offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1
        partial = [
            c for c in sorted({c0, c1 - 1})
            if offset > c * CHUNK_SIZE or end < min((c + 1) * CHUNK_SIZE, img.size)
        ]
        for c in partial:
            self._wait(img, c, c + 1, "write")
        whole = np.setdiff1d(np.arange(c0, c1), partial)
        if len(whole):
            with self._cond:
                self._note_locked(img, whole, "write", img.state[whole], 0.0)
        with self._layer:
            for c in partial:
                with self._cond:
                    st = img.state[c : c + 1].copy()
                if st[0] != ChunkState.WRITTEN:
                    lo, hi = c * CHUNK_SIZE, min((c + 1) * CHUNK_SIZE, img.size)
                    _pwrite_full(img.layer_fd, self._assemble(img, lo, hi, c, st), lo)
            _pwrite_full(img.layer_fd, data, offset)
            with self._cond:
                img.state[c0:c1] = ChunkState.WRITTEN
                self._counts["writes"] += 1
                self._counts["write_bytes"] += len(data)
                self._cond.notify_all()  # a full-chunk write ends a reader's wait too
        return len(data)

    # -- the pipeline's side ----------------------------------------------------------------

    def write_chunks(self, name: str, chunks: np.ndarray, data: np.ndarray) -> None:
        """Chunks from the overlay -> PRESENT, except those the guest has written since."""
        img = self._image(name)
        chunks = np.asarray(chunks, dtype=np.int64)
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(len(chunks), CHUNK_SIZE)
        with self._layer:
            with self._cond:
                keep = img.state[chunks] != ChunkState.WRITTEN
            if not keep.all():
                chunks, data = chunks[keep], data[keep]
            for i, j in _runs(chunks - np.arange(len(chunks))):  # runs of consecutive chunks
                lo = int(chunks[i]) * CHUNK_SIZE
                nbytes = min((j - i) * CHUNK_SIZE, img.size - lo)
                _pwrite_full(img.layer_fd, memoryview(data[i:j]).cast("B")[:nbytes], lo)
            with self._cond:
                img.state[chunks] = ChunkState.PRESENT
                self._cond.notify_all()

    def zero_chunks(self, name: str, chunks: np.ndarray) -> None:
        """Chunks that read as zeros -> ZERO, except those the guest has written since."""
        img = self._image(name)
        chunks = np.asarray(chunks, dtype=np.int64)
        with self._layer, self._cond:
            chunks = chunks[img.state[chunks] != ChunkState.WRITTEN]
            img.state[chunks] = ChunkState.ZERO
            self._cond.notify_all()

    def _report_failure(self, error: BaseException) -> None:
        """Tell the owner the fs failed itself, from a thread of its own: the owner's reaction
        (stop QEMU, unmount) must not run on a FUSE thread, which the unmount waits for."""
        if self._on_failure is not None:
            threading.Thread(
                target=self._on_failure, args=(error,), name="cloudletfs-failure", daemon=True
            ).start()

    def fail(self, error: BaseException) -> None:
        """Pending chunks will never arrive: waiting and future pending reads get EIO."""
        with self._cond:
            if self._error is None:
                self._error = error
                log.error("cloudletfs failed: %s; reads of missing chunks now fail", error)
            self._cond.notify_all()

    def interrupt(self) -> None:
        """Unmounting: wake every waiting read with EIO so the FUSE threads can end."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def close(self) -> None:
        for img in self._images.values():
            img.close()

    # -- statistics ------------------------------------------------------------------------

    def stats(self) -> dict:
        with self._cond:
            return {
                **self._counts,
                "wait_seconds_total": round(self._wait_total, 6),
                "wait_seconds_max": round(self._wait_max, 6),
                "failed": self._error is not None,
                "error": None if self._error is None else str(self._error),
                "traced_chunks": len(self._trace),
                "chunks": {
                    name: dict(zip(_STATE_NAMES, np.bincount(img.state, minlength=5).tolist(),
                                   strict=False))
                    for name, img in self._images.items()
                },
            }

    def trace(self) -> list[dict]:
        keys = ("t", "image", "chunk", "op", "state", "frame", "wait")
        with self._cond:
            return [dict(zip(keys, row, strict=True)) for row in self._trace]

    # -- internals -------------------------------------------------------------------------

    def _image(self, name: str) -> _Image:
        try:
            return self._images[name]
        except KeyError:
            raise FilesystemError(f"no image named {name} in this mount") from None

    def _wait(self, img: _Image, c0: int, c1: int, op: str) -> np.ndarray:
        """Wait until no chunk of [c0, c1) is pending (their frames demanded once), then return
        their states. Bounded by the fetch deadline; OSError(EIO) if it passes or the fs fails."""
        with self._cond:
            first = img.state[c0:c1].copy()
            pending = first == ChunkState.PENDING
            if not pending.any():
                self._note_locked(img, np.arange(c0, c1), op, first, 0.0)
                return first
            self._counts["demand_misses"] += 1
            if self._error is not None or self._closing:
                self._counts["eio"] += 1
                raise _interrupted()
            frames = np.unique(img.frame[c0:c1][pending]).tolist()
            self._counts["frames_demanded"] += len(frames)
        start = time.monotonic()
        for frame in frames:
            try:
                self._on_demand(frame)
            except Exception as e:  # the fetcher is broken: nothing will arrive
                error = FilesystemError(f"demanding frame {frame} failed: {e}")
                self.fail(error)
                self._report_failure(error)
        deadline = start + self._deadline
        with self._cond:
            while True:
                now = img.state[c0:c1]
                if not (now == ChunkState.PENDING).any():
                    break
                left = deadline - time.monotonic()
                if self._error is None and left <= 0:
                    self._error = FetchTimeout(
                        f"{img.name}: chunk(s) of frame(s) {frames[:5]} did not arrive within "
                        f"{self._deadline:g} s; is the overlay source reachable and fast enough?"
                    )
                    log.error("cloudletfs failed: %s", self._error)
                    self._cond.notify_all()
                    self._report_failure(self._error)
                if self._error is not None or self._closing:
                    self._counts["eio"] += 1
                    raise _interrupted()
                self._cond.wait(left)
            waited = time.monotonic() - start
            self._wait_total += waited
            self._wait_max = max(self._wait_max, waited)
            self._note_locked(img, np.arange(c0, c1), op, first, waited)
            return now.copy()

    def _note_locked(self, img: _Image, chunks: np.ndarray, op: str, states: np.ndarray,
                     wait: float) -> None:
        """Trace the first access of each chunk (state as found, before any wait)."""
        if not self._tracing:
            return
        fresh = ~img.seen[chunks]
        if not fresh.any():
            return
        img.seen[chunks[fresh]] = True
        t = round(time.monotonic() - self._t0, 6)
        wait = round(wait, 6)
        for c, st in zip(chunks[fresh].tolist(), states[fresh].tolist(), strict=True):
            self._trace.append((t, img.name, c, op, _STATE_NAMES[st], int(img.frame[c]), wait))

    def _assemble(self, img: _Image, offset: int, end: int, c0: int,
                  states: np.ndarray) -> bytes:
        """Bytes [offset, end) of the image given its chunks' states from chunk c0 on: one
        pread per run of chunks in the same state."""
        parts = []
        for i, j in _runs(states):
            lo = max(offset, (c0 + i) * CHUNK_SIZE)
            hi = min(end, (c0 + j) * CHUNK_SIZE)
            st = states[i]
            if st == ChunkState.ZERO:
                parts.append(bytes(hi - lo))
            elif st == ChunkState.BASE:
                parts.append(_pread_full(img.base_fd, hi - lo, lo))
            elif st in (ChunkState.PRESENT, ChunkState.WRITTEN):
                parts.append(_pread_full(img.layer_fd, hi - lo, lo))
            else:  # the caller waited: a pending chunk here is a bug, never stale data
                raise OSError(errno.EIO, f"{img.name}: chunk {c0 + i} still pending")
        return parts[0] if len(parts) == 1 else b"".join(parts)

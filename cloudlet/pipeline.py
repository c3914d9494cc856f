"""Apply an overlay as concurrent stages: fetch -> verify -> decompress -> apply -> a ChunkSink.

ZERO and BASE_* chunks need no overlay bytes, so start() applies them at once. Frames then flow
through bounded queues (a few frames each, so memory does not grow with the overlay): one thread
reads them in file order, a pool of workers (one per core: sha256 and zstd release the GIL)
verifies, decompresses and hashes their slots, and one applier thread writes them to the sink.
demand(frame) lets a reader that is blocked on a chunk (cloudletfs, early start) pull its frame
ahead of the stream through a second connection; every frame is claimed before it is fetched,
so it is applied exactly once. The pipeline, not the sink, hashes every written chunk and checks
both result digests against the manifest before sink.commit(), so any sink is verified alike.
"""

import hashlib
import logging
import mmap
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cloudlet.chunks import CHUNK_SIZE, Kind, Target, chunk_count
from cloudlet.errors import (
    BaseVMError,
    CloudletError,
    CorruptOverlay,
    SynthesisTimeout,
    TruncatedOverlay,
    VerificationFailed,
    WrongBase,
)
from cloudlet.hashing import DIGEST_SIZE, ZERO_CHUNK_DIGEST, tree_digest_with_overrides
from cloudlet.overlay.reader import OverlayReader
from cloudlet.sinks import ChunkSink, FileSink
from cloudlet.sources.base import OverlaySource
from cloudlet.stats import Stats

__all__ = [
    "BaseImages",
    "ChunkSink",
    "FileSink",
    "FramePlan",
    "Pipeline",
    "Progress",
    "ResultDigests",
    "check_base",
]

LOG = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)

_BASE_BATCH = 256  # BASE_* chunks gathered per write (1 MiB)
_POLL = 0.2  # every blocking wait wakes this often to notice a stop
_JOIN = 10.0  # bound on joining the stage threads
_RESEEK = 4 << 20  # a run of frames taken on demand this long is skipped with a new stream
_SKIP_READ = 1 << 20

# Frame states: who has claimed a frame (so that it is fetched and applied once).
_FREE, _SEQUENTIAL, _DEMANDED, _APPLIED = range(4)


@dataclass
class BaseImages:
    """The base VM's two image files and their chunk digest indexes (may be memory-mapped)."""

    disk: Path
    disk_digests: np.ndarray
    memory: Path
    memory_digests: np.ndarray
    base_id: str

    def image(self, target: Target) -> tuple[Path, np.ndarray]:
        if target is Target.DISK:
            return Path(self.disk), self.disk_digests
        return Path(self.memory), self.memory_digests


def check_base(reader: OverlayReader, base: BaseImages) -> None:
    """Everything about the overlay and the base that can be refused before any output exists.

    WrongBase for an overlay made for another base, BaseVMError for missing or damaged base
    files, CorruptOverlay for references past the end of a base image.
    """
    if reader.base_id != base.base_id:
        raise WrongBase(
            f"overlay {reader.name} was made for base VM {reader.base_id}, "
            f"not for {base.base_id}: synthesize it on a host that holds that base"
        )
    counts = {}
    for target in Target:
        path, digests = base.image(target)
        name = target.name.lower()
        if not path.is_file():
            raise BaseVMError(f"base {name} image {path} is missing")
        count = chunk_count(os.path.getsize(path))
        if digests.shape != (count, DIGEST_SIZE):
            raise BaseVMError(
                f"base {name} index has {digests.shape[0]} chunk digests but {path} has "
                f"{count} chunks: the base VM is damaged, re-import it"
            )
        counts[target] = count
    rows = reader.chunk_map
    for kind, src in ((Kind.BASE_DISK, Target.DISK), (Kind.BASE_MEMORY, Target.MEMORY)):
        refs = rows["ref"][rows["kind"] == kind]
        if len(refs) and int(refs.max()) >= counts[src]:
            raise CorruptOverlay(
                f"overlay {reader.name} references {src.name.lower()} chunk {int(refs.max())} "
                f"of a base image with {counts[src]} chunks"
            )


class FramePlan:
    """Which chunks each frame supplies, and the rows (ZERO, BASE_*) that need no frame."""

    def __init__(self, rows: np.ndarray, first_slots: np.ndarray, slot_count: int) -> None:
        self._rows = rows
        self._first_slots = first_slots
        supplied = rows[np.isin(rows["kind"], (Kind.NEW, Kind.SELF))]
        self._by_ref = supplied[np.argsort(supplied["ref"], kind="stable")]
        self._bounds = np.searchsorted(
            self._by_ref["ref"], np.append(first_slots, np.uint64(slot_count))
        )

    @classmethod
    def of(cls, reader: OverlayReader) -> "FramePlan":
        first = np.array([fr.first_slot for fr in reader.frames], dtype=np.uint64)
        return cls(reader.chunk_map, first, reader.slot_count)

    def supplied(self, target: Target) -> tuple[np.ndarray, np.ndarray]:
        """(chunks, frame index) of the NEW and SELF chunks of one image, sorted by chunk."""
        rows = self._rows
        mine = rows[(rows["target"] == target) & np.isin(rows["kind"], (Kind.NEW, Kind.SELF))]
        frames = np.searchsorted(self._first_slots, mine["ref"], side="right") - 1
        return mine["chunk"].astype(np.int64), frames.astype(np.int32)

    def zero(self, target: Target) -> np.ndarray:
        """The ZERO chunks of one image, sorted."""
        rows = self._rows
        return rows["chunk"][(rows["target"] == target) & (rows["kind"] == Kind.ZERO)].astype(
            np.int64
        )

    def base(self, target: Target) -> list[tuple[Target, np.ndarray, np.ndarray]]:
        """(source base image, chunks, source chunks) of the BASE_* chunks of one image."""
        rows = self._rows
        out = []
        for kind, src in ((Kind.BASE_DISK, Target.DISK), (Kind.BASE_MEMORY, Target.MEMORY)):
            sel = rows[(rows["target"] == target) & (rows["kind"] == kind)]
            if len(sel):
                out.append((src, sel["chunk"].astype(np.int64), sel["ref"].astype(np.int64)))
        return out

    def frame_rows(self, index: int) -> list[tuple[Target, np.ndarray, np.ndarray]]:
        """(image, sorted chunks, slot within the frame) of every chunk frame `index` supplies."""
        sub = self._by_ref[self._bounds[index] : self._bounds[index + 1]]
        out = []
        for target in Target:
            mine = sub[sub["target"] == target]
            if len(mine):
                mine = mine[np.argsort(mine["chunk"], kind="stable")]
                rel = (mine["ref"] - self._first_slots[index]).astype(np.int64)
                out.append((target, mine["chunk"].astype(np.int64), rel))
        return out


class ResultDigests:
    """The digest of one result image from its base index plus the chunks written over it.

    Only written chunks are hashed; untouched chunks take their digests from the base index
    (hashing.tree_digest_with_overrides), so verifying a multi-GiB image reads nothing of it.
    """

    def __init__(self, target: Target, base: Path, base_digests: np.ndarray, size: int) -> None:
        self.target = target
        self.base = base
        self.base_size = os.path.getsize(base)
        self.base_digests = base_digests
        self.size = size
        self.count = chunk_count(size)
        self._chunks: list[np.ndarray] = []  # written chunks and their digests, in write order
        self._digests: list[np.ndarray] = []

    def chunk_len(self, chunk: int) -> int:
        return min(CHUNK_SIZE, self.size - chunk * CHUNK_SIZE)

    def record(self, chunks: np.ndarray, digests: np.ndarray) -> None:
        """Digests of chunks just written (a chunk recorded again keeps its last digest)."""
        self._chunks.append(np.asarray(chunks, dtype=np.int64))
        self._digests.append(np.asarray(digests, dtype=np.uint8).reshape(-1, DIGEST_SIZE))

    def record_rows(
        self, chunks: np.ndarray, data: np.ndarray, digests: np.ndarray | None = None
    ) -> None:
        """Chunks written from rows of `data`; `digests` of the full rows if already known.

        The image's partial last chunk is hashed as the sink stores it: cut to the image size.
        """
        if len(chunks) == 0:
            return
        if digests is None:
            digests = _slot_digests(np.ascontiguousarray(data))
        if self.size % CHUNK_SIZE and chunks[-1] == self.count - 1:
            digests = np.array(digests, dtype=np.uint8, copy=True)
            tail = data[-1][: self.chunk_len(self.count - 1)].tobytes()
            digests[-1] = np.frombuffer(hashlib.sha256(tail).digest(), np.uint8)
        self.record(chunks, digests)

    def record_zero(self, chunks: np.ndarray) -> None:
        """Chunks made to read as zeros."""
        if len(chunks) == 0:
            return
        digests = np.empty((len(chunks), DIGEST_SIZE), dtype=np.uint8)
        digests[:] = np.frombuffer(ZERO_CHUNK_DIGEST, dtype=np.uint8)
        if self.size % CHUNK_SIZE and chunks[-1] == self.count - 1:
            tail = bytes(self.chunk_len(self.count - 1))
            digests[-1] = np.frombuffer(hashlib.sha256(tail).digest(), np.uint8)
        self.record(chunks, digests)

    def modified(self) -> np.ndarray:
        return np.concatenate(self._chunks) if self._chunks else np.empty(0, np.int64)

    def digest(self) -> str:
        """The result image's digest (hex), once every chunk has been written."""
        self._hash_boundary()
        if not self._digests:
            return tree_digest_with_overrides(self.base_digests, self.count, [], [])
        digests = np.concatenate(self._digests)
        return tree_digest_with_overrides(self.base_digests, self.count, self.modified(), digests)

    def verify(self, expected: str) -> None:
        got = self.digest()
        if got != expected:
            raise VerificationFailed(
                f"synthesized {self.target.name.lower()} image has digest {got}, the overlay "
                f"promises {expected}: the base image differs from its index or the overlay "
                "was made wrongly"
            )

    def _hash_boundary(self) -> None:
        """Untouched chunks that cutting or extending the base changed: hash their new content.

        That content is the base's bytes, cut to the result size or padded with zeros.
        """
        if self.size == self.base_size or self.count == 0:
            return
        candidates = {chunk_count(self.base_size) - 1, self.count - 1}
        modified = self.modified()
        for chunk in sorted(c for c in candidates if 0 <= c < self.count):
            if np.isin(chunk, modified):
                continue
            length = self.chunk_len(chunk)
            offset = chunk * CHUNK_SIZE
            with open(self.base, "rb") as f:
                data = os.pread(f.fileno(), max(0, min(length, self.base_size - offset)), offset)
            data += bytes(length - len(data))
            self.record(np.array([chunk]), np.frombuffer(hashlib.sha256(data).digest(), np.uint8))


@dataclass
class _Frame:
    """A frame moving through the stages: compressed bytes, then its raw slots and digests."""

    index: int
    data: bytes
    urgent: bool = False  # demanded: goes ahead of the stream order at every stage
    verified: bool = False  # read through the reader, which checked it already
    digests: np.ndarray | None = None  # (slots, 32) once decompressed


class _StageQueue:
    """A bounded queue between two stages; urgent (demanded) frames go first, with their own
    bound. Every wait wakes at least every _POLL seconds to notice `stop`."""

    def __init__(self, capacity: int, stop: threading.Event) -> None:
        self.capacity = capacity
        self.high_water = 0
        self._normal: deque[_Frame] = deque()
        self._urgent: deque[_Frame] = deque()
        self._cond = threading.Condition()
        self._stop = stop

    def put(self, item: _Frame) -> bool:
        """Wait for room; False if the pipeline stopped first."""
        lane = self._urgent if item.urgent else self._normal
        with self._cond:
            while len(lane) >= self.capacity:
                if self._stop.is_set():
                    return False
                self._cond.wait(_POLL)
            lane.append(item)
            self.high_water = max(self.high_water, len(self._normal) + len(self._urgent))
            self._cond.notify_all()
            return True

    def get(self) -> _Frame | None:
        """The next frame, urgent ones first; None once the pipeline stopped."""
        with self._cond:
            while not (self._urgent or self._normal):
                if self._stop.is_set():
                    return None
                self._cond.wait(_POLL)
            item = self._urgent.popleft() if self._urgent else self._normal.popleft()
            self._cond.notify_all()
            return item

    def promote(self, index: int) -> None:
        """Move a queued frame to the urgent lane (it was demanded while already in flight)."""
        with self._cond:
            for item in self._normal:
                if item.index == index:
                    self._normal.remove(item)
                    item.urgent = True
                    self._urgent.append(item)
                    self._cond.notify_all()
                    return

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class Pipeline:
    """Apply one overlay's frames onto a sink; see the module docstring."""

    def __init__(
        self,
        reader: OverlayReader,
        source: OverlaySource | None,
        base: BaseImages,
        sink: ChunkSink,
        *,
        workers: int | None = None,
        stats: Stats | None = None,
        frames_stream: BinaryIO | None = None,
        progress: Progress | None = None,
    ) -> None:
        """`source` None: frames are read through `reader` (a local file or a pipe).

        `frames_stream`: the stream `reader` was opened from, positioned at the first frame;
        the sequential fetcher keeps reading it instead of opening a new one (the caller
        closes it). `progress` is called from the applier thread after every frame.
        """
        check_base(reader, base)
        self.reader = reader
        self.source = source
        self.sink = sink
        self.plan = FramePlan.of(reader)
        self.results = {t: ResultDigests(t, *base.image(t), reader.images[t].size) for t in Target}
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._stats = stats
        self._frames_stream = frames_stream
        self._progress = progress
        self._random_access = source is not None and source.random_access
        frames = reader.frames
        self._state = np.full(len(frames), _FREE, dtype=np.int8)
        self._lock = threading.Lock()  # frame states and counters
        self._stop = threading.Event()  # every stage ends (success or failure)
        self._done = threading.Event()  # committed, or failed and the sink aborted
        self._error: BaseException | None = None
        self._committing = False
        self._complete = False
        self._started = False
        self._threads: list[threading.Thread] = []
        self._demands: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._clone: OverlaySource | None = None  # the demand fetcher's own connection
        depth = 2 * self.workers
        self._fetched = _StageQueue(depth, self._stop)
        self._decoded = _StageQueue(depth, self._stop)
        self._bytes_total = sum(fr.length for fr in frames)
        self._counters = {
            "frames_applied": 0,
            "bytes_fetched": 0,
            "bytes_fetched_twice": 0,
            "demand_fetches": 0,
            "raw_bytes": 0,
            "in_flight": 0,
            "in_flight_max": 0,
        }
        self._seconds = dict.fromkeys(
            ("base", "fetch", "verify", "decompress", "hash", "apply", "result", "commit"), 0.0
        )

    @property
    def max_in_flight(self) -> int:
        """Most frames ever held between fetch and apply: both lanes of both queues, one per
        worker, the applier's, and one each fetcher holds while it waits for room."""
        return 2 * self._fetched.capacity + 2 * self._decoded.capacity + self.workers + 3

    # -- control ---------------------------------------------------------------------------

    def start(self) -> None:
        """Apply the ZERO and BASE_* chunks now, then start the frame stages."""
        if self._started:
            raise RuntimeError("pipeline already started")
        self._started = True
        t = time.perf_counter()
        try:
            stage = self._stats.stage("apply zero + base chunks") if self._stats else nullcontext()
            with stage:
                self._apply_base_rows()
        except BaseException as e:
            self._fail(e)
            raise
        self._add_seconds("base", time.perf_counter() - t)
        stages: list[tuple[str, Callable[[], None]]] = [("fetch", self._fetch_loop)]
        if self._random_access:
            stages.append(("demand", self._demand_loop))
        stages += [(f"decompress-{i}", self._decompress_loop) for i in range(self.workers)]
        stages.append(("apply", self._apply_loop))
        for name, body in stages:
            thread = threading.Thread(
                target=self._run, args=(body,), name=f"pipeline-{name}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def demand(self, frame: int) -> None:
        """Fetch frame `frame` ahead of the stream, on a second connection; never blocks.

        A frame already applied or on its way is not fetched again (one in a queue is moved
        ahead). Without a random-access source the frame simply arrives in stream order.
        """
        if not 0 <= frame < len(self._state):
            raise ValueError(f"overlay {self.reader.name} has no frame {frame}")
        with self._lock:
            state = self._state[frame]
            claim = state == _FREE and self._random_access and not self._stop.is_set()
            if claim:
                self._state[frame] = _DEMANDED
        if claim:
            self._demands.put(frame)
        elif state == _SEQUENTIAL:
            self._fetched.promote(frame)
            self._decoded.promote(frame)

    def wait(self, timeout: float | None) -> None:
        """Until every frame is applied, both result digests verified and the sink committed.

        Raises the pipeline's failure, or SynthesisTimeout (the pipeline keeps running: the
        caller decides whether to fail() it). None waits as long as the stages run.
        """
        if not self._started:
            raise RuntimeError("start() the pipeline before waiting for it")
        if not self._done.wait(timeout):
            s = self.status()
            raise SynthesisTimeout(
                f"overlay {self.reader.name}: {s['frames_applied']} of {s['frames_total']} "
                f"frames applied ({s['bytes_fetched']} of {s['bytes_total']} bytes fetched) "
                f"after {timeout:.0f} s: the overlay source is too slow or stalled"
            )
        if self._error is not None:
            self._join()
            raise self._error

    def fail(self, error: BaseException) -> None:
        """Stop every stage (bounded) and abort the sink with `error`, unless already done."""
        self._fail(error)
        self._join()

    def close(self) -> None:
        """Stop whatever still runs (the sink is aborted) and join the threads; idempotent."""
        if not self._complete:
            self._fail(CloudletError(f"synthesis of {self.reader.name} was stopped unfinished"))
        self._join()

    def status(self) -> dict:
        with self._lock:
            return {
                "frames_total": len(self._state),
                "bytes_total": self._bytes_total,
                **self._counters,
                "seconds": dict(self._seconds),
                "done": self._complete,
                "error": None if self._error is None else str(self._error),
            }

    # -- stages ----------------------------------------------------------------------------

    def _run(self, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as e:  # noqa: BLE001 - any stage failure fails the synthesis
            self._fail(e)

    def _fetch_loop(self) -> None:
        """Frames in file order; skips frames already taken on demand."""
        frames = self.reader.frames
        stream, own = self._frames_stream, False
        pos = frames[0].offset if frames else 0
        try:
            i = 0
            while i < len(frames) and not self._stop.is_set():
                fr = frames[i]
                with self._lock:
                    taken = self._state[i] != _FREE
                    if not taken:
                        self._state[i] = _SEQUENTIAL
                    free = np.flatnonzero(self._state[i:] == _FREE) if taken else None
                if free is not None:
                    assert self.source is not None  # only a random-access source takes demands
                    if len(free) == 0:
                        return  # every remaining frame was demanded
                    nxt = i + int(free[0])
                    if frames[nxt].offset - pos >= _RESEEK:
                        if own:
                            stream.close()  # type: ignore[union-attr]
                        stream, own = self.source.stream(frames[nxt].offset), True
                        pos, i = frames[nxt].offset, nxt
                        continue
                t = time.perf_counter()
                if self.source is None:
                    data, verified = self.reader.fetch_frame(i), True
                else:
                    if stream is None:
                        stream, own, pos = self.source.stream(fr.offset), True, fr.offset
                    _skip(stream, fr.offset - pos, self.reader.name, i)
                    data, verified = _read_exact(stream, fr.length, self.reader.name, i), False
                    pos = fr.offset + fr.length
                    if i == len(frames) - 1 and not own:
                        self._check_ends(stream)  # before the last frame can complete it
                self._add_seconds("fetch", time.perf_counter() - t)
                if taken:  # read only to get past it: the demand fetcher has it already
                    self._count(bytes_fetched=fr.length, bytes_fetched_twice=fr.length)
                elif not self._queue(_Frame(i, data, verified=verified)):
                    return
                i += 1
        finally:
            if own and stream is not None:
                stream.close()

    def _check_ends(self, stream: BinaryIO) -> None:
        """A one-shot stream (an upload) must end with the overlay: bytes past it would fill
        the sender's pipe with nobody left to read them, and its request would never end."""
        if self.source is None or self.source.random_access:
            return
        if stream.read(1):
            raise CorruptOverlay(
                f"{self.reader.name} goes on past the end of its overlay "
                f"({self.reader.total_length} bytes): send the overlay file only"
            )

    def _demand_loop(self) -> None:
        """Demanded frames by byte range, through a connection of their own."""
        assert self.source is not None
        frames = self.reader.frames
        try:
            while not self._stop.is_set():
                try:
                    index = self._demands.get(timeout=_POLL)
                except queue.Empty:
                    continue
                fr = frames[index]
                clone = self._clone
                if clone is None:
                    clone = self.source.clone()
                    with self._lock:
                        self._clone = clone
                    if self._stop.is_set():  # failed before the clone could be closed
                        return
                t = time.perf_counter()
                data = clone.read_range(fr.offset, fr.length)
                self._add_seconds("fetch", time.perf_counter() - t)
                self._count(demand_fetches=1)
                if not self._queue(_Frame(index, data, urgent=True)):
                    return
        finally:
            self._close_clone()

    def _close_clone(self) -> None:
        """The demand fetcher's connection; closing it wakes a read blocked on it."""
        with self._lock:
            clone, self._clone = self._clone, None
        if clone is not None:
            clone.close()

    def _queue(self, item: _Frame) -> bool:
        with self._lock:
            c = self._counters
            c["bytes_fetched"] += len(item.data)
            c["in_flight"] += 1
            c["in_flight_max"] = max(c["in_flight_max"], c["in_flight"])
        return self._fetched.put(item)

    def _decompress_loop(self) -> None:
        """Verify (sha256 of the compressed bytes) before decoding; hash the slots once."""
        while (item := self._fetched.get()) is not None:
            t = time.perf_counter()
            if not item.verified:
                self.reader.verify_frame(item.index, item.data)
            t1 = time.perf_counter()
            item.data = self.reader.decompress_frame(item.index, item.data)
            t2 = time.perf_counter()
            item.digests = _slot_digests(item.data)
            t3 = time.perf_counter()
            with self._lock:
                self._seconds["verify"] += t1 - t
                self._seconds["decompress"] += t2 - t1
                self._seconds["hash"] += t3 - t2
            if not self._decoded.put(item):
                return

    def _apply_loop(self) -> None:
        total = len(self._state)
        applied = 0
        while applied < total:
            item = self._decoded.get()
            if item is None:
                return
            assert item.digests is not None
            t = time.perf_counter()
            slots = np.frombuffer(item.data, dtype=np.uint8).reshape(-1, CHUNK_SIZE)
            for target, chunks, rel in self.plan.frame_rows(item.index):
                if self._stop.is_set():
                    return
                self._write(target, chunks, _take(slots, rel), _take(item.digests, rel))
            self.sink.frame_applied(item.index)
            applied += 1
            with self._lock:
                self._state[item.index] = _APPLIED
                self._seconds["apply"] += time.perf_counter() - t
                self._counters["frames_applied"] = applied
                self._counters["raw_bytes"] += len(item.data)
                self._counters["in_flight"] -= 1
            if self._progress:
                self._progress("frames", applied, total)
        self._finish()

    def _finish(self) -> None:
        """Both result digests against the manifest, then the sink's commit."""
        t = time.perf_counter()
        for target, result in self.results.items():
            result.verify(self.reader.images[target].digest)
        self._add_seconds("result", time.perf_counter() - t)
        with self._lock:
            if self._error is not None:
                return
            self._committing = True  # from here on only the commit's own failure counts
        t = time.perf_counter()
        try:
            self.sink.commit()
        except BaseException as e:
            self._fail(e, committing=True)
            return
        self._add_seconds("commit", time.perf_counter() - t)
        with self._lock:
            self._complete = True
        self._stop.set()
        self._wake()
        self._done.set()
        LOG.info("applied overlay %s: %s", self.reader.name, self.status())

    # -- chunks ----------------------------------------------------------------------------

    def _apply_base_rows(self) -> None:
        for target in Target:
            zero = self.plan.zero(target)
            if len(zero):
                self.sink.zero(target, zero)
                self.results[target].record_zero(zero)
            for src, chunks, refs in self.plan.base(target):
                self._copy_base(target, src, chunks, refs)

    def _copy_base(self, target: Target, src: Target, chunks: np.ndarray, refs: np.ndarray) -> None:
        """Chunks `refs` of base image `src`, gathered through a read-only mapping."""
        base = _mapped(self.results[src].base)
        full = len(base) // CHUNK_SIZE
        base_chunks = base[: full * CHUNK_SIZE].reshape(full, CHUNK_SIZE)
        for s in range(0, len(chunks), _BASE_BATCH):
            r = refs[s : s + _BASE_BATCH]
            data = np.zeros((len(r), CHUNK_SIZE), dtype=np.uint8)
            inside = r < full
            data[inside] = base_chunks[r[inside]]
            for i in np.flatnonzero(~inside).tolist():  # the base's partial last chunk
                tail = base[full * CHUNK_SIZE :]
                data[i, : len(tail)] = tail
            self._write(target, chunks[s : s + _BASE_BATCH], data)
            _drop_pages(base)

    def _write(
        self,
        target: Target,
        chunks: np.ndarray,
        data: np.ndarray,
        digests: np.ndarray | None = None,
    ) -> None:
        self.sink.write(target, chunks, data)
        self.results[target].record_rows(chunks, data, digests)

    # -- bookkeeping -----------------------------------------------------------------------

    def _fail(self, error: BaseException, committing: bool = False) -> None:
        """Record the first failure, stop every stage, abort the sink once."""
        with self._lock:
            if self._error is not None or self._complete or (self._committing and not committing):
                return
            self._error = error
        LOG.debug("pipeline for %s failed: %s", self.reader.name, error)
        self._stop.set()
        self._wake()
        self._close_clone()
        try:
            self.sink.abort(error)
        except Exception:
            LOG.exception("aborting the synthesis output failed")
        self._done.set()

    def _wake(self) -> None:
        self._fetched.wake()
        self._decoded.wake()

    def _join(self) -> None:
        deadline = time.monotonic() + _JOIN
        for thread in self._threads:
            if thread is threading.current_thread():
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                LOG.warning("pipeline thread %s did not stop within %.0f s", thread.name, _JOIN)

    def _add_seconds(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] += seconds

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, delta in deltas.items():
                self._counters[key] += delta


def _slot_digests(raw: bytes | np.ndarray) -> np.ndarray:
    """sha256 of every 4 KiB slot, as (n, 32) uint8.

    Frames are seldom zero, so unlike hashing.window_digests this skips no zero test and does
    no numpy work per slot: between the hashes (which release the GIL) the workers hold the
    GIL as briefly as possible, which is what lets several of them hash at once.
    """
    view = memoryview(raw).cast("B")
    joined = b"".join(
        [hashlib.sha256(view[i : i + CHUNK_SIZE]).digest() for i in range(0, len(view), CHUNK_SIZE)]
    )
    return np.frombuffer(joined, dtype=np.uint8).reshape(-1, DIGEST_SIZE)


def _take(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    """rows[index]; a view, not a copy, when `index` is a run (a frame's NEW slots in order)."""
    first = int(index[0])
    if int(index[-1]) - first + 1 == len(index) and (np.diff(index) == 1).all():
        return rows[first : first + len(index)]
    return rows[index]


def _read_exact(stream: BinaryIO, length: int, name: str, index: int) -> bytes:
    parts = []
    left = length
    while left:
        block = stream.read(left)
        if not block:
            raise TruncatedOverlay(
                f"overlay {name} ends inside frame {index}: the copy or download was cut short"
            )
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def _skip(stream: BinaryIO, length: int, name: str, index: int) -> None:
    """Read past `length` bytes (a gap before a frame)."""
    while length > 0:
        n = min(length, _SKIP_READ)
        _read_exact(stream, n, name, index)
        length -= n


def _mapped(path: Path) -> np.ndarray:
    """A read-only view of a whole file, paged in by the kernel as chunks are gathered.

    np.memmap owns its mapping (unmapped when the last view goes), so no view outlives it.
    """
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _drop_pages(mapped: np.ndarray) -> None:
    """Unmap the pages of a read-only file mapping that were read (they stay in the page cache).

    Gathered base chunks would otherwise stay in this process's RSS, 4 KiB each, until the end.
    """
    if isinstance(mapped.base, mmap.mmap) and len(mapped.base):
        mapped.base.madvise(mmap.MADV_DONTNEED)

"""Apply an overlay onto the base images: the data half of synthesis.

Each output starts as a sparse (reflinked where the filesystem can) copy of its base image, cut or
extended to the result size. Then ZERO chunks become holes, BASE_* chunks are copied from the base
files, and frames are decompressed one at a time (the next one prefetched in a thread) and their
payload slots written to every chunk that references them. Every written chunk is hashed as it is
written; with the base index for untouched chunks (streamed, never copied whole) that gives the
result digest without reading the image again. Memory scales with the overlay, not the images.
Outputs keep temporary names until both digests match the manifest.
"""

import contextlib
import ctypes
import errno
import hashlib
import logging
import mmap
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cloudlet.chunks import CHUNK_SIZE, Kind, Target, chunk_count
from cloudlet.errors import BaseVMError, CorruptOverlay, VerificationFailed, WrongBase
from cloudlet.fsutil import clone_sparse, fsync_dir
from cloudlet.hashing import DIGEST_SIZE, ZERO_CHUNK_DIGEST, tree_digest_with_overrides
from cloudlet.overlay.format import FrameInfo
from cloudlet.overlay.reader import OverlayReader

LOG = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)

_BATCH = 256  # BASE_* chunks gathered per write batch (1 MiB)
_COPY_WINDOW = 1 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


@dataclass
class ApplyStats:
    """Where the time and bytes of one apply went."""

    seconds: dict[str, float] = field(default_factory=dict)
    compressed_bytes: int = 0  # frame bytes read and verified
    raw_bytes: int = 0  # frame bytes after decompression
    written_bytes: int = 0  # chunk bytes written into the outputs (holes excluded)
    chunks: dict[Target, dict[Kind, int]] = field(default_factory=dict)

    def stage_seconds(self) -> dict[str, float]:
        return dict(self.seconds)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class _Output:
    """One result image being built under a temporary name."""

    def __init__(
        self, target: Target, base: Path, base_digests: np.ndarray, out: Path, size: int
    ) -> None:
        self.target = target
        self.base = base
        self.base_size = os.path.getsize(base)
        self.base_digests = base_digests
        self.out = out
        self.size = size
        self.count = chunk_count(size)
        self._chunks: list[np.ndarray] = []  # written chunks and their digests, in write order
        self._digests: list[np.ndarray] = []
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        self.fd = fd
        self.tmp = Path(tmp)

    def chunk_len(self, chunk: int) -> int:
        return min(CHUNK_SIZE, self.size - chunk * CHUNK_SIZE)

    def record(self, chunks: np.ndarray, digests: np.ndarray) -> None:
        """Digests of chunks just written (a chunk recorded again keeps its last digest)."""
        self._chunks.append(np.asarray(chunks, dtype=np.int64))
        self._digests.append(np.asarray(digests, dtype=np.uint8).reshape(-1, DIGEST_SIZE))

    def modified(self) -> np.ndarray:
        return np.concatenate(self._chunks) if self._chunks else np.empty(0, np.int64)

    def result_digest(self) -> str:
        if not self._digests:
            return tree_digest_with_overrides(self.base_digests, self.count, [], [])
        digests = np.concatenate(self._digests)
        return tree_digest_with_overrides(self.base_digests, self.count, self.modified(), digests)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


def apply_overlay(
    reader: OverlayReader,
    base_disk: Path,
    base_disk_digests: np.ndarray,
    base_memory: Path,
    base_memory_digests: np.ndarray,
    out_disk: Path,
    out_memory: Path,
    expected_base_id: str,
    progress: Progress | None = None,
    fsync: bool = False,
) -> ApplyStats:
    """Build the two result images of `reader` over the base; verify them; rename into place.

    Raises WrongBase (before touching anything) if the overlay was made for another base,
    CorruptOverlay / TruncatedOverlay for a damaged overlay, VerificationFailed when a result
    digest differs from the manifest. On any error no output file is left behind. `fsync`
    makes the outputs durable before the rename (not needed for a VM resumed at once).
    """
    if reader.base_id != expected_base_id:
        raise WrongBase(
            f"overlay {reader.name} was made for base VM {reader.base_id}, "
            f"not for {expected_base_id}: synthesize it on a host that holds that base"
        )
    bases = {
        Target.DISK: (Path(base_disk), base_disk_digests, Path(out_disk)),
        Target.MEMORY: (Path(base_memory), base_memory_digests, Path(out_memory)),
    }
    _check_inputs(reader, bases)
    stats = ApplyStats()
    outputs: dict[Target, _Output] = {}
    try:
        for target, (base, digests, out) in bases.items():
            outputs[target] = _Output(target, base, digests, out, reader.images[target].size)
        t = time.perf_counter()
        for o in outputs.values():
            _copy_base(o)
            if progress:
                progress("copy", o.target + 1, len(outputs))
        stats.add("copy", time.perf_counter() - t)

        t = time.perf_counter()
        for o in outputs.values():
            rows = reader.map_for(o.target)
            per = np.bincount(rows["kind"], minlength=len(Kind))
            stats.chunks[o.target] = {k: int(per[k]) for k in Kind}
            stats.written_bytes += _apply_zero(o, rows["chunk"][rows["kind"] == Kind.ZERO])
            for kind, src in ((Kind.BASE_DISK, Target.DISK), (Kind.BASE_MEMORY, Target.MEMORY)):
                sel = rows[rows["kind"] == kind]
                stats.written_bytes += _apply_base(o, outputs[src], sel["chunk"], sel["ref"])
        stats.add("apply base", time.perf_counter() - t)

        _apply_frames(reader, outputs, stats, progress)

        t = time.perf_counter()
        for o in outputs.values():
            _rehash_boundary(o)
            got = o.result_digest()
            want = reader.images[o.target].digest
            if got != want:
                raise VerificationFailed(
                    f"synthesized {o.target.name.lower()} image has digest {got}, the overlay "
                    f"promises {want}: the base image differs from its index or the overlay was "
                    "made wrongly"
                )
        stats.add("verify", time.perf_counter() - t)

        t = time.perf_counter()
        for o in outputs.values():
            if fsync:
                os.fsync(o.fd)
            os.close(o.fd)
            o.fd = -1
        for o in outputs.values():
            os.replace(o.tmp, o.out)
        if fsync:
            for parent in {o.out.parent for o in outputs.values()}:
                fsync_dir(parent)
        stats.add("finish", time.perf_counter() - t)
    except BaseException:
        for o in outputs.values():
            o.discard()
        raise
    LOG.info(
        "applied overlay %s: %d frames, %d bytes written, %s",
        reader.name,
        len(reader.frames),
        stats.written_bytes,
        ", ".join(f"{k} {v:.2f}s" for k, v in stats.seconds.items()),
    )
    return stats


def _check_inputs(
    reader: OverlayReader, bases: dict[Target, tuple[Path, np.ndarray, Path]]
) -> None:
    """Everything that can be refused before an output file exists."""
    base_counts = {}
    for target, (base, digests, out) in bases.items():
        name = target.name.lower()
        if not base.is_file():
            raise BaseVMError(f"base {name} image {base} is missing")
        count = chunk_count(os.path.getsize(base))
        if digests.shape != (count, DIGEST_SIZE):
            raise BaseVMError(
                f"base {name} index has {digests.shape[0]} chunk digests but {base} has "
                f"{count} chunks: the base VM is damaged, re-import it"
            )
        if out.resolve() in {b.resolve() for b, _, _ in bases.values()}:
            raise ValueError(f"output {out} would overwrite a base image")
        base_counts[target] = count
    rows = reader.chunk_map
    for kind, src in ((Kind.BASE_DISK, Target.DISK), (Kind.BASE_MEMORY, Target.MEMORY)):
        refs = rows["ref"][rows["kind"] == kind]
        if len(refs) and int(refs.max()) >= base_counts[src]:
            raise CorruptOverlay(
                f"overlay {reader.name} references {src.name.lower()} chunk {int(refs.max())} "
                f"of a base image with {base_counts[src]} chunks"
            )


def _rehash_boundary(o: _Output) -> None:
    """Untouched chunks that the cut or extension changed: hash them from the output."""
    if o.size == o.base_size or o.count == 0:
        return
    candidates = {chunk_count(o.base_size) - 1, o.count - 1}
    modified = o.modified()
    for chunk in sorted(c for c in candidates if 0 <= c < o.count):
        if np.isin(chunk, modified):
            continue
        data = os.pread(o.fd, o.chunk_len(chunk), chunk * CHUNK_SIZE)
        o.record(np.array([chunk]), np.frombuffer(hashlib.sha256(data).digest(), np.uint8))


def _write_chunks(o: _Output, chunks: np.ndarray, data: np.ndarray) -> int:
    """Write rows of `data` ((k, 4096) uint8) to the sorted `chunks`; hash each as written."""
    if len(chunks) == 0:
        return 0
    written = 0
    breaks = np.flatnonzero(np.diff(chunks) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(chunks)]))
    last = o.count - 1
    partial = o.size % CHUNK_SIZE
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        first = int(chunks[s])
        block = data[s:e]
        buf = memoryview(np.ascontiguousarray(block)).cast("B")
        if partial and first + (e - s) - 1 == last:
            buf = buf[: len(buf) - (CHUNK_SIZE - partial)]
        _pwrite_all(o.fd, buf, first * CHUNK_SIZE)
        written += len(buf)
        n = e - s
        digests = b"".join(
            hashlib.sha256(buf[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]).digest() for i in range(n)
        )
        o.record(np.arange(first, first + n), np.frombuffer(digests, np.uint8))
    return written


def _apply_zero(o: _Output, chunks: np.ndarray) -> int:
    if len(chunks) == 0:
        return 0
    breaks = np.flatnonzero(np.diff(chunks) != 1) + 1
    starts = chunks[np.concatenate(([0], breaks))].tolist()
    ends = chunks[np.concatenate((breaks - 1, [len(chunks) - 1]))].tolist()
    written = 0
    for a, b in zip(starts, ends, strict=True):
        offset = a * CHUNK_SIZE
        length = min((b + 1) * CHUNK_SIZE, o.size) - offset
        written += _zero_range(o.fd, offset, length)
    digests = np.empty((len(chunks), DIGEST_SIZE), dtype=np.uint8)
    digests[:] = np.frombuffer(ZERO_CHUNK_DIGEST, dtype=np.uint8)
    if o.size % CHUNK_SIZE and chunks[-1] == o.count - 1:
        tail = bytes(o.chunk_len(o.count - 1))
        digests[-1] = np.frombuffer(hashlib.sha256(tail).digest(), np.uint8)
    o.record(chunks, digests)
    return written


def _apply_base(o: _Output, src: _Output, chunks: np.ndarray, refs: np.ndarray) -> int:
    """Copy chunks `refs` of the source base image to chunks `chunks` of output `o`."""
    if len(chunks) == 0:
        return 0
    written = 0
    base = _mapped(src.base)
    full = src.base_size // CHUNK_SIZE
    base_chunks = base[: full * CHUNK_SIZE].reshape(full, CHUNK_SIZE)
    for s in range(0, len(chunks), _BATCH):
        r = refs[s : s + _BATCH].astype(np.int64)
        data = np.zeros((len(r), CHUNK_SIZE), dtype=np.uint8)
        inside = r < full
        data[inside] = base_chunks[r[inside]]
        for i in np.flatnonzero(~inside).tolist():  # the base's partial last chunk
            tail = base[full * CHUNK_SIZE :]
            data[i, : len(tail)] = tail
        written += _write_chunks(o, chunks[s : s + _BATCH], data)
        _drop_pages(base)
    return written


def _apply_frames(
    reader: OverlayReader,
    outputs: dict[Target, _Output],
    stats: ApplyStats,
    progress: Progress | None,
) -> None:
    """NEW and SELF chunks, frame by frame; the next frame is fetched while this one is written."""
    rows = reader.chunk_map[np.isin(reader.chunk_map["kind"], (Kind.NEW, Kind.SELF))]
    order = np.argsort(rows["ref"], kind="stable")
    rows = rows[order]
    frames = reader.frames
    if not frames:
        return
    bounds = np.searchsorted(
        rows["ref"], np.array([fr.first_slot for fr in frames] + [reader.slot_count], np.uint64)
    )
    t_apply = 0.0
    with contextlib.closing(_prefetched(reader, stats)) as loaded:
        for fr, raw in loaded:
            t_apply += _apply_frame(fr, raw, rows, bounds, outputs, stats)
            if progress:
                progress("frames", fr.index + 1, len(frames))
    stats.add("apply frames", t_apply)


def _apply_frame(
    fr: FrameInfo,
    raw: bytes,
    rows: np.ndarray,
    bounds: np.ndarray,
    outputs: dict[Target, _Output],
    stats: ApplyStats,
) -> float:
    t = time.perf_counter()
    sub = rows[bounds[fr.index] : bounds[fr.index + 1]]
    slots = np.frombuffer(raw, dtype=np.uint8).reshape(fr.slot_count, CHUNK_SIZE)
    for target, o in outputs.items():
        mine = sub[sub["target"] == target]
        if len(mine) == 0:
            continue
        mine = mine[np.argsort(mine["chunk"], kind="stable")]
        rel = (mine["ref"] - np.uint64(fr.first_slot)).astype(np.int64)
        stats.written_bytes += _write_chunks(o, mine["chunk"], slots[rel])
    return time.perf_counter() - t


def _prefetched(reader: OverlayReader, stats: ApplyStats) -> Iterator[tuple[FrameInfo, bytes]]:
    """Frames in order, each read+verified and decompressed one step ahead in a thread."""

    def load(index: int) -> tuple[bytes, float, float, int]:
        t0 = time.perf_counter()
        comp = reader.fetch_frame(index)
        t1 = time.perf_counter()
        raw = reader.decompress_frame(index, comp)
        return raw, t1 - t0, time.perf_counter() - t1, len(comp)

    frames = reader.frames
    with ThreadPoolExecutor(1, "overlay-fetch") as pool:
        pending: Future[tuple[bytes, float, float, int]] | None = pool.submit(load, 0)
        try:
            for fr in frames:
                assert pending is not None
                t = time.perf_counter()
                raw, t_read, t_dec, n = pending.result()
                stats.add("wait frames", time.perf_counter() - t)
                stats.add("read + verify frames", t_read)
                stats.add("decompress", t_dec)
                stats.compressed_bytes += n
                stats.raw_bytes += len(raw)
                pending = pool.submit(load, fr.index + 1) if fr.index + 1 < len(frames) else None
                yield fr, raw
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(Exception):
                    pending.result(timeout=600)


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
    zeros = memoryview(bytes(min(length, _COPY_WINDOW)))
    done = 0
    while done < length:
        n = min(len(zeros), length - done)
        _pwrite_all(fd, zeros[:n], offset + done)
        done += n
    return length


def _copy_base(o: _Output) -> None:
    """Start the output as a copy of its base, cut or extended to the result size."""
    clone_sparse(o.base, o.tmp)
    os.ftruncate(o.fd, o.size)  # cp wrote into the same inode as o.fd

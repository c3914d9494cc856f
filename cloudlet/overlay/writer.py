"""Write an overlay: chunk map, blobs and NEW payloads compressed into ~1 MiB frames.

Frames are compressed in a thread pool while the caller keeps capturing (zstd and lzma release
the GIL) and spooled, in slot order, to a temporary file next to the output. `close()` then
assembles header + manifest + chunk map + blobs + frames into another temporary file and renames
it into place, so a crash or an error never leaves a file that looks like a complete overlay.
"""

import hashlib
import logging
import os
import tempfile
import time
from array import array
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

import cloudlet
from cloudlet.chunks import CHUNK_SIZE, Kind, Target, chunk_count
from cloudlet.codecs import Codec, NullCodec, get_codec
from cloudlet.fsutil import fsync_dir, umask_mode
from cloudlet.overlay import format as fmt

LOG = logging.getLogger(__name__)


@dataclass
class OverlayInfo:
    """What `OverlayWriter.close()` produced."""

    path: Path
    size: int  # bytes of the overlay file
    frames: int
    slots: int
    chunks: dict[Target, dict[Kind, int]]  # modified chunks per image and kind
    bytes_in: int  # raw bytes of NEW payload slots
    bytes_out: int  # compressed bytes of all frames
    map_bytes: int  # compressed chunk map
    blob_bytes: int  # compressed blobs
    compress_seconds: float  # CPU time spent in the codec (summed over threads)
    wait_seconds: float  # time the caller was blocked waiting for compression
    close_seconds: float  # assembling, syncing and renaming the file
    extra: dict[str, Any] = field(default_factory=dict)
    access_order: dict[str, Any] | None = None  # meta["access_order"] when a prefix was marked

    @property
    def ratio(self) -> float:
        return self.bytes_in / self.bytes_out if self.bytes_out else 1.0

    def counts_by_kind(self) -> dict[Kind, int]:
        total: Counter[Kind] = Counter()
        for per in self.chunks.values():
            total.update(per)
        return {k: total.get(k, 0) for k in Kind}


class OverlayWriter:
    """Build an overlay file; use as a context manager (an exception discards everything)."""

    def __init__(
        self,
        path: Path,
        base_id: str,
        codec: str = "zstd",
        level: int | None = None,
        frame_size: int = fmt.DEFAULT_FRAME_SIZE,
        workers: int | None = None,
    ) -> None:
        if frame_size <= 0 or frame_size % CHUNK_SIZE or frame_size > fmt.MAX_FRAME_RAW:
            raise ValueError(
                f"frame size {frame_size} must be a multiple of {CHUNK_SIZE} "
                f"up to {fmt.MAX_FRAME_RAW}"
            )
        self.path = Path(path)
        self.base_id = base_id
        self.codec: Codec = get_codec(codec, level)
        self.frame_size = frame_size
        self._images: dict[Target, fmt.ImageInfo] = {}
        self._targets = array("B")
        self._kinds = array("B")
        self._chunks = array("Q")
        self._refs = array("Q")
        self._short: list[tuple[Target, int, int]] = []  # (target, chunk, length) of partial NEW
        self._blobs: dict[str, tuple[bytes, int, bytes]] = {}  # name -> (compressed, raw, sha)
        self._meta: dict[str, Any] = {}
        self._prefix: tuple[int, int, str] | None = None  # (slots, frames, trace sha256)
        self._slots = 0
        self._buffer = bytearray()
        self._frames: list[list[Any]] = []  # manifest frame table rows
        self._spooled = 0
        self._bytes_in = 0
        self._compress_seconds = 0.0
        self._wait_seconds = 0.0
        self._closed = False
        if workers is None:
            workers = min(os.cpu_count() or 1, 4)
        self._pool = ThreadPoolExecutor(workers, "overlay-compress") if workers > 0 else None
        self._max_pending = max(2, 2 * workers)
        self._pending: deque[Future[tuple[bytes, str, float]]] = deque()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, spool = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".frames", dir=self.path.parent
        )
        self._spool_path = Path(spool)
        self._spool: BinaryIO = os.fdopen(fd, "w+b")

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> "OverlayWriter":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    # -- content ---------------------------------------------------------------------------

    def set_image(self, target: Target, size: int, digest: str) -> None:
        """Declare a result image: its size in bytes and its hashing.tree_digest (hex)."""
        if size < 0 or len(digest) != 64:
            raise ValueError(f"image {target!r}: need a size >= 0 and a 64-hex-digit digest")
        int(digest, 16)
        self._images[Target(target)] = fmt.ImageInfo(int(size), digest.lower())

    def add_new(self, target: Target, chunk: int, data: bytes | memoryview) -> int:
        """Store a chunk's bytes as the next payload slot; returns the slot for SELF refs.

        `data` is 4096 bytes, or fewer for the partial last chunk of an image.
        """
        self._check_open()
        n = len(data)
        if not 0 < n <= CHUNK_SIZE:
            raise ValueError(f"chunk data must be 1..{CHUNK_SIZE} bytes, got {n}")
        slot = self._slots
        self._append(target, chunk, Kind.NEW, slot)
        if n < CHUNK_SIZE:
            self._short.append((Target(target), int(chunk), n))
            self._buffer += data
            self._buffer += bytes(CHUNK_SIZE - n)
        else:
            self._buffer += data
        self._slots += 1
        self._bytes_in += CHUNK_SIZE
        if len(self._buffer) >= self.frame_size:
            self._flush_frame()
        return slot

    def add_ref(self, target: Target, chunk: int, kind: Kind, ref: int = 0) -> None:
        """Record a chunk whose content needs no payload: ZERO, BASE_MEMORY/BASE_DISK or SELF."""
        self._check_open()
        kind = Kind(kind)
        if kind is Kind.NEW:
            raise ValueError("NEW chunks carry data: use add_new()")
        if kind is Kind.ZERO:
            ref = 0
        elif kind is Kind.SELF and not 0 <= ref < self._slots:
            raise ValueError(f"SELF ref {ref} is not an earlier payload slot (have {self._slots})")
        self._append(target, chunk, kind, ref)

    def add_blob(self, name: str, data: bytes) -> None:
        """Attach a small named file (memory-layout, vm-config); compressed and digested."""
        self._check_open()
        if not name or len(name) > 255:
            raise ValueError(f"blob name {name!r} must be 1..255 characters")
        if len(data) > fmt.MAX_BLOB_RAW:
            raise ValueError(
                f"blob {name!r} is {len(data)} bytes; blobs are limited to {fmt.MAX_BLOB_RAW}"
            )
        comp = self.codec.compress(data)
        self._blobs[name] = (comp, len(data), hashlib.sha256(comp).digest())

    def set_meta(self, meta: dict[str, Any]) -> None:
        """Free-form creation metadata (msgpack-serialisable), merged into earlier calls."""
        self._meta.update(meta)

    def end_access_prefix(self, trace_sha256: str) -> None:
        """Mark the slots added so far as the ones a trace saw accessed first.

        The current frame is cut here, so the prefix is whole frames a client can fetch alone;
        close() records meta["access_order"] with the prefix's slots, frames and frame bytes.
        """
        self._check_open()
        self._flush_frame()
        self._prefix = (self._slots, len(self._frames), trace_sha256)

    # -- finishing -------------------------------------------------------------------------

    def close(self) -> OverlayInfo:
        """Finish the overlay and rename it into place; on error nothing is left behind."""
        self._check_open()
        try:
            return self._finish()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard everything written so far (temporary files included)."""
        if self._closed:
            return
        self._closed = True
        for fut in self._pending:
            fut.cancel()
        if self._pool:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)

    # -- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("overlay writer is closed")

    def _append(self, target: Target, chunk: int, kind: Kind, ref: int) -> None:
        if chunk < 0 or ref < 0:
            raise ValueError(f"chunk {chunk} / ref {ref} must not be negative")
        self._targets.append(Target(target))
        self._kinds.append(kind)
        self._chunks.append(chunk)
        self._refs.append(ref)

    def _flush_frame(self) -> None:
        raw = bytes(self._buffer)
        self._buffer.clear()
        if not raw:
            return
        first_slot = self._slots - len(raw) // CHUNK_SIZE
        self._frames.append([None, None, len(raw), None, None, first_slot])
        if self._pool is None:
            self._store(self._frames[-1], *_compress(self.codec, raw))
            return
        self._pending.append(self._pool.submit(_compress, self.codec, raw))
        while len(self._pending) >= self._max_pending:
            self._drain_one()

    def _drain_one(self) -> None:
        t = time.perf_counter()
        comp, codec, seconds = self._pending.popleft().result()
        self._wait_seconds += time.perf_counter() - t
        index = len(self._frames) - len(self._pending) - 1
        self._store(self._frames[index], comp, codec, seconds)

    def _store(self, row: list[Any], comp: bytes, codec: str, seconds: float) -> None:
        row[0] = self._spooled  # relative to the first frame; rebased at close
        row[1] = len(comp)
        row[3] = codec
        row[4] = hashlib.sha256(comp).digest()
        self._spool.write(comp)
        self._spooled += len(comp)
        self._compress_seconds += seconds

    def _chunk_map(self) -> np.ndarray:
        n = len(self._kinds)
        rows = np.empty(n, dtype=fmt.MAP_DTYPE)
        rows["target"] = np.frombuffer(self._targets, dtype=np.uint8, count=n)
        rows["kind"] = np.frombuffer(self._kinds, dtype=np.uint8, count=n)
        rows["chunk"] = np.frombuffer(self._chunks, dtype=np.uint64, count=n)
        rows["ref"] = np.frombuffer(self._refs, dtype=np.uint64, count=n)
        rows = rows[np.lexsort((rows["chunk"], rows["target"]))]
        for target in Target:
            sel = rows["chunk"][rows["target"] == target]
            if len(sel) == 0:
                continue
            if target not in self._images:
                raise ValueError(
                    f"chunks were added for the {target.name.lower()} image "
                    "but set_image() was not called for it"
                )
            dup = np.flatnonzero(np.diff(sel) == 0)
            if len(dup):
                raise ValueError(f"{target.name.lower()} chunk {sel[dup[0]]} was added twice")
            count = chunk_count(self._images[target].size)
            if sel[-1] >= count:
                raise ValueError(
                    f"{target.name.lower()} chunk {sel[-1]} lies past the image end "
                    f"({count} chunks)"
                )
        for target, chunk, n_bytes in self._short:
            size = self._images[target].size
            if chunk != chunk_count(size) - 1 or n_bytes != size - chunk * CHUNK_SIZE:
                raise ValueError(
                    f"{target.name.lower()} chunk {chunk} has {n_bytes} bytes; only "
                    "the partial last chunk of an image may be short"
                )
        return rows

    def _finish(self) -> OverlayInfo:
        for target in Target:
            if target not in self._images:
                raise ValueError(f"set_image() was not called for the {target.name.lower()} image")
        self._flush_frame()
        while self._pending:
            self._drain_one()
        if self._pool:
            self._pool.shutdown(wait=True)
        t_close = time.perf_counter()
        rows = self._chunk_map()
        map_comp = self.codec.compress(fmt.encode_chunk_map(rows))

        counts: dict[Target, dict[Kind, int]] = {}
        for target in Target:
            kinds = rows["kind"][rows["target"] == target]
            per = np.bincount(kinds, minlength=len(Kind))
            counts[target] = {k: int(per[k]) for k in Kind}

        # Data area: chunk map, blobs, frames; offsets relative to its start.
        pos = 0
        chunk_map = {
            "count": len(rows),
            "offset": pos,
            "length": len(map_comp),
            "raw_length": len(rows) * fmt.MAP_ROW_SIZE,
            "codec": self.codec.name,
            "sha256": hashlib.sha256(map_comp).digest(),
        }
        pos += len(map_comp)
        blobs = {}
        for name, (comp, raw_len, sha) in self._blobs.items():
            blobs[name] = {
                "offset": pos,
                "length": len(comp),
                "raw_length": raw_len,
                "codec": self.codec.name,
                "sha256": sha,
            }
            pos += len(comp)
        frames_start = pos
        for row in self._frames:
            row[0] += frames_start
        data_length = frames_start + self._spooled
        stats = {
            "chunks": {
                fmt.TARGET_KEYS[t]: {k.name: c for k, c in per.items()} for t, per in counts.items()
            },
            "slots": self._slots,
            "payload_bytes": self._bytes_in,
            "frame_bytes": self._spooled,
            "compress_seconds": round(self._compress_seconds, 3),
            "codec": {"name": self.codec.name, "level": self.codec.level},
        }
        if self._prefix is not None:
            slots, frames, trace_sha256 = self._prefix
            self._meta["access_order"] = {
                "accessed_slots": slots,
                "prefix_frames": frames,
                "prefix_bytes": sum(row[1] for row in self._frames[:frames]),
                "trace_sha256": trace_sha256,
            }
        manifest = fmt.encode_manifest(
            {
                "chunk_size": CHUNK_SIZE,
                "base_id": self.base_id,
                "images": {
                    fmt.TARGET_KEYS[t]: {"size": i.size, "digest": i.digest}
                    for t, i in self._images.items()
                },
                "slot_count": self._slots,
                "chunk_map": chunk_map,
                "blobs": blobs,
                "frames": self._frames,
                "created": {
                    "tool": "cloudlet",
                    "version": cloudlet.__version__,
                    "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                },
                "stats": stats,
                "meta": self._meta,
            }
        )
        header = fmt.pack_header(manifest, data_length)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent
        )
        try:
            with os.fdopen(fd, "wb") as out:
                # mkstemp made it 0600; an overlay is for sharing (a web server must be able
                # to read it), so it gets what open() would give it under the user's umask
                os.fchmod(out.fileno(), umask_mode())
                out.write(header)
                out.write(manifest)
                out.write(map_comp)
                for comp, _, _ in self._blobs.values():
                    out.write(comp)
                out.flush()
                self._spool.flush()
                _copy_all(self._spool, out, self._spooled)
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)
        self._closed = True
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)
        size = len(header) + len(manifest) + data_length
        info = OverlayInfo(
            path=self.path,
            size=size,
            frames=len(self._frames),
            slots=self._slots,
            chunks=counts,
            bytes_in=self._bytes_in,
            bytes_out=self._spooled,
            map_bytes=len(map_comp),
            blob_bytes=sum(len(c) for c, _, _ in self._blobs.values()),
            compress_seconds=self._compress_seconds,
            wait_seconds=self._wait_seconds,
            close_seconds=time.perf_counter() - t_close,
            access_order=self._meta.get("access_order") if self._prefix else None,
        )
        LOG.info(
            "overlay %s: %d bytes, %d frames, %d slots, ratio %.2f",
            self.path,
            size,
            info.frames,
            info.slots,
            info.ratio,
        )
        return info


def _compress(codec: Codec, raw: bytes) -> tuple[bytes, str, float]:
    """Compress one frame; store it as it is when compression does not pay."""
    t = time.thread_time()
    comp = codec.compress(raw)
    seconds = time.thread_time() - t
    if len(comp) >= len(raw):
        return raw, NullCodec.name, seconds
    return comp, codec.name, seconds


def _copy_all(src: BinaryIO, dst: BinaryIO, length: int) -> None:
    """Append the spool to the output, in the kernel where it can (copy_file_range)."""
    src_fd, dst_fd = src.fileno(), dst.fileno()
    offset = 0
    try:
        while offset < length:
            n = os.copy_file_range(src_fd, dst_fd, length - offset, offset)
            if n == 0:
                raise OSError(f"frame spool ended at {offset} of {length} bytes")
            offset += n
        return
    except OSError as e:
        if offset or e.errno is None:
            raise
    src.seek(0)
    dst.seek(0, os.SEEK_END)
    while offset < length:
        block = src.read(min(1 << 20, length - offset))
        if not block:
            raise OSError(f"frame spool ended at {offset} of {length} bytes")
        dst.write(block)
        offset += len(block)

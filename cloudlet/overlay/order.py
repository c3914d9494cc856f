"""Access-ordered overlays: payload slots ranked by when a trial synthesis first touched them.

A trial synthesis with early start records, per image chunk, the first access (cloudletfs trace,
JSONL). Renumbering the slots so that those touched first come first puts everything the VM
needs for its first response into a prefix of the frames: a streaming or demand-fetching client
has it after that prefix instead of after the whole overlay. Only slot numbering and frame
contents change; base, result images and what every chunk holds stay the same.
"""

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cloudlet.basevm.store import DISK, MEMORY
from cloudlet.chunks import CHUNK_SIZE, Kind, Target, chunk_count
from cloudlet.errors import AccessTraceError
from cloudlet.overlay import format as fmt
from cloudlet.overlay.reader import OverlayReader
from cloudlet.overlay.writer import OverlayInfo, OverlayWriter

LOG = logging.getLogger(__name__)

# File names of the images in a synthesis mount, as the trace's "image" field gives them.
IMAGE_NAMES = {DISK: Target.DISK, MEMORY: Target.MEMORY}


@dataclass(frozen=True)
class AccessTrace:
    """First access time of every traced chunk, per image (chunks sorted, unique)."""

    name: str  # for messages
    sha256: str  # of the trace file, recorded in the ordered overlay
    chunks: dict[Target, np.ndarray]  # int64, sorted
    times: dict[Target, np.ndarray]  # float64, seconds since mount, aligned with chunks

    def check(self, images: dict[Target, fmt.ImageInfo]) -> None:
        """Refuse a trace recorded for other images (a chunk past a result image's end)."""
        for target, chunks in self.chunks.items():
            count = chunk_count(images[target].size)
            if len(chunks) and chunks[-1] >= count:
                name = next(n for n, t in IMAGE_NAMES.items() if t is target)
                raise AccessTraceError(
                    f"trace {self.name} names {name} chunk {chunks[-1]}, but this overlay's "
                    f"{name} has {count} chunks: the trace was recorded for another overlay"
                )

    def first_access(self, target: Target, chunks: np.ndarray) -> np.ndarray:
        """First access time of each chunk; inf for chunks the trace never saw."""
        known, times = self.chunks[target], self.times[target]
        out = np.full(len(chunks), np.inf)
        if len(known) == 0:
            return out
        pos = np.minimum(np.searchsorted(known, chunks), len(known) - 1)
        hit = known[pos] == chunks
        out[hit] = times[pos[hit]]
        return out


def load_trace(path: Path) -> AccessTrace:
    """Read a cloudletfs trace (JSONL: {"t", "image", "chunk", ...} per line)."""
    digest = hashlib.sha256()
    cols: dict[Target, tuple[list[int], list[float]]] = {t: ([], []) for t in Target}
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; OSError becomes a trace error
    except OSError as e:
        raise AccessTraceError(f"cannot read access trace {path}: {e.strerror}") from e
    with f:
        for lineno, line in enumerate(f, 1):
            digest.update(line)
            if not line.strip():
                continue
            target, chunk, t = _parse_line(path, lineno, line)
            cols[target][0].append(chunk)
            cols[target][1].append(t)
    chunks: dict[Target, np.ndarray] = {}
    times: dict[Target, np.ndarray] = {}
    for target, (cs, ts) in cols.items():
        c, t = np.array(cs, dtype=np.int64), np.array(ts, dtype=np.float64)
        by = np.lexsort((t, c))  # by chunk, earliest first: keep the first row of each chunk
        c, t = c[by], t[by]
        first = np.ones(len(c), dtype=bool)
        first[1:] = c[1:] != c[:-1]
        chunks[target], times[target] = c[first], t[first]
    LOG.debug("trace %s: %s", path, {t.name: len(c) for t, c in chunks.items()})
    return AccessTrace(str(path), digest.hexdigest(), chunks, times)


def _parse_line(path: Path, lineno: int, line: bytes) -> tuple[Target, int, float]:
    where = f"access trace {path} line {lineno}"
    try:
        entry = json.loads(line)
    except ValueError as e:
        raise AccessTraceError(f"{where} is not JSON ({e}): is this a cloudletfs trace?") from e
    if not isinstance(entry, dict):
        raise AccessTraceError(f"{where} is not a JSON object")
    image, chunk, t = entry.get("image"), entry.get("chunk"), entry.get("t")
    if image not in IMAGE_NAMES:
        raise AccessTraceError(
            f"{where} names image {image!r}; a synthesis trace names "
            f"{' or '.join(map(repr, IMAGE_NAMES))}"
        )
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
        raise AccessTraceError(f"{where}: chunk {chunk!r} is not a chunk number")
    if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
        raise AccessTraceError(f"{where}: time {t!r} is not a number of seconds")
    return IMAGE_NAMES[image], chunk, float(t)


def rank_slots(reader: OverlayReader, trace: AccessTrace) -> tuple[np.ndarray, int]:
    """(old slot of each new slot, how many were accessed).

    A slot's time is the earliest first access of any chunk whose NEW or SELF row points at it;
    accessed slots come first by that time, the rest keep their relative order.
    """
    trace.check(reader.images)
    when = np.full(reader.slot_count, np.inf)
    for target in Target:
        rows = reader.map_for(target)
        rows = rows[(rows["kind"] == Kind.NEW) | (rows["kind"] == Kind.SELF)]
        t = trace.first_access(target, rows["chunk"].astype(np.int64))
        np.minimum.at(when, rows["ref"].astype(np.int64), t)
    order = np.argsort(when, kind="stable")
    return order, int(np.isfinite(when).sum())


def reorder_overlay(
    reader: OverlayReader,
    trace: AccessTrace,
    output: Path,
    *,
    codec: str | None = None,
    level: int | None = None,
) -> OverlayInfo:
    """Write `reader`'s overlay to `output` with its slots in access order.

    Streamed: each input frame is decoded at most twice, one at a time, and everything is
    recompressed through an OverlayWriter. The accessed slots, wanted in trace order, are first
    gathered into an unnamed temporary file beside `output` (their raw size); the others keep
    their order and are copied straight. `codec`/`level` default to the input's own.
    """
    order, accessed = rank_slots(reader, trace)
    if codec is None:
        codec, level = _input_codec(reader)
    frame_size = max((fr.raw_length for fr in reader.frames), default=fmt.DEFAULT_FRAME_SIZE)
    owners = reader.chunk_map[reader.chunk_map["kind"] == Kind.NEW]
    owners = owners[np.argsort(owners["ref"])]  # row i holds old slot i
    others = reader.chunk_map[reader.chunk_map["kind"] != Kind.NEW]
    refs = others["ref"].astype(np.int64)
    is_self = others["kind"] == Kind.SELF
    new_slot = np.empty(reader.slot_count, dtype=np.int64)  # old slot -> new slot
    new_slot[order] = np.arange(reader.slot_count)
    refs[is_self] = new_slot[refs[is_self]]

    with (
        OverlayWriter(output, reader.base_id, codec, level, frame_size) as writer,
        tempfile.TemporaryFile(dir=writer.path.parent, buffering=1 << 20) as spool,
    ):
        for target, info in reader.images.items():
            writer.set_image(target, info.size, info.digest)
        first, rest = order[:accessed], order[accessed:]
        _add_slots(writer, reader, owners[first], _gathered(reader, first, spool))
        writer.end_access_prefix(trace.sha256)
        _add_slots(writer, reader, owners[rest], _payloads(reader, rest))
        for target, kind, chunk, ref in zip(
            others["target"].tolist(),
            others["kind"].tolist(),
            others["chunk"].tolist(),
            refs.tolist(),
            strict=True,
        ):
            writer.add_ref(Target(target), chunk, Kind(kind), ref)
        for name in reader.blob_names:
            writer.add_blob(name, reader.blob(name))
        writer.set_meta({k: v for k, v in reader.meta.items() if k != "access_order"})
        info = writer.close()
    LOG.info(
        "reordered %s -> %s: %d of %d slots accessed, in the first %d of %d frames",
        reader.name,
        output,
        accessed,
        reader.slot_count,
        info.access_order["prefix_frames"] if info.access_order else 0,
        info.frames,
    )
    return info


def _payloads(reader: OverlayReader, slots: np.ndarray) -> Iterator[memoryview]:
    """The payload of each slot, for ascending slots: every frame is decoded once."""
    first_slots = np.array([fr.first_slot for fr in reader.frames], dtype=np.int64)
    frames = np.searchsorted(first_slots, slots, side="right") - 1
    starts = (slots - first_slots[frames]) * CHUNK_SIZE
    current, raw = -1, memoryview(b"")
    for f, start in zip(frames.tolist(), starts.tolist(), strict=True):
        if f != current:
            current, raw = f, memoryview(reader.read_frame(f))
        yield raw[start : start + CHUNK_SIZE]


def _gathered(reader: OverlayReader, slots: np.ndarray, spool: BinaryIO) -> Iterator[bytes]:
    """The payload of each slot in any order: put in place in `spool` in one pass, read back."""
    by_slot = np.argsort(slots, kind="stable")
    for pos, data in zip(by_slot.tolist(), _payloads(reader, slots[by_slot]), strict=True):
        os.pwrite(spool.fileno(), data, pos * CHUNK_SIZE)
    spool.seek(0)
    for _ in range(len(slots)):
        yield spool.read(CHUNK_SIZE)


def _add_slots(
    writer: OverlayWriter, reader: OverlayReader, rows: np.ndarray, payloads: Iterable[bytes]
) -> None:
    """Add the NEW rows `rows` as the writer's next slots; a partial last chunk goes unpadded."""
    sizes = np.array([reader.images[t].size for t in Target], dtype=np.int64)
    chunks = rows["chunk"].astype(np.int64)
    lengths = np.minimum(CHUNK_SIZE, sizes[rows["target"]] - chunks * CHUNK_SIZE)
    for target, chunk, length, data in zip(
        rows["target"].tolist(), chunks.tolist(), lengths.tolist(), payloads, strict=True
    ):
        writer.add_new(Target(target), chunk, data[:length])


def _input_codec(reader: OverlayReader) -> tuple[str, int | None]:
    """The codec (and level) the input was written with, so a reorder does not change it."""
    recorded = reader.stats.get("codec")
    if isinstance(recorded, dict) and isinstance(recorded.get("name"), str):
        level = recorded.get("level")
        return recorded["name"], level if isinstance(level, int) else None
    used = [fr.codec for fr in reader.frames if fr.codec != "none"]
    return (max(set(used), key=used.count) if used else "zstd"), None

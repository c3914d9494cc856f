"""The overlay file format, version 1.0: constants, header, manifest and chunk map codecs.

Layout (docs/overlay-format.md is the normative spec):

    header (96 bytes) | manifest (msgpack) | data area: chunk map | blobs | frames

Everything a consumer needs before the first frame (manifest, chunk map, blobs) comes first, so a
stream can be applied in one pass and early start can fetch any single frame by byte range.
Integrity chains from the header: the header carries the sha256 of the manifest, the manifest the
sha256 of every compressed block (chunk map, blobs, frames) and the digest of each result image.
"""

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np

from cloudlet.chunks import CHUNK_SIZE, Kind, Target, chunk_count
from cloudlet.errors import CorruptOverlay, UnsupportedFormat

MAGIC = b"\x89CLOVL\r\n"
VERSION_MAJOR = 1
VERSION_MINOR = 0

# magic, major, minor, header_size, manifest_length, data_length, manifest sha256,
# 16 reserved bytes, first 16 bytes of sha256(header[0:80]).
HEADER = struct.Struct("<8sHHIQQ32s16s16s")
HEADER_SIZE = HEADER.size  # 96
HEADER_CHECKED = 80  # bytes covered by the header check

MAX_MANIFEST = 64 << 20  # refuse to allocate more for a manifest (1 GiB of frames is ~80 KiB)
MAX_FRAME_RAW = 64 << 20  # largest raw frame a reader accepts (bounds apply memory)
MAX_BLOB_RAW = 64 << 20  # blobs are held in memory: device state and configs, not images
DEFAULT_FRAME_SIZE = 1 << 20

# One row of the chunk map as readers see it. On disk the map is stored column by column
# (all targets, all kinds, all chunks, all refs), which compresses far better than rows.
MAP_DTYPE = np.dtype([("target", "u1"), ("kind", "u1"), ("chunk", "<u8"), ("ref", "<u8")])
MAP_ROW_SIZE = 1 + 1 + 8 + 8

TARGET_KEYS = {Target.DISK: "disk", Target.MEMORY: "memory"}


class ImageInfo(NamedTuple):
    """What one result image must be after synthesis."""

    size: int
    digest: str  # hashing.tree_digest of the result, hex


class FrameInfo(NamedTuple):
    """One independently compressed frame of payload slots."""

    index: int
    offset: int  # absolute byte offset in the overlay file
    length: int  # compressed bytes
    raw_length: int  # decompressed bytes, a multiple of CHUNK_SIZE
    codec: str
    sha256: bytes  # of the compressed bytes
    first_slot: int

    @property
    def slot_count(self) -> int:
        return self.raw_length // CHUNK_SIZE


class BlockInfo(NamedTuple):
    """A compressed block of the data area that is not a frame (chunk map, blob)."""

    offset: int  # absolute byte offset in the overlay file
    length: int
    raw_length: int
    codec: str
    sha256: bytes


@dataclass(frozen=True)
class Header:
    major: int
    minor: int
    header_size: int
    manifest_length: int
    data_length: int
    manifest_sha256: bytes

    @property
    def data_offset(self) -> int:
        return self.header_size + self.manifest_length

    @property
    def total_length(self) -> int:
        return self.data_offset + self.data_length


def pack_header(manifest: bytes, data_length: int) -> bytes:
    head = HEADER.pack(
        MAGIC,
        VERSION_MAJOR,
        VERSION_MINOR,
        HEADER_SIZE,
        len(manifest),
        data_length,
        hashlib.sha256(manifest).digest(),
        bytes(16),
        bytes(16),
    )
    check = hashlib.sha256(head[:HEADER_CHECKED]).digest()[:16]
    return head[:HEADER_CHECKED] + check


def check_version(raw: bytes) -> tuple[int, int]:
    """Magic and version from the first 12 bytes; UnsupportedFormat for anything else."""
    if len(raw) < 12 or raw[:8] != MAGIC:
        raise UnsupportedFormat("not a cloudlet overlay (bad magic)")
    major, minor = struct.unpack_from("<HH", raw, 8)
    if major != VERSION_MAJOR:
        raise UnsupportedFormat(
            f"overlay format version {major}.{minor} is not supported (this engine reads "
            f"{VERSION_MAJOR}.x); upgrade cloudlet or re-create the overlay"
        )
    return major, minor


def unpack_header(raw: bytes) -> Header:
    """Parse and check a full header; raises UnsupportedFormat / CorruptOverlay."""
    major, minor = check_version(raw)
    _, _, _, header_size, manifest_length, data_length, digest, _, check = HEADER.unpack_from(raw)
    if hashlib.sha256(raw[:HEADER_CHECKED]).digest()[:16] != check:
        raise CorruptOverlay("overlay header is damaged (header check mismatch)")
    if header_size < HEADER_SIZE:
        raise CorruptOverlay(f"overlay header declares size {header_size} < {HEADER_SIZE}")
    if manifest_length > MAX_MANIFEST:
        raise CorruptOverlay(f"overlay manifest of {manifest_length} bytes is implausibly large")
    return Header(major, minor, header_size, manifest_length, data_length, digest)


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    return msgpack.packb(manifest, use_bin_type=True)


def decode_manifest(raw: bytes) -> dict[str, Any]:
    try:
        manifest = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise CorruptOverlay(f"overlay manifest does not decode: {e}") from e
    if not isinstance(manifest, dict):
        raise CorruptOverlay("overlay manifest is not a map")
    return manifest


def encode_chunk_map(rows: np.ndarray) -> bytes:
    """Column-wise little-endian bytes of a MAP_DTYPE array (sorted by target, chunk)."""
    return b"".join(
        np.ascontiguousarray(rows[name], dtype=MAP_DTYPE[name]).tobytes()
        for name in MAP_DTYPE.names
    )


def decode_chunk_map(raw: bytes, count: int) -> np.ndarray:
    if len(raw) != count * MAP_ROW_SIZE:
        raise CorruptOverlay(
            f"chunk map holds {len(raw)} bytes, expected {count * MAP_ROW_SIZE} for {count} rows"
        )
    rows = np.empty(count, dtype=MAP_DTYPE)
    pos = 0
    for name in MAP_DTYPE.names:
        dt = MAP_DTYPE[name]
        rows[name] = np.frombuffer(raw, dtype=dt, count=count, offset=pos)
        pos += dt.itemsize * count
    return rows


def check_chunk_map(rows: np.ndarray, images: dict[Target, ImageInfo], slot_count: int) -> None:
    """Structural checks a writer guarantees; anything else means a damaged or forged overlay."""
    if len(rows) == 0:
        return
    if (rows["target"] > max(Target)).any():
        raise CorruptOverlay("chunk map names an unknown target image")
    if (rows["kind"] > max(Kind)).any():
        raise CorruptOverlay("chunk map holds an unknown chunk kind")
    for target in Target:
        sel = rows["chunk"][rows["target"] == target]
        if len(sel) == 0:
            continue
        if target not in images:
            raise CorruptOverlay(f"chunk map has {target.name.lower()} chunks but no image size")
        if sel.max() >= chunk_count(images[target].size):
            raise CorruptOverlay(f"chunk map has a chunk past the {target.name.lower()} image end")
    key = (rows["target"].astype(np.uint64) << np.uint64(62)) | rows["chunk"]
    if (key[1:] <= key[:-1]).any():
        raise CorruptOverlay("chunk map is not sorted by (target, chunk) or has duplicates")
    new = np.sort(rows["ref"][rows["kind"] == Kind.NEW])
    if len(new) != slot_count or not np.array_equal(new, np.arange(slot_count, dtype=np.uint64)):
        raise CorruptOverlay("chunk map does not reference every payload slot exactly once as NEW")
    self_refs = rows["ref"][rows["kind"] == Kind.SELF]
    if len(self_refs) and self_refs.max() >= slot_count:
        raise CorruptOverlay("chunk map has a SELF chunk referencing a missing payload slot")
    zero_refs = rows["ref"][rows["kind"] == Kind.ZERO]
    if zero_refs.any():
        raise CorruptOverlay("chunk map has a ZERO chunk with a non-zero ref")


def block_info(entry: Any, data_offset: int, what: str) -> BlockInfo:
    try:
        offset, length, raw_length, codec, sha = (
            entry["offset"],
            entry["length"],
            entry["raw_length"],
            entry["codec"],
            entry["sha256"],
        )
    except (KeyError, TypeError) as e:
        raise CorruptOverlay(f"overlay manifest entry for {what} is malformed") from e
    _check_ints(what, offset, length, raw_length)
    if not isinstance(codec, str) or not isinstance(sha, bytes) or len(sha) != 32:
        raise CorruptOverlay(f"overlay manifest entry for {what} is malformed")
    return BlockInfo(data_offset + offset, length, raw_length, codec, sha)


def frame_table(entries: Any, data_offset: int, data_length: int) -> tuple[list[FrameInfo], int]:
    """Parse the manifest frame table; frames must tile the slots 0..n in order."""
    if not isinstance(entries, list):
        raise CorruptOverlay("overlay frame table is malformed")
    frames: list[FrameInfo] = []
    next_slot = 0
    for i, entry in enumerate(entries):
        try:
            offset, length, raw_length, codec, sha, first_slot = entry
        except (TypeError, ValueError) as e:
            raise CorruptOverlay(f"frame {i}: table entry is malformed") from e
        _check_ints(f"frame {i}", offset, length, raw_length, first_slot)
        if not isinstance(codec, str) or not isinstance(sha, bytes) or len(sha) != 32:
            raise CorruptOverlay(f"frame {i}: table entry is malformed")
        if raw_length == 0 or raw_length % CHUNK_SIZE or raw_length > MAX_FRAME_RAW:
            raise CorruptOverlay(f"frame {i}: raw length {raw_length} is not a valid frame size")
        if first_slot != next_slot:
            raise CorruptOverlay(f"frame {i}: starts at slot {first_slot}, expected {next_slot}")
        if offset + length > data_length:
            raise CorruptOverlay(f"frame {i}: lies past the end of the overlay data")
        frames.append(
            FrameInfo(i, data_offset + offset, length, raw_length, codec, sha, first_slot)
        )
        next_slot += raw_length // CHUNK_SIZE
    return frames, next_slot


def _check_ints(what: str, *values: Any) -> None:
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise CorruptOverlay(f"overlay manifest entry for {what} is malformed")

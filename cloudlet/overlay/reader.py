"""Read and verify an overlay from a file, a pipe or any file object.

Opening reads everything that precedes the frames (header, manifest, chunk map, blobs) and checks
it; frames are read on demand and checked (sha256 of the compressed bytes) before they reach a
decompressor. A seekable source allows random access to frames; a pipe allows `iter_frames()`.
"""

import hashlib
import io
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from cloudlet.chunks import Kind, Target
from cloudlet.codecs import Codec, get_codec
from cloudlet.errors import CorruptOverlay, SourceError, TruncatedOverlay, UnsupportedFormat
from cloudlet.overlay import format as fmt

LOG = logging.getLogger(__name__)


class OverlayReader:
    """A verified view of one overlay; create with `OverlayReader.open()`."""

    def __init__(self, f: BinaryIO, owned: bool, name: str) -> None:
        self._f = f
        self._owned = owned
        self.name = name
        self._lock = threading.Lock()
        self._codecs: dict[str, Codec] = {}
        try:
            self._seekable = f.seekable()
        except (AttributeError, ValueError):
            self._seekable = False
        self._start = f.tell() if self._seekable else 0
        self._pos = 0  # stream position relative to the overlay start
        try:
            self._fd: int | None = f.fileno() if self._seekable else None
        except (AttributeError, OSError, io.UnsupportedOperation):
            self._fd = None
        self._load()

    @classmethod
    def open(cls, source: Path | str | BinaryIO, name: str | None = None) -> "OverlayReader":
        """Open and verify header, manifest, chunk map and blob digests.

        `name` is what messages call a stream (its file or URL). Raises SourceError (cannot
        open the file), UnsupportedFormat (not an overlay, unknown major version or codec),
        TruncatedOverlay (shorter than declared) or CorruptOverlay (a digest mismatch).
        """
        if isinstance(source, str | os.PathLike):
            try:
                f = open(source, "rb")  # noqa: SIM115 - owned by the reader, closed by close()
            except OSError as e:
                raise SourceError(f"cannot open overlay {source}: {e.strerror}") from e
            try:
                return cls(f, owned=True, name=name or str(source))
            except BaseException:
                f.close()
                raise
        known = getattr(source, "name", None)  # a file's path; an int for a bare descriptor
        name = name or (known if isinstance(known, str) else "stream")
        return cls(source, owned=False, name=name)

    def close(self) -> None:
        if self._owned:
            self._f.close()

    def __enter__(self) -> "OverlayReader":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- properties ------------------------------------------------------------------------

    @property
    def version(self) -> tuple[int, int]:
        return self.header.major, self.header.minor

    @property
    def data_offset(self) -> int:
        """Byte offset of the data area (chunk map, blobs, frames) in the overlay."""
        return self.header.data_offset

    @property
    def frames_offset(self) -> int:
        """Byte offset of the first frame: fetch [0, frames_offset) to open remotely."""
        return self.frames[0].offset if self.frames else self.header.total_length

    @property
    def consumed(self) -> int:
        """Bytes read from the source so far (a stream stands after them)."""
        return self._pos

    @property
    def total_length(self) -> int:
        return self.header.total_length

    def map_for(self, target: Target) -> np.ndarray:
        """The chunk map rows of one image, sorted by chunk."""
        return self.chunk_map[self.chunk_map["target"] == target]

    @property
    def blob_names(self) -> list[str]:
        return list(self._blob_info)

    def blob(self, name: str) -> bytes:
        """A named blob, verified and decompressed; KeyError names the blobs present."""
        try:
            info = self._blob_info[name]
        except KeyError:
            raise KeyError(
                f"overlay {self.name} has no blob {name!r} (has: {', '.join(self._blob_info)})"
            ) from None
        return self._decode_block(info, self._blob_data[name], f"blob {name!r}")

    def summary(self) -> dict[str, Any]:
        """Plain-data description for `cloudlet overlay show` and logs."""
        kinds = np.bincount(self.chunk_map["kind"], minlength=len(Kind))
        return {
            "version": f"{self.header.major}.{self.header.minor}",
            "base_id": self.base_id,
            "images": {
                fmt.TARGET_KEYS[t]: {"size": i.size, "digest": i.digest}
                for t, i in self.images.items()
            },
            "chunks": {k.name: int(kinds[k]) for k in Kind},
            "slots": self.slot_count,
            "frames": len(self.frames),
            "codec": ",".join(sorted({fr.codec for fr in self.frames})) or "none",
            "frame_bytes": sum(fr.length for fr in self.frames),
            "blobs": {n: b.raw_length for n, b in self._blob_info.items()},
            "size": self.total_length,
            "created": self.created,
            "meta": self.meta,
        }

    def chunk_kinds(self) -> dict[str, dict[str, int]]:
        """Modified chunks per image and kind (untouched chunks are in no row of the map)."""
        out = {}
        for target, key in fmt.TARGET_KEYS.items():
            kinds = np.bincount(self.map_for(target)["kind"], minlength=len(Kind))
            out[key] = {k.name: int(kinds[k]) for k in Kind}
        return out

    # -- frames ----------------------------------------------------------------------------

    def read_frame(self, index: int) -> bytes:
        """The raw payload of frame `index` (slot_count * 4096 bytes), verified first."""
        return self.decompress_frame(index, self.fetch_frame(index))

    def fetch_frame(self, index: int) -> bytes:
        """The compressed bytes of a frame, checked against the frame table's sha256."""
        fr = self.frames[index]
        data = self._read_at(fr.offset, fr.length, f"frame {index}")
        return self.verify_frame(index, data)

    def verify_frame(self, index: int, data: bytes) -> bytes:
        """Check compressed frame bytes obtained elsewhere (HTTP range) before decoding them."""
        fr = self.frames[index]
        if len(data) != fr.length or hashlib.sha256(data).digest() != fr.sha256:
            raise CorruptOverlay(
                f"overlay {self.name}: frame {index} (bytes {fr.offset}..{fr.offset + fr.length}) "
                "fails its sha256: the overlay is damaged, fetch it again"
            )
        return data

    def decompress_frame(self, index: int, data: bytes) -> bytes:
        """Decompress verified frame bytes, bounded by the frame's raw length."""
        fr = self.frames[index]
        raw = self._codec(fr.codec).decompress(data, fr.raw_length)
        if len(raw) != fr.raw_length:
            raise CorruptOverlay(
                f"overlay {self.name}: frame {index} decodes to {len(raw)} bytes, "
                f"expected {fr.raw_length}"
            )
        return raw

    def decode_frame(self, index: int, data: bytes) -> bytes:
        """verify_frame + decompress_frame, for frames fetched by byte range."""
        return self.decompress_frame(index, self.verify_frame(index, data))

    def iter_frames(self) -> Iterator[tuple[fmt.FrameInfo, bytes]]:
        """(frame, raw payload) in file order; works on pipes."""
        for fr in self.frames:
            yield fr, self.read_frame(fr.index)

    # -- internals -------------------------------------------------------------------------

    def _codec(self, name: str) -> Codec:
        codec = self._codecs.get(name)
        if codec is None:
            codec = self._codecs[name] = get_codec(name)
        return codec

    def _read_exact(self, n: int) -> bytes:
        chunks = []
        left = n
        while left:
            block = self._f.read(left)
            if not block:
                break
            chunks.append(block)
            left -= len(block)
        self._pos += n - left
        return b"".join(chunks)

    def _read_at(self, offset: int, length: int, what: str) -> bytes:
        if self._fd is not None:
            data = os.pread(self._fd, length, self._start + offset)
            while len(data) < length:
                more = os.pread(self._fd, length - len(data), self._start + offset + len(data))
                if not more:
                    break
                data += more
        else:
            with self._lock:
                if self._seekable:
                    self._f.seek(self._start + offset)
                    self._pos = offset
                elif offset < self._pos:
                    raise ValueError(
                        f"overlay {self.name} is a stream: {what} lies before the current "
                        "position (read frames in order, or open a seekable file)"
                    )
                while self._pos < offset:
                    if not self._read_exact(min(1 << 20, offset - self._pos)):
                        break
                data = self._read_exact(length) if self._pos == offset else b""
        if len(data) < length:
            raise TruncatedOverlay(
                f"overlay {self.name} ends inside {what} (needs bytes up to {offset + length}, "
                f"declared size {self.header.total_length}): the copy or download was cut short"
            )
        return data

    def _decode_block(self, info: fmt.BlockInfo, data: bytes, what: str) -> bytes:
        if hashlib.sha256(data).digest() != info.sha256:
            raise CorruptOverlay(f"overlay {self.name}: {what} fails its sha256")
        raw = self._codec(info.codec).decompress(data, info.raw_length)
        if len(raw) != info.raw_length:
            raise CorruptOverlay(f"overlay {self.name}: {what} decodes to the wrong size")
        return raw

    def _load(self) -> None:
        head = self._read_exact(fmt.HEADER_SIZE)
        if len(head) < 12:
            if head and fmt.MAGIC.startswith(head[:8]) and len(head) >= 4:
                raise TruncatedOverlay(f"overlay {self.name} ends inside its header")
            raise UnsupportedFormat(f"{self.name} is not a cloudlet overlay (bad magic)")
        if head[:8] != fmt.MAGIC:
            raise UnsupportedFormat(f"{self.name} is not a cloudlet overlay (bad magic)")
        if len(head) < fmt.HEADER_SIZE:
            try:
                fmt.check_version(head)  # an unknown major version wins over truncation
            except UnsupportedFormat as e:
                raise UnsupportedFormat(f"{self.name}: {e}") from None
            raise TruncatedOverlay(f"overlay {self.name} ends inside its header")
        try:
            self.header = fmt.unpack_header(head)
        except UnsupportedFormat as e:
            raise UnsupportedFormat(f"{self.name}: {e}") from None
        h = self.header
        if self._seekable:
            size = self._f.seek(0, os.SEEK_END) - self._start
            self._f.seek(self._start + self._pos)
            if size < h.total_length:
                raise TruncatedOverlay(
                    f"overlay {self.name} is {size} bytes but its header declares "
                    f"{h.total_length}: the copy or download was cut short"
                )
        manifest_raw = self._read_at(h.header_size, h.manifest_length, "the manifest")
        if hashlib.sha256(manifest_raw).digest() != h.manifest_sha256:
            raise CorruptOverlay(f"overlay {self.name}: the manifest fails its sha256")
        m = fmt.decode_manifest(manifest_raw)
        try:
            self._parse_manifest(m)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptOverlay(f"overlay {self.name}: manifest is malformed ({e})") from e

        # Read the pre-frame blocks in file order (a stream allows nothing else).
        blocks = [("chunk map", self._map_info)] + [
            (f"blob {n!r}", b) for n, b in self._blob_info.items()
        ]
        datas: dict[str, bytes] = {}
        for what, info in sorted(blocks, key=lambda item: item[1].offset):
            datas[what] = self._read_at(info.offset, info.length, what)
        map_raw = self._decode_block(self._map_info, datas["chunk map"], "the chunk map")
        self.chunk_map = fmt.decode_chunk_map(map_raw, self._map_count)
        fmt.check_chunk_map(self.chunk_map, self.images, self.slot_count)
        self._blob_data = {n: datas[f"blob {n!r}"] for n in self._blob_info}
        LOG.debug(
            "opened overlay %s: %d frames, %d map rows",
            self.name,
            len(self.frames),
            len(self.chunk_map),
        )

    def _parse_manifest(self, m: dict[str, Any]) -> None:
        h = self.header
        if m.get("chunk_size") != fmt.CHUNK_SIZE:
            raise UnsupportedFormat(
                f"overlay {self.name} uses {m.get('chunk_size')}-byte chunks; this engine "
                f"handles {fmt.CHUNK_SIZE}"
            )
        base_id = m["base_id"]
        if not isinstance(base_id, str):
            raise TypeError("base_id is not a string")
        self.base_id: str = base_id
        self.images: dict[Target, fmt.ImageInfo] = {}
        for target, key in fmt.TARGET_KEYS.items():
            entry = m["images"][key]
            size, digest = entry["size"], entry["digest"]
            if not isinstance(size, int) or size < 0 or not isinstance(digest, str):
                raise TypeError(f"image {key} entry is malformed")
            self.images[target] = fmt.ImageInfo(size, digest)
        self.slot_count: int = m["slot_count"]
        self.frames, slots = fmt.frame_table(m["frames"], h.data_offset, h.data_length)
        if slots != self.slot_count:
            raise ValueError(f"frames hold {slots} slots, manifest says {self.slot_count}")
        cm = m["chunk_map"]
        self._map_count: int = cm["count"]
        self._map_info = fmt.block_info(cm, h.data_offset, "the chunk map")
        if self._map_info.raw_length != self._map_count * fmt.MAP_ROW_SIZE:
            raise ValueError("chunk map raw length does not match its row count")
        self._blob_info = {
            name: fmt.block_info(entry, h.data_offset, f"blob {name!r}")
            for name, entry in m["blobs"].items()
        }
        for what, info in [("the chunk map", self._map_info), *self._blob_info.items()]:
            if info.offset + info.length > h.total_length:
                raise ValueError(f"{what} lies past the end of the overlay data")
        for name in {
            self._map_info.codec,
            *(b.codec for b in self._blob_info.values()),
            *(fr.codec for fr in self.frames),
        }:
            self._codec(name)  # UnsupportedFormat now rather than halfway through a synthesis
        self.created: dict[str, Any] = m.get("created", {})
        self.stats: dict[str, Any] = m.get("stats", {})
        self.meta: dict[str, Any] = m.get("meta", {})

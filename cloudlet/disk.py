"""Changed disk chunks, reading only what the disk format says may have changed.

A qcow2 over the base raw image (how Nova and our own capture keep a customised disk) records every
guest write in its top layer: `qemu-img map` lists those clusters with their host offsets in the
qcow2 file, so we read them directly, compare them with the base and never touch the rest. Zero
extents of the top layer (discards, write-zeroes) become ZERO chunks where the base is not zero. A
raw disk carries no such map and falls back to a full scan.
"""

import json
import logging
import os
import subprocess
import tempfile
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cloudlet.chunks import CHUNK_SIZE
from cloudlet.diff import (
    ChangedBatch,
    changed_chunks,
    compare_window,
    iter_spans,
    normalize_ranges,
    pread_exact,
)
from cloudlet.errors import ImageError
from cloudlet.hypervisor.config import qemu_img_binary

LOG = logging.getLogger(__name__)

QEMU_IMG_TIMEOUT = 300  # seconds; `map` of a large fragmented image can take a while


@dataclass(frozen=True, slots=True)
class Extent:
    """One entry of `qemu-img map`: guest bytes [start, start + length) and where they live."""

    start: int
    length: int
    depth: int
    data: bool
    zero: bool
    present: bool = True
    offset: int | None = None  # host offset in the image file, if the data is stored plainly

    @property
    def end(self) -> int:
        return self.start + self.length


def _qemu_img(*args: str, timeout: float = QEMU_IMG_TIMEOUT, output_json: bool = True) -> Any:
    cmd = [qemu_img_binary(), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise ImageError("qemu-img not found: install QEMU's tools (qemu-utils)") from e
    except subprocess.TimeoutExpired as e:
        raise ImageError(f"{' '.join(cmd)} did not finish in {timeout} s") from e
    if proc.returncode != 0:
        raise ImageError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout) if output_json else None


def create_cow(base_raw: Path, dest: Path) -> None:
    """A qcow2 over a raw base image: a VM's writes land in it, the base is never modified."""
    _qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        str(base_raw.resolve()),
        "-F",
        "raw",
        str(dest),
        output_json=False,
    )


def convert_to_raw(src: Path, fmt: str, dest: Path) -> None:
    """Write any image qemu-img reads as a raw image (bounded by 10 MB/s of virtual size)."""
    timeout = QEMU_IMG_TIMEOUT + virtual_size(src) / 10e6
    _qemu_img(
        "convert", "-O", "raw", "-f", fmt, str(src), str(dest), timeout=timeout, output_json=False
    )


def image_info(path: Path) -> dict[str, Any]:
    """`qemu-img info` of one image (-U: the image may be open in a running QEMU)."""
    if not path.exists():
        raise ImageError(f"disk image {path} does not exist")
    return _qemu_img("info", "--output=json", "-U", str(path))


def disk_format(path: Path) -> str:
    """ "raw", "qcow2", ... as qemu-img probes it."""
    return str(image_info(path)["format"])


def virtual_size(path: Path) -> int:
    """Size of the disk as the guest sees it, in bytes."""
    return int(image_info(path)["virtual-size"])


def allocated_ranges(qcow2: Path) -> list[Extent]:
    """The extents of the top layer (depth 0), sorted by guest offset.

    Data extents carry `offset` into the qcow2 file (absent for compressed clusters); zero extents
    mean "reads as zero because of the top layer" (discarded, written with zeroes, or, when
    `present` is false, allocated nowhere in the chain).
    """
    entries = _qemu_img("map", "--output=json", "-U", "-f", "qcow2", str(qcow2))
    extents = [
        Extent(
            start=int(e["start"]),
            length=int(e["length"]),
            depth=int(e["depth"]),
            data=bool(e["data"]),
            zero=bool(e["zero"]),
            present=bool(e.get("present", True)),
            offset=int(e["offset"]) if "offset" in e else None,
        )
        for e in entries
        if e["depth"] == 0
    ]
    extents.sort(key=lambda x: x.start)
    return extents


def _check_backing(disk: Path, info: dict[str, Any], base_raw: Path) -> None:
    backing = info.get("backing-filename")
    if not backing:
        raise ImageError(
            f"{disk} has no backing file, so its changes against {base_raw} are unknown; "
            f"expected a qcow2 created with -b {base_raw} -F raw"
        )
    path = Path(backing)
    if not path.is_absolute():
        path = disk.parent / path  # qemu resolves a relative backing file from the image's folder
    try:
        same = os.path.samefile(path, base_raw)
    except OSError:
        same = False
    if not same:
        raise ImageError(f"{disk} is backed by {backing}, not by the base disk {base_raw}")
    fmt = info.get("backing-filename-format") or disk_format(base_raw)
    if fmt != "raw":
        raise ImageError(f"{disk}: backing file {backing} is {fmt}, expected a raw base disk")
    specific = info.get("format-specific", {}).get("data", {})
    if "data-file" in specific:
        raise ImageError(f"{disk} keeps its data in an external data file: not supported")
    if info.get("encrypted") or "encrypt" in specific:
        raise ImageError(f"{disk} is encrypted: its clusters cannot be compared with the base")


def changed_disk_chunks(base_raw: Path, disk: Path) -> Iterator[ChangedBatch]:
    """Yield the chunks of `disk` (qcow2 over `base_raw`, or raw) that differ from `base_raw`."""
    info = image_info(disk)
    size = int(info["virtual-size"])
    if info["format"] == "raw":
        LOG.info("%s is raw: scanning all %d bytes against %s", disk, size, base_raw)
        yield from changed_chunks(base_raw, disk, size)
        return
    if info["format"] != "qcow2":
        raise ImageError(f"{disk} is {info['format']}: only qcow2 (over the base) or raw disks")
    _check_backing(disk, info, base_raw)
    extents = allocated_ranges(disk)
    with tempfile.TemporaryDirectory(prefix="cloudlet-disk-") as tmp:
        pieces = _sources(disk, extents, Path(tmp))
        yield from _changed_from_pieces(base_raw, size, pieces)


def _sources(disk: Path, extents: list[Extent], tmp: Path) -> list[tuple[Extent, Path]]:
    """Each extent with the file its data is read from (at `extent.offset`).

    Data extents without a host offset (compressed clusters) are copied out with `qemu-img dd`
    into a temp raw file and read from there at offset 0.
    """
    out = []
    for i, e in enumerate(extents):
        if not e.data or e.zero or e.offset is not None:
            out.append((e, disk))
            continue
        bs = min(e.start & -e.start if e.start else 1 << 20, e.length & -e.length, 1 << 20)
        dest = tmp / f"extent-{i}.raw"
        skip, count = e.start // bs, e.length // bs
        # qemu-img 7.2 applies count before skip (counting from the image start), so ask for
        # skip + count blocks; a qemu-img that applies them in order just copies a little more.
        cmd = [qemu_img_binary(), "dd", "-U", "-f", "qcow2", "-O", "raw", f"bs={bs}",
               f"skip={skip}", f"count={skip + count}", f"if={disk}", f"of={dest}"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
        if proc.returncode != 0 or not dest.exists() or dest.stat().st_size < e.length:
            raise ImageError(
                f"could not read the compressed clusters at guest offset {e.start} of {disk}: "
                f"{proc.stderr.strip()}"
            )
        LOG.debug("%s: %d compressed bytes at %d read through qemu-img dd", disk, e.length, e.start)
        out.append((replace(e, offset=0), dest))
    return out


def _changed_from_pieces(
    base_raw: Path, size: int, pieces: list[tuple[Extent, Path]]
) -> Iterator[ChangedBatch]:
    """Rebuild each window of the guest view (base + top-layer pieces) and compare with the base."""
    base_size = os.path.getsize(base_raw)
    spans = []
    for e, _ in pieces:
        if e.data and not e.zero:
            spans.append((e.start, e.length))
        elif e.start < base_size:  # zeros past the base end change nothing
            spans.append((e.start, min(e.end, base_size) - e.start))
    starts = [e.start for e, _ in pieces]
    files: dict[Path, int] = {}
    try:
        fd_base = os.open(base_raw, os.O_RDONLY)
        files[base_raw] = fd_base
        for offset, length in iter_spans(normalize_ranges(spans, size)):
            base = os.pread(fd_base, length, offset)
            new = bytearray(base)
            new.extend(bytes(length - len(new)))  # past the base end the disk reads as zero
            end = offset + length
            i = max(bisect_right(starts, offset) - 1, 0)
            while i < len(pieces) and pieces[i][0].start < end:
                e, source = pieces[i]
                i += 1
                lo, hi = max(e.start, offset), min(e.end, end)
                if lo >= hi:
                    continue
                if e.zero or not e.data:
                    new[lo - offset : hi - offset] = bytes(hi - lo)
                    continue
                if source not in files:
                    files[source] = os.open(source, os.O_RDONLY)
                host = (e.offset or 0) + (lo - e.start)
                new[lo - offset : hi - offset] = pread_exact(files[source], hi - lo, host, source)
            batch = compare_window(offset // CHUNK_SIZE, new, base)
            if batch is not None:
                yield batch
    finally:
        for fd in files.values():
            os.close(fd)

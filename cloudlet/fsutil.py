"""File-system steps several stages share: durable renames, sparse copies, finding holes."""

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

_MIN_COPY_RATE = 10e6  # bytes/s below which a copy counts as hung


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clone_sparse(src: Path, dst: Path) -> None:
    """Copy an image, sharing extents where the filesystem can (reflink), leaving holes as holes.

    GNU cp does both: measured 2-4x faster than copy_file_range on ext4, and sparser. The wait is
    bounded by the size (at least 10 MB/s), so a hung storage device surfaces as an error.
    """
    timeout = 120 + os.path.getsize(src) / _MIN_COPY_RATE
    try:
        subprocess.run(
            ["cp", "--reflink=auto", "--sparse=always", str(src), str(dst)],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.CalledProcessError as e:
        raise OSError(f"copying {src} to {dst}: {e.stderr.strip()}") from e
    except subprocess.TimeoutExpired as e:
        raise OSError(f"copying {src} took over {timeout:.0f} s: is its storage healthy?") from e


_SEEK_DATA: int | None = getattr(os, "SEEK_DATA", None)
_SEEK_HOLE: int | None = getattr(os, "SEEK_HOLE", None)


def data_ranges(
    fd: int, start: int, end: int, align: int, min_hole: int
) -> Iterator[tuple[int, int]]:
    """`align`-aligned, ascending (start, end) ranges of [start, end) that may hold data.

    Everything else in [start, end) is a hole of a sparse file: it reads as zeros, so callers
    skip it. SEEK_DATA / SEEK_HOLE find the extents, but at most one probe pair per `min_hole`
    bytes: in a fragmented file a syscall pair per extent costs more than reading the small
    holes between them, so holes shorter than `min_hole` may be returned with the data around
    them (longer ones are always skipped, from at most `min_hole` into them). `start` and `end`
    are `align`-aligned. Without SEEK_DATA support (no such constant, or EINVAL / EOPNOTSUPP
    from the filesystem) everything is data.
    """
    run: int | None = None  # start of the data range being built
    pos = start  # next probe: everything before it is in `run` or already yielded
    while pos < end:
        data = _seek(fd, pos, _SEEK_DATA, end)
        if data is None:  # no hole support: the rest is data
            yield (pos if run is None else run), end
            return
        if data >= pos + min_hole or data >= end:
            if run is not None:
                yield run, pos
                run = None
            pos = data - data % align
            continue
        if run is None:
            run = data - data % align
        hole = _seek(fd, data, _SEEK_HOLE, end)
        hole = end if hole is None else min(end, -(-hole // align) * align)
        pos = max(hole, pos + min_hole)
    if run is not None:
        yield run, end


def next_data(fd: int, pos: int, end: int) -> int:
    """Offset of the first byte at or after `pos` that may hold data; `end` if only a hole
    follows, `pos` itself where the filesystem cannot tell."""
    found = _seek(fd, pos, _SEEK_DATA, end)
    return pos if found is None else min(found, end)


def _seek(fd: int, pos: int, whence: int | None, end: int) -> int | None:
    """lseek SEEK_DATA/SEEK_HOLE: `end` when no data follows, None when unsupported."""
    if whence is None:
        return None
    try:
        return os.lseek(fd, pos, whence)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return end  # nothing but hole from pos on
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise

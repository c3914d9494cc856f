import os
from pathlib import Path

import pytest

from cloudlet.fsutil import clone_sparse


def test_clone_keeps_content_and_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "base", tmp_path / "copy"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(os.urandom(1 << 20))
    clone_sparse(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks * 512 <= 4 << 20  # 63 MiB of holes were not written


def test_clone_failure_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="missing.raw"):
        clone_sparse(tmp_path / "missing.raw", tmp_path / "copy")

"""A base keeps a raw disk whatever it was given: raw copied sparsely, qcow2 converted."""

import os
import subprocess
from pathlib import Path

import pytest

from cloudlet.basevm.create import copy_disk_as_raw
from cloudlet.errors import CloudletError


def _qemu_io(image: Path, fmt: str, command: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", command, str(image)], check=True, capture_output=True
    )


def test_qcow2_disk_becomes_the_same_raw_disk(tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "8M"], check=True)
    _qemu_io(qcow2, "qcow2", "write -P 0x5a 1M 64k")
    copy_disk_as_raw(qcow2, tmp_path / "disk.raw")
    data = (tmp_path / "disk.raw").read_bytes()
    assert len(data) == 8 << 20
    assert data[1 << 20 : (1 << 20) + (64 << 10)] == b"\x5a" * (64 << 10)
    assert data.count(0) == len(data) - (64 << 10)


def test_raw_disk_is_copied_sparsely(tmp_path: Path) -> None:
    raw = tmp_path / "in.raw"
    with open(raw, "wb") as f:
        f.truncate(32 << 20)
        f.seek(3 << 20)
        f.write(os.urandom(4096))
    copy_disk_as_raw(raw, tmp_path / "disk.raw")
    assert (tmp_path / "disk.raw").read_bytes() == raw.read_bytes()
    assert (tmp_path / "disk.raw").stat().st_blocks * 512 < 1 << 20


def test_not_a_disk_is_refused_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(CloudletError, match="nope.img"):
        copy_disk_as_raw(tmp_path / "nope.img", tmp_path / "disk.raw")

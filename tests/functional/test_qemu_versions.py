"""Across QEMU versions: the system QEMU (Debian 12's 7.2) and bookworm-backports' (10.x).

A base made on the older QEMU synthesizes on the newer one; a base made on the newer QEMU with
its own machine type is refused on the older one at import and, when already registered, before
synthesis reads any overlay frame. Real QEMUs both (tools/qemu-backports/install.sh installs the
newer one beside the system's). These tests need the session's QEMU to be the system one (the
first pass of tools/test.sh): the session fixtures' base is then a 7.2 base.
"""

import json
import os
from pathlib import Path

import pytest

from cloudlet.basevm.store import BaseStore
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.config import QEMU_ENV, qemu_version
from cloudlet.hypervisor.qemu import free_port
from cloudlet.memory.stream import MemoryLayout
from cloudlet.overlay.reader import OverlayReader
from tests.functional.conftest import (
    cloudlet,
    create_test_base,
    create_test_overlay,
    leftovers,
)

pytestmark = [pytest.mark.qemu, pytest.mark.cross_version]
OLDER = "qemu-system-x86_64"  # the system QEMU, on PATH


@pytest.fixture(scope="module", autouse=True)
def _session_qemu_is_the_system_one():
    if os.environ.get(QEMU_ENV):
        pytest.fail(f"cross-version tests run with the system QEMU, not {QEMU_ENV} set")


@pytest.fixture(scope="module")
def newer_home(tmp_path_factory, test_guest: Path, newer_qemu: str) -> Path:
    """A home holding a base made on the newer QEMU with its newest machine type ("pc")."""
    home = tmp_path_factory.mktemp("home-newer")
    create_test_base(home, test_guest, newer_qemu)
    return home


@pytest.fixture(scope="module")
def newer_overlay(newer_home: Path, newer_qemu: str, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("newer-overlay") / "app.overlay"
    create_test_overlay(newer_home, out, newer_qemu)
    return out


def test_base_records_the_qemu_and_machine_it_was_saved_with(newer_home: Path, newer_qemu: str):
    base = BaseStore(CloudletHome(newer_home)).get("testguest")
    newest = qemu_version(newer_qemu)
    assert base.config["machine"].endswith(f"-{'.'.join(newest.split('.')[:2])}")
    assert MemoryLayout.from_bytes(base.memory_layout_path.read_bytes()).saved_by == newest


def test_base_of_older_qemu_synthesizes_on_newer(
    tmp_path: Path, package: Path, overlay: Path, newer_qemu: str
):
    home = tmp_path / "home"
    cloudlet(home, "base", "import", str(package), qemu=newer_qemu)
    port = free_port()
    done = cloudlet(
        home,
        "synthesize",
        str(overlay),
        "--check-and-exit",
        "-f",
        f"tcp:{port}:8080",
        "--check-url",
        f"http://127.0.0.1:{port}/",
        qemu=newer_qemu,
    )
    # served by a process started during customisation, from a file that only lived in RAM
    assert "ram-only state, written before capture" in done.stdout
    assert leftovers(home) == []


def test_base_of_newer_qemu_is_refused_at_import_on_older(
    tmp_path: Path, newer_home: Path, newer_qemu: str
):
    package = tmp_path / "newer.cbase"
    cloudlet(newer_home, "base", "export", "testguest", str(package), qemu=newer_qemu)
    home = tmp_path / "home"
    done = cloudlet(home, "base", "import", str(package), check=False, qemu=OLDER)
    assert done.returncode != 0
    machine = json.loads(cloudlet(newer_home, "base", "list", "--json").stdout)[0]["config"][
        "machine"
    ]
    assert f"needs QEMU machine type '{machine}'" in done.stderr
    assert f"QEMU {qemu_version(OLDER)}" in done.stderr
    assert "Traceback" not in done.stderr
    assert json.loads(cloudlet(home, "base", "list", "--json").stdout) == []


def test_overlay_of_newer_qemu_is_refused_before_any_frame_is_read(
    tmp_path: Path, newer_home: Path, newer_overlay: Path
):
    """The host's QEMU went back to an older version after the base was registered."""
    # Only the overlay's header is readable: a synthesis that read past it would fail otherwise.
    header = tmp_path / "header-only.overlay"
    with open(newer_overlay, "rb") as src, open(header, "wb") as dst:
        dst.write(src.read(_header_length(newer_overlay)))
    done = cloudlet(
        newer_home, "synthesize", str(header), "--check-and-exit", check=False, qemu=OLDER
    )
    assert done.returncode != 0
    assert "needs QEMU machine type" in done.stderr and "does not offer" in done.stderr
    assert "truncated" not in done.stderr.lower() and "Traceback" not in done.stderr
    assert leftovers(newer_home) == []


def _header_length(overlay: Path) -> int:
    with OverlayReader.open(overlay) as reader:
        return reader.frames_offset

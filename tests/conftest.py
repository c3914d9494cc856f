"""Shared fixtures: the test guest (built once per machine by tools/testguest/build.sh)."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cloudlet.hashing import file_sha256
from cloudlet.hypervisor.config import VMConfig, resolve_machine

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "tools" / "testguest" / "build.sh"


def guest_dir() -> Path:
    default = Path.home() / ".cache" / "cloudlet" / "testguest"
    return Path(os.environ.get("CLOUDLET_GUEST_DIR", default))


@pytest.fixture(scope="session")
def test_guest() -> Path:
    """Directory holding vmlinuz, initrd.img, disk.raw and guest.json (see build.sh).

    Builds or refreshes it if needed. A guest that cannot be built FAILS the test: the tests
    that need it are the ones proving the product works, so they must never silently skip.
    """
    out = guest_dir()
    try:
        done = subprocess.run(
            ["bash", str(BUILD_SCRIPT), str(out)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"building the test guest timed out after {exc.timeout:.0f} s")
    if done.returncode != 0:
        pytest.fail(
            f"building the test guest with {BUILD_SCRIPT} failed ({done.returncode}):\n"
            f"{done.stderr[-4000:]}"
        )
    return out


@pytest.fixture(scope="session")
def test_guest_info(test_guest: Path) -> dict:
    """guest.json of the test guest, with file names turned into absolute paths."""
    info = json.loads((test_guest / "guest.json").read_text())
    for key in ("kernel", "initrd", "disk"):
        info[key] = test_guest / info[key]
    return info


@pytest.fixture(scope="session")
def test_guest_config(test_guest_info: dict) -> VMConfig:
    """The VMConfig the test guest boots with (direct kernel boot, TCG-friendly defaults)."""
    return VMConfig(
        machine=resolve_machine("pc"),
        memory_mib=test_guest_info["memory_mib"],
        kernel_sha256=file_sha256(test_guest_info["kernel"]),
        initrd_sha256=file_sha256(test_guest_info["initrd"]),
        append=test_guest_info["append"],
    )


@pytest.fixture(scope="session")
def libvirtd():
    """A libvirt daemon answering on qemu:///system: the one running, or one started here.

    CI machines have the packages (tools/setup.sh) but no systemd to start the daemon, so the
    tests start libvirtd (and virtlogd, which it needs for QEMU's logs) and stop them after.
    """
    uri = "qemu:///system"

    def answers() -> bool:
        done = subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, timeout=30)
        return done.returncode == 0

    started = []
    if not answers():
        for daemon in ("virtlogd", "libvirtd"):
            proc = subprocess.Popen([daemon], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started.append(proc)
        deadline = time.monotonic() + 60
        while not answers():
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                for p in started:
                    p.kill()
                pytest.fail("libvirtd did not come up within 60 s")
            time.sleep(0.5)
    yield uri
    for proc in reversed(started):
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

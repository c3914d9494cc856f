"""Fixtures of the functional tests, shared by every module: one base VM made from the test guest
and one overlay of it per test session (each takes a real boot or resume under TCG), plus the
helpers that drive the `cloudlet` command as a user does, in subprocesses.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CUSTOMISE = REPO / "tools" / "demo" / "customize.sh"
QEMU_BACKPORTS = REPO / "tools" / "qemu-backports" / "install.sh"


def cloudlet(
    home: Path,
    *args: str,
    check: bool = True,
    timeout: float = 600,
    qemu: str | None = None,
    cwd: Path | None = None,
):
    """Run `cloudlet ARGS` in `home` (from `cwd`); `qemu` overrides the QEMU of this run
    (CLOUDLET_QEMU)."""
    env = dict(os.environ, CLOUDLET_HOME=str(home))
    if qemu is not None:
        env["CLOUDLET_QEMU"] = qemu
    done = subprocess.run(
        [sys.executable, "-m", "cloudlet.cli.main", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"cloudlet {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return done


def http_get(port: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def newer_qemu() -> str:
    """QEMU from bookworm-backports, beside the system's (tools/qemu-backports/install.sh)."""
    try:
        done = subprocess.run(
            ["bash", str(QEMU_BACKPORTS)], capture_output=True, text=True, timeout=900
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"installing the backports QEMU timed out after {exc.timeout:.0f} s")
    if done.returncode != 0:
        pytest.fail(f"{QEMU_BACKPORTS} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout.strip().splitlines()[-1]


def create_test_base(home: Path, test_guest: Path, qemu: str | None = None, *extra: str):
    """`cloudlet base create` of the test guest as "testguest" in `home`."""
    g = json.loads((test_guest / "guest.json").read_text())
    return cloudlet(
        home,
        "base",
        "create",
        str(test_guest / g["disk"]),
        "--name",
        "testguest",
        "--kernel",
        str(test_guest / g["kernel"]),
        "--initrd",
        str(test_guest / g["initrd"]),
        "--append",
        g["append"],
        "--memory",
        str(g["memory_mib"]),
        "--ready-marker",
        g["ready_marker"],
        *extra,
        qemu=qemu,
    )


def create_test_overlay(home: Path, out: Path, qemu: str | None = None, *extra: str):
    """`cloudlet overlay create` of the test guest's base in `home`, customised by CUSTOMISE."""
    return cloudlet(
        home, "overlay", "create", "testguest", "--script", str(CUSTOMISE), "-o", str(out),
        *extra, qemu=qemu,
    )  # fmt: skip


@pytest.fixture(scope="session")
def home_a(tmp_path_factory, test_guest: Path) -> Path:
    """A cloudlet home holding a base VM made from the test guest."""
    home = tmp_path_factory.mktemp("home-a")
    create_test_base(home, test_guest)
    return home


@pytest.fixture(scope="session")
def overlay(home_a: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("overlay") / "app.overlay"
    done = create_test_overlay(home_a, out, None, "--json")
    stats = json.loads(done.stdout)
    assert stats["counters"]["overlay size"] == out.stat().st_size
    return out


@pytest.fixture(scope="session")
def package(home_a: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "testguest.cbase"
    cloudlet(home_a, "base", "export", "testguest", str(out))
    return out


@pytest.fixture
def home_b(tmp_path: Path, package: Path) -> Path:
    """A fresh, separate cloudlet home that imported the base package."""
    home = tmp_path / "home-b"
    cloudlet(home, "base", "import", str(package))
    return home


def leftovers(home: Path) -> list[str]:
    """Files a failed synthesis might have left behind in the home's scratch areas (a stale
    FUSE mount of a killed process counts: it cannot even be listed)."""
    found: list[str] = []

    def unreadable(error: OSError) -> None:
        found.append(f"{Path(error.filename).relative_to(home)} ({error.strerror})")

    for sub in ("runs", "tmp"):
        for root, _, files in os.walk(home / sub, onerror=unreadable):
            found += [str((Path(root) / f).relative_to(home)) for f in files]
    return found



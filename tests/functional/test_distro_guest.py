"""End to end on the distribution guest (tools/distroguest/build.sh): a Debian 12 system with
systemd, DHCP on its first NIC, sshd and 1 GiB of RAM, booted under TCG.

base create (ready when sshd answers) -> customise over ssh as a user customises a cloud VM:
install nginx and a Python application over sqlite from .deb files, started as systemd units,
and add notes through it -> overlay -> export the base, import it into a fresh home ->
synthesize there: the application answers with the notes (its database on disk) and the
instance token it made at start (its memory: the guest was resumed, not rebooted).
tools/test.sh runs this once, on the system QEMU (marker `distro_guest`): it takes minutes.
"""

import json
from pathlib import Path

import pytest

from cloudlet.basevm.store import BaseStore
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.qemu import free_port
from cloudlet.overlay.create import Customisation, OverlaySpec, create_overlay
from cloudlet.stats import Stats
from tests.distroguest import (
    APP_TIMEOUT,
    BOOT_TIMEOUT,
    NOTES,
    DistroGuest,
    NotesCustomisation,
    build,
)
from tests.functional.conftest import cloudlet, leftovers

pytestmark = [pytest.mark.qemu, pytest.mark.distro_guest]


@pytest.fixture(scope="module")
def distro_guest() -> DistroGuest:
    """Built (or found in the cache) by the project's own recipe; a failure FAILS the test."""
    try:
        return DistroGuest.load(build())
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"building the distribution guest failed: {exc}")


def test_installed_application_answers_with_its_state_after_synthesis(
    tmp_path: Path, distro_guest: DistroGuest
):
    home_a = tmp_path / "home-a"
    ready = free_port()
    cloudlet(home_a, "base", "create", str(distro_guest.file("disk")), "--name", "distro",
             *distro_guest.create_args(), "--ready-port", str(ready), "-f", f"tcp:{ready}:22",
             "--timeout", str(BOOT_TIMEOUT), timeout=2 * BOOT_TIMEOUT)  # fmt: skip
    base = BaseStore(CloudletHome(home_a)).get("distro")
    assert (
        base.config["memory_mib"] == 1024 and base.config["append"] == distro_guest.info["append"]
    )

    overlay = tmp_path / "notes.overlay"
    customise = NotesCustomisation(distro_guest, free_port(), free_port())
    create_overlay(
        CloudletHome(home_a),
        base,
        OverlaySpec(output=overlay, host=customise.host()),
        Customisation(wait_for_user=customise, timeout=APP_TIMEOUT),
        Stats(),
    )
    before = customise.answer
    assert before is not None and before["notes"] == list(NOTES)
    # the application and nginx are in the overlay, not the 3 GiB disk and 1 GiB of RAM
    assert overlay.stat().st_size < (base.disk_size + base.memory_size) / 20

    package = tmp_path / "distro.cbase"
    cloudlet(home_a, "base", "export", "distro", str(package), timeout=BOOT_TIMEOUT)
    home_b = tmp_path / "home-b"
    cloudlet(home_b, "base", "import", str(package), timeout=BOOT_TIMEOUT)
    package.unlink()

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    done = cloudlet(home_b, "synthesize", str(overlay), "-f", f"tcp:{port}:80",
                    "--check-url", url, "--check-and-exit", "--json",
                    "--timeout", str(APP_TIMEOUT), timeout=2 * APP_TIMEOUT)  # fmt: skip
    after = json.loads(json.loads(done.stdout)["responses"][url])
    assert after["notes"] == list(NOTES)  # the database the customisation wrote
    # the application process of the customisation, in the same boot: resumed from memory
    assert (after["instance"], after["boot_id"]) == (before["instance"], before["boot_id"])
    assert leftovers(home_b) == []

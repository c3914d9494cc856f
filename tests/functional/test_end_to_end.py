"""End to end on real QEMU guests (TCG): base -> resume + customise -> overlay -> synthesis.

Everything here is real: the test guest's kernel, QEMU, the migration streams, sqlite, the files.
The `cloudlet` command is driven as a user drives it, in subprocesses.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloudlet.basevm.store import BaseStore
from cloudlet.disk import create_cow
from cloudlet.errors import HypervisorError
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.config import VMConfig
from cloudlet.hypervisor.qemu import Forward, free_port
from cloudlet.memory.libvirt import LibvirtSaveHeader, write_save_file
from cloudlet.memory.stream import MemoryLayout, emit_stream
from cloudlet.overlay import format as overlay_format
from cloudlet.overlay.create import OverlaySpec, build_overlay
from cloudlet.overlay.reader import OverlayReader
from cloudlet.stats import Stats
from cloudlet.synthesis import QemuRunner, SynthesisSpec, synthesize
from cloudlet.vm import HostOptions, resume_vm
from tests.functional.conftest import cloudlet, http_get, leftovers

pytestmark = pytest.mark.qemu

def test_base_is_registered_with_its_config(home_a: Path):
    bases = json.loads(cloudlet(home_a, "base", "list", "--json").stdout)
    assert [b["name"] for b in bases] == ["testguest"]
    assert bases[0]["config"]["memory_mib"] == 256
    assert bases[0]["config"]["machine"].startswith("pc-")  # the alias was pinned
    cloudlet(home_a, "base", "verify", "testguest")


def test_overlay_is_much_smaller_than_the_vm(home_a: Path, overlay: Path):
    shown = json.loads(cloudlet(home_a, "overlay", "show", str(overlay), "--json").stdout)
    base = json.loads(cloudlet(home_a, "base", "list", "--json").stdout)[0]
    assert shown["base_id"] == base["id"]
    # the customisation wrote 1 MiB of random data: it must be in there, as new chunks
    assert shown["chunks"]["NEW"] >= 256
    assert overlay.stat().st_size < (base["disk_size"] + base["memory_size"]) / 10


def test_synthesis_in_fresh_home_resumes_customised_guest(home_b: Path, overlay: Path):
    disk_port, ram_port = free_port(), free_port()
    done = cloudlet(
        home_b,
        "synthesize",
        str(overlay),
        "--check-and-exit",
        "-f",
        f"tcp:{disk_port}:80",
        "-f",
        f"tcp:{ram_port}:8080",
        "--check-url",
        f"http://127.0.0.1:{disk_port}/",
        "--check-url",
        f"http://127.0.0.1:{ram_port}/",
    )
    # the disk change made during customisation
    assert "hello from the cloudlet overlay" in done.stdout
    # the web server started during customisation serves a file that only ever lived in RAM:
    # it answers only if the guest's memory was resumed, not rebooted
    assert "ram-only state, written before capture" in done.stdout
    assert "restore memory" in done.stdout
    assert leftovers(home_b) == []


def test_synthesized_guest_continues_the_same_boot(home_b: Path, overlay: Path):
    """The boot id recorded in RAM before capture equals the running kernel's boot id."""

    port = free_port()
    spec = SynthesisSpec(
        source=overlay, runner=QemuRunner(HostOptions([Forward("tcp", port, 8080)])), timeout=120
    )
    with synthesize(CloudletHome(home_b), spec, Stats()) as synth:
        recorded = http_get(port).rsplit(":", 1)[1].strip()
        now = synth.runner.vm.run_in_guest("cat /proc/sys/kernel/random/boot_id", timeout=60)
        assert recorded and recorded in now


# --- bad input: a specific error, and nothing left that looks complete -----------------------


def _corrupt(
    src: Path,
    dest: Path,
    offset_from_end: int | None = None,
    at: int | None = None,
    truncate: int | None = None,
) -> Path:
    data = bytearray(src.read_bytes())
    if truncate is not None:
        data = data[:truncate]
    if offset_from_end is not None:
        data[len(data) - offset_from_end] ^= 0x01
    if at is not None:
        data[at] ^= 0x01
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize(
    "damage,message",
    [
        ("frame", "frame"),
        ("truncate", "cut short"),
        ("manifest", "manifest"),
        ("version", "version"),
    ],
)
def test_damaged_overlay_is_refused(home_b: Path, overlay: Path, tmp_path: Path, damage, message):
    bad = tmp_path / "bad.overlay"
    if damage == "frame":
        _corrupt(overlay, bad, offset_from_end=100)  # inside the last frame
    elif damage == "truncate":
        _corrupt(overlay, bad, truncate=overlay.stat().st_size - 5000)
    elif damage == "manifest":
        _corrupt(overlay, bad, at=_manifest_offset(overlay) + 10)
    else:
        _corrupt(overlay, bad, at=_version_offset())
    done = cloudlet(home_b, "synthesize", str(bad), "--check-and-exit", check=False)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr.lower(), done.stderr
    assert leftovers(home_b) == []


def _manifest_offset(path: Path) -> int:
    return overlay_format.HEADER_SIZE  # the manifest follows the fixed-size header


def _version_offset() -> int:
    return len(overlay_format.MAGIC)  # the major version follows the magic


def test_overlay_for_another_base_is_refused(tmp_path: Path, overlay: Path):
    empty = tmp_path / "empty-home"
    done = cloudlet(empty, "synthesize", str(overlay), "--check-and-exit", check=False)
    assert done.returncode == 2
    assert "base" in done.stderr and "import" in done.stderr


def test_base_package_with_bad_digest_is_refused(tmp_path: Path, package: Path):
    bad = tmp_path / "bad.cbase"
    _corrupt(package, bad, offset_from_end=package.stat().st_size // 2)
    home = tmp_path / "home"
    done = cloudlet(home, "base", "import", str(bad), check=False)
    assert done.returncode == 2, done.stderr
    assert json.loads(cloudlet(home, "base", "list", "--json").stdout) == []
    assert leftovers(home) == []


def test_missing_disk_is_refused(tmp_path: Path):
    done = cloudlet(
        tmp_path / "home",
        "base",
        "create",
        str(tmp_path / "nope.raw"),
        "--ready-marker",
        "x",
        check=False,
    )
    assert done.returncode == 2
    assert "nope.raw" in done.stderr and "does not exist" in done.stderr


def test_ready_port_timeout_quotes_the_console(tmp_path: Path, test_guest: Path):
    """A guest whose service never answers (here: nothing listens on guest port 81) fails with
    what its console said, as a --ready-marker timeout does; nothing is registered."""
    g = json.loads((test_guest / "guest.json").read_text())
    port = free_port()
    home = tmp_path / "home"
    done = cloudlet(home, "base", "create", str(test_guest / g["disk"]),
                    "--kernel", str(test_guest / g["kernel"]),
                    "--initrd", str(test_guest / g["initrd"]), "--append", g["append"],
                    "--memory", str(g["memory_mib"]), "--ready-port", str(port),
                    "-f", f"tcp:{port}:81", "--timeout", "45", check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"nothing in the guest answered on host port {port} within 45 s" in done.stderr
    assert "console ends: " in done.stderr and "guest# " in done.stderr  # the guest's shell
    assert BaseStore(CloudletHome(home)).list() == []
    assert leftovers(home) == []


# The test kernel with a one-line init: ready, then a kernel crash 3 s of guest time later. The
# snapshot is taken within that time, so the guest crashes on every resume of it, as one base of
# the test guest once did by itself ("kworker ... exited with irqs disabled"). ${IFS}: the kernel
# splits init's arguments at spaces.
_CRASH_AFTER_READY = (
    "rdinit=/bin/busybox -- sh -c busybox${IFS}mount${IFS}-t${IFS}proc${IFS}proc${IFS}/proc;"
    "echo${IFS}CRASH-READY;busybox${IFS}sleep${IFS}3;echo${IFS}c>/proc/sysrq-trigger;"
    "busybox${IFS}sleep${IFS}1000"
)


def test_a_base_that_does_not_resume_is_not_registered(tmp_path: Path, test_guest: Path):
    g = json.loads((test_guest / "guest.json").read_text())
    home = tmp_path / "home"
    done = cloudlet(home, "base", "create", str(test_guest / g["disk"]), "--name", "crashy",
                    "--kernel", str(test_guest / g["kernel"]),
                    "--initrd", str(test_guest / g["initrd"]),
                    "--append", f"{g['append']} {_CRASH_AFTER_READY}",
                    "--memory", str(g["memory_mib"]), "--ready-marker", "CRASH-READY",
                    check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the base was not registered: its memory snapshot does not resume" in done.stderr
    assert "console ends: " in done.stderr
    assert "FAILED check resume" in done.stderr
    assert BaseStore(CloudletHome(home)).list() == []
    assert leftovers(home) == [] and list((home / "bases").iterdir()) == []


def test_killed_synthesis_leaves_no_vm_and_is_cleaned_up(home_b: Path, overlay: Path):
    env = dict(os.environ, CLOUDLET_HOME=str(home_b))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudlet.cli.main", "synthesize", str(overlay)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # kill it while it works: as soon as it has written anything into its run directory
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not leftovers(home_b):
        time.sleep(0.005)
    assert leftovers(home_b), "synthesis never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # no QEMU outlives it
    time.sleep(1)
    ps = subprocess.run(["pgrep", "-f", f"qemu-system.*{home_b}"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""
    assert leftovers(home_b)  # what the killed process was writing is still there...
    port = free_port()
    cloudlet(
        home_b,
        "synthesize",
        str(overlay),
        "--check-and-exit",
        "-f",
        f"tcp:{port}:80",
        "--check-url",
        f"http://127.0.0.1:{port}/",
    )
    assert leftovers(home_b) == []


def test_restore_into_other_hardware_fails_fast_and_cleanly(home_a: Path, tmp_path: Path):
    """QEMU refusing the stream must surface as an error at once: no hang, no QEMU left."""

    base = BaseStore(CloudletHome(home_a)).get("testguest")
    smaller = VMConfig.from_dict({**base.config, "memory_mib": 128})
    disk = tmp_path / "disk.qcow2"
    create_cow(base.disk_path, disk)
    # QEMU's own refusal, not our timeout: the failure is seen as soon as QEMU gives up
    with pytest.raises(HypervisorError, match="(?i)mismatch|exited|died"):
        resume_vm(
            smaller,
            disk=disk,
            disk_format="qcow2",
            memory_image=base.memory_path,
            layout=MemoryLayout.from_bytes(base.memory_layout_path.read_bytes()),
            run_dir=tmp_path,
            kernel=base.kernel_path,
            initrd=base.initrd_path,
            host=HostOptions(),
            stats=Stats(),
            timeout=120,
        )
    assert not (tmp_path / "incoming.fifo").exists()
    ps = subprocess.run(["pgrep", "-f", f"qemu-system.*{tmp_path}"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_overlay_from_a_libvirt_save_file(home_a: Path, tmp_path: Path):
    """Memory saved by libvirt (`virsh save`, as Nova does) is captured like QEMU's own stream.

    The VM here is the base itself, unchanged: its overlay ships no chunk at all, and
    synthesizing it gives back the base's running guest.
    """
    home = CloudletHome(home_a)
    base = BaseStore(home).get("testguest")
    layout = MemoryLayout.from_bytes(base.memory_layout_path.read_bytes())
    save = tmp_path / "vm.save"
    with open(save, "wb") as out:
        write_save_file(
            out,
            LibvirtSaveHeader(xml="<domain type='qemu'/>", was_running=True),
            lambda o: emit_stream(layout, base.memory_path, o),
        )
    disk = tmp_path / "disk.qcow2"
    create_cow(base.disk_path, disk)
    overlay = tmp_path / "unchanged.overlay"
    work = tmp_path / "work"
    work.mkdir()
    build_overlay(base, save, disk, OverlaySpec(overlay), Stats(), work_dir=work)
    with OverlayReader.open(overlay) as reader:
        assert len(reader.chunk_map) == 0 and reader.slot_count == 0
    port = free_port()
    spec = SynthesisSpec(source=overlay, runner=QemuRunner(HostOptions([Forward("tcp", port, 80)])))
    with synthesize(home, spec, Stats()):
        assert http_get(port) == "cloudlet base disk\n"

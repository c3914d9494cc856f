"""Memory snapshots of real QEMU guests: parse, re-emit, restore, and compare the RAM.

The guest is BIOS-only (no disk): SeaBIOS runs and leaves varied RAM, plus a known pattern put
at a fixed guest-physical address by QEMU's generic loader. Nothing here depends on the
hypervisor package: a tiny QMP client drives QEMU directly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from cloudlet import fsutil
from cloudlet.hypervisor.config import QEMU_BINARY, qemu_binary
from cloudlet.memory import libvirt
from cloudlet.memory.stream import emit_stream, open_snapshot, parse_stream

QEMU = shutil.which(qemu_binary())  # the run's QEMU: CLOUDLET_QEMU, else the system's
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason=f"{qemu_binary()} is not installed"),
]

BASE_ARGS = ["-accel", "tcg", "-m", "128", "-nodefaults", "-display", "none"]
# QEMU's newest i440fx and q35 machine types: from 10.0 on their streams carry SWITCHOVER_START
MACHINES = ["pc", "q35"]
PATTERN_ADDR = 64 << 20  # inside pc.ram, far from where SeaBIOS puts itself
TIMEOUT = 60.0


class Qmp:
    """Just enough QMP: one command at a time, events skipped, every wait bounded."""

    def __init__(self, path: Path, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(timeout)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._sock = sock
        self._file = sock.makefile("rw")
        json.loads(self._file.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args):
        self._file.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self._file.flush()
        while True:
            line = self._file.readline()
            if not line:
                raise RuntimeError(f"QEMU closed the QMP socket during {name}")
            reply = json.loads(line)
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def wait_for(self, what: str, check, timeout: float = TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"QEMU did not reach {what} within {timeout} s")

    def migrate_to(self, path: Path) -> None:
        """Save the (stopped) guest's state to a file, as the engine does for a snapshot."""
        self.cmd("migrate", uri=f"exec:cat > {path}")

        def done():
            status = self.cmd("query-migrate").get("status")
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"migration {status}")
            return status == "completed"

        self.wait_for("migration completed", done)

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class Vm:
    """A QEMU process with a QMP socket; always torn down."""

    def __init__(self, workdir: Path, name: str, extra: list[str]) -> None:
        self.sock = workdir / f"{name}.qmp"
        machine = (workdir / "machine").read_text()
        self.proc = subprocess.Popen(
            [QEMU, "-machine", machine, *BASE_ARGS, "-qmp", f"unix:{self.sock},server=on,wait=off",
             *extra],  # fmt: skip
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            self.qmp = Qmp(self.sock)
        except BaseException:
            self.stop()
            raise

    def status(self) -> str:
        return self.qmp.cmd("query-status")["status"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.qmp.cmd("quit")
                self.qmp.close()
            except (AttributeError, OSError, RuntimeError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture(scope="module", params=MACHINES)
def workdir(tmp_path_factory, request) -> Path:
    """Scratch directory of one machine type's tests; its `machine` file names the type."""
    path = tmp_path_factory.mktemp(f"memory-{request.param}")
    (path / "machine").write_text(request.param)
    return path


@pytest.fixture(scope="module")
def pattern(workdir) -> bytes:
    data = b"".join(i.to_bytes(4, "little") * 1024 for i in range(64))  # 64 distinct pages
    (workdir / "pattern.bin").write_bytes(data)
    return data


@pytest.fixture(scope="module")
def snapshot(workdir, pattern) -> Path:
    """A stream saved from a BIOS-only guest that ran a moment, then stopped."""
    loader = f"loader,file={workdir / 'pattern.bin'},addr={PATTERN_ADDR},force-raw=on"
    vm = Vm(workdir, "source", ["-device", loader])
    try:
        time.sleep(0.5)  # let SeaBIOS scribble over RAM
        vm.qmp.cmd("stop")
        vm.qmp.migrate_to(workdir / "source.qevm")
    finally:
        vm.stop()
    return workdir / "source.qevm"


@pytest.fixture(scope="module")
def parsed(workdir, snapshot):
    image = workdir / "source.img"
    with open(snapshot, "rb") as f:
        layout = parse_stream(f, image)
    return layout, image


def test_real_stream_parses_into_guest_physical_layout(workdir, parsed, pattern):
    layout, image = parsed
    assert layout.blocks[0].name == "pc.ram" and layout.blocks[0].length == 128 << 20
    assert {"pc.bios", "pc.rom"} <= {b.name for b in layout.blocks}
    want = {"pc": "pc-i440fx-", "q35": "pc-q35-"}[(workdir / "machine").read_text()]
    assert layout.machine and layout.machine.startswith(want)
    assert os.path.getsize(image) == layout.size
    with open(image, "rb") as f:
        f.seek(PATTERN_ADDR)
        assert f.read(len(pattern)) == pattern  # pc.ram offset = guest physical address
        f.seek(layout.block("pc.bios").offset + layout.block("pc.bios").length - 16)
        assert f.read(16) != bytes(16)  # the reset vector of SeaBIOS


def test_parse_emit_parse_gives_identical_image_and_layout(workdir, parsed):
    layout, image = parsed
    with open(workdir / "emitted.qevm", "wb") as out:
        emit_stream(layout, image, out)
    with open(workdir / "emitted.qevm", "rb") as f:
        again = parse_stream(f, workdir / "again.img")
    assert again == layout
    assert _same_file(image, workdir / "again.img")


def test_emit_skipping_holes_equals_reading_everything(workdir, parsed, monkeypatch):
    """A sparse copy of a real guest's image (holes where RAM is zero) emits the same stream
    as reading every byte of it."""

    layout, image = parsed
    sparse = workdir / "sparse.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(sparse)], check=True, timeout=60)
    out = {}
    for name, path in (("parsed", image), ("sparse", sparse)):
        with open(workdir / f"{name}.qevm", "wb") as f:
            emit_stream(layout, path, f)
    monkeypatch.setattr(fsutil, "_SEEK_DATA", None)  # as on a filesystem without holes
    with open(workdir / "scan.qevm", "wb") as f:
        emit_stream(layout, image, f)
    for name in ("parsed", "sparse"):
        out[name] = _same_file(workdir / f"{name}.qevm", workdir / "scan.qevm")
    assert out == {"parsed": True, "sparse": True}


def test_emitted_stream_restores_the_same_guest(workdir, parsed, pattern):
    """QEMU accepts the emitted stream; the restored guest holds the same RAM and runs."""
    layout, image = parsed
    emitted = workdir / "restore.qevm"
    with open(emitted, "wb") as out:
        emit_stream(layout, image, out)
    # No loader device here: the pattern can only come from the emitted stream.
    vm = Vm(workdir, "restored", ["-S", "-incoming", "defer"])
    try:
        vm.qmp.cmd("migrate-incoming", uri=f"exec:cat {emitted}")
        vm.qmp.wait_for("paused after incoming migration", lambda: vm.status() == "paused")
        assert vm.qmp.cmd("query-migrate").get("status") == "completed"
        vm.qmp.migrate_to(workdir / "restored.qevm")
        with open(workdir / "restored.qevm", "rb") as f:
            restored = parse_stream(f, workdir / "restored.img")
        assert restored.ram_compatible(layout)
        assert _same_file(image, workdir / "restored.img")
        vm.qmp.cmd("cont")
        vm.qmp.wait_for("running after cont", lambda: vm.status() == "running")
    finally:
        vm.stop()


def test_libvirt_container_of_a_real_stream_restores_in_qemu(workdir, parsed):
    """A save file written by the engine carries the stream where libvirt looks for it."""
    layout, image = parsed
    header = libvirt.LibvirtSaveHeader(xml="<domain type='qemu'/>", was_running=True)
    path = workdir / "vm.save"
    with open(path, "wb") as out:
        written = libvirt.write_save_file(out, header, lambda o: emit_stream(layout, image, o))
    f, kind = open_snapshot(path)
    with f:
        assert kind == "libvirt"
        assert parse_stream(f, workdir / "container.img") == layout
    assert _same_file(image, workdir / "container.img")
    vm = Vm(workdir, "fromsave", ["-S", "-incoming", "defer"])
    try:
        vm.qmp.cmd("migrate-incoming", uri=f"exec:tail -c +{written.stream_offset + 1} {path}")
        vm.qmp.wait_for("paused after incoming migration", lambda: vm.status() == "paused")
        vm.qmp.cmd("cont")
        vm.qmp.wait_for("running after cont", lambda: vm.status() == "running")
    finally:
        vm.stop()


DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>{qemu}</emulator></devices>
</domain>
"""


@pytest.mark.qemu
@pytest.mark.libvirt
def test_virsh_save_file_read_edited_and_restored_by_libvirt(tmp_path, libvirtd):
    """Read a real `virsh save`, rewrite it with edited XML and re-emitted RAM, restore it."""
    workdir = tmp_path
    name = f"cloudlet-test-{os.getpid()}"
    xml = workdir / "domain.xml"
    xml.write_text(DOMAIN_XML.format(name=name, qemu=shutil.which(QEMU_BINARY)))
    saved, rewritten = workdir / "virsh.save", workdir / "rewritten.save"

    def virsh(*args: str) -> str:
        done = subprocess.run(
            ["virsh", "-c", libvirtd, *args], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    virsh("create", str(xml))
    try:
        virsh("save", name, str(saved))
        f, kind = open_snapshot(saved)
        with f:
            assert kind == "libvirt"
            layout = parse_stream(f, workdir / "virsh.img")
        with open(saved, "rb") as f:
            header = libvirt.read_header(f)
        assert header.was_running and f"<name>{name}</name>" in header.xml
        header.xml = header.xml.replace(
            f"<name>{name}</name>", f"<name>{name}</name><description>edited</description>"
        )
        with open(rewritten, "wb") as out:
            libvirt.write_save_file(
                out, header, lambda o: emit_stream(layout, workdir / "virsh.img", o)
            )
        virsh("restore", str(rewritten))
        assert virsh("domstate", name).strip() == "running"
        assert "<description>edited</description>" in virsh("dumpxml", name)
    finally:
        subprocess.run(
            ["virsh", "-c", "qemu:///system", "destroy", name], capture_output=True, timeout=60
        )


def _same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True

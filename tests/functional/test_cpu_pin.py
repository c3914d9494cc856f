"""A base's pinned CPU model against a real libvirtd + QEMU under TCG (cloudlet_nova.hardware).

Two models: Westmere, which TCG emulates, and the same model asking for a feature TCG lacks
(avx512f). The host check refuses the second with libvirt's list of missing features; a real
guest saved on a pinned Westmere resumes through the Nova driver's restore path (the engine's
runner for Nova, cloudlet_nova.runner.LibvirtRestore) into a domain pinned the same way, and the
runner refuses to resume it into a domain with another model. Nova's own functional tests
(cloudlet_nova/tests/test_cpu) cover the driver and scheduler around these checks with
fakelibvirt.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from xml.etree import ElementTree

import pytest

from cloudlet.basevm.store import BaseVM
from cloudlet.memory.stream import MemoryLayout, open_snapshot, parse_stream
from cloudlet.stats import Stats
from cloudlet.synthesis import Resumable

QEMU = shutil.which("qemu-system-x86_64")  # the system's: the one libvirtd runs
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.libvirt,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
]
libvirt = pytest.importorskip("libvirt")
hardware = pytest.importorskip("cloudlet_nova.hardware")  # the [nova] extra
runner = pytest.importorskip("cloudlet_nova.runner")

SAVED_ON = "Westmere"  # TCG emulates it: usable in the domain capabilities


@pytest.fixture
def host_cpu(libvirtd):
    conn = libvirt.open(libvirtd)
    yield hardware.HostCPU(libvirt, conn, "qemu", "x86_64")
    conn.close()


def test_host_check_accepts_a_model_tcg_provides_and_refuses_missing_features(host_cpu):
    assert host_cpu.check("image", SAVED_ON) == hardware.CpuPin(SAVED_ON)
    with pytest.raises(hardware.errors.CpuModelUnavailable) as refused:
        host_cpu.check("image", f"{SAVED_ON},+avx512f")
    message = str(refused.value)
    assert f"needs CPU model {SAVED_ON}" in message and "avx512f" in message
    assert host_cpu.check("image", "host-model") is None  # nothing pinned: nothing checked


def test_provided_models_become_traits(host_cpu):
    traits = host_cpu.model_traits()
    assert "CUSTOM_CLOUDLET_CPU_WESTMERE" in traits
    assert "CUSTOM_CLOUDLET_CPU_SKYLAKE_SERVER" not in traits  # avx512 is not emulated
    caps = ElementTree.fromstring(
        host_cpu.conn.getDomainCapabilities(None, "x86_64", None, "qemu", 0))
    host_model = caps.findtext("./cpu/mode[@name='host-model']/model")
    assert hardware.model_trait(host_model) in traits  # what host-model guests are saved on
    # and a base saved on it, features and all (as libvirt expands host-model), passes the check
    saved_on = hardware.CpuPin.from_domain(caps.find("./cpu/mode[@name='host-model']"))
    assert host_cpu.check("image", saved_on.spec()) == saved_on


def _domain_xml(name: str, cpu: str) -> str:
    """A BIOS-only guest whose <cpu> is the pinned one the driver gives a resumed domain."""
    guest_uuid = uuid.uuid5(uuid.NAMESPACE_DNS, name)  # the same domain whatever its CPU
    root = ElementTree.fromstring(
        f"<domain type='qemu'><name>{name}</name><uuid>{guest_uuid}</uuid>"
        f"<memory unit='MiB'>64</memory>"
        f"<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
        f"<devices><emulator>{QEMU}</emulator></devices></domain>"
    )
    pinned = hardware.CpuPin.parse(cpu).guest_cpu().to_xml()
    root.insert(4, ElementTree.fromstring(pinned))
    return ElementTree.tostring(root, encoding="unicode")


def _restore(conn, xml: str, memory: Path, layout: MemoryLayout, work: Path) -> None:
    """Resume the saved guest as the driver does: LibvirtRestore with the base's recorded CPU.
    The libvirt runner reads only the base's id from its record (no base files are needed: a
    domain without a disk), so the record is one of a base that was never registered."""
    base = BaseVM(id="0" * 64, name="saved-on-westmere", created=datetime.now(UTC), path=work,
                  disk_size=0, memory_size=0, disk_digest="", memory_digest="", config={},
                  files={})  # fmt: skip
    images = Resumable(base, disk=Path("/dev/null"), memory=memory, layout=layout, work_dir=work)
    restore = runner.LibvirtRestore(conn, xml, libvirt.VIR_DOMAIN_SAVE_RUNNING, "image", SAVED_ON)
    restore.resume(images, Stats(), timeout=60)


def _wait_running(dom, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
        assert time.monotonic() < deadline, f"domain state {dom.state()} after {timeout} s"
        time.sleep(0.2)


def test_saved_on_a_pinned_model_resumes_only_into_that_model(libvirtd, tmp_path: Path):
    conn = libvirt.open(libvirtd)
    name = f"cloudlet-cpu-{os.getpid()}"
    xml = _domain_xml(name, SAVED_ON)
    instance_dir = tmp_path / "instance"
    instance_dir.mkdir(mode=0o711)
    try:
        dom = conn.createXML(xml, 0)
        _wait_running(dom)
        saved = tmp_path / "guest.save"
        dom.save(str(saved))  # a real snapshot of a guest running on the pinned model
        src, kind = open_snapshot(saved)
        with src:
            assert kind == "libvirt"
            layout = parse_stream(src, tmp_path / "memory.img")
        memory = tmp_path / "memory.img"
        # libvirt itself would resume it on qemu64 without a word: the driver refuses
        for other in ("qemu64", f"{SAVED_ON},+avx512f", f"{SAVED_ON},-sse4.2"):
            with pytest.raises(hardware.errors.RestoreRefused, match=f"saved on {SAVED_ON}"):
                _restore(conn, _domain_xml(name, other), memory, layout, instance_dir)
            assert name not in conn.listDefinedDomains() + [d.name() for d in
                                                            conn.listAllDomains()]
        _restore(conn, xml, memory, layout, instance_dir)
        dom = conn.lookupByName(name)
        _wait_running(dom)
        live = ElementTree.fromstring(dom.XMLDesc(0)).find("cpu")
        assert live.findtext("model") == SAVED_ON
    finally:
        try:
            conn.lookupByName(name).destroy()
        except libvirt.libvirtError:
            pass
        conn.close()

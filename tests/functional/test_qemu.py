"""The QEMU adapter against real QEMU (TCG unless KVM really works) and the real test guest."""

import dataclasses
import logging
import subprocess
import time
from pathlib import Path

import pytest

from cloudlet.errors import ConfigMismatch, GuestCommandFailed, HypervisorError
from cloudlet.hypervisor.qemu import (
    Forward,
    LaunchSpec,
    QemuVM,
    build_command,
    detect_accel,
    free_port,
    http_get,
)

LOG = logging.getLogger(__name__)


def cow_over(backing: Path, fmt: str, path: Path) -> Path:
    """A qcow2 copy-on-write layer, so tests never write to the shared test guest disk."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", fmt, str(path)],
        check=True,
        timeout=60,
    )
    return path


def spec_for(info: dict, config, run_dir: Path, port: int, **kw) -> LaunchSpec:
    return LaunchSpec(
        config=config,
        disk=kw.pop("disk", info["disk"]),
        disk_format=kw.pop("disk_format", "raw"),
        run_dir=run_dir,
        kernel=info["kernel"],
        initrd=info["initrd"],
        forwards=[Forward("tcp", port, 80)],
        **kw,
    )


# --- no QEMU process needed ------------------------------------------------------------------


def test_forward_parse():
    assert Forward.parse("tcp:8080:80") == Forward("tcp", 8080, 80)
    assert Forward.parse("udp:0.0.0.0:5353:53") == Forward("udp", 5353, 53, "0.0.0.0")
    assert Forward.parse("tcp:8080:80").hostfwd() == "tcp:127.0.0.1:8080-:80"
    with pytest.raises(ValueError):
        Forward.parse("tcp:http:80")
    with pytest.raises(ValueError):
        Forward.parse("sctp:1:2")


def test_guest_hardware_depends_only_on_config(tmp_path, test_guest_config):
    """A save and a later restore must present identical devices, whatever the host side."""
    disk = tmp_path / "d.raw"

    def devices(**kw) -> list[str]:
        spec = LaunchSpec(test_guest_config, disk, "raw", tmp_path / "r", accel="tcg", **kw)
        args = build_command(spec, tmp_path / "q.sock", tmp_path / "c.sock")
        keep = {"-device", "-machine", "-cpu", "-smp", "-m", "-append"}
        return [v for k, v in zip(args, args[1:], strict=False) if k in keep]

    plain = devices()
    other = devices(
        forwards=[Forward("tcp", 1234, 80)], vnc="127.0.0.1:7", incoming=tmp_path / "mem"
    )
    assert plain == other
    assert any(d.startswith("virtio-balloon-pci,") and "free-page-hint=on" in d for d in plain)
    bigger = dataclasses.replace(test_guest_config, memory_mib=512)
    assert "512M" in (
        build_command(
            LaunchSpec(bigger, disk, "raw", tmp_path / "r", accel="tcg"),
            tmp_path / "q.sock",
            tmp_path / "c.sock",
        )
    )


def test_accel_override(monkeypatch):
    monkeypatch.setenv("CLOUDLET_ACCEL", "tcg")
    assert detect_accel() == "tcg"
    monkeypatch.setenv("CLOUDLET_ACCEL", "xen")
    with pytest.raises(HypervisorError, match="CLOUDLET_ACCEL"):
        detect_accel()
    monkeypatch.delenv("CLOUDLET_ACCEL")
    assert detect_accel() in ("kvm", "tcg")


# --- real QEMU -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def booted(tmp_path_factory, test_guest_info, test_guest_config):
    """One booted test guest for the module (a TCG boot costs ~9 s)."""
    run_dir = tmp_path_factory.mktemp("boot")
    port = free_port()
    disk = cow_over(test_guest_info["disk"], "raw", run_dir / "disk.qcow2")
    spec = spec_for(
        test_guest_info, test_guest_config, run_dir, port, disk=disk, disk_format="qcow2"
    )
    t0 = time.monotonic()
    with QemuVM.launch(spec) as vm:
        vm.wait_ready(marker=test_guest_info["ready_marker"], timeout=180)
        LOG.warning("TIMING boot-to-ready %.2f s (accel %s)", time.monotonic() - t0, detect_accel())
        yield vm, port


@pytest.mark.qemu
def test_booted_guest_serves_the_base_disk_over_http(booted):
    vm, port = booted
    vm.wait_ready(port=port, timeout=60)
    assert http_get(port, timeout=30) == "cloudlet base disk\n"
    assert vm.status() == "running"
    assert "CLOUDLET-GUEST-READY" in vm.console_output()


@pytest.mark.qemu
def test_run_in_guest_returns_exactly_the_output(booted):
    vm, _ = booted
    assert vm.run_in_guest("echo hello") == "hello\n"
    assert vm.run_in_guest("cat /data/www/index.html") == "cloudlet base disk\n"
    assert vm.run_in_guest("true") == ""
    assert vm.run_in_guest("printf 'no newline'") == "no newline"
    # A script longer than one console line, with quotes and shell metacharacters.
    script = "\n".join(f"echo 'line {i}: $HOME \"q\" `x` ; | &'" for i in range(60))
    out = vm.run_in_guest(script)
    assert out.splitlines() == [f'line {i}: $HOME "q" `x` ; | &' for i in range(60)]


@pytest.mark.qemu
def test_run_in_guest_reports_failures(booted):
    vm, _ = booted
    with pytest.raises(GuestCommandFailed) as err:
        vm.run_in_guest("echo oops >&2; exit 3")
    assert err.value.returncode == 3
    assert err.value.output == "oops\n"
    assert vm.run_in_guest("exit 4", check=False) == ""
    assert vm.run_in_guest("echo still here") == "still here\n"


@pytest.fixture(scope="module")
def saved(booted, tmp_path_factory):
    """The booted guest's memory, saved after writing /proof to its RAM-only root fs."""
    vm, _ = booted
    vm.run_in_guest("echo resumed-not-rebooted > /proof")
    mem = tmp_path_factory.mktemp("saved") / "memory.qemu"
    t0 = time.monotonic()
    vm.save_memory(mem, timeout=300)
    LOG.warning(
        "TIMING save %.2f s (%d MB stream)", time.monotonic() - t0, mem.stat().st_size // 10**6
    )
    return mem


@pytest.mark.qemu
def test_save_leaves_a_complete_stream_and_a_paused_vm(booted, saved):
    vm, _ = booted
    assert saved.read_bytes()[:4] == b"QEVM"
    assert not saved.with_name(saved.name + ".part").exists()
    assert vm.status() in ("paused", "postmigrate")
    with pytest.raises(HypervisorError, match="cont"):
        vm.save_memory(saved.with_name("again.qemu"))
    assert not saved.with_name("again.qemu").exists()


@pytest.mark.qemu
def test_restore_resumes_the_running_guest(booted, saved, tmp_path, test_guest_info):
    vm, _ = booted
    # The disk as the saved memory knows it: the booted VM's disk, under a new COW layer.
    cow = cow_over(vm.spec.disk, "qcow2", tmp_path / "cow.qcow2")
    port = free_port()
    spec = spec_for(
        test_guest_info,
        vm.spec.config,
        tmp_path / "restore",
        port,
        disk=cow,
        disk_format="qcow2",
        incoming=saved,
    )
    t0 = time.monotonic()
    with QemuVM.launch(spec) as restored:
        restored.wait_incoming(timeout=120)
        incoming_s = time.monotonic() - t0
        assert restored.status() == "paused"
        t1 = time.monotonic()
        restored.cont()
        assert http_get(port, timeout=30) == "cloudlet base disk\n"
        http_s = time.monotonic() - t1
        # Written to the RAM-only root fs before the save: memory was resumed, not rebooted.
        assert restored.run_in_guest("cat /proof") == "resumed-not-rebooted\n"
        assert "CLOUDLET-GUEST-READY" not in restored.console_output()
        assert restored.status() == "running"
    LOG.warning("TIMING restore launch-to-paused %.2f s; cont-to-HTTP %.2f s", incoming_s, http_s)
    assert not restored.alive()


@pytest.mark.qemu
def test_live_save_of_a_running_guest_restores_it(booted, saved, tmp_path, test_guest_info):
    """A save taken while the guest runs (so the balloon can hint free pages) is consistent."""
    vm, _ = booted
    first = cow_over(vm.spec.disk, "qcow2", tmp_path / "first.qcow2")
    spec = spec_for(
        test_guest_info, vm.spec.config, tmp_path / "first", free_port(),
        disk=first, disk_format="qcow2", incoming=saved,
    )  # fmt: skip
    live = tmp_path / "live.qemu"
    with QemuVM.launch(spec) as running:
        running.wait_incoming(timeout=120)
        running.cont()
        running.run_in_guest("echo written-while-running > /proof-live")
        running.save_memory(live, timeout=300, live=True)
        assert running.status() in ("paused", "postmigrate")
    port = free_port()
    spec = spec_for(
        test_guest_info, vm.spec.config, tmp_path / "second", port,
        disk=cow_over(first, "qcow2", tmp_path / "second.qcow2"), disk_format="qcow2",
        incoming=live,
    )  # fmt: skip
    with QemuVM.launch(spec) as restored:
        restored.wait_incoming(timeout=120)
        restored.cont()
        assert restored.run_in_guest("cat /proof-live") == "written-while-running\n"
        assert http_get(port, timeout=30) == "cloudlet base disk\n"


@pytest.mark.qemu
def test_restore_into_different_hardware_fails_with_qemus_reason(
    booted, saved, tmp_path, test_guest_info
):
    vm, _ = booted
    bigger = dataclasses.replace(vm.spec.config, memory_mib=vm.spec.config.memory_mib * 2)
    cow = cow_over(vm.spec.disk, "qcow2", tmp_path / "cow.qcow2")
    spec = spec_for(
        test_guest_info, bigger, tmp_path / "r", free_port(),
        disk=cow, disk_format="qcow2", incoming=saved,
    )  # fmt: skip
    with QemuVM.launch(spec) as restored, pytest.raises(HypervisorError) as err:
        restored.wait_incoming(timeout=60)
    assert "exited" in str(err.value) and "ram" in str(err.value).lower()
    LOG.warning("wrong-hardware restore error: %s", err.value)


@pytest.mark.qemu
def test_qemu_that_cannot_start_reports_its_log(tmp_path, test_guest_info, test_guest_config):
    spec = spec_for(
        test_guest_info, test_guest_config, tmp_path, free_port(), extra_args=["-bogus-option"]
    )
    with pytest.raises(HypervisorError, match="bogus-option"):
        QemuVM.launch(spec, timeout=20)


def test_wrong_kernel_is_refused_before_starting(tmp_path, test_guest_info, test_guest_config):
    other = tmp_path / "vmlinuz"
    other.write_bytes(b"not the kernel")
    spec = spec_for(test_guest_info, test_guest_config, tmp_path, free_port())
    spec.kernel = other
    with pytest.raises(ConfigMismatch, match="sha256"):
        QemuVM.launch(spec)

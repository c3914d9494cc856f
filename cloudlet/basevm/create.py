"""Create a base VM: boot a disk, wait for the guest to be ready, save disk + memory, check that
the snapshot resumes into a working guest, register."""

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cloudlet.basevm.store import (
    CONFIG,
    DISK,
    INITRD,
    KERNEL,
    LAYOUT,
    MEMORY,
    BaseStore,
    BaseVM,
)
from cloudlet.disk import convert_to_raw, create_cow, disk_format
from cloudlet.errors import BaseVMError, HypervisorError
from cloudlet.fsutil import clone_sparse
from cloudlet.hashing import file_sha256
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.config import VMConfig, qemu_binary, qemu_version, resolve_machine
from cloudlet.hypervisor.qemu import LaunchSpec, QemuVM
from cloudlet.memory.stream import SAVED_BY_QEMU, MemoryLayout, parse_stream
from cloudlet.stats import Stats
from cloudlet.vm import HostOptions, resume_vm

LOG = logging.getLogger(__name__)
SECTOR = 512  # a raw disk is whole sectors
RESUME_ANSWER_TIMEOUT = 30.0  # seconds a resumed guest has to answer on its console or port


@dataclass
class Readiness:
    """How to tell the freshly booted guest is at the point to snapshot."""

    marker: str | None = None  # text the guest prints on its serial console
    port: int | None = None  # a forwarded host port that starts answering
    wait_for_user: Callable[[], None] | None = None  # a human says when (e.g. over VNC)
    timeout: float = 300.0


@dataclass
class BaseSpec:
    disk: Path
    name: str
    memory_mib: int = 256
    vcpus: int = 1
    cpu: str = "qemu64"
    machine: str = "pc"
    nic_model: str = "e1000"
    balloon: bool = True
    display: str = "none"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    host: HostOptions = field(default_factory=HostOptions)


def create_base(home: CloudletHome, spec: BaseSpec, ready: Readiness, stats: Stats) -> BaseVM:
    """Boot `spec.disk`, snapshot the running guest and register it as a base VM."""
    if not spec.disk.is_file():
        raise BaseVMError(f"disk image {spec.disk} does not exist")
    for p in (spec.kernel, spec.initrd):
        if p is not None and not p.is_file():
            raise BaseVMError(f"{p} does not exist")
    if ready.port is not None:
        spec.host.check_forwarded(ready.port, f"--ready-port {ready.port}")
    staging = home.make_staging_dir("base-")
    run_dir = home.new_run_dir("base")
    try:
        with stats.stage("copy disk"):
            copy_disk_as_raw(spec.disk, staging / DISK)
        kernel_sha = initrd_sha = None
        if spec.kernel:
            shutil.copyfile(spec.kernel, staging / KERNEL)
            kernel_sha = file_sha256(staging / KERNEL)
        if spec.initrd:
            shutil.copyfile(spec.initrd, staging / INITRD)
            initrd_sha = file_sha256(staging / INITRD)
        config = VMConfig(
            machine=resolve_machine(spec.machine),
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            cpu=spec.cpu,
            disk_bus="virtio",
            nic_model=spec.nic_model,
            balloon=spec.balloon,
            display=spec.display,
            kernel_sha256=kernel_sha,
            initrd_sha256=initrd_sha,
            append=spec.append,
        )
        (staging / CONFIG).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        launch = LaunchSpec(
            config=config,
            disk=staging / DISK,
            disk_format="raw",
            run_dir=run_dir,
            kernel=staging / KERNEL if spec.kernel else None,
            initrd=staging / INITRD if spec.initrd else None,
            forwards=spec.host.forwards,
            extra_args=spec.host.extra_args,
            vnc=spec.host.vnc,
        )
        stream = run_dir / "memory.stream"
        with QemuVM.launch(launch) as vm:
            with stats.stage("boot until ready"):
                if ready.wait_for_user:
                    ready.wait_for_user()
                else:
                    vm.wait_ready(marker=ready.marker, port=ready.port, timeout=ready.timeout)
            with stats.stage("save memory"):
                # live while the balloon can hint free pages, so they are not saved
                vm.save_memory(stream, timeout=ready.timeout, live=config.balloon)
            vm.quit(timeout=30)
        with stats.stage("parse memory", stream.stat().st_size), open(stream, "rb") as src:
            layout = parse_stream(src, staging / MEMORY)
        layout.extra[SAVED_BY_QEMU] = qemu_version(qemu_binary())  # checked before resuming
        (staging / LAYOUT).write_bytes(layout.to_bytes())
        stream.unlink()
        with stats.stage("check resume"):
            check_resumes(config, staging, layout, run_dir, spec, ready)
        with stats.stage("index + register"):
            known = {KERNEL: kernel_sha, INITRD: initrd_sha}
            base = BaseStore(home).add_from_directory(
                staging, spec.name, file_sha256={n: d for n, d in known.items() if d}
            )
        stats.counters["memory size"] = layout.size
        stats.counters["disk size"] = base.disk_size
        return base
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def check_resumes(
    config: VMConfig,
    staging: Path,
    layout: MemoryLayout,
    run_dir: Path,
    spec: BaseSpec,
    ready: Readiness,
) -> None:
    """Resume the saved snapshot once, on a throw-away disk layer, before it is registered: a
    snapshot whose guest crashes on resume (it happens) would fail every synthesis from it.

    The guest must keep running with no kernel crash on its console, and pass again the check
    it was made ready by: answer Enter on its console (--ready-marker), or answer on the
    --ready-port. BaseVMError with its console's end if not.
    """
    cow = run_dir / "check.qcow2"
    create_cow(staging / DISK, cow)
    try:
        vm = resume_vm(
            config,
            disk=cow,
            disk_format="qcow2",
            memory_image=staging / MEMORY,
            layout=layout,
            run_dir=run_dir,
            kernel=staging / KERNEL if spec.kernel else None,
            initrd=staging / INITRD if spec.initrd else None,
            host=spec.host,
            stats=Stats(),
            timeout=ready.timeout,
        )
        with vm:
            # the check it was made ready by: a guest ready on its console must answer there
            vm.wait_alive(timeout=min(ready.timeout, RESUME_ANSWER_TIMEOUT),
                          console_answers=ready.marker is not None)
            if ready.port is not None:
                vm.wait_ready(port=ready.port, timeout=min(ready.timeout, RESUME_ANSWER_TIMEOUT))
    except HypervisorError as e:
        raise BaseVMError(
            f"the base was not registered: its memory snapshot does not resume into a working "
            f"guest ({e}); create it again (a guest that is still busy booting when it is "
            "snapshotted can fail this way: wait for a later --ready-marker or a --ready-port)"
        ) from e
    finally:
        cow.unlink(missing_ok=True)


def copy_disk_as_raw(src: Path, dest: Path) -> None:
    """The base keeps a raw disk: copy raw sparsely, convert anything else with qemu-img."""
    fmt = disk_format(src)
    if fmt != "raw":
        convert_to_raw(src, fmt, dest)
        return
    size = src.stat().st_size
    if size == 0 or size % SECTOR:
        raise BaseVMError(
            f"{src} is not a disk image: {size} bytes is not a whole number of {SECTOR}-byte "
            "sectors (raw and qcow2 images are)"
        )
    try:
        clone_sparse(src, dest)
    except OSError as e:
        raise BaseVMError(f"cannot copy {src}: {e}") from e

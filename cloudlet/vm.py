"""Resume a VM from a base: the one path both overlay capture and synthesis start a guest by.

The guest-visible hardware comes only from the base's recorded VMConfig, so every resume presents
exactly what the memory snapshot was saved with; host-side options (port forwards, VNC, extra
QEMU arguments) may vary per run.

The memory stream is never written to disk: a feeder thread emits it into a FIFO that QEMU
restores from, so emitting and loading overlap.
"""

import contextlib
import errno
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cloudlet.basevm.store import BaseVM
from cloudlet.errors import HypervisorError
from cloudlet.hypervisor.config import VMConfig
from cloudlet.hypervisor.qemu import MAIN_RAM_BLOCK, Forward, LaunchSpec, QemuVM
from cloudlet.memory.stream import MemoryLayout, emit_stream
from cloudlet.stats import Stats

LOG = logging.getLogger(__name__)
_F_SETPIPE_SZ = 1031  # <linux/fcntl.h>


@dataclass
class HostOptions:
    """Host-side settings of one run of a VM: they may differ between runs of the same base."""

    forwards: list[Forward] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)  # passed to QEMU verbatim
    vnc: str | None = None

    def check_forwarded(self, port: int, what: str) -> None:
        """Refuse, before anything starts, a wait on a host port no forward reaches the guest
        by (it could only end at its timeout); forwards in extra QEMU arguments count."""
        if any(f.proto == "tcp" and f.host_port == port for f in self.forwards):
            return
        if any(re.search(rf"hostfwd=tcp:[^,]*:{port}-", arg) for arg in self.extra_args):
            return
        raise HypervisorError(
            f"{what} waits on host port {port}, which no forward reaches the guest by: add "
            f"--forward tcp:{port}:GUEST_PORT"
        )


class _StreamFeeder(threading.Thread):
    """Writes the migration stream of a memory image into a FIFO once QEMU opens it."""

    def __init__(
        self,
        layout: MemoryLayout,
        image: Path,
        fifo: Path,
        timeout: float,
        skip_blocks: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(name="memory-stream-feeder", daemon=True)
        self.layout, self.image, self.fifo = layout, image, fifo
        self.skip_blocks = skip_blocks
        self.deadline = time.monotonic() + timeout
        self.error: BaseException | None = None
        self.cancelled = threading.Event()

    def run(self) -> None:
        try:
            fd = self._open_writer()
            with open(fd, "wb", buffering=1 << 20) as out:
                emit_stream(self.layout, self.image, out, self.skip_blocks)
        except BaseException as exc:  # handed to the thread that waits for the restore
            self.error = exc

    def _open_writer(self) -> int:
        # Non-blocking open fails with ENXIO until a reader exists: poll, so that a QEMU which
        # never gets as far as opening the FIFO cannot hang this thread past the deadline.
        while True:
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > self.deadline:
                    raise
                if self.cancelled.wait(0.005):
                    raise HypervisorError(
                        "restore abandoned before QEMU opened the stream"
                    ) from None
                continue
            os.set_blocking(fd, True)
            with contextlib.suppress(OSError):  # fewer, larger hand-overs to QEMU
                fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)
            return fd

    def result(self, timeout: float) -> None:
        self.join(timeout)
        if self.is_alive():
            raise HypervisorError("QEMU stopped reading the memory stream")
        if self.error is not None:
            raise HypervisorError(f"emitting the memory stream failed: {self.error}") from (
                self.error
            )


def resume_vm(
    config: VMConfig,
    *,
    disk: Path,
    disk_format: str,
    memory_image: Path,
    layout: MemoryLayout,
    run_dir: Path,
    kernel: Path | None,
    initrd: Path | None,
    host: HostOptions,
    stats: Stats,
    timeout: float,
    ram_file: Path | None = None,
    on_launch: Callable[[QemuVM], None] | None = None,
) -> QemuVM:
    """Start QEMU on `disk`, restore the memory image into it and leave the guest running.

    `on_launch` gets the QemuVM as soon as QEMU runs, before the restore: another thread that
    must be able to stop it meanwhile (a failing synthesis) can then kill it.

    With `ram_file` (a file laid out like the guest RAM block) QEMU maps guest RAM from it
    and the stream carries only the other blocks and the device state: guest pages are read
    lazily, when the guest touches them.
    """
    skip: frozenset[str] = frozenset()
    if ram_file is not None:
        try:
            ram = layout.block(MAIN_RAM_BLOCK)
        except KeyError:
            raise HypervisorError(
                f"the memory snapshot has no {MAIN_RAM_BLOCK} block: cannot map guest RAM "
                "from a file (resume without early start)"
            ) from None
        if ram.length != config.memory_mib << 20:
            raise HypervisorError(
                f"RAM block {MAIN_RAM_BLOCK} is {ram.length} bytes, the VM has "
                f"{config.memory_mib} MiB: cannot map guest RAM from a file"
            )
        skip = frozenset({MAIN_RAM_BLOCK})
    fifo = run_dir / "incoming.fifo"
    os.mkfifo(fifo, 0o600)
    feeder = _StreamFeeder(layout, memory_image, fifo, timeout, skip)
    feeder.start()
    spec = LaunchSpec(
        config=config,
        disk=disk,
        disk_format=disk_format,
        run_dir=run_dir,
        kernel=kernel,
        initrd=initrd,
        forwards=host.forwards,
        extra_args=host.extra_args,
        vnc=host.vnc,
        incoming=fifo,
        ram_file=ram_file,
    )
    streamed = layout.size - sum(layout.block(name).length for name in skip)
    vm = None
    try:
        with stats.stage("restore memory", streamed):
            vm = QemuVM.launch(spec)
            if on_launch is not None:
                on_launch(vm)
            vm.wait_incoming(timeout)
            feeder.result(timeout)
        with stats.stage("resume"):
            vm.cont()
    except BaseException:
        if vm is not None:
            vm.kill()  # a feeder blocked writing now gets EPIPE
        feeder.cancelled.set()  # one still waiting for QEMU to open the FIFO gives up
        feeder.join(5)
        raise
    finally:
        fifo.unlink(missing_ok=True)
    LOG.info("guest resumed from its memory snapshot in %s", run_dir)
    return vm


def resume_base(
    base: BaseVM,
    *,
    disk: Path,
    disk_format: str,
    memory_image: Path,
    layout: MemoryLayout,
    run_dir: Path,
    host: HostOptions,
    stats: Stats,
    timeout: float,
    ram_file: Path | None = None,
    on_launch: Callable[[QemuVM], None] | None = None,
) -> QemuVM:
    """resume_vm with the hardware, kernel and initrd the base was saved with."""
    return resume_vm(
        VMConfig.from_dict(base.config),
        disk=disk,
        disk_format=disk_format,
        memory_image=memory_image,
        layout=layout,
        run_dir=run_dir,
        kernel=base.kernel_path,
        initrd=base.initrd_path,
        host=host,
        stats=stats,
        timeout=timeout,
        ram_file=ram_file,
        on_launch=on_launch,
    )

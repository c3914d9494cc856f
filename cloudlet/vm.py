"""Resume a VM from a base: the one path both overlay capture and synthesis start a guest by.

The guest-visible hardware comes only from the base's recorded VMConfig, so every resume presents
exactly what the memory snapshot was saved with; host-side options (port forwards, VNC, extra
QEMU arguments) may vary per run.
"""

import logging
from pathlib import Path

from cloudlet.hypervisor.config import VMConfig
from cloudlet.hypervisor.qemu import Forward, LaunchSpec, QemuVM
from cloudlet.memory.stream import MemoryLayout, emit_stream
from cloudlet.stats import Stats

LOG = logging.getLogger(__name__)


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
    forwards: list[Forward],
    extra_args: list[str],
    vnc: str | None,
    stats: Stats,
    timeout: float,
) -> QemuVM:
    """Start QEMU on `disk`, restore the memory image into it and leave the guest running."""
    stream = run_dir / "incoming.stream"
    with stats.stage("emit memory stream", layout.size):
        with open(stream, "wb") as out:
            emit_stream(layout, memory_image, out)
    spec = LaunchSpec(
        config=config,
        disk=disk,
        disk_format=disk_format,
        run_dir=run_dir,
        kernel=kernel,
        initrd=initrd,
        forwards=forwards,
        extra_args=extra_args,
        vnc=vnc,
        incoming=stream,
    )
    vm = QemuVM.launch(spec)
    try:
        with stats.stage("restore memory"):
            vm.wait_incoming(timeout)
        with stats.stage("resume"):
            vm.cont()
    except BaseException:
        vm.kill()
        raise
    finally:
        stream.unlink(missing_ok=True)
    LOG.info("guest resumed from its memory snapshot in %s", run_dir)
    return vm

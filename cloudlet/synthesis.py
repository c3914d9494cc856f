"""Synthesize a VM: base + overlay -> verified disk and memory images -> guest resumed running."""

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cloudlet.basevm.store import BaseStore, BaseVM
from cloudlet.errors import BaseNotFound, WrongBase
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.config import VMConfig
from cloudlet.hypervisor.qemu import QemuVM
from cloudlet.index import ChunkIndex
from cloudlet.memory.stream import MemoryLayout
from cloudlet.overlay.apply import apply_overlay
from cloudlet.overlay.reader import OverlayReader
from cloudlet.stats import Stats
from cloudlet.vm import HostOptions, resume_base

LOG = logging.getLogger(__name__)


@dataclass
class SynthesisSpec:
    overlay: Path
    host: HostOptions = field(default_factory=HostOptions)
    timeout: float = 300.0


@dataclass
class Synthesis:
    """A synthesized VM, running; `close()` stops it and removes its run directory."""

    vm: QemuVM
    base: BaseVM
    run_dir: Path
    stats: Stats

    def close(self) -> None:
        try:
            self.vm.quit(timeout=10)
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "Synthesis":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_base(home: CloudletHome, base_id: str) -> BaseVM:
    try:
        return BaseStore(home).get(base_id)
    except BaseNotFound:
        raise WrongBase(
            f"this overlay needs base VM {base_id}, which is not in {home.path}: "
            "import its package with `cloudlet base import`"
        ) from None


def synthesize(home: CloudletHome, spec: SynthesisSpec, stats: Stats) -> Synthesis:
    with stats.stage("open + verify manifest"):
        reader = OverlayReader.open(spec.overlay)
    with reader:  # the overlay is only read until it is applied
        return _synthesize(home, reader, spec, stats)


def _synthesize(
    home: CloudletHome, reader: OverlayReader, spec: SynthesisSpec, stats: Stats
) -> Synthesis:
    base = find_base(home, reader.base_id)
    config = VMConfig.from_dict(base.config)
    config.check_compatible(VMConfig.from_dict(json.loads(reader.blob("vm-config"))))
    layout = MemoryLayout.from_bytes(reader.blob("memory-layout"))
    if not layout.ram_compatible(MemoryLayout.from_bytes(base.memory_layout_path.read_bytes())):
        raise WrongBase("the overlay's RAM layout does not match the base VM's")
    run_dir = home.new_run_dir("synthesis")
    try:
        disk, memory = run_dir / "disk.raw", run_dir / "memory.img"
        with stats.stage("apply overlay"):
            applied = apply_overlay(
                reader,
                base_disk=base.disk_path,
                base_disk_digests=ChunkIndex.load(base.path, "disk").digests,
                base_memory=base.memory_path,
                base_memory_digests=ChunkIndex.load(base.path, "memory").digests,
                out_disk=disk,
                out_memory=memory,
                expected_base_id=base.id,
            )
        for name, seconds in applied.stage_seconds().items():
            stats.counters[f"  {name}"] = f"{seconds:.2f} s"
        vm = resume_base(
            base,
            disk=disk,
            disk_format="raw",
            memory_image=memory,
            layout=layout,
            run_dir=run_dir,
            host=spec.host,
            stats=stats,
            timeout=spec.timeout,
        )
        memory.unlink()  # restored into QEMU; the disk stays, the guest runs on it
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return Synthesis(vm=vm, base=base, run_dir=run_dir, stats=stats)

"""Capture an overlay: resume a base, customise it, then keep only what changed, deduplicated."""

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cloudlet.basevm.store import BaseVM
from cloudlet.chunks import Kind, Target, chunk_count
from cloudlet.codecs import NullCodec
from cloudlet.dedup import Deduplicator
from cloudlet.diff import ChangedBatch, changed_chunks, data_ranges_of
from cloudlet.disk import changed_disk_chunks, create_cow, virtual_size
from cloudlet.errors import ConfigMismatch
from cloudlet.hashing import tree_digest_with_overrides, window_digests
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.config import VMConfig, qemu_binary, qemu_version
from cloudlet.hypervisor.qemu import QemuVM
from cloudlet.index import ChunkIndex
from cloudlet.memory.stream import SAVED_BY_QEMU, MemoryLayout, open_snapshot, parse_stream
from cloudlet.overlay.order import AccessTrace, reorder_overlay
from cloudlet.overlay.reader import OverlayReader
from cloudlet.overlay.writer import OverlayInfo, OverlayWriter
from cloudlet.stats import Stats
from cloudlet.vm import HostOptions, resume_base

LOG = logging.getLogger(__name__)


@dataclass
class Customisation:
    """What happens to the resumed base before capture."""

    script: str | None = None  # shell text run in the guest over its serial console
    wait_for_user: Callable[[QemuVM], None] | None = None  # a human customises, then says so
    timeout: float = 600.0


@dataclass
class OverlaySpec:
    output: Path
    codec: str = "zstd"
    level: int | None = None
    host: HostOptions = field(default_factory=HostOptions)
    access_order: AccessTrace | None = None  # order frames by this earlier synthesis's accesses


def create_overlay(
    home: CloudletHome, base: BaseVM, spec: OverlaySpec, custom: Customisation, stats: Stats
) -> OverlayInfo:
    run_dir = home.new_run_dir("overlay")
    try:
        snapshot, disk = capture_customised(base, run_dir, custom, spec.host, stats)
        saved_by = qemu_version(qemu_binary())
        return build_overlay(base, snapshot, disk, spec, stats, work_dir=run_dir, saved_by=saved_by)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def capture_customised(
    base: BaseVM, run_dir: Path, custom: Customisation, host: HostOptions, stats: Stats
) -> tuple[Path, Path]:
    """The VM half of capture: resume the base, customise it, save it.

    Returns (memory snapshot, qcow2 disk over the base disk), both in `run_dir`.
    """
    disk = run_dir / "disk.qcow2"
    create_cow(base.disk_path, disk)
    vm = resume_base(
        base,
        disk=disk,
        disk_format="qcow2",
        memory_image=base.memory_path,
        layout=MemoryLayout.from_bytes(base.memory_layout_path.read_bytes()),
        run_dir=run_dir,
        host=host,
        stats=stats,
        timeout=custom.timeout,
    )
    snapshot = run_dir / "memory.stream"
    with vm:
        with stats.stage("customise"):
            if custom.script is not None:
                output = vm.run_in_guest(custom.script, timeout=custom.timeout)
                LOG.info("customisation script output:\n%s", output)
            if custom.wait_for_user is not None:
                custom.wait_for_user(vm)
        with stats.stage("save memory"):
            # live while the balloon can hint free pages, so they are not saved
            vm.save_memory(snapshot, timeout=custom.timeout, live=vm.spec.config.balloon)
        vm.quit(timeout=30)
    return snapshot, disk


def build_overlay(
    base: BaseVM,
    memory_snapshot: Path,
    disk: Path,
    spec: OverlaySpec,
    stats: Stats,
    work_dir: Path,
    saved_by: str | None = None,
) -> OverlayInfo:
    """The data half of capture: a saved memory snapshot + the VM's disk -> overlay file.

    The snapshot is a QEMU migration stream or a libvirt save file (`virsh save`, Nova).

    `disk` is a qcow2 over the base's raw disk (only its allocated clusters are compared) or a
    full raw image (scanned). `work_dir` holds the parsed memory image while the overlay is built.
    `saved_by` is the version of the QEMU that wrote the snapshot, recorded in the overlay's
    layout so a host with an older QEMU refuses it before fetching its frames.
    """
    config = VMConfig.from_dict(base.config)
    layout = MemoryLayout.from_bytes(base.memory_layout_path.read_bytes())
    memory = work_dir / "memory.img"
    try:
        src, _kind = open_snapshot(memory_snapshot)  # a bare QEMU stream or a `virsh save` file
        with stats.stage("parse memory", memory_snapshot.stat().st_size), src:
            custom_layout = parse_stream(src, memory)
        if saved_by is not None:
            custom_layout.extra[SAVED_BY_QEMU] = saved_by
        if not custom_layout.ram_compatible(layout):
            raise ConfigMismatch("the customised VM's RAM blocks differ from the base's")
        if spec.access_order is None:
            return _write_overlay(base, config, memory, custom_layout, disk, spec, stats)
        # Capture order first, uncompressed (cheap), then reorder: compressed once, in order.
        staged = replace(
            spec, output=work_dir / "capture.overlay", codec=NullCodec.name, level=None
        )
        _write_overlay(base, config, memory, custom_layout, disk, staged, stats)
        with stats.stage("access order"), OverlayReader.open(staged.output) as reader:
            info = reorder_overlay(
                reader, spec.access_order, spec.output, codec=spec.codec, level=spec.level
            )
        stats.counters["overlay size"] = info.size
        return info
    finally:
        memory.unlink(missing_ok=True)
        (work_dir / "capture.overlay").unlink(missing_ok=True)


class _ResultDigests:
    """Digest of a result image: the base's chunk digests with the modified chunks' replaced.

    Only the modified chunks' (number, digest) are kept (the overlay ships them anyway); the base's
    digests are streamed from its index when the digest is asked for.
    """

    def __init__(self, base: ChunkIndex, result_size: int) -> None:
        self._base = base
        self._count = chunk_count(result_size)
        self._chunks: list[np.ndarray] = []
        self._digests: list[np.ndarray] = []

    def update(self, batch: ChangedBatch) -> None:
        self._chunks.append(np.asarray(batch.chunks, dtype=np.int64))
        self._digests.append(window_digests(batch.data))

    def hexdigest(self) -> str:
        chunks = np.concatenate(self._chunks) if self._chunks else np.empty(0, np.int64)
        digests = np.concatenate(self._digests) if self._digests else np.empty((0, 32), np.uint8)
        return tree_digest_with_overrides(self._base.digests, self._count, chunks, digests)


def _write_overlay(
    base: BaseVM,
    config: VMConfig,
    memory: Path,
    layout: MemoryLayout,
    disk: Path,
    spec: OverlaySpec,
    stats: Stats,
) -> OverlayInfo:
    mem_index = base.chunk_index("memory")
    disk_index = base.chunk_index("disk")
    dedup = Deduplicator(mem_index, disk_index, base.memory_path, base.disk_path)
    disk_size = virtual_size(disk)
    slots: dict[tuple[int, int], int] = {}
    with OverlayWriter(spec.output, base.id, codec=spec.codec, level=spec.level) as writer:
        for target, batches, index, size in (
            (
                Target.MEMORY,
                lambda: changed_chunks(
                    base.memory_path,
                    memory,
                    layout.size,
                    data_ranges_of((base.memory_path, memory), layout.size),
                ),
                mem_index,
                layout.size,
            ),
            (Target.DISK, lambda: changed_disk_chunks(base.disk_path, disk), disk_index, disk_size),
        ):
            digests = _ResultDigests(index, size)
            with stats.stage(f"diff + dedup {target.name.lower()}"):
                for batch in batches():
                    digests.update(batch)
                    _add_batch(writer, dedup, target, batch, slots)
            writer.set_image(target, size, digests.hexdigest())
        writer.add_blob("memory-layout", layout.to_bytes())
        writer.add_blob("vm-config", json.dumps(config.to_dict(), sort_keys=True).encode())
        for kind, count in dedup.stats.items():
            stats.counters[f"chunks {kind}"] = count
        writer.set_meta({"stats": stats.as_dict()})
        with stats.stage("compress + write"):
            info = writer.close()
    stats.counters["overlay size"] = spec.output.stat().st_size
    return info


def _add_batch(
    writer: OverlayWriter,
    dedup: Deduplicator,
    target: Target,
    batch: ChangedBatch,
    slots: dict[tuple[int, int], int],
) -> None:
    for i, (kind, ref) in enumerate(dedup.classify(target, batch)):
        chunk = int(batch.chunks[i])
        if kind is Kind.NEW:
            slots[(target, chunk)] = writer.add_new(target, chunk, batch.chunk_data(i))
        elif kind is Kind.SELF:
            writer.add_ref(target, chunk, Kind.SELF, slots[ref])
        else:
            writer.add_ref(target, chunk, kind, ref)

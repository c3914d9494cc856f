"""What a spawn from a cloudlet image adds to Nova's: base from the cache, synthesis of an
overlay, and the restore of the memory snapshot into the domain Nova defined.

Early start (resuming before the overlay has fully arrived, through cloudletfs) is not used by
the driver yet: an overlay is synthesized completely, then restored.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from nova.virt.libvirt import utils as libvirt_utils
from oslo_log import log as logging
from oslo_utils import units

from cloudlet.basevm.store import BaseVM
from cloudlet.errors import (
    CloudletError,
    ConfigMismatch,
    CorruptOverlay,
    TruncatedOverlay,
    UnsupportedFormat,
    VerificationFailed,
)
from cloudlet.errors import WrongBase as EngineWrongBase
from cloudlet.hypervisor.config import VMConfig
from cloudlet.memory.libvirt import LibvirtSaveHeader, write_save_file
from cloudlet.memory.stream import MemoryLayout, emit_stream
from cloudlet.overlay.apply import apply_overlay
from cloudlet.overlay.reader import OverlayReader
from cloudlet.synthesis import check_overlay_fits
from cloudlet_nova import errors, state
from cloudlet_nova.cache import BaseCache
from cloudlet_nova.glance import CloudletImage, GlanceImages, Kind

LOG = logging.getLogger(__name__)

SAVE_FILE = "restore.save"
_FAULTS: list[tuple[tuple[type[CloudletError], ...], type[errors.CloudletImageUnacceptable]]] = [
    ((EngineWrongBase, ConfigMismatch), errors.WrongBase),
    ((VerificationFailed, CorruptOverlay, TruncatedOverlay), errors.DigestMismatch),
    ((UnsupportedFormat,), errors.CloudletImageInvalid),
    ((CloudletError,), errors.CloudletImageUnacceptable),
]


def prepare(
    cache: BaseCache, glance: GlanceImages, image: CloudletImage, instance: Any, instance_dir: Path
) -> state.InstanceState:
    """Make the instance's images ready (base cached, overlay synthesized) and record its state.

    `glance` carries the booting user's context: the base is resumed only from Glance images
    that user can read and whose content hashes are proven to hold it (BaseCache.ensure), on
    every boot. Raises a CloudletImageUnacceptable subclass (an instance fault) on every refusal.
    """
    if image.kind is Kind.BASE_MEMORY:
        raise errors.CloudletImageInvalid(
            image_id=image.image_id,
            reason=f"a base memory image is not bootable: boot its base disk image "
            f"{image.disk_image}",
        )
    # with the booting user's context (`glance`): their images, proven to hold the base
    base = cache.ensure(glance, *glance.base_images(image))
    snapshot_mb = VMConfig.from_dict(base.config).memory_mib
    if instance.flavor.memory_mb != snapshot_mb:
        raise errors.FlavorMemoryMismatch(
            image_id=image.image_id, snapshot_mb=snapshot_mb, flavor_mb=instance.flavor.memory_mb
        )
    if image.kind is Kind.BASE_DISK:
        st = state.InstanceState(
            kind=image.kind.value,
            image_id=image.image_id,
            base_id=base.id,
            disk=str(base.disk_path),
            memory=str(base.memory_path),
            layout=str(base.memory_layout_path),
        )
    else:
        st = _synthesize(glance, image, base, state.work_dir(instance_dir))
    state.save(instance_dir, st)
    return st


def _synthesize(
    glance: GlanceImages, image: CloudletImage, base: BaseVM, work: Path
) -> state.InstanceState:
    """Stream the overlay from Glance and apply it over the cached base into plain images."""
    work.mkdir(mode=0o711, exist_ok=True)
    disk, memory, layout_path = work / "disk.raw", work / "memory.img", work / "memory.layout"
    try:
        with glance.open(image.image_id) as stream, OverlayReader.open(stream) as reader:
            if reader.base_id != image.base_id or reader.base_id != base.id:
                raise errors.WrongBase(
                    image_id=image.image_id,
                    reason=f"the overlay was made for base {reader.base_id}, its properties "
                    f"say {image.base_id}",
                )
            layout = check_overlay_fits(reader, base)
            layout_path.write_bytes(layout.to_bytes())
            applied = apply_overlay(
                reader,
                base_disk=base.disk_path,
                base_disk_digests=base.chunk_index("disk").digests,
                base_memory=base.memory_path,
                base_memory_digests=base.chunk_index("memory").digests,
                out_disk=disk,
                out_memory=memory,
                expected_base_id=base.id,
            )
    except CloudletError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise _fault(image.image_id, e) from e
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    LOG.info("synthesized overlay %s over base %s: %d bytes written",
             image.image_id, base.id, applied.written_bytes)
    return state.InstanceState(
        kind=image.kind.value,
        image_id=image.image_id,
        base_id=base.id,
        disk=str(disk),
        memory=str(memory),
        layout=str(layout_path),
    )


def _fault(image_id: str, e: CloudletError) -> errors.CloudletImageUnacceptable:
    fault = next(f for kinds, f in _FAULTS if isinstance(e, kinds))  # the last catches all
    return fault(image_id=image_id, reason=str(e))


def create_root_disk(path: Path, st: state.InstanceState, root_gb: int) -> None:
    """The instance's root disk: a qcow2 over the synthesized or cached base disk (verified
    images, so Nova's safety inspection of untrusted backing files is skipped)."""
    size = max(root_gb * units.Gi, os.path.getsize(st.disk))
    libvirt_utils.create_image(str(path), "qcow2", size, backing_file=st.disk, safe=True)


def restore(conn: Any, xml: str, st: state.InstanceState, instance_dir: Path, flags: int) -> None:
    """Restore the snapshot into the defined domain: a libvirt save file holding Nova's XML for
    this instance and the QEMU stream the engine emits, then virDomainRestoreFlags with the same
    XML (libvirt's ABI check guards compatibility). The save file is removed afterwards."""
    work = state.work_dir(instance_dir)
    work.mkdir(mode=0o711, exist_ok=True)
    save_file = work / SAVE_FILE
    layout = MemoryLayout.from_bytes(Path(st.layout).read_bytes())
    try:
        with open(save_file, "wb") as f:
            write_save_file(
                f,
                LibvirtSaveHeader(xml=xml, was_running=True),
                lambda out: emit_stream(layout, Path(st.memory), out),
            )
        save_file.chmod(0o644)
        conn.restoreFlags(str(save_file), xml, flags)
    finally:
        save_file.unlink(missing_ok=True)
    if Path(st.memory).parent == work:  # synthesized: now in the guest, no longer needed
        Path(st.memory).unlink(missing_ok=True)

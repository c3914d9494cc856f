"""What a spawn from a cloudlet image adds to Nova's: base from the cache, synthesis of an
overlay, and the restore of the memory snapshot into the domain Nova defined.

Both go through the engine's one synthesis path (cloudlet.synthesis): prepare (the overlay from
Glance with the booting user's context, matched to the base the cache proved), materialize into
plain images, and resume with the libvirt runner (cloudlet_nova.runner). Early start (a
cloudletfs sink resumed by the same runner before the overlay has fully arrived) is not used by
the driver yet: an overlay is synthesized completely, then restored.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from nova.virt.libvirt import utils as libvirt_utils
from oslo_config import cfg
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
from cloudlet.memory.stream import MemoryLayout
from cloudlet.stats import Stats
from cloudlet.synthesis import PlainImages, Resumable, SynthesisSpec, prepare_synthesis
from cloudlet_nova import conf as cloudlet_conf  # noqa: F401  (registers [cloudlet])
from cloudlet_nova import errors, state
from cloudlet_nova.cache import BaseCache
from cloudlet_nova.glance import CloudletImage, GlanceImages, Kind
from cloudlet_nova.hardware import HostCPU
from cloudlet_nova.runner import LibvirtRestore

LOG = logging.getLogger(__name__)
CONF = cfg.CONF
_FAULTS: list[tuple[tuple[type[CloudletError], ...], type[errors.CloudletImageUnacceptable]]] = [
    ((EngineWrongBase, ConfigMismatch), errors.WrongBase),
    ((VerificationFailed, CorruptOverlay, TruncatedOverlay), errors.DigestMismatch),
    ((UnsupportedFormat,), errors.CloudletImageInvalid),
    ((CloudletError,), errors.CloudletImageUnacceptable),
]


def prepare(
    cache: BaseCache, glance: GlanceImages, image: CloudletImage, instance: Any,
    instance_dir: Path, host_cpu: HostCPU, stats: Stats,
) -> state.InstanceState:
    """Make the instance's images ready (base cached, overlay synthesized) and record its state.

    `glance` carries the booting user's context: the base is resumed only from Glance images
    that user can read and whose content hashes are proven to hold it (BaseCache.ensure), on
    every boot. The base's CPU must be one this host provides (`host_cpu`): checked before any
    download from what its images announce, then from what the base records. Raises a
    CloudletImageUnacceptable subclass (an instance fault) on every refusal. `stats` gets the
    engine's stages (cloudlet_nova.records), after "fetch base" (the cache's proof or download).
    """  # fmt: skip
    if image.kind is Kind.BASE_MEMORY:
        raise errors.CloudletImageInvalid(
            image_id=image.image_id,
            reason=f"a base memory image is not bootable: boot its base disk image "
            f"{image.disk_image}",
        )
    # with the booting user's context (`glance`): their images, proven to hold the base
    disk_image, memory_image = glance.base_images(image)
    announced = disk_image.cpu or image.cpu
    host_cpu.check(image.image_id, announced)
    with stats.stage("fetch base"):
        base = cache.ensure(glance, disk_image, memory_image)
    config = VMConfig.from_dict(base.config)
    if config.cpu != announced:  # the images only announce it: the base's record decides
        host_cpu.check(image.image_id, config.cpu)
    snapshot_mb = config.memory_mib
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
        st = _synthesize(cache, glance, image, base, state.work_dir(instance_dir), stats)
    st.cpu = config.cpu
    state.save(instance_dir, st)
    return st


def _synthesize(
    cache: BaseCache, glance: GlanceImages, image: CloudletImage, base: BaseVM, work: Path,
    stats: Stats,
) -> state.InstanceState:
    """Synthesize the overlay over the cached base into plain images in `work`, through the
    engine's one synthesis path: the overlay read from Glance with the booting user's context,
    its manifest verified, matched to the base the cache proved (`base`), every frame and both
    result images verified. The libvirt restore (LibvirtRestore) resumes them once Nova has
    defined the domain."""
    work.mkdir(mode=0o711, exist_ok=True)
    layout_path = work / "memory.layout"
    spec = SynthesisSpec(
        source=glance.overlay_source(image),
        sink=PlainImages(work),
        runner=None,  # the domain does not exist yet: _create_guest restores
        base=base,
        timeout=CONF.cloudlet.synthesis_timeout,
        id=image.image_id,
    )
    try:
        with prepare_synthesis(cache.home, spec, stats) as synth:
            synth.start()
            assert synth.images is not None
            layout_path.write_bytes(synth.layout.to_bytes())
            disk, memory = synth.images.disk, synth.images.memory
    except CloudletError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise _fault(image.image_id, e) from e
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    LOG.info("synthesized overlay %s over base %s", image.image_id, base.id)
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


def restore(
    conn: Any, cache: BaseCache, xml: str, st: state.InstanceState, instance_dir: Path,
    flags: int, stats: Stats,
) -> None:
    """Resume the instance's images (a synthesis's, or the cached base's) into the defined
    domain with the engine's runner for libvirt. A synthesized memory image is removed
    afterwards: it is in the guest now."""
    base = cache.get(st.base_id)
    if base is None:  # the instance's disk is layered over it: it cannot have been evicted
        raise errors.CloudletImageUnacceptable(
            image_id=st.image_id, reason=f"base {st.base_id[:16]} is no longer in the host cache"
        )
    work = state.work_dir(instance_dir)
    images = Resumable(
        base,
        disk=Path(st.disk),
        memory=Path(st.memory),
        layout=MemoryLayout.from_bytes(Path(st.layout).read_bytes()),
        work_dir=work,
    )
    LibvirtRestore(conn, xml, flags, st.image_id, st.cpu).resume(
        images, stats, CONF.cloudlet.synthesis_timeout
    )
    if Path(st.memory).parent == work:  # synthesized: now in the guest, no longer needed
        Path(st.memory).unlink(missing_ok=True)

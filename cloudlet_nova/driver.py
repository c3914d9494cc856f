"""CloudletDriver: Nova's libvirt driver, plus booting cloudlet images resumed, not cold.

Only these hooks differ from LibvirtDriver (spawn itself is Nova's):
- `_create_image`: before Nova's image creation, fetch the base into the host cache and
  synthesize an overlay (cloudlet_nova.spawn.prepare), recording the instance's state;
- `_create_and_inject_local_root`: the root disk is a qcow2 over the synthesized disk (overlay)
  or over the cached base disk (base), instead of over a Glance download in _base;
- `_create_guest`: Nova defines the domain from its XML, then instead of starting it the driver
  restores the memory snapshot into it (virDomainRestoreFlags, paused while Nova waits for
  network-vif-plugged events, exactly as Nova would have launched it); a refused restore is an
  instance fault (RestoreRefused), not a reschedule;
- `_get_guest_config`: a domain resumed from a kernel-booted base boots that base's kernel, and
  one resumed from a base that pinned a CPU model gets exactly that model (cloudlet_nova.hardware).
Plus placement traits for cached bases and provided CPU models (`update_provider_tree`) and the
RPC endpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from nova.compute import task_states
from nova.virt.libvirt import driver as libvirt_driver
from nova.virt.libvirt import imagebackend
from nova.virt.libvirt import utils as libvirt_utils
from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import fileutils

from cloudlet.stats import Stats
from cloudlet_nova import cache as base_cache
from cloudlet_nova import conf as cloudlet_conf  # noqa: F401  (registers [cloudlet])
from cloudlet_nova import errors, hardware, records, rpc, spawn, state
from cloudlet_nova.glance import CloudletImage, GlanceImages, Kind

LOG = logging.getLogger(__name__)
CONF = cfg.CONF

class CloudletDriver(libvirt_driver.LibvirtDriver):
    def __init__(self, virtapi: Any, read_only: bool = False) -> None:
        super().__init__(virtapi, read_only)
        self._cache: base_cache.BaseCache | None = None
        self.rpc_server: Any = None
        # spawns between _create_image and _create_guest: the synthesis record each one adds to
        self._records: dict[str, records.SynthesisRecord] = {}

    @property
    def cache(self) -> base_cache.BaseCache:
        if self._cache is None:
            path = CONF.cloudlet.cache_dir or os.path.join(CONF.instances_path, base_cache.DIR_NAME)
            self._cache = base_cache.BaseCache(Path(path))
        return self._cache

    @property
    def host_cpu(self) -> hardware.HostCPU:
        arch = self._host.get_capabilities().host.cpu.arch
        return hardware.HostCPU(libvirt_driver.libvirt, self._host.get_connection(),
                                CONF.libvirt.virt_type, arch)

    def init_host(self, host: str) -> None:
        super().init_host(host)
        LOG.info("cloudlet base cache: %s (%d bases)", self.cache.path, len(self.cache.base_ids()))
        if CONF.cloudlet.rpc_enabled:
            self.rpc_server = rpc.start_server(self, host)

    def cleanup_host(self, host: str) -> None:
        if self.rpc_server is not None:
            self.rpc_server.stop()
            self.rpc_server = None
        super().cleanup_host(host)

    def destroy(self, context, instance, *args, **kwargs):
        self._records.pop(instance.uuid, None)  # a spawn that failed before its restore
        return super().destroy(context, instance, *args, **kwargs)

    # -- spawn hooks ----------------------------------------------------------------------

    def _create_image(self, context, instance, disk_mapping, injection_info=None, suffix="",
                      disk_images=None, block_device_info=None, fallback_from_host=None,
                      ignore_bdi_for_swap=False):
        if (instance.task_state == task_states.SPAWNING and not suffix and disk_images is None
                and not self._is_booted_from_volume(block_device_info)):
            self._prepare_cloudlet(context, instance)
        return super()._create_image(
            context, instance, disk_mapping, injection_info=injection_info, suffix=suffix,
            disk_images=disk_images, block_device_info=block_device_info,
            fallback_from_host=fallback_from_host, ignore_bdi_for_swap=ignore_bdi_for_swap)

    def _prepare_cloudlet(self, context: Any, instance: Any) -> None:
        glance = GlanceImages(context)
        image = glance.describe(instance.image_ref)
        if image is None:
            return  # a plain image: Nova's way
        instance_dir = Path(libvirt_utils.get_instance_path(instance))
        created_dir = not instance_dir.exists()
        fileutils.ensure_tree(str(instance_dir))
        record = records.SynthesisRecord(instance_dir, instance.uuid, instance.project_id,
                                         image.image_id, _record_kind(image))
        try:
            spawn.prepare(self.cache, glance, image, instance, instance_dir, self.host_cpu,
                          record.stats)
        except BaseException as e:
            record.finish(e)
            # a refused image leaves nothing behind (the build is aborted, not rescheduled)
            if created_dir:
                shutil.rmtree(instance_dir, ignore_errors=True)
            else:
                state.path(instance_dir).unlink(missing_ok=True)
            raise
        self._records[instance.uuid] = record

    def _create_and_inject_local_root(self, context, instance, disk_mapping, booted_from_volume,
                                      suffix, disk_images, injection_info, fallback_from_host):
        st = state.load(Path(libvirt_utils.get_instance_path(instance)))
        if st is None or booted_from_volume or suffix:
            return super()._create_and_inject_local_root(
                context, instance, disk_mapping, booted_from_volume, suffix, disk_images,
                injection_info, fallback_from_host)
        backend = self.image_backend.by_name(
            instance, "disk", disk_info_mapping=disk_mapping["disk"])
        if not isinstance(backend, imagebackend.Qcow2):
            raise errors.CloudletImageUnacceptable(
                image_id=st.image_id,
                reason="cloudlet images need qcow2 instance disks: set [libvirt] images_type = "
                "qcow2 (or default with use_cow_images = True)")
        if backend.exists():
            return False
        spawn.create_root_disk(Path(backend.path), st, instance.flavor.root_gb)
        return True

    def _create_guest(self, context, xml, instance, power_on=True, pause=False,
                      post_xml_callback=None):
        instance_dir = Path(libvirt_utils.get_instance_path(instance))
        st = state.load(instance_dir)
        if st is None or not st.restore_pending or not (power_on or pause):
            return super()._create_guest(context, xml, instance, power_on=power_on, pause=pause,
                                         post_xml_callback=post_xml_callback)
        # Nova defines the domain (and its secrets, config drive) without starting it ...
        guest = super()._create_guest(context, xml, instance, power_on=False, pause=False,
                                      post_xml_callback=post_xml_callback)
        # ... and the snapshot is restored into it, as launch(pause=pause) would have started it
        self.cpu_api.power_up_for_instance(instance)
        lv = libvirt_driver.libvirt
        flags = lv.VIR_DOMAIN_SAVE_PAUSED if pause else lv.VIR_DOMAIN_SAVE_RUNNING
        # the spawn's record; after a nova-compute restart between the two hooks, none is kept
        record = self._records.pop(instance.uuid, None)
        try:
            spawn.restore(self._host.get_connection(), self.cache, xml, st, instance_dir, flags,
                          record.stats if record is not None else Stats())
        except BaseException as e:
            if record is not None:
                record.finish(e)
            if not isinstance(e, lv.libvirtError):
                raise
            # another host's libvirt would refuse the same snapshot: a fault, not a reschedule
            # (Nova's _create_guest_with_network undefines the domain and removes the disks)
            LOG.error("libvirt refused to restore base %s (image %s) into this instance's "
                      "domain: %s. A base VM resumes only into a domain with the devices it was "
                      "saved with: create bases in Nova (cloudlet-manage base create)",
                      st.base_id, st.image_id, e, instance=instance)
            raise errors.RestoreRefused(
                image_id=st.image_id, base=st.base_id[:16], reason=_qemu_reason(str(e))) from e
        st.restore_pending = False  # from now on reboots boot the disk, as for any instance
        state.save(instance_dir, st)
        if record is not None:
            record.finish()
        LOG.info("restored %s base %s memory snapshot", st.kind, st.base_id, instance=instance)
        return guest

    def _get_guest_config(self, instance, network_info, image_meta, disk_info, rescue=None,
                          *args, **kwargs):
        guest = super()._get_guest_config(instance, network_info, image_meta, disk_info, rescue,
                                          *args, **kwargs)
        if rescue is not None:
            return guest
        instance_dir = Path(libvirt_utils.get_instance_path(instance))
        st = state.load(instance_dir)
        if st is None:
            return guest
        if guest.os_kernel is None:
            self._boot_base_kernel(instance_dir, st, guest)
        pin = hardware.CpuPin.parse(st.cpu)
        if pin is not None:  # the CPU the snapshot was saved on, checked in _prepare_cloudlet
            guest.cpu = pin.guest_cpu(guest.cpu)
        return guest

    def _boot_base_kernel(self, instance_dir: Path, st: state.InstanceState, guest: Any) -> None:
        """A base saved from a kernel-booted guest resumes only into a domain booting that same
        kernel (QEMU's direct-boot option ROM is part of the saved hardware), and its disk boots
        only that way: the instance boots the base's kernel, initrd and command line, copied
        into the instance directory under Nova's own names."""
        kernel, initrd = instance_dir / "kernel", instance_dir / "ramdisk"
        base = self.cache.get(st.base_id)
        if not kernel.exists():
            if base is None or base.kernel_path is None:
                return  # a disk-booted base (or one evicted since: then it was disk-booted)
            shutil.copyfile(base.kernel_path, kernel)
            if base.initrd_path is not None:
                shutil.copyfile(base.initrd_path, initrd)
            cmdline = base.config.get("append") or ""
            (instance_dir / "kernel.cmdline").write_text(cmdline)
        guest.os_kernel = str(kernel)
        if initrd.exists():
            guest.os_initrd = str(initrd)
        cmdline_file = instance_dir / "kernel.cmdline"
        guest.os_cmdline = cmdline_file.read_text() if cmdline_file.exists() else None

    # -- placement ------------------------------------------------------------------------

    def update_provider_tree(self, provider_tree, nodename, allocations=None):
        super().update_provider_tree(provider_tree, nodename, allocations=allocations)
        wanted = {base_cache.base_trait(b) for b in self.cache.base_ids()}
        wanted |= self.host_cpu.model_traits()
        have = {t for t in provider_tree.data(nodename).traits
                if t.startswith((base_cache.TRAIT_PREFIX, hardware.TRAIT_PREFIX))}
        provider_tree.remove_traits(nodename, *(have - wanted))
        provider_tree.add_traits(nodename, *(wanted - have))


def _record_kind(image: CloudletImage) -> str:
    return "overlay" if image.kind is Kind.OVERLAY else "base"


def _qemu_reason(message: str) -> str:
    """QEMU's own words from a libvirt error (the fault keeps 255 characters, and libvirt puts
    "internal error: qemu unexpectedly closed the monitor: <timestamp> qemu-system-...:" first)."""
    found = _QEMU_SAID.search(message)
    return f"QEMU: {found.group(1).strip()}" if found else message


_QEMU_SAID = re.compile(r"qemu-system-[\w.-]+: (.+)")

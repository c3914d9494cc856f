"""Base VMs into Glance: created from a running instance, or registered from an engine package.

Either way the base lands in the host's cache first (the engine computes its content id there)
and is then published as two linked Glance images (glance.py has the properties). Publishing
looks for images of that base id first, so registering the same base twice uploads nothing.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from nova import exception
from nova.virt.libvirt import utils as libvirt_utils
from oslo_config import cfg
from oslo_log import log as logging

from cloudlet.basevm.create import copy_disk_as_raw
from cloudlet.basevm.package import import_base
from cloudlet.basevm.store import CONFIG, DISK, INITRD, KERNEL, LAYOUT, MEMORY, BaseVM
from cloudlet.hashing import file_sha256
from cloudlet.hypervisor.config import VMConfig
from cloudlet.memory.stream import open_snapshot, parse_stream
from cloudlet_nova import conf as cloudlet_conf  # noqa: F401  (registers [cloudlet])
from cloudlet_nova import glance, hardware
from cloudlet_nova.capture import (
    lock_instance,
    running_instance,
    snapshot_guest,
    unlock_instance,
    work_dir,
)
from cloudlet_nova.objects import CloudletCreateBaseRequest, CloudletRegisterBaseRequest
from cloudlet_nova.publish import Publisher
from cloudlet_nova.tasks import Progress

LOG = logging.getLogger(__name__)
CONF = cfg.CONF

MEMORY_BUNDLE = "memory.bundle"


def package_in_import_dir(requested: str, host: str) -> Path:
    """The file `requested` names (absolute, or relative to `[cloudlet] base_import_dir`),
    resolved with every symlink followed; refused unless it lies inside that directory."""
    if not CONF.cloudlet.base_import_dir:
        raise exception.Invalid(
            message=f"host {host} registers no base packages: set [cloudlet] base_import_dir "
            "in its nova.conf"
        )
    root = Path(CONF.cloudlet.base_import_dir).resolve()
    raw = Path(requested)
    if ".." in raw.parts:
        raise exception.Invalid(message=f"base package path {requested!r} contains '..'")
    resolved = (root / raw).resolve()  # an absolute `raw` replaces root
    if not resolved.is_relative_to(root):
        raise exception.Invalid(
            message=f"base package {requested} is outside the import directory {root} of host "
            f"{host} (symlinks are followed): copy it there"
        )
    if not resolved.is_file():
        raise exception.Invalid(
            message=f"base package {requested} is not a file in {root} on host {host}: copy it "
            "there (registration reads it on the compute host)"
        )
    return resolved


def publish_base(
    driver: Any, context: Any, base: BaseVM, name: str, public: bool, progress: Progress,
    lo: float = 0.5,
) -> dict[str, str]:  # fmt: skip
    """Upload `base` as a disk image + memory image linked to each other, unless Glance already
    has such a pair whose contents the host cache knows to be this base (labels alone prove
    nothing). The uploaded images' Glance digests are recorded in the cache as proof of the
    base. Returns {"disk": id, "memory": id}."""
    cache = driver.cache
    publisher = Publisher(context)
    memories = {m.image_id: m for m in publisher.find(glance.Kind.BASE_MEMORY, base.id)}
    for disk in publisher.find(glance.Kind.BASE_DISK, base.id):
        memory = memories.get(str(disk.memory_image))
        if memory is not None and cache.proven(base.id, disk.content, memory.content):
            LOG.info("base %s is already in Glance: %s + %s", base.id, disk.image_id,
                     memory.image_id)  # fmt: skip
            progress.stage("already in Glance", 0.99)
            return {"disk": disk.image_id, "memory": memory.image_id}
    disk_id, memory_id = publisher.new_id(), publisher.new_id()
    min_ram = int(base.config.get("memory_mib", 0))
    with work_dir(driver, "publish") as work:
        progress.stage("pack memory", lo)
        bundle = work / MEMORY_BUNDLE
        with progress.stats.stage("pack memory"), open(bundle, "wb") as out:
            glance.write_memory_bundle(base, out)
        mid = lo + (1 - lo) / 4
        progress.stage("upload memory image", mid)
        _, memory_hash = publisher.upload_verified(
            bundle, f"{name}-memory", glance.base_memory_properties(base.id, disk_id),
            image_id=memory_id, public=public, progress=progress.fraction(mid, mid + 0.1),
        )  # fmt: skip
    try:
        progress.stage("upload disk image", mid + 0.1)
        disk_properties = {
            **glance.base_disk_properties(base.id, memory_id, base.config.get("cpu")),
            **glance.configuration_properties(base),
        }
        _, disk_hash = publisher.upload_verified(
            base.disk_path, name, disk_properties,
            image_id=disk_id, public=public, min_ram=min_ram,
            progress=progress.fraction(mid + 0.1, 0.99),
        )  # fmt: skip
    except BaseException:
        publisher.delete(memory_id)  # a memory image without its disk is of no use
        raise
    cache.record(base.id, disk_hash, memory_hash)
    return {"disk": disk_id, "memory": memory_id}


def vm_config(instance: Any, domain_xml: str, kernel: Path | None, initrd: Path | None) -> dict:
    """The engine's VMConfig of an instance: what its memory snapshot depends on."""
    root = ET.fromstring(domain_xml)
    machine = root.find("./os/type")
    cpu = root.find("./cpu")
    nic = root.find("./devices/interface/model")
    balloon = root.find("./devices/memballoon")
    config = VMConfig(
        machine=(machine.get("machine") if machine is not None else None) or "pc",
        memory_mib=int(instance.flavor.memory_mb),
        vcpus=int(instance.flavor.vcpus),
        cpu=_saved_cpu(cpu),
        disk_bus="virtio",
        nic_model=nic.get("type", "none") if nic is not None else "none",
        balloon=balloon is not None and balloon.get("model") == "virtio",
        display="std" if root.find("./devices/graphics") is not None else "none",
        kernel_sha256=file_sha256(kernel) if kernel else None,
        initrd_sha256=file_sha256(initrd) if initrd and kernel else None,
        append=root.findtext("./os/cmdline"),
    )
    return config.to_dict()


def _saved_cpu(cpu: ET.Element | None) -> str:
    """The CPU the guest runs on, as VMConfig.cpu: the live XML's named model and features
    (libvirt expands host-model into them), else the CPU mode as before pinning."""
    pin = hardware.CpuPin.from_domain(cpu)
    if pin is not None:
        return pin.spec()
    return (cpu.get("mode") or "custom") if cpu is not None else "default"


class BaseCreation:
    """A base VM from a running instance: its memory (virDomainSaveFlags) and its disk, flattened
    to raw. The instance is restored and keeps running."""

    def __init__(
        self, driver: Any, host: str, context: Any, request: CloudletCreateBaseRequest
    ) -> None:
        self.driver = driver
        self.context = context
        self.request = request
        self.instance = running_instance(context, request.instance_uuid, host)
        lock_instance(self.instance)

    def abandon(self) -> None:
        unlock_instance(self.instance)

    def run(self, progress: Progress) -> None:
        try:
            with work_dir(self.driver, "base") as work:
                base = self._create(work, progress)
        finally:
            unlock_instance(self.instance)
        progress.task.base_id = base.id
        progress.task.images = publish_base(
            self.driver, self.context, base, self.request.name, self.request.public, progress
        )

    def _create(self, work: Path, progress: Progress) -> BaseVM:
        guest = self.driver._host.get_guest(self.instance)
        domain_xml = guest.get_xml_desc()
        _restored, save, disk = snapshot_guest(
            self.driver, self.instance, work, progress, resume_now=True
        )
        staging = self.driver.cache.home.make_staging_dir("base-")
        try:
            progress.stage("parse memory", 0.3)
            src, _kind = open_snapshot(save)
            with progress.stats.stage("parse memory", save.stat().st_size), src:
                layout = parse_stream(src, staging / MEMORY)
            (staging / LAYOUT).write_bytes(layout.to_bytes())
            save.unlink()
            progress.stage("flatten disk", 0.35)
            with progress.stats.stage("flatten disk"):
                copy_disk_as_raw(disk, staging / DISK)
            disk.unlink()
            instance_dir = Path(libvirt_utils.get_instance_path(self.instance))
            kernel = initrd = None
            for nova_name, ours in (("kernel", KERNEL), ("ramdisk", INITRD)):
                if (instance_dir / nova_name).is_file():
                    shutil.copyfile(instance_dir / nova_name, staging / ours)
            kernel = staging / KERNEL if (staging / KERNEL).exists() else None
            initrd = staging / INITRD if (staging / INITRD).exists() else None
            config = vm_config(self.instance, domain_xml, kernel, initrd)
            (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
            progress.stage("index base", 0.45)
            with progress.stats.stage("index base"):
                base = self.driver.cache.store.add_from_directory(
                    staging, self.request.name
                )
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # consumed on success
        LOG.info("base %s created from instance %s", base.id, self.instance.uuid)
        return base


class BaseRegistration:
    """An engine base package (.cbase) on this host -> the host cache -> Glance.

    nova-compute reads the package from a host path the caller names: admins only, and only
    inside `[cloudlet] base_import_dir`."""

    def __init__(
        self, driver: Any, host: str, context: Any, request: CloudletRegisterBaseRequest
    ) -> None:
        if not context.is_admin:
            raise exception.Forbidden(
                message="registering a base package from a compute host path is for admins"
            )
        self.driver = driver
        self.context = context
        self.request = request
        self.package = package_in_import_dir(request.package_path, host)

    def abandon(self) -> None:
        pass

    def run(self, progress: Progress) -> None:
        progress.stage("import package", 0.01)
        total = self.package.stat().st_size
        report = progress.fraction(0.01, 0.5)
        result = import_base(
            self.driver.cache.store, self.package, name=self.request.name,
            progress=lambda done: report(done, total),
        )  # fmt: skip
        base = result.base
        progress.task.base_id = base.id
        name = self.request.name or result.manifest.name
        progress.task.images = publish_base(
            self.driver, self.context, base, name, self.request.public, progress
        )

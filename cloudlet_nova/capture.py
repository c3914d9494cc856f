"""Overlay capture on the compute host: a running instance -> an overlay image in Glance.

Save the guest's memory (virDomainSaveFlags: a libvirt save file, which the engine reads), copy
the instance's qcow2 while the guest is stopped (its allocated clusters over the cached base are
all that can differ), restore the guest, build the overlay with the engine and upload it with
properties naming its base. The source instance is never left worse than it was: any failure
restores it from the save file, a half-made Glance image is deleted and the work directory is
always removed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nova import exception
from nova import objects as nova_objects
from nova.compute import power_state, task_states, vm_states
from nova.virt.libvirt import utils as libvirt_utils
from oslo_log import log as logging

from cloudlet.basevm.store import BaseVM
from cloudlet.disk import convert_to_raw, image_info
from cloudlet.fsutil import clone_sparse
from cloudlet.overlay.create import OverlaySpec, build_overlay
from cloudlet_nova import glance, state
from cloudlet_nova.objects import AfterCapture, CloudletCaptureRequest
from cloudlet_nova.publish import Publisher
from cloudlet_nova.tasks import Progress

LOG = logging.getLogger(__name__)

SAVE_FILE = "memory.save"
DISK_COPY = "disk.qcow2"


def instance_disk(instance: Any) -> Path:
    """The instance's root disk file (a qcow2 over the cached base's disk.raw)."""
    return Path(libvirt_utils.get_instance_path(instance)) / "disk"


def running_instance(context: Any, instance_uuid: str, host: str) -> Any:
    """The instance, if it runs on this host and nothing else is being done to it."""
    instance = nova_objects.Instance.get_by_uuid(context, instance_uuid)
    if instance.host != host:
        raise exception.Invalid(
            message=f"instance {instance_uuid} runs on host {instance.host}, not {host}"
        )
    if instance.vm_state != vm_states.ACTIVE or instance.task_state is not None:
        raise exception.InstanceInvalidState(
            instance_uuid=instance_uuid, attr="vm_state", state=instance.vm_state,
            method="cloudlet capture (needs ACTIVE with no task in progress)",
        )  # fmt: skip
    return instance


def lock_instance(instance: Any) -> None:
    """Claim the instance like Nova's own snapshot does (task_state image_snapshot), so no other
    action (reboot, delete, a second capture) runs while its memory is saved."""
    instance.task_state = task_states.IMAGE_SNAPSHOT
    instance.save(expected_task_state=[None])


def unlock_instance(instance: Any) -> None:
    if instance.task_state == task_states.IMAGE_SNAPSHOT:
        instance.task_state = None
        instance.save(expected_task_state=[task_states.IMAGE_SNAPSHOT])


def cached_base(driver: Any, context: Any, st: state.InstanceState) -> BaseVM:
    """The base the instance runs over, from the host cache (its id is the instance's state,
    verified when it booted); fetched again, through the caller's context and the checks of a
    boot, if it was evicted."""
    cache = driver.cache
    base = cache.get(st.base_id)
    if base is not None:
        return base
    images = glance.GlanceImages(context)
    image = images.describe(st.image_id)
    if image is None or image.base_id != st.base_id:
        raise exception.Invalid(
            message=f"base {st.base_id} is neither cached nor reachable through image "
            f"{st.image_id}"
        )
    return cache.ensure(images, *images.base_images(image))


class SavedGuest:
    """A guest stopped by virDomainSaveFlags: its memory in `path`, restorable exactly once.

    Leaving the `with` block restores it unless `restore()` or `keep_stopped()` already decided.
    """

    def __init__(self, driver: Any, instance: Any, path: Path) -> None:
        self.driver = driver
        self.instance = instance
        self.path = path
        self._pending = False

    def save(self) -> None:
        """virDomainSaveFlags: the guest stops, its memory and device state go to `path`."""
        guest = self.driver._host.get_guest(self.instance)
        guest._domain.saveFlags(str(self.path), None, 0)
        self._pending = True
        LOG.info("saved memory of %s (%d bytes)", self.instance.uuid, self.path.stat().st_size)

    def __enter__(self) -> SavedGuest:
        return self

    def restore(self) -> None:
        """virDomainRestoreFlags from the save file: the guest runs on where it stopped."""
        if not self._pending:
            return
        self._pending = False
        self.driver._host.get_connection().restoreFlags(str(self.path), None, 0)
        state = self.driver._host.get_guest(self.instance).get_power_state(self.driver._host)
        if state != power_state.RUNNING:
            raise exception.NovaException(
                message=f"instance {self.instance.uuid} is not running after its restore"
            )
        LOG.info("restored %s from its saved memory", self.instance.uuid)

    def keep_stopped(self) -> None:
        self._pending = False

    def __exit__(self, *exc: object) -> None:
        if self._pending:
            try:
                self.restore()
            except Exception:
                LOG.exception("could not restore %s from %s", self.instance.uuid, self.path)
                raise


@contextmanager
def work_dir(driver: Any, prefix: str) -> Iterator[Path]:
    """A scratch directory in the host's cloudlet home (same filesystem as the cached bases,
    swept if nova-compute dies), always removed."""
    path = driver.cache.home.new_run_dir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def snapshot_guest(
    driver: Any, instance: Any, work: Path, progress: Progress, resume_now: bool
) -> tuple[SavedGuest, Path, Path]:
    """Save memory and copy the disk while the guest is stopped; restore it at once when
    `resume_now`. Returns the (open) SavedGuest, the save file and the disk copy."""
    save, disk = work / SAVE_FILE, work / DISK_COPY
    saved = SavedGuest(driver, instance, save)
    progress.stage("save memory", 0.05)
    with progress.stats.stage("save memory"):
        saved.save()
    try:
        progress.stage("copy disk", 0.2)
        with progress.stats.stage("copy disk"):
            clone_sparse(instance_disk(instance), disk)
        if resume_now:
            progress.stage("restore instance", 0.25)
            with progress.stats.stage("restore instance"):
                saved.restore()
    except BaseException:
        saved.__exit__()
        raise
    return saved, save, disk


def comparable_disk(base: BaseVM, disk: Path, work: Path) -> Path:
    """A disk the engine can diff against the base: the copied qcow2 itself when it lies over
    the base's disk.raw (only its clusters are read); otherwise (an instance synthesized from an
    overlay runs over its synthesized disk) the chain flattened to a raw image and scanned."""
    info = image_info(disk)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing and os.path.exists(backing) and os.path.samefile(backing, base.disk_path):
        return disk
    raw = work / "disk.raw"
    convert_to_raw(disk, str(info["format"]), raw)
    disk.unlink()
    return raw


class OverlayCapture:
    """One capture request: validated in __init__ (inside the RPC call), run in a task thread."""

    def __init__(
        self, driver: Any, host: str, context: Any, request: CloudletCaptureRequest
    ) -> None:
        self.driver = driver
        self.context = context
        self.request = request
        instance = running_instance(context, request.instance_uuid, host)
        self.state = state.load(Path(libvirt_utils.get_instance_path(instance)))
        if self.state is None:
            raise exception.Invalid(
                message=f"instance {instance.uuid} was not booted from a cloudlet base or "
                "overlay image: there is no base to capture an overlay against"
            )
        self.base_id = self.state.base_id
        lock_instance(instance)
        self.instance = instance

    def abandon(self) -> None:
        unlock_instance(self.instance)

    def run(self, progress: Progress) -> None:
        progress.task.base_id = self.base_id
        try:
            progress.stage("fetch base", 0.01)
            base = cached_base(self.driver, self.context, self.state)
            with work_dir(self.driver, "capture") as work:
                self._capture(base, work, progress)
        finally:
            unlock_instance(self.instance)

    def _capture(self, base: Any, work: Path, progress: Progress) -> None:
        delete = self.request.after == AfterCapture.DELETE
        saved, save, disk = snapshot_guest(
            self.driver, self.instance, work, progress, resume_now=not delete
        )
        with saved:
            disk = comparable_disk(base, disk, work)
            progress.stage("build overlay", 0.3)
            overlay = work / "overlay"
            spec = OverlaySpec(output=overlay, codec=self.request.codec)
            build_overlay(base, save, disk, spec, progress.stats, work_dir=work)
            disk.unlink()  # the overlay holds what mattered; free the space before uploading
            progress.stage("upload overlay", 0.7)
            properties = glance.overlay_properties(base.id, self._base_disk_image())
            image_id = Publisher(self.context).upload(
                overlay, self.request.name, properties, public=self.request.public,
                min_ram=int(base.config.get("memory_mib", 0)),
                progress=progress.fraction(0.7, 0.98),
            )  # fmt: skip
            progress.task.images = {"overlay": image_id}
            if delete:
                saved.keep_stopped()
        if delete:
            progress.stage("delete instance", 0.99)
            self._delete_instance()

    def _base_disk_image(self) -> str:
        """The Glance base disk image the overlay points at (where other hosts fetch the base)."""
        image = glance.GlanceImages(self.context).describe(self.state.image_id)
        if image is None:
            raise exception.Invalid(message=f"image {self.state.image_id} is no cloudlet image")
        return image.image_id if image.kind is glance.Kind.BASE_DISK else str(image.disk_image)

    def _delete_instance(self) -> None:
        from nova.compute import api as compute_api  # heavy; only needed for this path

        unlock_instance(self.instance)
        compute_api.API().delete(self.context, self.instance)

"""The per-host base-VM cache: a cloudlet home under <instances_path>/_cloudlet (like Nova's
_base), filled from Glance on first use.

Instance disks are qcow2 layers over the cached disk.raw, so QEMU's user must reach it:
directories on the way are 0711 (traverse, not list), base files 0444 (the store's).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from nova import exception as nova_exception
from oslo_concurrency import lockutils
from oslo_log import log as logging

from cloudlet.basevm.store import DISK, BaseStore, BaseVM
from cloudlet.errors import BaseExists, BaseNotFound, CloudletError
from cloudlet.home import CloudletHome
from cloudlet_nova import errors
from cloudlet_nova.glance import CloudletImage, GlanceImages, Kind, read_memory_bundle

LOG = logging.getLogger(__name__)

DIR_NAME = "_cloudlet"
TRAIT_PREFIX = "CUSTOM_CLOUDLET_BASE_"
_TRAVERSE = 0o711


def base_trait(base_id: str) -> str:
    """The placement trait of a host that caches base `base_id` (first 128 bits of the id)."""
    return TRAIT_PREFIX + base_id[:32].upper()


class BaseCache:
    def __init__(self, path: Path) -> None:
        self.home = CloudletHome(path)  # creates the layout 0700 (and tightens it)
        for d in (self.home.root, self.home.bases):
            d.chmod(_TRAVERSE)
        self.store = BaseStore(self.home)

    @property
    def path(self) -> Path:
        return self.home.root

    def base_ids(self) -> list[str]:
        return sorted(b.id for b in self.store.list())

    def get(self, base_id: str) -> BaseVM | None:
        try:
            return self.store.get(base_id)
        except BaseNotFound:
            return None

    def ensure(self, glance: GlanceImages, disk_image: CloudletImage) -> BaseVM:
        """The cached base of `disk_image` (a base disk image), fetched from Glance if missing.

        Both images are downloaded into a staging directory, the base id is recomputed from
        their contents, and a base whose id differs from the images' property is refused.
        """
        with lockutils.lock(f"cloudlet-base-{disk_image.base_id}"):
            base = self.get(disk_image.base_id)
            if base is None:
                base = self._fetch(glance, disk_image)
            self._open_to_qemu(base)
            return base

    def _fetch(self, glance: GlanceImages, disk_image: CloudletImage) -> BaseVM:
        memory_id = disk_image.memory_image
        assert memory_id is not None  # glance.describe requires it on a base disk
        try:
            memory_image = glance.describe(memory_id)
        except nova_exception.ImageNotFound:
            raise errors.MissingMemoryImage(
                image_id=disk_image.image_id,
                reason=f"its memory image {memory_id} is not in Glance",
            ) from None
        if memory_image is None or memory_image.kind is not Kind.BASE_MEMORY:
            raise errors.MissingMemoryImage(
                image_id=disk_image.image_id,
                reason=f"image {memory_id} is not a cloudlet base memory image",
            )
        if memory_image.base_id != disk_image.base_id:
            raise errors.WrongBase(
                image_id=disk_image.image_id,
                reason=f"its memory image {memory_id} belongs to base {memory_image.base_id}, "
                f"not {disk_image.base_id}",
            )
        LOG.info("fetching base VM %s from Glance images %s + %s",
                 disk_image.base_id, disk_image.image_id, memory_id)
        staging = self.home.make_staging_dir("glance-")
        try:
            glance.download_to(disk_image.image_id, staging / DISK)
            with glance.open(memory_id) as f:
                read_memory_bundle(f, staging, memory_id)
            try:
                base = self.store.add_from_directory(staging, f"glance-{disk_image.image_id}")
            except BaseExists as e:  # contents of a cached base, but not the one asked for
                raise errors.DigestMismatch(image_id=disk_image.image_id, reason=str(e)) from e
            except CloudletError as e:
                raise errors.DigestMismatch(image_id=disk_image.image_id, reason=str(e)) from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # consumed on success
        if base.id != disk_image.base_id:
            if base.name == f"glance-{disk_image.image_id}":
                self.store.delete(base.id)
            raise errors.DigestMismatch(
                image_id=disk_image.image_id,
                reason=f"its contents hash to base id {base.id}, its properties say "
                f"{disk_image.base_id}: the images were changed or mislabelled",
            )
        LOG.info("cached base VM %s in %s", base.id, base.path)
        return base

    def _open_to_qemu(self, base: BaseVM) -> None:
        base.path.chmod(_TRAVERSE)


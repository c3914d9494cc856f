"""The per-host base-VM cache: a cloudlet home under <instances_path>/_cloudlet (like Nova's
_base), filled from Glance on first use.

Instance disks are qcow2 layers over the cached disk.raw, so QEMU's user must reach it:
directories on the way are 0711 (traverse, not list), base files 0444 (the store's).

Project isolation: a cached base serves only a boot whose (the booting user's) readable Glance
images carry a content hash proven to hold that base. For every base the cache keeps the Glance
content hashes (os_hash_algo:os_hash_value) of the disk and memory images it has verified: those
it fetched (the bytes hashed as they arrived, equal to Glance's digest, and the base id
recomputed from them) and those this host uploaded itself (publish). A boot whose images' hashes
are not on record is verified by fetching them, whatever is cached. Property labels prove
nothing (anyone can set them on their own image); a byte-identical copy in another project
proves its owner already has the content.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from oslo_concurrency import lockutils
from oslo_log import log as logging

from cloudlet.basevm.store import DISK, PRIMARY_FILES, BaseStore, BaseVM
from cloudlet.errors import BaseExists, BaseNotFound, CloudletError
from cloudlet.fsutil import fsync_dir
from cloudlet.hashing import file_sha256
from cloudlet.home import CloudletHome
from cloudlet_nova import errors
from cloudlet_nova.glance import (
    CloudletImage,
    ContentHash,
    GlanceImages,
    read_memory_bundle,
    write_sparse,
)

LOG = logging.getLogger(__name__)

DIR_NAME = "_cloudlet"
PROOF_DIR = "glance-hashes"  # <base id>.json: {"disk": [hash, ...], "memory": [hash, ...]}
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
        self._proofs = self.home.root / PROOF_DIR
        self._proofs.mkdir(mode=0o700, exist_ok=True)

    @property
    def path(self) -> Path:
        return self.home.root

    def base_ids(self) -> list[str]:
        return sorted(b.id for b in self.store.list())

    def get(self, base_id: str) -> BaseVM | None:
        """The cached base of an id this host already trusts (an instance's recorded state, a
        base it just made). An id from a user's image goes through `ensure` instead."""
        try:
            return self.store.get(base_id)
        except BaseNotFound:
            return None

    def ensure(
        self, glance: GlanceImages, disk_image: CloudletImage, memory_image: CloudletImage
    ) -> BaseVM:
        """The cached base that images `disk_image` + `memory_image` (as the booting user's
        context read them: GlanceImages.base_images) hold, fetched from Glance when it is not
        cached or when those images' content hashes are not on record for it.

        Fetched images are hashed as they arrive (must equal Glance's digest) and the base id
        is recomputed from their contents: a base whose id differs from the images' property is
        refused, and nothing of it is used.
        """
        base_id = disk_image.base_id
        for image in (disk_image, memory_image):
            if image.content is None:
                raise errors.BaseAccessDenied(
                    image_id=disk_image.image_id, base=base_id[:16],
                    reason=f"Glance has no os_hash_value for image {image.image_id}: re-upload "
                    "its data",
                )
        with lockutils.lock(f"cloudlet-base-{base_id}"):
            base = self.get(base_id)
            if base is None or not self.proven(base_id, disk_image.content, memory_image.content):
                base = self._fetch(glance, disk_image, memory_image, cached=base)
            self._open_to_qemu(base)
            return base

    def proven(self, base_id: str, disk: ContentHash | None, memory: ContentHash | None) -> bool:
        """Whether images of these content hashes were verified to hold base `base_id`."""
        known = self._read_proof(base_id)
        return str(disk) in known["disk"] and str(memory) in known["memory"]

    def record(self, base_id: str, disk: ContentHash, memory: ContentHash) -> None:
        """Remember that images of these content hashes hold base `base_id` (verified by the
        caller: fetched and recomputed, or uploaded by this host from the base itself)."""
        known = self._read_proof(base_id)
        if str(disk) in known["disk"] and str(memory) in known["memory"]:
            return
        known = {"disk": sorted({*known["disk"], str(disk)}),
                 "memory": sorted({*known["memory"], str(memory)})}  # fmt: skip
        target = self._proofs / f"{base_id}.json"
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(known, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(self._proofs)

    def _read_proof(self, base_id: str) -> dict[str, list[str]]:
        try:
            data = json.loads((self._proofs / f"{base_id}.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"disk": [], "memory": []}
        return {"disk": list(data.get("disk", [])), "memory": list(data.get("memory", []))}

    def _fetch(
        self, glance: GlanceImages, disk_image: CloudletImage, memory_image: CloudletImage,
        cached: BaseVM | None,
    ) -> BaseVM:  # fmt: skip
        base_id = disk_image.base_id
        LOG.info("%s base VM %s from Glance images %s + %s",
                 "verifying" if cached else "fetching", base_id, disk_image.image_id,
                 memory_image.image_id)  # fmt: skip
        staging = self.home.make_staging_dir("glance-")
        try:
            with open(staging / DISK, "wb") as out:
                glance.fetch_verified(disk_image, lambda src: write_sparse(src, out))
            glance.fetch_verified(
                memory_image, lambda src: read_memory_bundle(src, staging, memory_image.image_id)
            )
            if cached is not None:
                base = self._same_as_cached(staging, cached, disk_image)
            else:
                base = self._add(staging, disk_image)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # consumed on success
        assert disk_image.content is not None and memory_image.content is not None
        self.record(base.id, disk_image.content, memory_image.content)
        LOG.info("cached base VM %s in %s; images %s + %s verified", base.id, base.path,
                 disk_image.image_id, memory_image.image_id)  # fmt: skip
        return base

    def _add(self, staging: Path, disk_image: CloudletImage) -> BaseVM:
        try:
            base = self.store.add_from_directory(staging, f"glance-{disk_image.image_id}")
        except BaseExists as e:  # contents of a cached base, but not the one asked for
            raise errors.DigestMismatch(image_id=disk_image.image_id, reason=str(e)) from e
        except CloudletError as e:
            raise errors.DigestMismatch(image_id=disk_image.image_id, reason=str(e)) from e
        if base.id != disk_image.base_id:
            if base.name == f"glance-{disk_image.image_id}":
                self.store.delete(base.id)
            raise _mislabelled(disk_image, f"its contents hash to base id {base.id}")
        return base

    @staticmethod
    def _same_as_cached(staging: Path, cached: BaseVM, disk_image: CloudletImage) -> BaseVM:
        """The cached base, if the fetched files are exactly its files (the base id is a digest
        of them, so equal files are the same base)."""
        fetched = sorted(n for n in os.listdir(staging) if n in PRIMARY_FILES)
        ours = sorted(n for n in cached.files if n in PRIMARY_FILES)
        if fetched != ours or any(
            file_sha256(staging / n) != cached.files[n].sha256 for n in ours
        ):
            raise _mislabelled(disk_image, f"its contents are not those of base {cached.id}")
        return cached

    def _open_to_qemu(self, base: BaseVM) -> None:
        base.path.chmod(_TRAVERSE)


def _mislabelled(disk_image: CloudletImage, found: str) -> errors.DigestMismatch:
    return errors.DigestMismatch(
        image_id=disk_image.image_id,
        reason=f"{found}, its properties say {disk_image.base_id}: the images were changed or "
        "mislabelled",
    )

"""Putting cloudlet images into Glance (capture and base creation/registration).

Through Nova's image API, so auth, endpoints and the functional tests' GlanceFixture come with it.
Every upload names its image id up front, so a failed upload can always delete the record it
left behind: no half-made image stays in Glance.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from nova import exception
from oslo_log import log as logging
from oslo_utils import uuidutils

from cloudlet.hashing import READ_SIZE
from cloudlet_nova import glance

LOG = logging.getLogger(__name__)

UPLOAD_HASH = "sha512"  # Glance's default os_hash_algo: computed while uploading


class _ProgressReader:
    """File wrapper that reports (bytes read, total) as the upload consumes it, and feeds what
    it reads to `hasher` when there is one."""

    def __init__(self, f: BinaryIO, total: int, report: Callable[[int, int], None] | None,
                 hasher: Any = None):  # fmt: skip
        self._f = f
        self._total = total
        self._done = 0
        self._report = report
        self._hasher = hasher

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if self._hasher is not None:
            self._hasher.update(data)
        self._done += len(data)
        if self._report is not None:
            self._report(self._done, self._total)
        return data


class Publisher:
    def __init__(self, context: Any, api: Any = None) -> None:
        from nova.image import glance as nova_glance

        self.context = context
        self.api = api if api is not None else nova_glance.API()

    def upload(
        self,
        path: Path,
        name: str,
        properties: dict[str, str],
        *,
        image_id: str | None = None,
        public: bool = False,
        disk_format: str = "raw",
        min_ram: int = 0,
        progress: Callable[[int, int], None] | None = None,
        hasher: Any = None,
    ) -> str:
        """Create an image from `path` (fed to `hasher` as it is read); returns its id. On any
        failure the image is deleted."""
        image_id = image_id or self.new_id()
        meta = {
            "id": image_id,
            "name": name,
            "disk_format": disk_format,
            "container_format": "bare",
            "visibility": "public" if public else "private",
            "min_ram": min_ram,
            "properties": dict(properties),
        }
        try:
            with open(path, "rb") as f:
                reader = _ProgressReader(f, path.stat().st_size, progress, hasher)
                self.api.create(self.context, meta, data=reader)
        except BaseException:
            LOG.warning("upload of %s as image %s failed: deleting the image", path, image_id)
            self.delete(image_id)
            raise
        LOG.info("uploaded %s as image %s (%s)", path, image_id, properties.get(glance.TYPE))
        return image_id

    def upload_verified(
        self, path: Path, name: str, properties: dict[str, str], **kw: Any
    ) -> tuple[str, glance.ContentHash]:
        """`upload`, then Glance's digest of the image (os_hash_value) checked against the
        file's: proof, for the host's base cache, that this image holds exactly this file.
        The image is deleted when Glance recorded no digest or another one."""
        local = hashlib.new(UPLOAD_HASH)
        image_id = self.upload(path, name, properties, hasher=local, **kw)
        try:
            content = glance.content_hash(self.api.get(self.context, image_id))
            if content is None:
                raise exception.NovaException(
                    message=f"Glance recorded no content hash (os_hash_value) for image "
                    f"{image_id}: no server could be bound to its contents"
                )
            if content.algo != UPLOAD_HASH:  # Glance hashes with another algorithm
                local = content.new_hasher()
                with open(path, "rb") as f:
                    while block := f.read(READ_SIZE):
                        local.update(block)
            if local.hexdigest() != content.value:
                raise exception.NovaException(
                    message=f"image {image_id}: Glance's {content.algo} digest differs from "
                    f"that of {path}: the upload was altered"
                )
        except BaseException:
            self.delete(image_id)
            raise
        return image_id, content

    @staticmethod
    def new_id() -> str:
        """Ids are chosen here, so two images can name each other before either exists."""
        return uuidutils.generate_uuid()

    def delete(self, image_id: str) -> None:
        """Delete an image; one that is already gone is fine."""
        try:
            self.api.delete(self.context, image_id)
        except exception.ImageNotFound:
            pass
        except Exception:
            LOG.exception("could not delete image %s: delete it by hand", image_id)

    def find(self, kind: glance.Kind, base_id: str) -> list[glance.CloudletImage]:
        """Active images of `kind` for `base_id` owned by the caller's project (Glance filters
        on the properties; the result is checked again here). Another project's images are
        not reused: their owner could delete them."""
        images = self.api.get_all(
            self.context, filters={glance.TYPE: kind.value, glance.BASE_ID: base_id}
        )
        found = []
        for image in images:
            if image.get("status", "active") != "active":
                continue
            if image.get("owner") != self.context.project_id:
                continue
            try:
                info = glance.describe(image)
            except exception.NovaException:
                continue  # a damaged record is not ours to use
            if info is not None and info.kind is kind and info.base_id == base_id:
                found.append(info)
        return found

"""Putting cloudlet images into Glance (capture and base creation/registration).

Through Nova's image API, so auth, endpoints and the functional tests' GlanceFixture come with it.
Every upload names its image id up front, so a failed upload can always delete the record it
left behind: no half-made image stays in Glance.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from nova import exception
from oslo_log import log as logging
from oslo_utils import uuidutils

from cloudlet_nova import glance

LOG = logging.getLogger(__name__)


class _ProgressReader:
    """File wrapper that reports (bytes read, total) as the upload consumes it."""

    def __init__(self, f: BinaryIO, total: int, report: Callable[[int, int], None] | None):
        self._f = f
        self._total = total
        self._done = 0
        self._report = report

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
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
    ) -> str:
        """Create an image from `path`; returns its id. On any failure the image is deleted."""
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
                self.api.create(
                    self.context, meta, data=_ProgressReader(f, path.stat().st_size, progress)
                )
        except BaseException:
            LOG.warning("upload of %s as image %s failed: deleting the image", path, image_id)
            self.delete(image_id)
            raise
        LOG.info("uploaded %s as image %s (%s)", path, image_id, properties.get(glance.TYPE))
        return image_id

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
        """Active images of `kind` for `base_id` (Glance filters on the properties; the result
        is checked again here)."""
        images = self.api.get_all(
            self.context, filters={glance.TYPE: kind.value, glance.BASE_ID: base_id}
        )
        found = []
        for image in images:
            if image.get("status", "active") != "active":
                continue
            try:
                info = glance.describe(image)
            except exception.NovaException:
                continue  # a damaged record is not ours to use
            if info is not None and info.kind is kind and info.base_id == base_id:
                found.append(info)
        return found

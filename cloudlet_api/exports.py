"""Base export: a base's Glance images turned back into a package (.cbase) and streamed.

The disk image and the memory bundle are streamed from Glance (with the caller's token) into a
private staging home, registered there (which recomputes the base id from the contents: images
that no longer match their base id are refused), exported by the engine
(cloudlet.basevm.package.export_base) and streamed to the caller; the staging home is removed
when the response ends or fails. Exports share the import slots ([api] max_concurrent_imports).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nova import exception as nova_exception
from oslo_log import log as logging

from cloudlet.basevm.package import SUFFIX, export_base
from cloudlet.basevm.store import DISK, BaseStore
from cloudlet.errors import CloudletError
from cloudlet.home import CloudletHome
from cloudlet_api import errors
from cloudlet_api.clients import Glance
from cloudlet_api.imports import BLOCK, Importer
from cloudlet_nova import glance as cloudlet_glance

LOG = logging.getLogger(__name__)


def _glance_stream(glance: Glance, image_id: str, what: str) -> cloudlet_glance.ImageStream:
    def download(sink: Any) -> None:
        _, chunks = glance.download(image_id, what)
        for chunk in chunks:
            sink.write(chunk)

    return cloudlet_glance.ImageStream(download, name=f"glance image {image_id}")


def export(
    importer: Importer, glance: Glance, image: dict[str, Any], info: cloudlet_glance.CloudletImage
) -> tuple[int, Iterator[bytes]]:
    """(package size, its bytes) of the base whose disk image is `image`."""
    importer.slot()
    home_dir = importer.root / f"export-{uuid.uuid4()}"
    try:
        home = CloudletHome(home_dir)
        staging = home.make_staging_dir("export-")
        with _glance_stream(glance, str(info.memory_image), "memory image") as src:
            cloudlet_glance.read_memory_bundle(src, staging, str(info.memory_image))
        with (
            _glance_stream(glance, info.image_id, "disk image") as src,
            open(staging / DISK, "wb") as out,
        ):
            cloudlet_glance.write_sparse(src, out)
        store = BaseStore(home)
        name = "".join(c for c in image.get("name") or "" if c.isprintable()).strip()
        base = store.add_from_directory(staging, name[:100] or "base")
        if base.id != info.base_id:
            raise errors.Conflict(
                f"base {info.image_id}: its images hold base {base.id}, not the "
                f"{info.base_id} their properties name: the images were changed"
            )
        package = export_base(store, base.id, home.tmp / f"{base.id}{SUFFIX}", threads=0)
    except (CloudletError, nova_exception.NovaException) as e:
        _cleanup(home_dir, importer)
        reason = e.format_message() if isinstance(e, nova_exception.NovaException) else str(e)
        raise errors.Conflict(f"base {info.image_id} cannot be exported: {reason}") from None
    except BaseException:
        _cleanup(home_dir, importer)
        raise
    return package.stat().st_size, _stream(package, home_dir, importer)


def _cleanup(home_dir: Path, importer: Importer) -> None:
    shutil.rmtree(home_dir, ignore_errors=True)
    importer.release()


def _stream(package: Path, home_dir: Path, importer: Importer) -> Iterator[bytes]:
    try:
        with open(package, "rb") as f:
            while block := f.read(BLOCK):
                yield block
    finally:
        _cleanup(home_dir, importer)

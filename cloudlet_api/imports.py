"""Base-VM package imports: receive (upload or allowed URL), verify, publish to Glance.

The package is spooled to a file under [api] state_path in 1 MiB blocks (memory stays bounded
whatever its size; the size limit is enforced as the bytes arrive), then verified by the engine
(cloudlet.basevm.package.import_base: every member's sha256, the rebuilt image digests and the
recomputed base id) into a private staging home. Only a verified base is published, as the
linked disk + memory images the driver reads, with the caller's token; a failed publish deletes
what it created. Nothing of a rejected package reaches Glance. Everything local is removed at
the end, success or not.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import requests
from oslo_config import cfg
from oslo_log import log as logging

from cloudlet.basevm.package import import_base
from cloudlet.basevm.store import BaseStore, BaseVM
from cloudlet.errors import CloudletError, SourceNotAllowed
from cloudlet.home import CloudletHome
from cloudlet.sources.allow import AllowList
from cloudlet_api import conf as api_conf
from cloudlet_api import errors
from cloudlet_api.clients import Glance, describe
from cloudlet_api.tasks import FAILED, IMPORT_BASE, SUCCEEDED, Task, TaskStore
from cloudlet_nova import glance as cloudlet_glance

LOG = logging.getLogger(__name__)

BLOCK = 1 << 20
_MiB = 1 << 20
MEMORY_BUNDLE = "memory.bundle"


class ProgressReader:
    """A file read by an upload, reporting (done, total); len() lets requests send a
    Content-Length instead of chunked encoding."""

    def __init__(self, f: BinaryIO, total: int, report: Callable[[int, int], None]) -> None:
        self._f = f
        self._total = total
        self._done = 0
        self._report = report

    def __len__(self) -> int:
        return self._total

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._done += len(data)
        self._report(self._done, self._total)
        return data


class TaskProgress:
    """Writes a task's stage and progress, at most once per percent."""

    def __init__(self, store: TaskStore, task: Task) -> None:
        self.store = store
        self.task = task

    def stage(self, name: str, progress: float) -> None:
        self.task.stage = name
        self.task.progress = max(self.task.progress, progress)
        self.store.save(self.task)

    def fraction(self, lo: float, hi: float) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            value = lo + (hi - lo) * (done / total if total else 1.0)
            if value - self.task.progress >= 0.01:
                self.task.progress = value
                self.store.save(self.task)

        return report


class Importer:
    def __init__(self, conf: cfg.ConfigOpts, store: TaskStore) -> None:
        self.conf = conf
        self.store = store
        self.root = Path(conf[api_conf.API].state_path) / "imports"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.limit = conf[api_conf.API].max_package_size * _MiB
        self.allow = AllowList.parse(conf[api_conf.API].import_url_allow)
        self._slots = threading.BoundedSemaphore(conf[api_conf.API].max_concurrent_imports)

    def slot(self) -> None:
        """Take one of the process's package slots (imports and exports), or 429."""
        if not self._slots.acquire(blocking=False):
            raise errors.TooManyRequests(
                "this cloudlet-api process is already running its maximum of "
                f"{self.conf[api_conf.API].max_concurrent_imports} package imports and "
                "exports; retry later",
                headers={"Retry-After": "30"},
            )

    def release(self) -> None:
        self._slots.release()

    def upload(
        self,
        ctx: Any,
        glance: Glance,
        body: BinaryIO,
        length: int | None,
        name: str | None,
        public: bool,
    ) -> Task:
        """Spool an uploaded package, then verify and publish it in a task."""
        if length is None:
            raise errors.LengthRequired("a package upload needs a Content-Length header")
        if length > self.limit:
            raise errors.PayloadTooLarge(self._too_large(length))
        self.slot()
        spool = self.root / f"{uuid.uuid4()}.cbase"
        try:
            with open(spool, "xb") as out:
                done = 0
                while done < length:
                    block = body.read(min(BLOCK, length - done))
                    if not block:
                        raise errors.BadRequest(
                            f"the upload ended after {done} of {length} bytes (Content-Length)"
                        )
                    out.write(block)
                    done += len(block)
            task = self.store.new(
                ctx.project_id, ctx.user_id, IMPORT_BASE, name=name, stage="verify"
            )
        except BaseException:
            spool.unlink(missing_ok=True)
            self._slots.release()
            raise
        self._start(task, lambda progress: spool, spool, glance, public)
        return task

    def url(self, ctx: Any, glance: Glance, url: str, name: str | None, public: bool) -> Task:
        """Fetch a package from an allowed URL, then verify and publish it, all in a task."""
        try:
            target = str(self.allow.check(url))
        except SourceNotAllowed as e:
            raise errors.BadRequest(str(e)) from None
        self.slot()
        spool = self.root / f"{uuid.uuid4()}.cbase"
        try:
            task = self.store.new(
                ctx.project_id, ctx.user_id, IMPORT_BASE, name=name, stage="download"
            )
        except BaseException:
            self._slots.release()
            raise
        self._start(
            task, lambda progress: self._download(target, spool, progress), spool, glance, public
        )
        return task

    def _too_large(self, size: int) -> str:
        return (
            f"the package is {size} bytes, more than the {self.limit} bytes "
            "([api] max_package_size) this service accepts"
        )

    def _download(self, url: str, spool: Path, progress: TaskProgress) -> Path:
        timeout = self.conf[api_conf.API].import_url_timeout
        # No redirects: a redirect could lead outside the allow-list.
        with requests.get(url, stream=True, timeout=timeout, allow_redirects=False) as resp:
            if resp.status_code != 200:
                raise CloudletError(f"{url} answered HTTP {resp.status_code}")
            total = int(resp.headers.get("Content-Length") or 0)
            if total > self.limit:
                raise CloudletError(self._too_large(total))
            report = progress.fraction(0.0, 0.3)
            done = 0
            with open(spool, "xb") as out:
                for block in resp.iter_content(BLOCK):
                    done += len(block)
                    if done > self.limit:
                        raise CloudletError(self._too_large(done))
                    out.write(block)
                    report(done, total or done)
        return spool

    def _start(
        self,
        task: Task,
        receive: Callable[[TaskProgress], Path],
        spool: Path,
        glance: Glance,
        public: bool,
    ) -> None:
        thread = threading.Thread(
            target=self._run,
            args=(task, receive, spool, glance, public),
            name=f"import-{task.id[:8]}",
            daemon=True,
        )
        thread.start()

    def _run(
        self,
        task: Task,
        receive: Callable[[TaskProgress], Path],
        spool: Path,
        glance: Glance,
        public: bool,
    ) -> None:
        progress = TaskProgress(self.store, task)
        home_dir = self.root / task.id
        try:
            receive(progress)
            progress.stage("verify", 0.3 if task.stage == "download" else 0.0)
            home = CloudletHome(home_dir)
            size = spool.stat().st_size
            report = progress.fraction(task.progress, 0.6)
            result = import_base(
                BaseStore(home), spool, name=task.name, progress=lambda done: report(done, size)
            )
            spool.unlink()
            task.base_id = result.base.id
            task.name = result.base.name
            task.images, uploaded = publish(
                glance, task.project_id, result.base, result.base.name, public, progress, home
            )
            task.stats["glance"] = "uploaded" if uploaded else "already present"
            task.state, task.stage, task.progress = SUCCEEDED, "done", 1.0
            LOG.info("imported base %s as images %s", task.base_id, task.images)
        except Exception as e:  # every failure ends in the task record
            LOG.warning("base import %s failed: %s", task.id, e)
            # the engine names the file it read: the spool file means nothing to the caller
            task.state, task.error = FAILED, _reason(e).replace(str(spool), "the package")
        finally:
            # the task ends once nothing of the import is left here
            spool.unlink(missing_ok=True)
            shutil.rmtree(home_dir, ignore_errors=True)
            self._slots.release()
            self.store.save(task)


def _reason(e: Exception) -> str:
    if isinstance(e, errors.APIError):
        return e.detail
    if isinstance(e, (CloudletError, requests.RequestException, OSError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def publish(
    glance: Glance,
    project_id: str,
    base: BaseVM,
    name: str,
    public: bool,
    progress: TaskProgress,
    work: CloudletHome,
) -> tuple[dict[str, str], bool]:
    """The base's disk + memory images in Glance, uploaded unless the project already has a
    linked pair for its id. Returns ({"disk": id, "memory": id}, whether they were uploaded)."""
    found = [
        (image, info)
        for image in glance.list_images(
            cloudlet_type=cloudlet_glance.Kind.BASE_DISK.value, cloudlet_base_id=base.id
        )
        if image.get("status") == "active"
        and image.get("owner") == project_id
        and (info := describe(image)) is not None
    ]
    for image, info in found:
        try:
            memory = glance.get_image(str(info.memory_image), "memory image")
        except errors.NotFound:
            continue
        if memory.get("status") == "active":
            progress.stage("already in Glance", 0.99)
            return {"disk": image["id"], "memory": memory["id"]}, False
    disk_id, memory_id = str(uuid.uuid4()), str(uuid.uuid4())
    visibility = "public" if public else "private"
    created: list[str] = []
    try:
        progress.stage("pack memory", 0.6)
        bundle = work.tmp / MEMORY_BUNDLE
        with open(bundle, "wb") as out:
            cloudlet_glance.write_memory_bundle(base, out)
        progress.stage("upload memory image", 0.65)
        meta = {
            "id": memory_id,
            "name": f"{name}-memory",
            "disk_format": "raw",
            "container_format": "bare",
            "visibility": visibility,
            **cloudlet_glance.base_memory_properties(base.id, disk_id),
        }
        glance.create_image(meta)
        created.append(memory_id)
        with open(bundle, "rb") as f:
            glance.upload(
                memory_id,
                ProgressReader(f, os.fstat(f.fileno()).st_size, progress.fraction(0.65, 0.75)),
            )
        bundle.unlink()
        progress.stage("upload disk image", 0.75)
        meta = {
            "id": disk_id,
            "name": name,
            "disk_format": "raw",
            "container_format": "bare",
            "visibility": visibility,
            "min_ram": int(base.config.get("memory_mib", 0)),
            **cloudlet_glance.base_disk_properties(base.id, memory_id),
            **cloudlet_glance.configuration_properties(base),
        }
        glance.create_image(meta)
        created.append(disk_id)
        with open(base.disk_path, "rb") as f:
            glance.upload(
                disk_id,
                ProgressReader(f, os.fstat(f.fileno()).st_size, progress.fraction(0.75, 0.99)),
            )
    except BaseException:
        for image_id in reversed(created):
            try:
                glance.delete_image(image_id, f"deleting half-published image {image_id}")
            except errors.APIError as e:
                LOG.error("could not delete half-published image %s: %s", image_id, e.detail)
        raise
    return {"disk": disk_id, "memory": memory_id}, True

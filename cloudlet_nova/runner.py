"""The engine's runner for Nova: resume into the domain Nova defined, by libvirt restore.

The engine's QemuRunner starts QEMU itself; on a compute host libvirt owns QEMU, so the guest is
resumed by virDomainRestoreFlags from a libvirt save file that holds Nova's XML for the instance
and the QEMU stream the engine emits from the memory image. It takes the engine's Resumable
whatever sink made it: the plain images a synthesis left in the instance directory, a cached
base's own files, or (early start) the files a cloudletfs mount serves.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from oslo_log import log as logging

from cloudlet.basevm.store import BaseVM
from cloudlet.errors import CloudletError
from cloudlet.memory.libvirt import LibvirtSaveHeader, write_save_file
from cloudlet.memory.stream import MemoryLayout, emit_stream
from cloudlet.stats import Stats
from cloudlet.synthesis import Resumable
from cloudlet_nova import hardware

LOG = logging.getLogger(__name__)

SAVE_FILE = "restore.save"


class LibvirtRestore:
    """Runner (cloudlet.synthesis.Runner) restoring into the defined domain `xml` with libvirt's
    `flags` (running, or paused while Nova waits for its network events)."""

    def __init__(self, conn: Any, xml: str, flags: int, image_id: str, cpu: str | None) -> None:
        self._conn = conn
        self._xml = xml
        self._flags = flags
        self._image_id = image_id
        self._cpu = cpu  # the base's VMConfig.cpu
        self._lock = threading.Lock()
        self._restored = False
        self._stopped = False

    def check_host(self, base: BaseVM, layout: MemoryLayout) -> None:
        """libvirt's ABI check guards the devices at restore; the CPU model, which it does not
        check, is checked here."""
        hardware.check_domain_cpu(self._image_id, base.id, self._xml, self._cpu)

    def resume(self, images: Resumable, stats: Stats, timeout: float) -> None:
        """Write the save file (the stream is emitted, not copied: with early start its reads
        go through the mount), restore, remove the save file. libvirt bounds the restore."""
        self.check_host(images.base, images.layout)
        images.work_dir.mkdir(mode=0o711, exist_ok=True)
        save_file = images.work_dir / SAVE_FILE
        with self._lock:
            if self._stopped:
                raise CloudletError("the synthesis was stopped before the restore began")
        try:
            with stats.stage("restore memory", images.layout.size):
                with open(save_file, "wb") as f:
                    write_save_file(
                        f,
                        LibvirtSaveHeader(xml=self._xml, was_running=True),
                        lambda out: emit_stream(images.layout, Path(images.memory), out),
                    )
                save_file.chmod(0o644)
                self._conn.restoreFlags(str(save_file), self._xml, self._flags)
        finally:
            save_file.unlink(missing_ok=True)
        with self._lock:
            self._restored = True

    def stop(self, failed: bool) -> None:
        """A synthesis that fails after the restore (early start: a frame digest) destroys the
        guest; Nova's own clean-up then undefines the domain and removes its disks."""
        with self._lock:
            self._stopped = True
            restored = self._restored
        if restored:
            uuid = ElementTree.fromstring(self._xml).findtext("uuid")
            domain = self._conn.lookupByUUIDString((uuid or "").strip())
            if domain.isActive():
                domain.destroy()

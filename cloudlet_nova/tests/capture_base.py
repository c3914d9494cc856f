"""Shared set-up of the capture / base / RPC tests: the driver harness of test_driver plus root
disks on real files, the RPC client over oslo.messaging's fake:// transport (RPCFixture), and a
guest that changes its disk and memory.

fakelibvirt stands for libvirtd + QEMU (they cannot run inside Nova's functional framework); its
save/restore (fixtures.SaveRestoreFixture) reads and writes real libvirt save files.
"""

from __future__ import annotations

import io
import os
import subprocess
import uuid
from pathlib import Path

import fixtures
from nova import context as nova_context
from nova.virt.libvirt import utils as libvirt_utils

from cloudlet.disk import create_cow
from cloudlet.memory.stream import MemoryLayout, emit_stream, parse_stream
from cloudlet_nova import state
from cloudlet_nova.objects import CloudletTask
from cloudlet_nova.rpc import CloudletRPCClient
from cloudlet_nova.tests.test_driver import CloudletDriverTestBase

HOST = "compute1"
DISK_WRITE = (64 * 1024, 8192, 0x5A)  # offset, length, byte the guest writes to its disk
MEMORY_PAGE = 500  # page the guest changes in RAM


class CaptureTestBase(CloudletDriverTestBase):
    ADMIN_API = True

    def setUp(self) -> None:
        self.flags(host=HOST)  # the RPC server of the one compute is named by it
        super().setUp()
        # Nova's image backend is a fixture here (no files): lay the root disk as the driver's
        # _create_and_inject_local_root does, a qcow2 over the image's raw disk, so capture
        # reads a real qcow2.
        self.useFixture(fixtures.MonkeyPatch(
            "nova.virt.libvirt.LibvirtDriver._create_image", self._lay_root_disk))
        self.start_compute(HOST)
        self.driver = self.computes[HOST].driver
        self.ctxt = nova_context.get_admin_context()
        self.client = CloudletRPCClient(timeout=60)
        self.scratch = Path(self.useFixture(fixtures.TempDir()).path)

    @staticmethod
    def _lay_root_disk(driver, context, instance, *args, **kwargs):  # noqa: ANN001, ANN205
        instance_dir = Path(libvirt_utils.get_instance_path(instance))
        st = state.load(instance_dir)
        if st is not None and not (instance_dir / "disk").exists():
            create_cow(Path(st.disk), instance_dir / "disk")
        return False, False

    def root_disk(self, server: dict) -> Path:
        return self.instance_dir(server) / "disk"

    def customise(self, server: dict, marker: bytes = b"customised in RAM") -> None:
        """What a user does in the guest: a write to its disk, a page of its memory changed."""
        offset, length, byte = DISK_WRITE
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P {byte} {offset} {length}",
             str(self.root_disk(server))],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        scratch = self.scratch

        def changed(dom_uuid: str, stream: bytes) -> bytes:
            if dom_uuid != server["id"]:
                return stream
            image = scratch / f"{uuid.uuid4()}.img"
            layout = parse_stream(io.BytesIO(stream), image)
            with open(image, "r+b") as f:
                f.seek(MEMORY_PAGE * 4096)
                f.write(marker.ljust(4096, b"."))
            out = io.BytesIO()
            emit_stream(layout, image, out)
            image.unlink()
            return out.getvalue()

        self.libvirt_fx.customise = changed

    def memory_of(self, server: dict) -> tuple[MemoryLayout, bytes]:
        """The guest's memory now (as the fake hypervisor holds it), flat."""
        image = self.scratch / "now.img"
        layout = parse_stream(io.BytesIO(self.libvirt_fx.streams[server["id"]]), image)
        data = image.read_bytes()
        image.unlink()
        return layout, data

    def wait(self, task: CloudletTask) -> CloudletTask:
        return self.client.wait(self.ctxt, HOST, task.id, timeout=120, interval=0.05)

    def domain_running(self, server: dict) -> bool:
        conn = self.driver._host.get_connection()
        return bool(conn.lookupByUUIDString(server["id"]).isActive())

    def assert_no_leftovers(self) -> None:
        home = self.driver.cache.home
        self.assertEqual([], os.listdir(home.runs), "capture work directory left behind")
        self.assertEqual([], os.listdir(home.tmp), "staging left in the base cache")

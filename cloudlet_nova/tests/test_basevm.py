"""Base VMs into Glance through the cloudlet RPC endpoint (cloudlet_nova.basevm): registered from
an engine package, created from a running instance. fakelibvirt stands for libvirtd + QEMU."""

from __future__ import annotations

import io
import uuid

from cloudlet.basevm.package import export_base
from cloudlet.basevm.store import BaseStore
from cloudlet.home import CloudletHome
from cloudlet_nova import glance
from cloudlet_nova.objects import (
    CloudletCreateBaseRequest,
    CloudletRegisterBaseRequest,
    TaskState,
)
from cloudlet_nova.tests import fixtures as cf
from cloudlet_nova.tests.capture_base import HOST, CaptureTestBase


class BaseTest(CaptureTestBase):
    def register(self, package: str, name: str | None = None):  # noqa: ANN201
        request = CloudletRegisterBaseRequest(task_id=str(uuid.uuid4()), package_path=package,
                                              name=name)
        return self.wait(self.client.register_base(self.ctxt, HOST, request))

    def assert_linked_pair(self, images: dict[str, str], base_id: str) -> None:
        disk = glance.describe(self.glance.show(None, images["disk"]))
        memory = glance.describe(self.glance.show(None, images["memory"]))
        self.assertEqual((glance.Kind.BASE_DISK, base_id, images["memory"]),
                         (disk.kind, disk.base_id, disk.memory_image))
        self.assertEqual((glance.Kind.BASE_MEMORY, base_id, images["disk"]),
                         (memory.kind, memory.base_id, memory.disk_image))

    def rebuilt_id(self, images: dict[str, str]) -> str:
        """The base id of what Glance holds, recomputed by the engine from the two images."""
        home = CloudletHome(self.scratch / "check")
        staging = home.make_staging_dir()
        (staging / "disk.raw").write_bytes(self.glance._imagedata[images["disk"]])
        glance.read_memory_bundle(io.BytesIO(self.glance._imagedata[images["memory"]]), staging,
                                  images["memory"])
        return BaseStore(home).add_from_directory(staging, "check").id

    def test_register_a_package_twice_uploads_once(self) -> None:
        other = cf.make_base(self.home, seed=7)
        package = self.scratch / "web.cbase"
        export_base(self.home, other.id, package)
        first = self.register(str(package), name="web")
        self.assertEqual(TaskState.SUCCEEDED, first.state, first.error)
        self.assertEqual(other.id, first.base_id)
        self.assert_linked_pair(first.images, other.id)
        self.assertEqual("web", self.glance.show(None, first.images["disk"])["name"])
        self.assertEqual(other.id, self.rebuilt_id(first.images))
        self.assertIsNotNone(self.driver.cache.get(other.id))  # cached on the host too
        count = len(self.glance.images)
        second = self.register(str(package))
        self.assertEqual(TaskState.SUCCEEDED, second.state, second.error)
        self.assertEqual(first.images, second.images)
        self.assertEqual(count, len(self.glance.images), "the second registration uploaded")
        self.assert_no_leftovers()
        # and Nova boots it
        self.boot(first.images["disk"])

    def test_register_a_damaged_package_fails_and_uploads_nothing(self) -> None:
        package = self.scratch / "bad.cbase"
        export_base(self.home, self.base.id, package)
        data = bytearray(package.read_bytes())
        data[len(data) // 2] ^= 0xFF
        package.write_bytes(bytes(data))
        count = len(self.glance.images)
        task = self.register(str(package))
        self.assertEqual(TaskState.FAILED, task.state)
        self.assertIn("import package", task.error)
        self.assertEqual(count, len(self.glance.images))
        self.assert_no_leftovers()

    def test_create_base_from_a_running_instance(self) -> None:
        server = self.boot(self.images.disk_image)
        self.customise(server, marker=b"state worth keeping")
        request = CloudletCreateBaseRequest(task_id=str(uuid.uuid4()), instance_uuid=server["id"],
                                            name="warm-web")
        task = self.wait(self.client.create_base(self.ctxt, HOST, request))
        self.assertEqual(TaskState.SUCCEEDED, task.state, task.error)
        self.assertNotEqual(self.base.id, task.base_id)
        self.assert_linked_pair(task.images, task.base_id)
        self.assertEqual(task.base_id, self.rebuilt_id(task.images))  # id = content digest
        new_base = self.driver.cache.get(task.base_id)
        self.assertIn(b"state worth keeping", new_base.memory_path.read_bytes())
        self.assertEqual(cf.MEMORY_MIB, new_base.config["memory_mib"])
        server = self.api.get_server(server["id"])
        self.assertEqual(("ACTIVE", None), (server["status"], server["OS-EXT-STS:task_state"]))
        self.assertTrue(self.domain_running(server))
        self.assert_no_leftovers()
        # a new server boots resumed from the new base
        self.libvirt_fx.customise = None
        second = self.boot(task.images["disk"])
        self.assertEqual(self.libvirt_fx.streams[server["id"]],
                         self.libvirt_fx.streams[second["id"]])

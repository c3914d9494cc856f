"""Base VMs into Glance through the cloudlet RPC endpoint (cloudlet_nova.basevm): registered from
an engine package, created from a running instance. fakelibvirt stands for libvirtd + QEMU."""

from __future__ import annotations

import contextlib
import io
import shutil
import types
import uuid
from pathlib import Path

import fixtures
from nova import context as nova_context
from nova import exception

from cloudlet.basevm.package import export_base
from cloudlet.basevm.store import BaseStore
from cloudlet.home import CloudletHome
from cloudlet_nova import glance
from cloudlet_nova.cmd import manage
from cloudlet_nova.objects import (
    CloudletCreateBaseRequest,
    CloudletRegisterBaseRequest,
    TaskState,
)
from cloudlet_nova.tests import fixtures as cf
from cloudlet_nova.tests.capture_base import HOST, CaptureTestBase


class BaseTest(CaptureTestBase):
    def setUp(self) -> None:
        super().setUp()
        self.flags(base_import_dir=str(self.scratch), group="cloudlet")

    def register(self, package: str, name: str | None = None):  # noqa: ANN201
        return self.wait(self.client.register_base(self.ctxt, HOST, self.request(package, name)))

    @staticmethod
    def request(package: str, name: str | None = None) -> CloudletRegisterBaseRequest:
        return CloudletRegisterBaseRequest(task_id=str(uuid.uuid4()), package_path=package,
                                           name=name)

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
        # the disk image tells users what the base was saved with (cloudlet-api's configuration)
        recorded = glance.configuration(self.glance.show(None, task.images["disk"])["properties"])
        self.assertEqual({k: new_base.config[k] for k in ("machine", "memory_mib", "vcpus", "cpu")},
                         {k: recorded[k] for k in ("machine", "memory_mib", "vcpus", "cpu")})
        self.assertEqual(new_base.config["nic_model"], recorded["devices"]["nic_model"])
        server = self.api.get_server(server["id"])
        self.assertEqual(("ACTIVE", None), (server["status"], server["OS-EXT-STS:task_state"]))
        self.assertTrue(self.domain_running(server))
        self.assert_no_leftovers()
        # a new server boots resumed from the new base
        self.libvirt_fx.customise = None
        second = self.boot(task.images["disk"])
        self.assertEqual(self.libvirt_fx.streams[server["id"]],
                         self.libvirt_fx.streams[second["id"]])

    def test_register_is_for_admins_and_reads_only_the_import_directory(self) -> None:
        package = self.scratch / "web.cbase"
        export_base(self.home, self.base.id, package)
        member = nova_context.RequestContext(user_id="a", project_id=cf.PROJECT_A,
                                             roles=["reader", "member"])
        e = self.assertRaises(exception.Forbidden, self.client.register_base, member, HOST,
                              self.request(str(package)))
        self.assertIn("for admins", str(e))
        outside = Path(self.useFixture(fixtures.TempDir()).path)
        shutil.copyfile(package, outside / "web.cbase")
        (self.scratch / "escape.cbase").symlink_to(outside / "web.cbase")
        (self.scratch / "sub").mkdir()
        for path, words in ((str(outside / "web.cbase"), "outside the import directory"),
                            ("escape.cbase", "outside the import directory"),
                            ("sub/../web.cbase", "contains '..'"),
                            (f"{self.scratch}/../web.cbase", "contains '..'"),
                            ("/etc/passwd", "outside the import directory")):
            e = self.assertRaises(exception.Invalid, self.client.register_base, self.ctxt, HOST,
                                  self.request(path))
            self.assertIn(words, str(e))
        self.flags(base_import_dir=None, group="cloudlet")
        e = self.assertRaises(exception.Invalid, self.client.register_base, self.ctxt, HOST,
                              self.request(str(package)))
        self.assertIn("set [cloudlet] base_import_dir", str(e))
        self.assertEqual([], self.driver.cache.base_ids())
        self.assertEqual([], list(self.driver.rpc_server.endpoint.store.directory.iterdir()))

    def test_cloudlet_manage_registers_a_package_for_an_admin(self) -> None:
        # a name relative to the host's import directory; the admin's context as
        # cloudlet-manage builds it from a Keystone token
        export_base(self.home, self.base.id, self.scratch / "web.cbase")
        admin = nova_context.RequestContext(user_id="admin", project_id=cf.PROJECT_A,
                                            roles=["reader", "member", "admin"], is_admin=True)
        category = types.SimpleNamespace(name="base", action="register", package="web.cbase",
                                         image_name="web", public=False, wait_timeout=120)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            status = manage.run(self.client, admin, HOST, category)
        self.assertEqual(0, status)
        lines = dict(line.split() for line in out.getvalue().splitlines())
        self.assertEqual(self.base.id, lines["base_id"])
        self.assert_linked_pair({"disk": lines["disk_image"], "memory": lines["memory_image"]},
                                self.base.id)
        self.boot(lines["disk_image"])  # and it boots

"""CloudletDriver inside Nova's own functional framework: API, conductor, scheduler and compute
services in one process, with Nova's Placement, Glance and Neutron fixtures.

Run with `python -m stestr --test-path cloudlet_nova/tests run` (or testtools.run), not pytest.

fakelibvirt stands for libvirtd + QEMU, which cannot run inside this framework; it is extended
with virDomainSaveFlags / virDomainRestoreFlags (fixtures.SaveRestoreFixture) that read and write
real libvirt save files. Nova's GlanceFixture stands for Glance and is made to enforce image
ownership and visibility and to compute content hashes as Glance does
(fixtures.GlanceAsGlanceFixture). Everything else is real: the engine's base VM files and
overlays, the base cache, synthesis, state files, placement traits and the scheduler weigher.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from xml.etree import ElementTree

import fixtures
from nova import context as nova_context
from nova.tests.functional.libvirt import base as libvirt_base

from cloudlet.home import CloudletHome
from cloudlet_nova import cache as base_cache
from cloudlet_nova import driver as cloudlet_driver
from cloudlet_nova import state
from cloudlet_nova.glance import GlanceImages
from cloudlet_nova.tests import fixtures as cf


class CloudletDriverTestBase(libvirt_base.ServersTestBase):
    microversion = "latest"
    ADDITIONAL_FILTERS: list[str] = []

    def setUp(self) -> None:
        super().setUp()
        self.useFixture(cf.GlanceAsGlanceFixture(self.glance))
        scratch = Path(self.useFixture(fixtures.TempDir()).path)
        # nova's test base leaves state_path at the installed package: one per test instead, so
        # parallel test processes never share host state (task records, locks)
        self.flags(state_path=str(scratch / "state"))
        self.libvirt_fx = self.useFixture(cf.SaveRestoreFixture(scratch / "fakelibvirt"))
        (scratch / "fakelibvirt").mkdir()
        self.defined: list[str] = []
        orig_define = cf.fakelibvirt.Connection.defineXML

        def define(conn, xml):  # the XML Nova generated, as libvirt received it
            self.defined.append(xml)
            return orig_define(conn, xml)

        self.useFixture(fixtures.MonkeyPatch(
            f"{cf.fakelibvirt.__name__}.Connection.defineXML", define))
        self.home = CloudletHome(scratch / "engine")  # where the test makes its base VMs
        self.base = cf.make_base(self.home)
        self.images = cf.upload_base(self.glance, self.base)
        self.flavor_id = self._create_flavor(memory_mb=cf.MEMORY_MIB, vcpu=1, disk=1, ephemeral=0)

    def _setup_compute_service(self) -> None:
        self.flags(compute_driver="cloudlet.CloudletDriver")  # through the nova.virt shim

    def instance_dir(self, server: dict) -> Path:
        return Path(self.flags_instances_path) / server["id"]

    @property
    def flags_instances_path(self) -> str:
        from nova import conf
        return conf.CONF.instances_path

    def boot(self, image: str, expected_state: str = "ACTIVE", **kw) -> dict:
        return self._create_server(image_uuid=image, flavor_id=kw.pop("flavor_id", self.flavor_id),
                                   networks="none", expected_state=expected_state, **kw)

    def assert_fault(self, server: dict, *words: str, restores: int = 0) -> None:
        server = self.api_fixture.admin_api.get_server(server["id"])  # any project's
        self.assertEqual("ERROR", server["status"])
        message = server["fault"]["message"]
        for w in words:
            self.assertIn(w, message)
        self.assertNotIn("reschedul", message.lower())
        self.assertFalse(self.instance_dir(server).exists(), "instance directory left behind")
        cache = self.computes["compute1"].driver.cache
        self.assertEqual([], os.listdir(cache.home.tmp), "staging left in the base cache")
        self.assertEqual(restores, len(self.libvirt_fx.restores), "a snapshot was restored")


class SpawnTest(CloudletDriverTestBase):
    def test_driver_loads_through_the_nova_virt_shim(self) -> None:
        self.start_compute()
        self.assertIsInstance(self.computes["compute1"].driver, cloudlet_driver.CloudletDriver)

    def test_boot_from_base_restores_its_memory(self) -> None:
        self.start_compute()
        server = self.boot(self.images.disk_image)
        [r] = self.libvirt_fx.restores
        nova_xml = self.defined[-1]
        self.assertIn(server["id"], nova_xml)
        self.assertEqual(nova_xml, r.dxml)  # restored with the XML Nova generated for it
        self.assertEqual(nova_xml, r.header_xml)
        self.assertEqual(hashlib.sha256(cf.base_stream(self.base)).hexdigest(), r.stream_sha256)
        self.assertEqual(cf.SaveRestoreFixture.SAVE_RUNNING, r.flags)
        self.assertFalse(os.path.exists(r.save_file), "save file left behind")
        st = state.load(self.instance_dir(server))
        self.assertEqual(("base-disk", self.base.id, False),
                         (st.kind, st.base_id, st.restore_pending))
        cached = self.computes["compute1"].driver.cache.get(self.base.id)
        self.assertEqual(st.disk, str(cached.disk_path))
        self.assertEqual(0o711, os.stat(cached.path).st_mode & 0o777)  # QEMU's user reaches it
        self.assertEqual(0o444, os.stat(cached.disk_path).st_mode & 0o777)
        self._delete_server(server)
        self.assertFalse(self.instance_dir(server).exists())

    def test_boot_from_overlay_synthesizes_and_restores(self) -> None:
        self.start_compute()
        ov = cf.make_overlay(self.base, Path(self.useFixture(fixtures.TempDir()).path))
        overlay_id = cf.upload_overlay(self.glance, ov.path.read_bytes(), self.base.id,
                                       self.images.disk_image)
        server = self.boot(overlay_id)
        st = state.load(self.instance_dir(server))
        self.assertEqual(("overlay", overlay_id), (st.kind, st.image_id))
        self.assertEqual(ov.disk_sha256, hashlib.sha256(Path(st.disk).read_bytes()).hexdigest())
        self.assertTrue(Path(st.disk).is_relative_to(self.instance_dir(server)))
        [r] = self.libvirt_fx.restores
        self.assertEqual(ov.stream_sha256, r.stream_sha256)  # the customised memory
        self.assertEqual(self.defined[-1], r.dxml)
        self.assertFalse(Path(st.memory).exists(), "synthesized memory kept after the restore")

    def test_kernel_booted_base_resumes_into_a_domain_booting_its_kernel(self) -> None:
        # QEMU's direct-boot option ROM is part of the saved hardware: no kernel, no restore
        base = cf.make_base(self.home, seed=2, append="console=ttyS0 quiet")
        images = cf.upload_base(self.glance, base)
        self.start_compute()
        server = self.boot(images.disk_image)
        [r] = self.libvirt_fx.restores
        inst = self.instance_dir(server)
        os_el = ElementTree.fromstring(r.dxml).find("os")
        self.assertEqual(str(inst / "kernel"), os_el.findtext("kernel"))
        self.assertEqual(str(inst / "ramdisk"), os_el.findtext("initrd"))
        self.assertEqual("console=ttyS0 quiet", os_el.findtext("cmdline"))
        self.assertEqual(base.kernel_path.read_bytes(), (inst / "kernel").read_bytes())
        self._reboot_server(server, hard=True)  # the disk boots that kernel again
        os_el = ElementTree.fromstring(self.defined[-1]).find("os")
        self.assertEqual(str(inst / "kernel"), os_el.findtext("kernel"))

    def test_trait_for_each_cached_base(self) -> None:
        self.start_compute()
        rp = self.compute_rp_uuids["compute1"]
        trait = base_cache.base_trait(self.base.id)
        self.assertNotIn(trait, self._get_provider_traits(rp))
        self.boot(self.images.disk_image)
        self._run_periodics()
        self.assertIn(trait, self._get_provider_traits(rp))
        self.assertEqual("CUSTOM_CLOUDLET_BASE_" + self.base.id[:32].upper(), trait)

    def test_state_survives_a_compute_restart(self) -> None:
        self.start_compute()
        server = self.boot(self.images.disk_image)
        self.restart_compute_service("compute1")
        st = state.load(self.instance_dir(server))
        self.assertEqual((self.base.id, False), (st.base_id, st.restore_pending))
        self._run_periodics()
        self.assertIn(base_cache.base_trait(self.base.id),
                      self._get_provider_traits(self.compute_rp_uuids["compute1"]))
        # a hard reboot after the restart boots the disk: the snapshot is not restored again
        self._reboot_server(server, hard=True)
        self.assertEqual(1, len(self.libvirt_fx.restores))


class FaultTest(CloudletDriverTestBase):
    def setUp(self) -> None:
        super().setUp()
        self.start_compute()

    def test_wrong_base(self) -> None:
        other = cf.make_base(self.home, seed=1)
        other_images = cf.upload_base(self.glance, other)
        ov = cf.make_overlay(self.base, Path(self.useFixture(fixtures.TempDir()).path))
        # the overlay claims the other base: the engine finds it was made for self.base
        overlay_id = cf.upload_overlay(self.glance, ov.path.read_bytes(), other.id,
                                       other_images.disk_image)
        server = self.boot(overlay_id, expected_state="ERROR")
        self.assert_fault(server, "needs another base VM", self.base.id)

    def test_tampered_overlay(self) -> None:
        ov = cf.make_overlay(self.base, Path(self.useFixture(fixtures.TempDir()).path))
        data = bytearray(ov.path.read_bytes())
        data[-100] ^= 0x01  # a bit in the last frame
        overlay_id = cf.upload_overlay(self.glance, bytes(data), self.base.id,
                                       self.images.disk_image)
        server = self.boot(overlay_id, expected_state="ERROR")
        self.assert_fault(server, "digest mismatch", "fails its")

    def test_tampered_base_disk(self) -> None:
        disk = bytearray(self.base.disk_path.read_bytes())
        disk[4096] ^= 0xFF
        images = cf.upload_base(self.glance, self.base, disk_data=bytes(disk))
        server = self.boot(images.disk_image, expected_state="ERROR")
        self.assert_fault(server, "digest mismatch", "hash to base id")
        self.assertEqual([], self.computes["compute1"].driver.cache.base_ids())

    def test_missing_memory_image(self) -> None:
        images = cf.upload_base(self.glance, self.base, memory_image="no-such-image")
        server = self.boot(images.disk_image, expected_state="ERROR")
        self.assert_fault(server, f"may not resume base {self.base.id[:16]}",
                          "memory image no-such-image is missing or not readable by this project")

    def test_flavor_memory_differs_from_the_snapshot(self) -> None:
        flavor = self._create_flavor(memory_mb=2 * cf.MEMORY_MIB, vcpu=1, disk=1, ephemeral=0)
        server = self.boot(self.images.disk_image, expected_state="ERROR", flavor_id=flavor)
        self.assert_fault(server, f"{cf.MEMORY_MIB} MB of RAM", f"not {2 * cf.MEMORY_MIB} MB")

    def test_restore_refused_by_libvirt(self) -> None:
        # libvirt's ABI check refusing the snapshot (e.g. a base saved with other devices): what
        # real libvirt says is stood in for, fakelibvirt has no QEMU to refuse it
        self.start_compute("compute2")  # a reschedule would have somewhere to go
        calls = []

        def refuse(conn, frm, dxml=None, flags=0):
            calls.append(frm)
            raise cf.fakelibvirt.make_libvirtError(
                cf.fakelibvirt.libvirtError,
                "internal error: qemu unexpectedly closed the monitor: 2026-12-05T14:07:21.076Z "
                "qemu-system-x86_64: Unknown ramblock \"0000:00:03.0/e1000.rom\", cannot accept "
                "migration", error_code=cf.fakelibvirt.VIR_ERR_INTERNAL_ERROR)  # as libvirt 9 says

        self.useFixture(fixtures.MonkeyPatch(
            f"{cf.fakelibvirt.__name__}.Connection.restoreFlags", refuse))
        server = self.boot(self.images.disk_image, expected_state="ERROR")
        self.assertEqual(1, len(calls), "the build was retried")
        self.assert_fault(server, f"Base VM {self.base.id[:16]}",
                          "saved hardware does not match this server's domain",
                          'QEMU: Unknown ramblock "0000:00:03.0/e1000.rom", cannot accept '
                          "migration")
        for compute in self.computes.values():
            conn = compute.driver._host.get_connection()
            self.assertEqual([], conn.listAllDomains(), "a domain left defined")


class WeigherTest(CloudletDriverTestBase):
    def _setup_scheduler_service(self):  # noqa: ANN202 - nova's hook
        self.flags(weight_classes=["nova.scheduler.weights.all_weighers",
                                   "cloudlet_nova.weigher.CloudletBaseWeigher"],
                   group="filter_scheduler")
        return super()._setup_scheduler_service()

    def setUp(self) -> None:
        super().setUp()
        root = Path(self.useFixture(fixtures.TempDir()).path)
        for host in ("compute1", "compute2"):
            self.flags(cache_dir=str(root / host), group="cloudlet")
            self.start_compute(host)

    def test_prefers_the_host_holding_the_base(self) -> None:
        ctx = nova_context.get_admin_context()
        glance = GlanceImages(ctx)
        self.computes["compute2"].driver.cache.ensure(
            glance, *glance.base_images(glance.describe(self.images.disk_image)))
        self._run_periodics()
        ov = cf.make_overlay(self.base, Path(self.useFixture(fixtures.TempDir()).path))
        overlay_id = cf.upload_overlay(self.glance, ov.path.read_bytes(), self.base.id,
                                       self.images.disk_image)
        for _ in range(2):  # without the weigher the second would spread to compute1
            server = self.boot(overlay_id)
            self.assertEqual("compute2", server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual([], self.computes["compute1"].driver.cache.base_ids())

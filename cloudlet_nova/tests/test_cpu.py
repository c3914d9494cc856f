"""A base pins the CPU model it was saved on (docs/nova.md, "The CPU a base was saved on").

fakelibvirt stands for libvirtd + QEMU (see test_driver): its host CPU is Penryn, its
compareHypervisorCPU accepts that model only, and its domain capabilities mark Penryn and
Nehalem usable but not Skylake-Client. The same checks against a real libvirtd under TCG are
in tests/functional/test_cpu_pin.py.
"""

from __future__ import annotations

from xml.etree import ElementTree

import fixtures

from cloudlet_nova import state
from cloudlet_nova.tests import fixtures as cf
from cloudlet_nova.tests.test_driver import CloudletDriverTestBase


class CpuPinTest(CloudletDriverTestBase):
    def setUp(self) -> None:
        super().setUp()
        self.downloads: list[str] = []
        real = self.glance.download
        self.useFixture(fixtures.MockPatchObject(
            self.glance, "download",
            lambda ctx, image_id, **kw: self.downloads.append(image_id) or real(ctx, image_id,
                                                                               **kw)))
        self.start_compute()

    def cpu_of(self, xml: str) -> ElementTree.Element:
        cpu = ElementTree.fromstring(xml).find("cpu")
        self.assertIsNotNone(cpu)
        return cpu

    def test_the_domain_resumes_exactly_the_saved_model_and_features(self) -> None:
        # Nova's cpu_mode would give it host-model: the base's model and flags win
        self.flags(cpu_mode="host-model", group="libvirt")
        base = cf.make_base(self.home, seed=3, cpu="Penryn,+xtpr,-monitor")
        images = cf.upload_base(self.glance, base)
        server = self.boot(images.disk_image)
        [restore] = self.libvirt_fx.restores
        cpu = self.cpu_of(restore.dxml)
        self.assertEqual(("custom", "exact", "partial"),
                         (cpu.get("mode"), cpu.get("match"), cpu.get("check")))
        self.assertEqual("Penryn", cpu.findtext("model"))
        self.assertEqual("forbid", cpu.find("model").get("fallback"))
        self.assertEqual({("xtpr", "require"), ("monitor", "disable")},
                         {(f.get("name"), f.get("policy")) for f in cpu.findall("feature")})
        self.assertIsNotNone(cpu.find("topology"))  # Nova's topology is kept
        # later domains of the server (a hard reboot) keep the model
        self._reboot_server(server, hard=True)
        self.assertEqual("Penryn", self.cpu_of(self.defined[-1]).findtext("model"))

    def test_a_model_the_host_cannot_provide_is_refused_before_any_download(self) -> None:
        # Nehalem is in the hypervisor's list (the trait is reported, the scheduler passes) but
        # this host's CPU cannot provide it: libvirt's comparison refuses it
        base = cf.make_base(self.home, seed=4, cpu="Nehalem")
        images = cf.upload_base(self.glance, base)
        server = self.boot(images.disk_image, expected_state="ERROR")
        self.assert_fault(server, "needs CPU model Nehalem", "cannot provide")
        self.assertEqual([], self.downloads)
        self.assertIsNone(self.computes["compute1"].driver.cache.get(base.id))

    def test_an_unannounced_model_is_refused_from_the_base_record(self) -> None:
        # images without the cloudlet_cpu property (or lying about it): the downloaded base's
        # own record decides, before anything is restored
        base = cf.make_base(self.home, seed=5, cpu="Nehalem")
        images = cf.upload_base(self.glance, base, announce_cpu=False)
        server = self.boot(images.disk_image, expected_state="ERROR")
        self.assert_fault(server, "needs CPU model Nehalem")

    def test_the_scheduler_sends_no_server_to_a_host_without_the_model(self) -> None:
        rp = self.compute_rp_uuids["compute1"]
        traits = self._get_provider_traits(rp)
        self.assertIn("CUSTOM_CLOUDLET_CPU_PENRYN", traits)
        self.assertNotIn("CUSTOM_CLOUDLET_CPU_SKYLAKE_CLIENT", traits)  # usable='no'
        base = cf.make_base(self.home, seed=6, cpu="Skylake-Client")
        images = cf.upload_base(self.glance, base)
        server = self.boot(images.disk_image, expected_state="ERROR")
        server = self.api_fixture.admin_api.get_server(server["id"])
        self.assertIn("No valid host", server["fault"]["message"])
        self.assertEqual([], self.downloads)
        self.assertEqual([], self.libvirt_fx.restores)

    def test_a_base_without_a_named_model_keeps_novas_cpu(self) -> None:
        # bases made before pinning recorded Nova's CPU mode: they resume as they did
        self.flags(cpu_mode="host-model", group="libvirt")
        base = cf.make_base(self.home, seed=7, cpu="host-model")
        images = cf.upload_base(self.glance, base)
        props = self.glance.show(None, images.disk_image)["properties"]
        self.assertNotIn("cloudlet_cpu", props)
        server = self.boot(images.disk_image)
        [restore] = self.libvirt_fx.restores
        self.assertEqual("host-model", self.cpu_of(restore.dxml).get("mode"))
        self.assertEqual("host-model", state.load(self.instance_dir(server)).cpu)

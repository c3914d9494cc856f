"""Project isolation of cached bases: project B never resumes project A's base, whatever its
images say, on a cache hit or a miss; legitimate sharing (public bases, overlays over them, a
byte-identical copy) still boots. Glance is Nova's GlanceFixture made to enforce ownership and
visibility and to compute content hashes as Glance does (fixtures.GlanceAsGlanceFixture):
Glance itself cannot run inside Nova's functional framework.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import fixtures
import numpy as np
import zstandard
from nova import context as nova_context
from nova import objects as nova_objects
from nova.scheduler import host_manager
from nova.scheduler import weights as nova_weights
from nova.tests.functional.api import client as api_client

from cloudlet_nova import cache as base_cache
from cloudlet_nova import glance, weigher
from cloudlet_nova.tests import fixtures as cf
from cloudlet_nova.tests.test_driver import CloudletDriverTestBase

MiB = 1 << 20


class IsolationTest(CloudletDriverTestBase):
    def setUp(self) -> None:
        super().setUp()
        self.start_compute()
        self.cache = self.computes["compute1"].driver.cache
        self.api_b = api_client.TestOpenStackClient(
            "user-b", self.api.base_url, project_id=cf.PROJECT_B, roles=["reader", "member"])
        self.api_b.microversion = self.api.microversion
        # A (self.api's project) boots its private base: the base is now cached on the host
        self.a_server = self.boot(self.images.disk_image)
        self.assertEqual(1, len(self.libvirt_fx.restores))

    def boot_b(self, image: str, expected_state: str = "ACTIVE") -> dict:
        return self._create_server(image_uuid=image, flavor_id=self.flavor_id, networks="none",
                                   expected_state=expected_state, api=self.api_b)

    def upload_b(self, data: bytes, properties: dict[str, str]) -> str:
        """An image of project B's own: any data, any properties (anyone can set them)."""
        image = self.glance.create(self.b_context(), {
            "name": "b", "disk_format": "raw", "container_format": "bare",
            "visibility": "private", "properties": properties}, data=io.BytesIO(data))
        return image["id"]

    @staticmethod
    def b_context() -> nova_context.RequestContext:
        return nova_context.RequestContext(user_id="user-b", project_id=cf.PROJECT_B,
                                           roles=["reader", "member"])

    def assert_refused(self, server: dict, *words: str) -> None:
        """ERROR with the fault, nothing resumed for it (A's one restore only), no domain."""
        self.assert_fault(server, *words, restores=1)
        conn = self.computes["compute1"].driver._host.get_connection()
        self.assertNotIn(server["id"], [d.UUIDString() for d in conn.listAllDomains(0)])

    # -- attacks ---------------------------------------------------------------------------

    def test_forged_disk_image_labelled_with_a_base_id(self) -> None:
        # the attack as found: 1 MiB of B's own, labelled base-disk of A's base, its memory link
        # naming A's private memory image
        forged = self.upload_b(np.random.default_rng(5).bytes(MiB), glance.base_disk_properties(
            self.base.id, self.images.memory_image))
        server = self.boot_b(forged, expected_state="ERROR")
        self.assert_refused(server, f"may not resume base {self.base.id[:16]}",
                            f"memory image {self.images.memory_image} is missing or not "
                            "readable by this project")

    def test_forged_pair_labelled_with_a_base_id(self) -> None:
        # B's own disk and memory images, both labelled with A's base id: readable, but their
        # contents are not A's base (fetched and recomputed: a cache hit proves nothing)
        other = cf.make_base(self.home, seed=3)
        bundle = io.BytesIO()
        glance.write_memory_bundle(other, bundle)
        memory = self.upload_b(bundle.getvalue(), glance.base_memory_properties(self.base.id, "x"))
        forged = self.upload_b(other.disk_path.read_bytes(),
                               glance.base_disk_properties(self.base.id, memory))
        server = self.boot_b(forged, expected_state="ERROR")
        self.assert_refused(server, "failed verification", "its contents are not those of base")
        self.assertEqual([self.base.id], self.cache.base_ids())

    def test_a_private_image_id_is_refused_by_the_api(self) -> None:
        e = self.assertRaises(api_client.OpenStackApiException, self.api_b.post_server,
                              {"server": self._build_server(image_uuid=self.images.disk_image,
                                                            flavor_id=self.flavor_id,
                                                            networks="none")})
        self.assertEqual(400, e.response.status_code)
        self.assertEqual(1, len(self.libvirt_fx.restores))

    def test_overlay_pointing_at_a_private_base_disk_image(self) -> None:
        ov = cf.make_overlay(self.base, Path(self.useFixture(fixtures.TempDir()).path))
        overlay = self.upload_b(ov.path.read_bytes(), glance.overlay_properties(
            self.base.id, self.images.disk_image))
        server = self.boot_b(overlay, expected_state="ERROR")
        self.assert_refused(server, f"may not resume base {self.base.id[:16]}",
                            f"base disk image {self.images.disk_image} is missing or not "
                            "readable by this project")

    def test_overlay_pointing_at_a_forged_base_disk_image(self) -> None:
        forged = self.upload_b(np.random.default_rng(6).bytes(MiB), glance.base_disk_properties(
            self.base.id, self.images.memory_image))
        ov = cf.make_overlay(self.base, Path(self.useFixture(fixtures.TempDir()).path))
        overlay = self.upload_b(ov.path.read_bytes(), glance.overlay_properties(
            self.base.id, forged))
        server = self.boot_b(overlay, expected_state="ERROR")
        self.assert_refused(server, f"memory image {self.images.memory_image} is missing or not "
                            "readable by this project")

    def test_image_without_a_glance_hash_is_refused(self) -> None:
        # e.g. an image whose data Glance never hashed (registered by location)
        images = cf.upload_base(self.glance, self.base)
        for key in ("os_hash_algo", "os_hash_value"):
            self.glance.images[images.disk_image].pop(key)
        server = self.boot(images.disk_image, expected_state="ERROR")
        self.assert_refused(server, f"Glance has no os_hash_value for image {images.disk_image}")

    # -- what still works ------------------------------------------------------------------

    def test_public_base_and_an_overlay_of_b_over_it(self) -> None:
        public = cf.upload_base(self.glance, self.base, visibility="public")
        self.boot_b(public.disk_image)
        self.assertEqual(hashlib.sha256(cf.base_stream(self.base)).hexdigest(),
                         self.libvirt_fx.restores[-1].stream_sha256)
        ov = cf.make_overlay(self.base, Path(self.useFixture(fixtures.TempDir()).path))
        overlay = self.upload_b(ov.path.read_bytes(), glance.overlay_properties(
            self.base.id, public.disk_image))
        self.boot_b(overlay)
        self.assertEqual(ov.stream_sha256, self.libvirt_fx.restores[-1].stream_sha256)
        self.assertEqual(3, len(self.libvirt_fx.restores))

    def test_byte_identical_copy_boots_from_the_cache_without_a_download(self) -> None:
        # B's own copy of the base's images: same Glance digests, so B has the content already
        bundle = io.BytesIO()
        glance.write_memory_bundle(self.base, bundle)
        memory = self.upload_b(bundle.getvalue(), glance.base_memory_properties(self.base.id, "x"))
        disk = self.upload_b(self.base.disk_path.read_bytes(),
                             glance.base_disk_properties(self.base.id, memory))
        downloads = []
        real = self.glance.download
        self.useFixture(fixtures.MockPatchObject(
            self.glance, "download",
            lambda ctx, image_id, **kw: downloads.append(image_id) or real(ctx, image_id, **kw)))
        self.boot_b(disk)
        self.assertEqual([], downloads)
        self.assertEqual(2, len(self.libvirt_fx.restores))

    def test_same_base_in_other_images_is_verified_then_recorded(self) -> None:
        # a public pair holding the same base, its memory bundle compressed otherwise (another
        # digest): fetched and compared with the cached base once, then known
        own = io.BytesIO()
        glance.write_memory_bundle(self.base, own)
        tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(own.getvalue())).read()
        bundle = zstandard.ZstdCompressor(level=1).compress(tar)
        self.assertNotEqual(own.getvalue(), bundle)
        public = cf.upload_base(self.glance, self.base, visibility="public", memory_data=bundle)
        memory_hash = glance.content_hash(self.glance.show(None, public.memory_image))
        disk_hash = glance.content_hash(self.glance.show(None, public.disk_image))
        self.assertFalse(self.cache.proven(self.base.id, disk_hash, memory_hash))
        self.boot_b(public.disk_image)
        self.assertTrue(self.cache.proven(self.base.id, disk_hash, memory_hash))
        self.assertEqual([], list(self.cache.home.tmp.iterdir()))


class WeigherIsolationTest(CloudletDriverTestBase):
    """The weigher looks the base up with the request's context, per request."""

    def setUp(self) -> None:
        super().setUp()
        self.start_compute()
        admin = nova_context.get_admin_context()
        images = glance.GlanceImages(admin)
        self.computes["compute1"].driver.cache.ensure(
            images, *images.base_images(images.describe(self.images.disk_image)))
        self._run_periodics()
        self.host = host_manager.HostState("compute1", "compute1", "cell1")
        self.host.uuid = self.compute_rp_uuids["compute1"]

    def weigh(self, context: nova_context.RequestContext | None, image_id: str) -> float:
        spec = nova_objects.RequestSpec(image=nova_objects.ImageMeta(id=image_id))
        spec._context = context
        [weight] = weigher.CloudletBaseWeigher().weigh_objects(
            [nova_weights.WeighedHost(self.host, 0.0)], spec)
        return weight

    def test_weight_only_for_a_project_that_can_read_the_base(self) -> None:
        ov = cf.make_overlay(self.base, Path(self.useFixture(fixtures.TempDir()).path))
        a_overlay = cf.upload_overlay(self.glance, ov.path.read_bytes(), self.base.id,
                                      self.images.disk_image, visibility="public")
        project_a = nova_context.RequestContext(user_id="a", project_id=cf.PROJECT_A,
                                                roles=["member"])
        project_b = nova_context.RequestContext(user_id="b", project_id=cf.PROJECT_B,
                                                roles=["member"])
        self.assertIn(base_cache.base_trait(self.base.id), self._get_provider_traits(
            self.host.uuid))
        self.assertEqual(1.0, self.weigh(project_a, self.images.disk_image))
        self.assertEqual(1.0, self.weigh(project_a, a_overlay))
        # B reads the (public) overlay, not the private base it points at
        self.assertEqual(0.0, self.weigh(project_b, a_overlay))
        self.assertEqual(0.0, self.weigh(project_b, self.images.disk_image))
        # a forged image of B's labelled with A's base id: A's memory image is not B's to read
        forged = self.glance.create(project_b, {
            "name": "forged", "disk_format": "raw", "container_format": "bare",
            "properties": glance.base_disk_properties(self.base.id, self.images.memory_image),
        }, data=io.BytesIO(b"x" * 4096))["id"]
        self.assertEqual(0.0, self.weigh(project_b, forged))
        self.assertEqual(0.0, self.weigh(None, self.images.disk_image))  # never as admin
        # answers are not kept across requests: once public, B's request weighs it
        for image_id in (self.images.disk_image, self.images.memory_image):
            self.glance.images[image_id]["visibility"] = "public"
        self.assertEqual(1.0, self.weigh(project_b, a_overlay))
